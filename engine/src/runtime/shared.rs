//! State shared by every worker of one process for one job.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::StopSignal;
use crate::collective::Collective;
use crate::error::{EngineError, OpError};
use crate::metrics::{MetricsRegistry, OperatorMetrics, TraceRecorder};
use crate::operator::{OpContext, Rejection, WorkerInfo};
use crate::plan::Plan;

/// Live figures of a running job: epochs opened, the gate, and what is in flight.
#[derive(Debug, Default)]
pub struct JobStatus {
    opened: AtomicU64,
    gate: AtomicU64,
    ledger: Mutex<BTreeMap<u64, (u64, u64)>>,
    max_items: AtomicU64,
    max_bytes: AtomicU64,
    /// Bytes operators hold outside batches ([`ByteBudget::hold`](crate::operator::ByteBudget::hold)).
    held: AtomicU64,
}

impl JobStatus {
    /// `(epochs opened, epochs in flight)` as this process sees them.
    pub fn epochs(&self) -> (u64, u64) {
        let opened = self.opened.load(Ordering::Relaxed);
        (opened, opened.saturating_sub(self.gate.load(Ordering::Relaxed)))
    }

    /// The gate moved to `frontier` (every sink finished the epochs before it).
    pub(crate) fn advance_gate(&self, frontier: u64) {
        self.gate.fetch_max(frontier, Ordering::Relaxed);
        let gate = self.gate.load(Ordering::Relaxed);
        let mut ledger = self.ledger.lock().expect("ledger lock");
        *ledger = ledger.split_off(&gate);
    }

