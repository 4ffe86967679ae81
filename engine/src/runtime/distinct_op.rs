//! Distinct nodes: drop rows whose content key was seen before, on any worker of any process.
//!
//! 1. Each worker computes its batches' row keys and sends `(key, row id)` to the worker that
//!    owns the key; the batch waits on its own worker.
//! 2. The owner keeps, per epoch, the smallest row id of each key (a candidate).
//! 3. differential-dataflow's `distinct_total` over the candidates' keys says which keys are new
//!    in that epoch: its arrangement holds each distinct key once (32 bytes plus differential's
//!    bookkeeping), so memory is O(distinct rows); payloads never enter it.
//! 4. Candidates whose key is new are kept; their ids go back to the row's worker, which
//!    filters its batches once the epoch is decided and rejects the rest as `duplicate`.
//!
//! A batch leaves the node once every worker has finished its epoch: the node adds no epochs
//! of delay beyond that, so backpressure works as for any other node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use differential_dataflow::operators::ThresholdTotal;
use differential_dataflow::AsCollection;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::panics;
use super::shared::NodeRuntime;
use crate::data::Batch;
use crate::operator::{ContentKey, ContentKeys, Rejection};

/// A row: (worker, batch number on that worker, row in the batch). Ordered, so the smallest is
/// the row a key keeps.
type RowId = (u64, u64, u32);

/// Each row's key on its way to the key's owner.
type Keyed<'s> = StreamVec<'s, u64, (ContentKey, RowId)>;
/// Batches numbered on their worker, waiting for the verdict on their rows.
type Held<'s> = StreamVec<'s, u64, (u64, Batch)>;

/// The worker that owns `key`.
fn owner(key: &ContentKey) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

/// Builds the distinct operator. `keys` is `None` on workers outside the node's placement.
pub(crate) fn build<'s>(
    input: StreamVec<'s, u64, Batch>,
    node: NodeRuntime,
    keys: Option<Arc<dyn ContentKeys>>,
) -> StreamVec<'s, u64, Batch> {
    let (candidates, held) = split(input, node.clone(), keys);
    let firsts = first_per_epoch(candidates);
    let new_keys = firsts.clone().as_collection().map(|(key, _): (ContentKey, RowId)| key).distinct_total();
    let kept = keep_new(firsts, new_keys.inner);
    filter(held, kept, node)
}

/// Step 1: `(key, row id)` per row to the key's owner, and the numbered batches to step 4.
fn split<'s>(
    input: StreamVec<'s, u64, Batch>,
    node: NodeRuntime,
    keys: Option<Arc<dyn ContentKeys>>,
) -> (Keyed<'s>, Held<'s>) {
    let scope = input.scope();
    let worker = scope.index() as u64;
    let mut builder = OperatorBuilder::new(format!("distinct {} keys", node.id), scope);
    let mut input = builder.new_input(input, Pipeline);
    let (keys_out, keys_stream) = builder.new_output::<Vec<(ContentKey, RowId)>>();
    let (held_out, held_stream) = builder.new_output::<Vec<(u64, Batch)>>();
    let mut keys_out = OutputBuilder::<u64, CapacityContainerBuilder<Vec<(ContentKey, RowId)>>>::from(keys_out);
    let mut held_out = OutputBuilder::<u64, CapacityContainerBuilder<Vec<(u64, Batch)>>>::from(held_out);
    builder.build(move |caps| {
        drop(caps);
        let mut ctx = node.context();
        let mut seq = 0u64;
        move |_frontiers| {
            input.for_each(|cap, data| {
                let (Some(keys_cap), Some(held_cap)) = (cap.retain_least(0), cap.retain_least(1)) else { return };
                let mut keys_session = keys_out.activate();
                let mut keys_session = keys_session.session(&keys_cap);
                let mut held_session = held_out.activate();
                let mut held_session = held_session.session(&held_cap);
                for batch in data.drain(..) {
                    node.metrics.record_in(&batch);
                    let Some(hasher) = keys.as_ref().filter(|_| !node.shared.stop.is_failed()) else { continue };
                    if batch.rows() == 0 {
                        continue;
                    }
                    let began = std::time::Instant::now();
                    let result = panics::catch(|| hasher.keys(&batch, &mut ctx));
                    node.finish_call(&mut ctx, began, &node.track("worker"));
                    match result {
                        Ok(row_keys) if row_keys.len() == batch.rows() => {
                            for (row, key) in row_keys.into_iter().enumerate() {
                                keys_session.give((key, (worker, seq, row as u32)));
                            }
                            held_session.give((seq, batch));
                            seq += 1;
                        }
                        Ok(row_keys) => node.fail(crate::error::OpError::msg(format!(
                            "made {} keys for a batch of {} rows",
                            row_keys.len(),
                            batch.rows()
                        ))),
                        Err(e) => node.fail(e),
                    }
                }
            });
        }
    });
    (keys_stream, held_stream)
}

