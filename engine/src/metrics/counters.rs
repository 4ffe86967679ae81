//! Per-operator counters the engine keeps for every instance, so operator authors emit none.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::data::Batch;
use crate::operator::Rejection;

/// Counters of one operator instance (one node on one worker).
#[derive(Debug, Default)]
pub struct OperatorMetrics {
    pub(crate) node_index: usize,
    pub(crate) worker: usize,
    /// Whether the node runs on this worker (other workers only pass its rows on).
    pub(crate) runs_here: bool,
    batches_in: AtomicU64,
    items_in: AtomicU64,
    batches_out: AtomicU64,
    items_out: AtomicU64,
    bytes_out: AtomicU64,
    busy_ns: AtomicU64,
    wait_ns: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    counted: Mutex<BTreeMap<String, u64>>,
}

/// A copy of an instance's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Batches received.
    pub batches_in: u64,
    /// Rows received.
    pub items_in: u64,
    /// Batches emitted.
    pub batches_out: u64,
    /// Rows emitted.
    pub items_out: u64,
    /// Bytes emitted.
    pub bytes_out: u64,
    /// Seconds spent in the operator's own code.
    pub busy_seconds: f64,
    /// Seconds spent waiting: for input (maps, stages, sinks) or for the backpressure gate
    /// (sources).
    pub wait_seconds: f64,
    /// Rows dropped, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// What the operator counted itself ([`OpContext::count`](crate::OpContext::count)), by name.
    pub counted: BTreeMap<String, u64>,
}

impl OperatorMetrics {
    pub(crate) fn record_in(&self, batch: &Batch) {
        self.batches_in.fetch_add(1, Relaxed);
        self.items_in.fetch_add(batch.rows() as u64, Relaxed);
    }

    pub(crate) fn record_out(&self, batch: &Batch) {
        self.batches_out.fetch_add(1, Relaxed);
        self.items_out.fetch_add(batch.rows() as u64, Relaxed);
        self.bytes_out.fetch_add(batch.byte_size() as u64, Relaxed);
    }

    pub(crate) fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub(crate) fn add_wait(&self, d: Duration) {
        self.wait_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub(crate) fn record_rejections(&self, node: &str, rejections: Vec<Rejection>) {
        if rejections.is_empty() {
            return;
        }
        let mut counts = self.rejected.lock().expect("metrics lock");
        for r in rejections {
            tracing::debug!(node, key = %r.key, reason = %r.reason, "row rejected");
            *counts.entry(r.reason).or_default() += 1;
        }
    }

    pub(crate) fn record_counts(&self, counts: Vec<(String, u64)>) {
        if counts.is_empty() {
            return;
        }
        let mut counted = self.counted.lock().expect("metrics lock");
        for (name, n) in counts {
            *counted.entry(name).or_default() += n;
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            batches_in: self.batches_in.load(Relaxed),
            items_in: self.items_in.load(Relaxed),
            batches_out: self.batches_out.load(Relaxed),
            items_out: self.items_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            busy_seconds: self.busy_ns.load(Relaxed) as f64 * 1e-9,
            wait_seconds: self.wait_ns.load(Relaxed) as f64 * 1e-9,
            rejected: self.rejected.lock().expect("metrics lock").clone(),
            counted: self.counted.lock().expect("metrics lock").clone(),
        }
    }
}

impl MetricsSnapshot {
    /// Adds another instance's counters (summing over workers).
    pub fn add(&mut self, other: &MetricsSnapshot) {
        self.batches_in += other.batches_in;
        self.items_in += other.items_in;
        self.batches_out += other.batches_out;
        self.items_out += other.items_out;
        self.bytes_out += other.bytes_out;
        self.busy_seconds += other.busy_seconds;
        self.wait_seconds += other.wait_seconds;
        for (reason, n) in &other.rejected {
            *self.rejected.entry(reason.clone()).or_default() += n;
        }
        for (name, n) in &other.counted {
            *self.counted.entry(name.clone()).or_default() += n;
        }
    }
}

/// Every instance's counters in this process.
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    instances: Mutex<Vec<Arc<OperatorMetrics>>>,
}

impl MetricsRegistry {
    pub(crate) fn register(&self, node_index: usize, worker: usize, runs_here: bool) -> Arc<OperatorMetrics> {
        let metrics = Arc::new(OperatorMetrics { node_index, worker, runs_here, ..OperatorMetrics::default() });
        self.instances.lock().expect("metrics lock").push(Arc::clone(&metrics));
        metrics
    }

    /// Counters summed per node (indexed like the plan's nodes) and the workers each ran on.
    pub fn per_node(&self, nodes: usize) -> Vec<(MetricsSnapshot, Vec<usize>)> {
        let mut out = vec![(MetricsSnapshot::default(), Vec::new()); nodes];
        for m in self.instances.lock().expect("metrics lock").iter() {
            if let Some((sum, workers)) = out.get_mut(m.node_index) {
                sum.add(&m.snapshot());
                if m.runs_here {
                    workers.push(m.worker);
                }
            }
        }
        out
    }

    /// Each instance's counters: `(node index, worker, counters)`.
    pub fn per_instance(&self) -> Vec<(usize, usize, MetricsSnapshot)> {
        let instances = self.instances.lock().expect("metrics lock");
        instances.iter().map(|m| (m.node_index, m.worker, m.snapshot())).collect()
    }
}

/// Tracks the time an operator sits with no work, so it can be counted as waiting.
#[derive(Debug)]
pub(crate) struct IdleClock {
    in_flight: usize,
    idle_since: Option<Instant>,
}

impl IdleClock {
    pub(crate) fn new() -> Self {
        IdleClock { in_flight: 0, idle_since: Some(Instant::now()) }
    }

    pub(crate) fn started(&mut self, metrics: &OperatorMetrics) {
        if let Some(since) = self.idle_since.take() {
            metrics.add_wait(since.elapsed());
        }
        self.in_flight += 1;
    }

    pub(crate) fn finished(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.idle_since = Some(Instant::now());
        }
    }

    /// The input ended: stop counting.
    pub(crate) fn stop(&mut self, metrics: &OperatorMetrics) {
        if let Some(since) = self.idle_since.take() {
            metrics.add_wait(since.elapsed());
        }
    }
}
