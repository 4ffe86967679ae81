//! Where every source stood after each epoch it emitted, so a stage that checkpoints at the end
//! of epoch `t` can save the data position that goes with it, and a resumed run can seek its
//! sources there.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{json, Value};

/// Per source instance `(node, worker)`: its position after each recent epoch.
#[derive(Debug, Default)]
pub struct PositionLedger {
    workers: usize,
    processes: usize,
    process: usize,
    entries: Mutex<BTreeMap<(String, usize), BTreeMap<u64, Value>>>,
}

impl PositionLedger {
    /// An empty ledger for process `process` of a job of `workers` workers in all over
    /// `processes` processes.
    pub fn new(workers: usize, processes: usize, process: usize) -> Self {
        PositionLedger { workers, processes, process, entries: Mutex::default() }
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
    /// `{"workers": N, "processes": P, "covered": [p], "sources": {"NODE": {"WORKER": position}}}`
    /// (this process `p`'s sources only; a trainer merges the processes' ledgers). Older entries are dropped,
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
        json!({ "workers": self.workers, "processes": self.processes, "covered": [self.process], "sources": sources })
    }
}

/// Where a resumed run's sources start: what [`PositionLedger::after_epoch`] returned.
#[derive(Clone, Debug, Default)]
pub(crate) struct ResumePositions(Option<Value>);

impl ResumePositions {
    /// Checks that `saved` was taken with as many workers as this run has.
    pub(crate) fn new(saved: Option<Value>, workers: usize) -> Result<Self, String> {
        if let Some(saved) = &saved {
            let processes = saved.get("processes").and_then(Value::as_u64).unwrap_or(1);
            let covered: Vec<u64> = match saved.get("covered").and_then(Value::as_array) {
                Some(list) => list.iter().filter_map(Value::as_u64).collect(),
                None => vec![0],
            };
            if covered != (0..processes).collect::<Vec<_>>() {
                // Each process's ledger holds its own sources; the trainers merge them, and a
                // process without a trainer is missing.
                return Err(format!(
                    "the checkpoint's data position covers the sources of process(es) {covered:?} of {processes}: \
                     the processes without a trainer were not saved; place a trainer on every process, or start \
                     the data from the beginning"
                ));
            }
            let was = saved.get("workers").and_then(Value::as_u64);
            if was != Some(workers as u64) {
                return Err(format!(
                    "the checkpoint's data position was saved by a run with {} workers, this run has {workers}; \
                     resume with the same --workers and --processes",
                    was.map_or_else(|| "an unknown number of".to_string(), |w| w.to_string())
                ));
            }
        }
        Ok(ResumePositions(saved))
    }

    /// The position source `node` on `worker` continues from; `None` to start at the beginning
    /// (no resume, or a source that had emitted nothing when the checkpoint was taken).
    pub(crate) fn get(&self, node: &str, worker: usize) -> Option<&Value> {
        self.0.as_ref()?.get("sources")?.get(node)?.get(worker.to_string())
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
            json!({"workers": 2, "processes": 1, "covered": [0], "sources": {"read": {"0": 20, "1": 5}}})
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
    fn resume_needs_the_same_number_of_workers() {
        let saved = json!({"workers": 2, "sources": {"read": {"1": {"row": 4}}}});
        let err = ResumePositions::new(Some(saved.clone()), 1).unwrap_err();
        assert!(err.contains("2 workers, this run has 1"), "{err}");
        let resume = ResumePositions::new(Some(saved), 2).unwrap();
        assert_eq!(resume.get("read", 1), Some(&json!({"row": 4})));
        assert_eq!(resume.get("read", 0), None);
    }
}
