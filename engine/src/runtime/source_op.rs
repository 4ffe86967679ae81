//! The gated source: emits epoch `t` only while every sink has finished epoch `t - K` (and the
//! byte budget allows), reading one batch ahead on its own thread.

use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, StreamVec};
use timely::progress::Antichain;
use timely::scheduling::SyncActivator;

use super::panics;
use super::shared::NodeRuntime;
use super::StopReason;
use crate::data::Batch;
use crate::error::OpError;
use crate::operator::{Rejection, Source};

enum SourceEvent {
    /// An epoch's batches, the position after them, and the rows the source rejected while
    /// reading them: they count (and reach the reject log) only once the epoch is emitted, so an
    /// epoch read ahead but never emitted before a stop is read, and its rejections made, once
    /// more after a resume.
    Batch(Vec<Batch>, serde_json::Value, Vec<Rejection>),
    End,
    Failed(OpError),
}

/// Set in a stop message on the control stream when the stop is a failure, so that other
/// processes treat the data after it as incomplete too (the low bits name the worker).
const FAILED: u64 = 1 << 63;

/// Builds the source operator. `source` is `None` on workers outside the node's placement.
/// Returns the data stream and the control stream that carries stop requests to other workers.
pub(crate) fn build<'s>(
    scope: Scope<'s, u64>,
    node: NodeRuntime,
    source: Option<Box<dyn Source>>,
    gate: StreamVec<'s, u64, Batch>,
    control: StreamVec<'s, u64, u64>,
) -> (StreamVec<'s, u64, Batch>, StreamVec<'s, u64, u64>) {
    let mut builder = OperatorBuilder::new(format!("source {}", node.id), scope);
    let info = builder.operator_info();
    let (data_out, data_stream) = builder.new_output::<Vec<Batch>>();
    let (ctl_out, ctl_stream) = builder.new_output::<Vec<u64>>();
    let mut data_out = OutputBuilder::<u64, CapacityContainerBuilder<Vec<Batch>>>::from(data_out);
    let mut ctl_out = OutputBuilder::<u64, CapacityContainerBuilder<Vec<u64>>>::from(ctl_out);
    // Disconnected inputs: their frontiers are read, never inherited, so the loop back from the
    // sinks creates no cycle in timely's progress tracking.
    let no_connection = Vec::<(usize, Antichain<u64>)>::new;
    let mut gate_in = builder.new_input_connection(gate, Pipeline, no_connection());
    let mut ctl_in = builder.new_input_connection(control, Pipeline, no_connection());

    let activator = scope.worker().sync_activator_for(info.address.to_vec());
    let shared = node.shared.clone();
    shared.stop.register(activator.clone());
    let k = shared.plan.job.max_epochs_in_flight;
    let budget = shared.plan.job.max_bytes_in_flight.map(|b| b.as_u64());
    let events = source.map(|s| spawn_reader(s, node.clone(), activator));

    builder.build(move |mut caps| {
        let ctl_cap = caps.pop();
        let data_cap = caps.pop();
        let mut caps: Option<(Capability<u64>, Capability<u64>)> = match (&events, data_cap, ctl_cap) {
            (Some(_), Some(d), Some(c)) => Some((d, c)),
            _ => None,
        };
        let mut blocked_since: Option<Instant> = None;
        move |frontiers| {
            gate_in.for_each(|_, data| data.clear());
            ctl_in.for_each(|_, data| {
                for message in data.drain(..) {
                    let reason = if message & FAILED != 0 { StopReason::PeerFailed } else { StopReason::Peer };
                    shared.stop.request(reason);
                }
            });
            let Some((data_cap, ctl_cap)) = caps.as_mut() else {
                return;
            };
            let Some(events) = events.as_ref() else {
                return;
            };
            // The gate only moves forward, so reading it once per activation is conservative.
            let gate = frontiers[0].frontier();
            if let Some(&f) = gate.iter().min() {
                shared.status.advance_gate(f);
            }
            loop {
                if shared.stop.is_stopped() {
                    // Tell every other worker (and process), then release the epoch.
                    let failed = if shared.stop.is_failed() { FAILED } else { 0 };
                    ctl_out.activate().session(&*ctl_cap).give(node.worker.index as u64 | failed);
                    caps = None;
                    return;
                }
                let t = *data_cap.time();
                let gate_open = gate.iter().all(|f| t < f + k);
                let budget_open =
                    budget.is_none_or(|b| shared.status.bytes_in_flight() < b || gate.iter().all(|f| *f >= t));
                if !gate_open || !budget_open {
                    blocked_since.get_or_insert_with(Instant::now);
                    return; // rescheduled when the gate frontier moves
                }
                match events.try_recv() {
                    Ok(SourceEvent::Batch(batches, position, rejections)) => {
                        if let Some(since) = blocked_since.take() {
                            node.metrics.add_wait(since.elapsed());
                        }
                        node.record_rejections(rejections);
                        let finished_below = gate.iter().min().copied().unwrap_or(t);
                        shared.ledger.record(&node.id, node.worker.index, t, position, finished_below);
                        let batches: Vec<Batch> = batches.into_iter().filter(|b| !b.is_empty()).collect();
                        if batches.is_empty() {
                            continue;
                        }
                        for batch in batches {
                            node.metrics.record_out(&batch);
                            shared.status.record_source(t, batch.rows() as u64, batch.byte_size() as u64);
                            data_out.activate().session(&*data_cap).give(batch);
                        }
                        // Close epoch t before possibly blocking on t + 1. The control
                        // capability stays at its first epoch: its stream feeds only disconnected
                        // inputs, so holding it back costs nothing, while moving it would cost
                        // progress traffic every epoch.
                        data_cap.downgrade(&(t + 1));
                    }
                    Ok(SourceEvent::End) => {
                        caps = None;
                        return;
                    }
                    // Both stop the job; the next turn of the loop announces it as a failure.
                    Err(TryRecvError::Disconnected) => {
                        // Never the end of the data: that is `End`. Whatever ended the reader,
                        // the job did not read all of it.
                        node.fail(OpError::msg("the source's reader thread ended without finishing"));
                    }
                    Ok(SourceEvent::Failed(error)) => node.fail(error),
                    Err(TryRecvError::Empty) => return, // the reader activates us
                }
            }
        }
    });
    (data_stream, ctl_stream)
}

