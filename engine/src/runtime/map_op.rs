//! Map operators: each batch becomes a job on the process's thread pool; the operator holds the
//! batch's epoch capability until the result is back, so the gate counts work on the pool.
//!
//! A chain of maps (each the only consumer of the one before, on the same workers) runs as one
//! timely operator and one pool job per batch, saving a round trip through the worker per map;
//! each map in the chain is still counted and traced as its own node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::panics;
use super::shared::NodeRuntime;
use crate::data::Batch;
use crate::error::OpError;
use crate::metrics::IdleClock;
use crate::operator::Map;

/// A finished job: its id, and the output batches or the index in the chain of the map that
/// failed.
type Done = (u64, Result<Vec<Batch>, (usize, OpError)>);

/// The maps of a chain that all have an instance on this worker.
type Links = Arc<Vec<(NodeRuntime, Arc<dyn Map>)>>;

/// One map of a chain: the node and its instance (`None` on workers outside the node's
/// placement or when the instance failed to build; batches reaching it are dropped).
pub(crate) type ChainLink = (NodeRuntime, Option<Arc<dyn Map>>);

/// Builds the operator for a chain of one or more maps.
pub(crate) fn build<'s>(input: StreamVec<'s, u64, Batch>, chain: Vec<ChainLink>) -> StreamVec<'s, u64, Batch> {
    let node = chain[0].0.clone();
    let last = chain[chain.len() - 1].0.clone();
    let chain: Option<Links> =
        chain.into_iter().map(|(n, m)| m.map(|m| (n, m))).collect::<Option<Vec<_>>>().map(Arc::new);
    let scope = input.scope();
    let mut builder = OperatorBuilder::new(format!("map {}", node.id), scope);
    let info = builder.operator_info();
    let mut input = builder.new_input(input, Pipeline);
    let (output, stream) = builder.new_output::<Vec<Batch>>();
    let mut output = OutputBuilder::<u64, CapacityContainerBuilder<Vec<Batch>>>::from(output);
    let activator = scope.worker().sync_activator_for(info.address.to_vec());
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let track = Arc::<str>::from(node.track("pool"));

    builder.build(move |caps| {
        drop(caps);
        let mut next_id = 0u64;
        let mut pending: HashMap<u64, Capability<u64>> = HashMap::new();
        let mut idle = IdleClock::new();
        move |frontiers| {
            input.for_each(|cap, data| {
                let Some(held) = cap.retain_least(0) else {
                    return;
                };
                for batch in data.drain(..) {
                    node.metrics.record_in(&batch);
                    let Some(chain) = chain.as_ref() else { continue };
                    let (id, epoch) = (next_id, *held.time());
                    next_id += 1;
                    pending.insert(id, held.clone());
                    idle.started(&node.metrics);
                    let (chain, done, activator, track) =
                        (Arc::clone(chain), done_tx.clone(), activator.clone(), Arc::clone(&track));
                    node.shared.pool.spawn(move || {
                        let result = run_chain(&chain, batch, epoch, &track);
                        if done.send((id, result)).is_ok() {
                            let _ = activator.activate();
                        }
                    });
                }
            });
            let mut out = output.activate();
            for (id, result) in done_rx.try_iter() {
                let held = pending.remove(&id).expect("a result for a pending job");
                idle.finished();
                match result {
                    Ok(batches) => {
                        for batch in batches {
                            last.metrics.record_out(&batch);
                            node.shared.status.record_bytes(*held.time(), batch.byte_size() as u64);
                            out.session(&held).give(batch);
                        }
                    }
                    Err((failed, error)) => match &chain {
                        Some(links) => links[failed].0.fail(error),
                        None => node.fail(error),
                    },
                }
                // Dropping `held` lets the epoch complete downstream.
            }
            if frontiers[0].is_empty() && pending.is_empty() {
                idle.stop(&node.metrics);
            }
        }
    });
    stream
}

/// Every row a map got comes out, in one of its batches, or is rejected: a map (built in or a
/// user's own) that drops rows without a word would lose them from the job's accounting.
fn check_accounting(rows_in: usize, outputs: &[Batch], rejected: usize) -> Result<(), OpError> {
    let rows_out: usize = outputs.iter().map(Batch::rows).sum();
    if rows_out + rejected < rows_in {
        return Err(OpError::msg(format!(
            "returned {rows_out} of the {rows_in} rows it got and rejected {rejected}: the other {} are lost \
             (a map must reject the rows it drops, with `OpContext::reject(key, reason)`)",
            rows_in - rows_out - rejected
        )));
    }
    Ok(())
}

/// Runs a batch through every map of a chain, counting each as its own node; a map that
/// splits its batch (rows of several shapes) hands each part to the next map. Empty batches
/// (every row rejected) go no further.
fn run_chain(
    chain: &[(NodeRuntime, Arc<dyn Map>)],
    batch: Batch,
    epoch: u64,
    track: &str,
) -> Result<Vec<Batch>, (usize, OpError)> {
    let mut batches = vec![batch];
    for (i, (node, map)) in chain.iter().enumerate() {
        let mut outputs = Vec::with_capacity(batches.len());
        for batch in batches {
            if i > 0 {
                node.metrics.record_in(&batch);
            }
            let mut ctx = node.context();
            ctx.set_epoch(epoch);
            let rows_in = batch.rows();
            let began = Instant::now();
            let result = panics::catch(|| map.map_groups(batch, &mut ctx));
            let rejected = ctx.rejected();
            node.finish_call(&mut ctx, began, track);
            let result = result.map_err(|e| (i, e))?;
            check_accounting(rows_in, &result, rejected).map_err(|e| (i, e))?;
            outputs.extend(result.into_iter().filter(|b| !b.is_empty()));
        }
        if i + 1 < chain.len() {
            outputs.iter().for_each(|b| node.metrics.record_out(b));
        }
        batches = outputs;
    }
    Ok(batches)
}
