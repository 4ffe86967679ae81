//! Stages and sinks: a long-lived thread per instance that owns the operator's state and sees
//! its batches in epoch order. The timely operator holds each epoch's capability until the
//! thread has finished that epoch, and one more capability (trailing the input frontier) until
//! the final flush, so downstream frontiers, and the gate, count work still on the thread.

use std::collections::BTreeMap;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;
use timely::scheduling::SyncActivator;

use super::panics;
use super::shared::NodeRuntime;
use crate::data::Batch;
use crate::error::OpError;
use crate::operator::{OpContext, Sink, Stage};

enum StageIn {
    Batches(u64, Vec<Batch>),
    EndEpoch(u64),
    Finish,
}

enum StageOut {
    Output(u64, Batch),
    EpochDone(u64),
    Finished(Option<Batch>),
    Failed(OpError),
}

/// One epoch's state on the operator: its capability (held until the thread is done with it)
/// and batches not yet handed to the thread.
struct Epoch {
    cap: Capability<u64>,
    buffered: Vec<Batch>,
    ended: bool,
}

/// Runs a [`Sink`] as a stage that emits nothing.
pub(crate) struct SinkStage(pub Box<dyn Sink>);

impl Stage for SinkStage {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        self.0.start(ctx)
    }

    fn process(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        self.0.write(batch, ctx).map(|()| None)
    }

    fn end_epoch(&mut self, epoch: u64, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        self.0.end_epoch(epoch, ctx).map(|()| None)
    }

    fn finish(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        self.0.finish(ctx).map(|()| None)
    }
}

/// Builds a stage (or sink) operator. `stage` is `None` on workers outside the node's placement
/// or when the instance failed to build; batches reaching it are dropped.
pub(crate) fn build<'s>(
    input: StreamVec<'s, u64, Batch>,
    node: NodeRuntime,
    stage: Option<Box<dyn Stage>>,
) -> StreamVec<'s, u64, Batch> {
    let scope = input.scope();
    let mut builder = OperatorBuilder::new(format!("stage {}", node.id), scope);
    let info = builder.operator_info();
    let mut input = builder.new_input(input, Pipeline);
    let (output, stream) = builder.new_output::<Vec<Batch>>();
    let mut output = OutputBuilder::<u64, CapacityContainerBuilder<Vec<Batch>>>::from(output);
    let activator = scope.worker().sync_activator_for(info.address.to_vec());
    // Instances that work together (they hold a collective) must all see the same epochs.
    let every_epoch = node.collective.lock().expect("collective lock").is_some();
    let thread = stage.map(|s| spawn_thread(s, node.clone(), activator));

    builder.build(move |mut caps| {
        // Held until the final flush, trailing the input frontier so it never holds back the gate.
        let mut held: Option<Capability<u64>> = caps.pop().filter(|_| thread.is_some());
        let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
        let mut finish_sent = false;
        let mut failed = false;
        // The first epoch not yet ended on the thread.
        let mut next_epoch = 0u64;
        move |frontiers| {
            let frontier = frontiers[0].frontier();
            input.for_each(|cap, data| {
                let Some(time) = cap.least().copied() else {
                    return;
                };
                let batches: Vec<Batch> = std::mem::take(data);
                for batch in &batches {
                    node.metrics.record_in(batch);
                }
                if thread.is_none() || failed {
                    return;
                }
                if let std::collections::btree_map::Entry::Vacant(entry) = epochs.entry(time) {
                    let Some(cap) = cap.retain_least(0) else { return };
                    entry.insert(Epoch { cap, buffered: Vec::new(), ended: false });
                }
                epochs.get_mut(&time).expect("inserted").buffered.extend(batches);
            });
            let Some((tx, rx)) = thread.as_ref() else {
                return;
            };
            // The thread sees one epoch at a time, in order: an epoch's batches go only once every
            // earlier epoch has ended (the input frontier reached it), so which rows an epoch holds
            // never depends on timing. Nodes whose instances work together also end the epochs
            // that brought them nothing, so every instance sees the same sequence of epochs.
            let reached = |time: u64| frontier.iter().all(|f| *f >= time);
            for (time, epoch) in epochs.iter_mut().filter(|(_, e)| !e.ended) {
                if !reached(*time) {
                    break;
                }
                if every_epoch {
                    for empty in next_epoch..*time {
                        let _ = tx.send(StageIn::EndEpoch(empty));
                    }
                }
                next_epoch = next_epoch.max(*time);
                if !epoch.buffered.is_empty() {
                    let _ = tx.send(StageIn::Batches(*time, std::mem::take(&mut epoch.buffered)));
                }
                if frontier.less_equal(time) {
                    break;
                }
                epoch.ended = true;
                next_epoch = *time + 1;
                let _ = tx.send(StageIn::EndEpoch(*time));
            }
            if let (true, Some(&f)) = (every_epoch, frontier.iter().min()) {
                // Every epoch below the frontier is complete; those with data ended above.
                for empty in next_epoch..f {
                    let _ = tx.send(StageIn::EndEpoch(empty));
                }
                next_epoch = next_epoch.max(f);
            }
            if let (Some(h), Some(&f)) = (held.as_mut(), frontier.iter().min()) {
                if f > *h.time() {
                    h.downgrade(&f);
                }
            }
            let mut out = output.activate();
            let mut events: Vec<StageOut> = rx.try_iter().collect();
            if held.is_some() && !failed && events.is_empty() {
                match rx.try_recv() {
                    // Sent since `try_iter` looked: keep it.
                    Ok(event) => events.push(event),
                    // Nothing more can come: the thread ended without finishing or failing.
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        events.push(StageOut::Failed(OpError::msg("the operator's thread ended without finishing")))
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => {}
                }
            }
            for event in events {
                match event {
                    StageOut::Output(time, batch) => {
                        let cap = epochs.get(&time).map(|e| &e.cap).or(held.as_ref());
                        if let Some(cap) = cap {
                            node.metrics.record_out(&batch);
                            node.shared.status.record_bytes(time, batch.byte_size() as u64);
                            out.session(cap).give(batch);
                        }
                    }
                    StageOut::EpochDone(time) => {
                        epochs.remove(&time);
                    }
                    StageOut::Finished(batch) => {
                        if let (Some(batch), Some(cap)) = (batch, held.as_ref()) {
                            node.metrics.record_out(&batch);
                            out.session(cap).give(batch);
                        }
                        held = None;
                    }
                    StageOut::Failed(error) => {
                        node.fail(error);
                        failed = true;
                        epochs.clear();
                        held = None;
                    }
                }
            }
            if frontier.is_empty() && !finish_sent && !failed && epochs.values().all(|e| e.ended) {
                finish_sent = true;
                let _ = tx.send(StageIn::Finish);
            }
        }
    });
    stream
}