/// Runs the source on its own thread, one batch ahead of what the gate has let out.
fn spawn_reader(mut source: Box<dyn Source>, node: NodeRuntime, activator: SyncActivator) -> Receiver<SourceEvent> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let track = node.track("source");
    std::thread::Builder::new()
        .name(format!("lf-src-{}-{}", node.id, node.worker.index))
        .spawn(move || {
            let mut ctx = node.context();
            let started = panics::catch(|| {
                source.start(&mut ctx)?;
                match node.shared.resume.get(&node.id, node.worker.index) {
                    Some(position) => {
                        tracing::info!(node = %node.id, worker = node.worker.index, %position, "source seeks");
                        source.seek(position)
                    }
                    None => Ok(()),
                }
            });
            node.record_rejections(ctx.take_rejections());
            if let Err(e) = started {
                let _ = tx.send(SourceEvent::Failed(e));
                let _ = activator.activate();
                return;
            }
            let mut epoch = 0;
            while !node.shared.stop.is_stopped() {
                ctx.set_epoch(epoch);
                let began = Instant::now();
                let result = panics::catch(|| Ok(source.next_batches(&mut ctx)?.map(|b| (b, source.position()))));
                let rejections = node.finish_call_deferring(&mut ctx, began, &track);
                let (event, last) = match result {
                    Ok(Some((batches, position))) => (SourceEvent::Batch(batches, position, rejections), false),
                    Ok(None) => (SourceEvent::End, true),
                    Err(e) => (SourceEvent::Failed(e), true),
                };
                if tx.send(event).is_err() {
                    return; // the operator stopped
                }
                let _ = activator.activate();
                if last {
                    return;
                }
                epoch += 1;
            }
        })
        .expect("spawn source thread");
    rx
}