    /// A source emitted `items` rows of `bytes` at `epoch`.
    pub(crate) fn record_source(&self, epoch: u64, items: u64, bytes: u64) {
        self.opened.fetch_max(epoch + 1, Ordering::Relaxed);
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let entry = ledger.entry(epoch).or_default();
        entry.0 += items;
        entry.1 += bytes;
        let (items, bytes) = ledger.values().fold((0, 0), |(i, b), (x, y)| (i + x, b + y));
        self.max_items.fetch_max(items, Ordering::Relaxed);
        self.max_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// An operator emitted `bytes` at `epoch` (counts against the byte budget until the
    /// epoch completes).
    pub(crate) fn record_bytes(&self, epoch: u64, bytes: u64) {
        if epoch < self.gate.load(Ordering::Relaxed) {
            return;
        }
        let mut ledger = self.ledger.lock().expect("ledger lock");
        ledger.entry(epoch).or_default().1 += bytes;
        let total: u64 = ledger.values().map(|v| v.1).sum();
        self.max_bytes.fetch_max(total, Ordering::Relaxed);
    }

    /// Bytes emitted in epochs that have not completed, and bytes operators hold outside batches
    /// (downloads in flight).
    pub(crate) fn bytes_in_flight(&self) -> u64 {
        let emitted: u64 = self.ledger.lock().expect("ledger lock").values().map(|v| v.1).sum();
        emitted + self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn hold(&self, bytes: u64) {
        let held = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let emitted: u64 = self.ledger.lock().expect("ledger lock").values().map(|v| v.1).sum();
        self.max_bytes.fetch_max(emitted + held, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, bytes: u64) {
        let _ = self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| Some(h.saturating_sub(bytes)));
    }

    /// The most source rows ever in flight at once in this process.
    pub fn max_items_in_flight(&self) -> u64 {
        self.max_items.load(Ordering::Relaxed)
    }

    /// The most bytes ever in flight at once in this process.
    pub fn max_bytes_in_flight(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }
}

/// Everything the workers of one process share.
pub(crate) struct JobShared {
    pub plan: Plan,
    pub threads: usize,
    pub processes: usize,
    pub start: Instant,
    pub stop: Arc<StopSignal>,
    pub metrics: Arc<MetricsRegistry>,
    pub status: Arc<JobStatus>,
    pub pool: super::pool::JobPool,
    pub trace: Option<Arc<TraceRecorder>>,
    pub failure: Mutex<Option<EngineError>>,
    /// Every source's position after each recent epoch (what checkpoints save).
    pub ledger: Arc<super::PositionLedger>,
    /// Where sources start when the run resumes a checkpoint.
    pub resume: super::positions::ResumePositions,
    pub reject_logs: std::collections::HashMap<std::path::PathBuf, Arc<super::reject_log::RejectLog>>,
    /// Shared-memory collectives by node index, made by the first worker that builds the node
    /// and taken rank by rank.
    pub local_groups: Mutex<BTreeMap<usize, Vec<Option<Collective>>>>,
    /// Rows per epoch per instance of each source, as the plan fixed them.
    pub source_batches: Vec<Option<usize>>,
}

impl JobShared {
    /// Records the first failure and stops the job. The first is what `run` returns (and the
    /// CLI prints, once); later ones, often its consequences, are logged.
    pub(crate) fn fail(&self, node: &str, worker: &WorkerInfo, source: OpError) {
        let mut failure = self.failure.lock().expect("failure lock");
        // A collective cut off by this failure may have reported first: this is the cause.
        let replaces = match &*failure {
            None => true,
            Some(EngineError::Operator { source: first, .. }) => first.is_consequence() && !source.is_consequence(),
            Some(_) => false,
        };
        let device = worker.device.clone().filter(|d| d != "cpu");
        let failed = EngineError::Operator { node: node.to_string(), worker: worker.index, device, source };
        let logged = if replaces { failure.replace(failed) } else { Some(failed) };
        if let Some(other) = logged {
            tracing::warn!("also failed: {other}");
        }
        drop(failure);
        self.stop.request(super::StopReason::Failed);
    }
}

/// One node on one worker: what its timely operator and threads need.
#[derive(Clone)]
pub(crate) struct NodeRuntime {
    pub id: Arc<str>,
    pub worker: WorkerInfo,
    pub metrics: Arc<OperatorMetrics>,
    pub shared: Arc<JobShared>,
    pub reject_log: Option<Arc<super::reject_log::RejectLog>>,
    /// This instance's collective, until its thread's context takes it.
    pub collective: Arc<Mutex<Option<Collective>>>,
}

impl NodeRuntime {
    pub(crate) fn context(&self) -> OpContext {
        OpContext::new(
            Arc::clone(&self.id),
            self.worker.clone(),
            Arc::clone(&self.shared.stop),
            Arc::clone(&self.shared.ledger),
            self.collective.lock().expect("collective lock").take(),
            crate::operator::ByteBudget::new(
                Arc::clone(&self.shared.status),
                self.shared.plan.job.max_bytes_in_flight.map(|b| b.as_u64()),
            ),
        )
    }

    pub(crate) fn fail(&self, error: OpError) {
        self.shared.fail(&self.id, &self.worker, error);
    }

    /// Counts a finished call: busy time, rejections and a trace span.
    pub(crate) fn finish_call(&self, ctx: &mut OpContext, began: Instant, track: &str) {
        let rejections = self.finish_call_deferring(ctx, began, track);
        self.record_rejections(rejections);
    }

    /// Counts a finished call's busy time and trace span, and hands back its rejections for
    /// [`record_rejections`](Self::record_rejections) once its output is emitted.
    pub(crate) fn finish_call_deferring(&self, ctx: &mut OpContext, began: Instant, track: &str) -> Vec<Rejection> {
        self.metrics.add_busy(began.elapsed());
        self.metrics.record_counts(ctx.take_counts());
        if let Some(trace) = &self.shared.trace {
            trace.span(&self.id, "operator", track, began, ctx.epoch());
        }
        ctx.take_rejections()
    }

    /// Counts rejected rows and writes them to the node's reject log.
    pub(crate) fn record_rejections(&self, rejections: Vec<Rejection>) {
        if rejections.is_empty() {
            return;
        }
        if let Some(log) = &self.reject_log {
            log.write(&self.id, &rejections);
        }
        self.metrics.record_rejections(&self.id, rejections);
    }

    /// The name of this instance's thread (or pool) in traces and thread lists.
    pub(crate) fn track(&self, role: &str) -> String {
        format!("w{} {} ({role})", self.worker.index, self.id)
    }
}