fn spawn_thread(
    mut stage: Box<dyn Stage>,
    node: NodeRuntime,
    activator: SyncActivator,
) -> (Sender<StageIn>, Receiver<StageOut>) {
    let (in_tx, in_rx) = crossbeam_channel::unbounded::<StageIn>();
    let (out_tx, out_rx) = crossbeam_channel::unbounded::<StageOut>();
    let track = node.track("stage");
    std::thread::Builder::new()
        .name(format!("lf-stage-{}-{}", node.id, node.worker.index))
        .spawn(move || {
            let send = |event: StageOut| {
                let ok = out_tx.send(event).is_ok();
                let _ = activator.activate();
                ok
            };
            let mut ctx = node.context();
            let started = panics::catch(|| stage.start(&mut ctx));
            node.record_rejections(ctx.take_rejections());
            if let Err(e) = started {
                send(StageOut::Failed(e));
                return;
            }
            let mut waiting = Instant::now();
            while let Ok(message) = in_rx.recv() {
                node.metrics.add_wait(waiting.elapsed());
                let began = Instant::now();
                let result: Result<Vec<StageOut>, OpError> = panics::catch(|| match message {
                    StageIn::Batches(time, batches) => {
                        ctx.set_epoch(time);
                        let mut outs = Vec::new();
                        let mut result = Ok(());
                        for batch in batches {
                            match stage.process(batch, &mut ctx) {
                                Ok(Some(out)) => outs.push(StageOut::Output(time, out)),
                                Ok(None) => {}
                                Err(e) => {
                                    result = Err(e);
                                    break;
                                }
                            }
                        }
                        result.map(|()| outs)
                    }
                    StageIn::EndEpoch(time) => {
                        ctx.set_epoch(time);
                        stage.end_epoch(time, &mut ctx).map(|out| {
                            out.map(|b| StageOut::Output(time, b))
                                .into_iter()
                                .chain([StageOut::EpochDone(time)])
                                .collect()
                        })
                    }
                    StageIn::Finish => stage.finish(&mut ctx).map(|out| vec![StageOut::Finished(out)]),
                });
                node.finish_call(&mut ctx, began, &track);
                let finished = matches!(result.as_deref(), Ok([.., StageOut::Finished(_)]));
                match result {
                    Ok(events) => {
                        for event in events {
                            if !send(event) {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        send(StageOut::Failed(e));
                        return;
                    }
                }
                if finished {
                    return;
                }
                waiting = Instant::now();
            }
        })
        .expect("spawn stage thread");
    (in_tx, out_rx)
}