/// Step 2: at each key's owner, the smallest row id of every key in each epoch, once the epoch
/// is complete, as a differential update `((key, id), epoch, +1)`.
fn first_per_epoch<'s>(candidates: Keyed<'s>) -> StreamVec<'s, u64, ((ContentKey, RowId), u64, isize)> {
    candidates.unary_frontier::<CapacityContainerBuilder<_>, _, _, _>(
        Exchange::new(|(key, _): &(ContentKey, RowId)| owner(key)),
        "distinct first per epoch",
        |cap, _info| {
            drop(cap);
            let mut epochs: BTreeMap<u64, (Capability<u64>, HashMap<ContentKey, RowId>)> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let firsts = match epochs.entry(time) {
                        std::collections::btree_map::Entry::Occupied(entry) => &mut entry.into_mut().1,
                        std::collections::btree_map::Entry::Vacant(entry) => {
                            let Some(retained) = cap.retain_least(0) else { return };
                            &mut entry.insert((retained, HashMap::new())).1
                        }
                    };
                    for (key, id) in data.drain(..) {
                        let first = firsts.entry(key).or_insert(id);
                        *first = (*first).min(id);
                    }
                });
                while let Some(entry) = epochs.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (time, (cap, firsts)) = entry.remove_entry();
                    let mut session = output.session(&cap);
                    for (key, id) in firsts {
                        session.give(((key, id), time, 1));
                    }
                }
            }
        },
    )
}

/// Step 3 joined with step 2: the candidates of each epoch whose key `distinct_total` reports new
/// in that epoch (its output changes only at a key's first epoch), as row ids to their workers.
fn keep_new<'s>(
    firsts: StreamVec<'s, u64, ((ContentKey, RowId), u64, isize)>,
    new_keys: StreamVec<'s, u64, (ContentKey, u64, isize)>,
) -> StreamVec<'s, u64, RowId> {
    firsts.binary_frontier::<_, CapacityContainerBuilder<_>, _, _, _, _>(
        new_keys,
        Pipeline,
        Exchange::new(|(key, _, _): &(ContentKey, u64, isize)| owner(key)),
        "distinct keep new",
        |cap, _info| {
            drop(cap);
            type Epoch = (Option<Capability<u64>>, Vec<(ContentKey, RowId)>, HashSet<ContentKey>);
            let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
            move |(firsts, firsts_frontier), (new_keys, new_frontier), output| {
                firsts.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let epoch = epochs.entry(time).or_default();
                    if epoch.0.is_none() {
                        epoch.0 = cap.retain_least(0);
                    }
                    epoch.1.extend(data.drain(..).map(|((key, id), _, _)| (key, id)));
                });
                new_keys.for_each(|_cap, data| {
                    for (key, time, diff) in data.drain(..) {
                        if diff > 0 {
                            epochs.entry(time).or_default().2.insert(key);
                        }
                    }
                });
                while let Some(entry) = epochs.first_entry() {
                    let time = *entry.key();
                    if firsts_frontier.less_equal(&time) || new_frontier.less_equal(&time) {
                        break;
                    }
                    let (cap, candidates, new) = entry.remove();
                    let Some(cap) = cap else { continue };
                    let mut session = output.session(&cap);
                    for (key, id) in candidates {
                        if new.contains(&key) {
                            session.give(id);
                        }
                    }
                }
            }
        },
    )
}

/// Step 4: on each row's worker, its batches of an epoch once every kept id of the epoch is in:
/// kept rows go on, the others are rejected as `duplicate`.
fn filter<'s>(held: Held<'s>, kept: StreamVec<'s, u64, RowId>, node: NodeRuntime) -> StreamVec<'s, u64, Batch> {
    held.binary_frontier::<_, CapacityContainerBuilder<_>, _, _, _, _>(
        kept,
        Pipeline,
        Exchange::new(|(worker, _, _): &RowId| *worker),
        "distinct filter",
        move |cap, _info| {
            drop(cap);
            type Epoch = (Option<Capability<u64>>, Vec<(u64, Batch)>, HashSet<(u64, u32)>);
            let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
            move |(held, held_frontier), (kept, kept_frontier), output| {
                held.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let epoch = epochs.entry(time).or_default();
                    if epoch.0.is_none() {
                        epoch.0 = cap.retain_least(0);
                    }
                    epoch.1.append(data);
                });
                kept.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    epochs.entry(time).or_default().2.extend(data.drain(..).map(|(_, seq, row)| (seq, row)));
                });
                while let Some(entry) = epochs.first_entry() {
                    let time = *entry.key();
                    if held_frontier.less_equal(&time) || kept_frontier.less_equal(&time) {
                        break;
                    }
                    let (cap, batches, kept) = entry.remove();
                    let Some(cap) = cap else { continue };
                    let mut session = output.session(&cap);
                    for (seq, mut batch) in batches {
                        let keep: Vec<bool> = (0..batch.rows() as u32).map(|row| kept.contains(&(seq, row))).collect();
                        if keep.iter().any(|k| !k) {
                            node.record_rejections(duplicates(&batch, &keep));
                            batch.retain_rows(&keep);
                        }
                        if batch.rows() > 0 {
                            node.metrics.record_out(&batch);
                            session.give(batch);
                        }
                    }
                }
            }
        },
    )
}

/// The rows `keep` drops, as `duplicate` rejections named by their key column (or row number).
fn duplicates(batch: &Batch, keep: &[bool]) -> Vec<Rejection> {
    let keys = batch.i64s("key").ok();
    keep.iter()
        .enumerate()
        .filter(|(_, k)| !**k)
        .map(|(row, _)| Rejection {
            key: keys.map_or_else(|| format!("row {row}"), |k| k[row].to_string()),
            reason: "duplicate".into(),
        })
        .collect()
}
