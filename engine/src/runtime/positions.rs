//! Where every source stood after each epoch it emitted, so a stage that checkpoints at the end
//! of epoch `t` can save the data position that goes with it, and a resumed run can seek its
//! sources there.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::operator::OperatorKind;
use crate::plan::Plan;

/// Per source instance `(node, worker)`: its position after each recent epoch.
#[derive(Debug, Default)]
pub struct PositionLedger {
    workers: usize,
    processes: usize,
    process: usize,
    /// Each source's workers in shard order (saved, so a resume can tell a re-sharding).
    shards: BTreeMap<String, Vec<usize>>,
    entries: Mutex<BTreeMap<(String, usize), BTreeMap<u64, Value>>>,
}

impl PositionLedger {
    /// An empty ledger for process `process` of a job of `workers` workers in all over
    /// `processes` processes.
    pub fn new(workers: usize, processes: usize, process: usize) -> Self {
        PositionLedger { workers, processes, process, shards: BTreeMap::new(), entries: Mutex::default() }
    }

    /// The same ledger, noting each source's workers in shard order (`node -> workers`).
    pub fn with_shards(mut self, shards: BTreeMap<String, Vec<usize>>) -> Self {
        self.shards = shards;
        self
    }

    /// Source `node` on `worker` stands at `position` after emitting epoch `epoch`. Every sink
    /// has finished the epochs below `finished_below`, so nobody asks for them any more: of
    /// those, only the newest entry is kept (it is the answer for any later epoch the source
    /// did not emit), which bounds the ledger by the epochs in flight.
    pub(crate) fn record(&self, node: &str, worker: usize, epoch: u64, position: Value, finished_below: u64) {
        let mut entries = self.entries.lock().expect("positions lock");
        let by_epoch = entries.entry((node.to_string(), worker)).or_default();
        by_epoch.insert(epoch, position);
        let mut open = by_epoch.split_off(&finished_below);
        if let Some((e, p)) = by_epoch.pop_last() {
            open.insert(e, p);
        }
        *by_epoch = open;
    }

    /// Every source's newest position (what the run report lists).
    pub(crate) fn latest(&self) -> BTreeMap<(String, usize), Value> {
        let entries = self.entries.lock().expect("positions lock");
        entries.iter().filter_map(|(k, by_epoch)| Some((k.clone(), by_epoch.last_key_value()?.1.clone()))).collect()
    }

    /// Every source's position once epoch `epoch` (and every epoch before it) has been read:
    /// `{"workers": N, "processes": P, "covered": [p], "shards": {"NODE": [WORKER, ...]},
    /// "sources": {"NODE": {"WORKER": position}}}` (this process `p`'s sources only; a trainer
    /// merges the processes' ledgers). Older entries are dropped,
    /// so ask for epochs in increasing order.
    ///
    /// ```
    /// use latentflow_engine::runtime::PositionLedger;
    /// let ledger = PositionLedger::new(1, 1, 0);
    /// assert_eq!(ledger.after_epoch(0)["sources"], serde_json::json!({}));
    /// ```
    pub fn after_epoch(&self, epoch: u64) -> Value {
        let mut entries = self.entries.lock().expect("positions lock");
        let mut sources = serde_json::Map::new();
        for ((node, worker), by_epoch) in entries.iter_mut() {
            // Keep the newest entry at or before `epoch` and everything after it.
            let newer = by_epoch.split_off(&(epoch + 1));
            let at = by_epoch.pop_last();
            *by_epoch = newer;
            if let Some((e, position)) = at {
                by_epoch.insert(e, position.clone());
                let per_worker = sources.entry(node.clone()).or_insert_with(|| json!({}));
                per_worker[worker.to_string()] = position;
            }
        }
        json!({
            "workers": self.workers,
            "processes": self.processes,
            "covered": [self.process],
            "shards": self.shards,
            "sources": sources,
        })
    }

