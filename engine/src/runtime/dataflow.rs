//! Builds one worker's timely dataflow from a plan. Every worker builds the same graph; workers
//! outside a node's placement hold an empty instance that receives nothing.

use std::sync::{Arc, Mutex};

use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Concatenate, ConnectLoop, Exchange, Feedback};
use timely::dataflow::{Scope, StreamVec};
use timely::worker::Worker;

use super::shared::{JobShared, NodeRuntime};
use super::stage_op::SinkStage;
use super::{distinct_op, map_op, source_op, stage_op};
use crate::collective::{local, network, AbortCheck, Collective};
use crate::data::Batch;
use crate::error::OpError;
use crate::operator::{InstanceContext, OperatorImpl, OperatorKind, Stage, WorkerInfo};
use crate::plan::PlanNode;

/// Builds the dataflow on `worker` and runs it to completion.
pub(crate) fn run_worker(worker: &mut Worker, shared: &Arc<JobShared>) {
    let index = worker.index();
    let peers = worker.peers();
    worker.dataflow::<u64, _, _>(|scope| build(scope, shared, index, peers));
    while worker.step_or_park(None) {}
}

fn build<'s>(scope: Scope<'s, u64>, shared: &Arc<JobShared>, index: usize, peers: usize) {
    let plan = &shared.plan;
    let (gate_handle, gate) = scope.feedback::<Vec<Batch>>(0);
    let (ctl_handle, control) = scope.feedback::<Vec<u64>>(0);
    let mut streams: Vec<Option<StreamVec<'s, u64, Batch>>> = Vec::with_capacity(plan.nodes.len());
    let mut done = Vec::new();
    let mut controls = Vec::new();
    let chained = chain_next(plan);
    // The maps gathered so far for the chain being built (its head's input and its links).
    let mut open_chain: Option<(StreamVec<'s, u64, Batch>, Vec<map_op::ChainLink>)> = None;
    for (i, node) in plan.nodes.iter().enumerate() {
        let workers = node.placement.workers(shared.threads, shared.processes, plan.job.devices.len());
        let runtime = NodeRuntime {
            id: Arc::from(node.id.as_str()),
            worker: worker_info(shared, index, peers, &workers),
            metrics: shared.metrics.register(i, index, workers.contains(&index)),
            shared: Arc::clone(shared),
            reject_log: node.reject_log.as_ref().and_then(|p| shared.reject_logs.get(p).cloned()),
            collective: Arc::new(Mutex::new(collective(scope, shared, i, node, &workers))),
        };
        let batch_size = shared.source_batches[i];
        let instance = if workers.contains(&index) { instantiate(node, &runtime, batch_size) } else { None };
        let input = (!node.inputs.is_empty() && open_chain.is_none()).then(|| {
            let inputs = node.inputs.iter().map(|&j| streams[j].clone().expect("inputs come first"));
            let merged = if node.inputs.len() == 1 {
                inputs.into_iter().next().expect("one input")
            } else {
                scope.concatenate(inputs)
            };
            if workers.len() == peers {
                merged
            } else {
                // Round-robin over the workers that run the node, starting at a different one on
                // each worker so they share the load.
                let mut next = index;
                merged.exchange(move |_| {
                    next += 1;
                    workers[next % workers.len()] as u64
                })
            }
        });
        let output = match (node.kind, instance) {
            (OperatorKind::Source, instance) => {
                let source = match instance {
                    Some(OperatorImpl::Source(s)) => Some(s),
                    _ => None,
                };
                let (data, ctl) = source_op::build(scope, runtime, source, gate.clone(), control.clone());
                controls.push(ctl);
                data
            }
            (OperatorKind::Map, instance) => {
                let map = match instance {
                    Some(OperatorImpl::Map(m)) => Some(m),
                    _ => None,
                };
                let (head_input, mut links) = match open_chain.take() {
                    Some(chain) => chain,
                    None => (input.expect("checked: maps have inputs"), Vec::new()),
                };
                links.push((runtime, map));
                if chained[i] {
                    // The next node continues this chain; nothing else reads this node's output.
                    open_chain = Some((head_input, links));
                    streams.push(None);
                    continue;
                }
                map_op::build(head_input, links)
            }
            (OperatorKind::Distinct, instance) => {
                let keys = match instance {
                    Some(OperatorImpl::Distinct(k)) => Some(k),
                    _ => None,
                };
                distinct_op::build(input.expect("checked: distinct nodes have inputs"), runtime, keys)
            }
            (OperatorKind::Stage | OperatorKind::Sink, instance) => {
                let stage: Option<Box<dyn Stage>> = match instance {
                    Some(OperatorImpl::Stage(s)) => Some(s),
                    Some(OperatorImpl::Sink(s)) => Some(Box::new(SinkStage(s))),
                    _ => None,
                };
                let out = stage_op::build(input.expect("checked: stages have inputs"), runtime, stage);
                if node.kind == OperatorKind::Sink {
                    done.push(out.clone());
                }
                out
            }
        };
        streams.push(Some(output));
    }
    // Sinks' progress closes the loop into every source's gate; stop requests reach every worker.
    scope.concatenate(done).connect_loop(gate_handle);
    scope.concatenate(controls).broadcast().connect_loop(ctl_handle);
}

/// This worker's collective for node `i`, when the node asks for one and runs on several workers:
/// shared memory when all of them are in this process, timely's channels otherwise.
fn collective(
    scope: Scope<'_, u64>,
    shared: &Arc<JobShared>,
    i: usize,
    node: &PlanNode,
    members: &[usize],
) -> Option<Collective> {
    if !node.spec.collective() || members.len() < 2 {
        return None;
    }
    let stop = Arc::clone(&shared.stop);
    let abort: AbortCheck = Arc::new(move || stop.is_failed());
    // Decided the same way on every worker, so every worker builds the same graph.
    let process_of = |w: &usize| w / shared.threads;
    if members.iter().all(|w| process_of(w) == process_of(&members[0])) {
        let rank = members.iter().position(|&w| w == scope.index())?;
        let mut groups = shared.local_groups.lock().expect("groups lock");
        let group = groups
            .entry(i)
            .or_insert_with(|| local::group(&node.id, members.len(), abort).into_iter().map(Some).collect());
        return group[rank].take();
    }
    network::build(scope, &node.id, members, abort)
}

/// `chain_next[i]`: map `i` feeds the next node, a map on the same workers that reads only it,
/// and nothing else reads `i`; the two then run as one operator.
fn chain_next(plan: &crate::plan::Plan) -> Vec<bool> {
    let nodes = &plan.nodes;
    (0..nodes.len())
        .map(|i| {
            let Some(next) = nodes.get(i + 1) else { return false };
            let readers = nodes.iter().filter(|n| n.inputs.contains(&i)).count();
            nodes[i].kind == OperatorKind::Map
                && next.kind == OperatorKind::Map
                && next.inputs == [i]
                && readers == 1
                && next.placement == nodes[i].placement
        })
        .collect()
}

fn worker_info(shared: &JobShared, index: usize, peers: usize, workers: &[usize]) -> WorkerInfo {
    let local_index = index % shared.threads;
    WorkerInfo {
        index,
        peers,
        process: index / shared.threads,
        processes: shared.processes,
        local_index,
        shard: workers.iter().position(|&w| w == index).unwrap_or(0),
        shards: workers.len(),
        device: shared.plan.job.devices.get(local_index).cloned(),
    }
}

/// Builds this worker's instance; a failure stops the job and leaves an empty instance.
fn instantiate(node: &PlanNode, runtime: &NodeRuntime, batch_size: Option<usize>) -> Option<OperatorImpl> {
    let job = &runtime.shared.plan.job;
    let ctx = InstanceContext { node: &node.id, job, worker: runtime.worker.clone(), batch_size };
    match super::panics::catch(|| node.spec.instantiate(&ctx)) {
        Ok(instance) if instance.kind() == node.kind => Some(instance),
        Ok(instance) => {
            runtime.fail(OpError::msg(format!(
                "operator `{}` is registered as a {} but built a {}",
                node.type_name,
                node.kind,
                instance.kind()
            )));
            None
        }
        Err(e) => {
            runtime.fail(e);
            None
        }
    }
}