    /// Merges what the ledgers of several processes returned from [`PositionLedger::after_epoch`]:
    /// their sources, and the processes they cover (`"covered"`), so a resume can tell a
    /// complete position (a trainer gathers them from every process for its checkpoint).
    pub fn merge(positions: impl IntoIterator<Item = Value>) -> Option<Value> {
        let mut merged: Option<Value> = None;
        for position in positions {
            let Some(m) = merged.as_mut() else {
                merged = Some(position);
                continue;
            };
            if let (Some(into), Some(from)) = (m["sources"].as_object_mut(), position["sources"].as_object()) {
                for (node, workers) in from {
                    let entry = into.entry(node.clone()).or_insert_with(|| Value::Object(Default::default()));
                    if let (Some(e), Some(w)) = (entry.as_object_mut(), workers.as_object()) {
                        e.extend(w.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
            }
            let mut covered: Vec<Value> = m["covered"].as_array().cloned().unwrap_or_default();
            for p in position["covered"].as_array().into_iter().flatten() {
                if !covered.contains(p) {
                    covered.push(p.clone());
                }
            }
            covered.sort_by_key(|p| p.as_u64());
            m["covered"] = Value::Array(covered);
        }
        merged
    }
}

/// Where a resumed run's sources start: each source instance's position, from what
/// [`PositionLedger::after_epoch`] saved. When the run has the same workers as the saved one,
/// each worker continues its own position; with a different number of workers or processes
/// (elastic resume), each source re-shards its saved positions
/// ([`NodeSpec::reshard_position`](crate::NodeSpec::reshard_position)).
#[derive(Clone, Debug, Default)]
pub(crate) struct ResumePositions(BTreeMap<(String, usize), Value>);

impl ResumePositions {
    /// Resolves `saved` for `plan` on `threads` workers per process over `processes` processes.
    pub(crate) fn new(saved: Option<Value>, plan: &Plan, threads: usize, processes: usize) -> Result<Self, String> {
        let Some(saved) = saved else { return Ok(ResumePositions::default()) };
        let saved_processes = saved.get("processes").and_then(Value::as_u64).unwrap_or(1);
        let covered: Vec<u64> = match saved.get("covered").and_then(Value::as_array) {
            Some(list) => list.iter().filter_map(Value::as_u64).collect(),
            None => vec![0],
        };
        if covered != (0..saved_processes).collect::<Vec<_>>() {
            // Each process's ledger holds its own sources; the trainers merge them, and a
            // process without a trainer is missing.
            return Err(format!(
                "the checkpoint's data position covers the sources of process(es) {covered:?} of {saved_processes}: \
                 the processes without a trainer were not saved; place a trainer on every process, or start \
                 the data from the beginning"
            ));
        }
        let saved_workers = saved.get("workers").and_then(Value::as_u64).unwrap_or(0) as usize;
        let mut resolved = BTreeMap::new();
        let devices = plan.job.devices.len();
        for node in plan.nodes.iter().filter(|n| n.kind == OperatorKind::Source) {
            let Some(by_worker) = saved["sources"].get(&node.id) else { continue };
            let now = node.placement.workers(threads, processes, devices);
            // The saved shard order; older checkpoints list none and ran on every worker.
            let then: Vec<usize> = match saved.get("shards").and_then(|s| s.get(&node.id)).and_then(Value::as_array) {
                Some(list) => list.iter().filter_map(|w| w.as_u64().map(|w| w as usize)).collect(),
                None => (0..saved_workers).collect(),
            };
            if then == now {
                for w in now {
                    if let Some(position) = by_worker.get(w.to_string()) {
                        resolved.insert((node.id.clone(), w), position.clone());
                    }
                }
                continue;
            }
            let old: Vec<Option<Value>> = then.iter().map(|w| by_worker.get(w.to_string()).cloned()).collect();
            for (shard, &w) in now.iter().enumerate() {
                let position = node.spec.reshard_position(&old, shard, now.len()).map_err(|e| {
                    format!(
                        "node `{}`: the checkpoint's data position was saved with {} source worker(s), this run has \
                         {}: {e}",
                        node.id,
                        then.len(),
                        now.len()
                    )
                })?;
                if let Some(position) = position {
                    resolved.insert((node.id.clone(), w), position);
                }
            }
            tracing::info!(node = %node.id, from = then.len(), to = now.len(), "source positions re-sharded");
        }
        Ok(ResumePositions(resolved))
    }

    /// The position source `node` on `worker` continues from; `None` to start at the beginning
    /// (no resume, or a source that had emitted nothing when the checkpoint was taken).
    /// True when some source resumes a saved position (the run continues an earlier one).
    pub(crate) fn is_resuming(&self) -> bool {
        !self.0.is_empty()
    }

    pub(crate) fn get(&self, node: &str, worker: usize) -> Option<&Value> {
        self.0.get(&(node.to_string(), worker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_after_an_epoch_is_the_newest_at_or_before_it() {
        let ledger = PositionLedger::new(2, 1, 0);
        ledger.record("read", 0, 0, json!(10), 0);
        ledger.record("read", 0, 1, json!(20), 0);
        ledger.record("read", 1, 0, json!(5), 0);
        ledger.record("read", 0, 2, json!(30), 0);
        assert_eq!(
            ledger.after_epoch(1),
            json!({"workers": 2, "processes": 1, "covered": [0], "shards": {}, "sources": {"read": {"0": 20, "1": 5}}})
        );
        // Asking again for a later epoch still sees worker 1's last position.
        assert_eq!(ledger.after_epoch(2)["sources"]["read"], json!({"0": 30, "1": 5}));
    }

    #[test]
    fn finished_epochs_are_dropped_but_the_newest_of_them() {
        let ledger = PositionLedger::new(1, 1, 0);
        for epoch in 0..1000 {
            ledger.record("read", 0, epoch, json!(epoch), epoch.saturating_sub(2));
        }
        let kept: Vec<u64> = ledger.entries.lock().unwrap()[&("read".to_string(), 0)].keys().copied().collect();
        assert_eq!(kept, [996, 997, 998, 999], "bounded by the epochs in flight");
        assert_eq!(ledger.after_epoch(997)["sources"]["read"]["0"], json!(997));
        assert_eq!(ledger.latest()[&("read".to_string(), 0)], json!(999));
    }

    #[test]
    fn positions_of_several_processes_merge() {
        let a =
            serde_json::json!({"workers": 4, "processes": 2, "covered": [0], "sources": {"read": {"0": 1, "1": 2}}});
        let b =
            serde_json::json!({"workers": 4, "processes": 2, "covered": [1], "sources": {"read": {"2": 3, "3": 4}}});
        let merged = PositionLedger::merge([a.clone(), b, a]).unwrap();
        assert_eq!(merged["sources"]["read"], serde_json::json!({"0": 1, "1": 2, "2": 3, "3": 4}));
        assert_eq!(merged["covered"], serde_json::json!([0, 1]));
    }
}
