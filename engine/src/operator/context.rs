//! What the engine tells an operator about where it runs, and what an operator can tell back.

use std::sync::Arc;

use crate::collective::Collective;
use crate::plan::JobConfig;
use crate::runtime::{PositionLedger, StopReason, StopSignal};

/// Where one instance of an operator runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Global worker index (`process * threads + thread`).
    pub index: usize,
    /// Total number of workers over all processes.
    pub peers: usize,
    /// This worker's process.
    pub process: usize,
    /// Number of processes.
    pub processes: usize,
    /// Thread index within the process.
    pub local_index: usize,
    /// This instance's index among the workers that run the operator (its placement).
    pub shard: usize,
    /// How many workers run the operator.
    pub shards: usize,
    /// The device this worker owns (`job.devices`), if any.
    pub device: Option<String>,
}

impl WorkerInfo {
    /// A single worker that runs everything: for unit tests and plain loops.
    pub fn single() -> Self {
        WorkerInfo {
            index: 0,
            peers: 1,
            process: 0,
            processes: 1,
            local_index: 0,
            shard: 0,
            shards: 1,
            device: Some("cpu".into()),
        }
    }
}

/// What [`NodeSpec::instantiate`](super::NodeSpec::instantiate) gets: the node, the job and
/// the worker the instance will run on.
#[derive(Clone, Debug)]
pub struct InstanceContext<'a> {
    /// The node id in the topology.
    pub node: &'a str,
    /// The job's settings (seed, output directory, ...).
    pub job: &'a JobConfig,
    /// The worker this instance runs on.
    pub worker: WorkerInfo,
    /// For a source: the rows per epoch the plan fixed for this instance (its share of a
    /// trainer's `global_batch_size`), which overrides its default `batch_size`.
    pub batch_size: Option<usize>,
}

/// A row an operator dropped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The row's key (or position) as text.
    pub key: String,
    /// A short, stable reason (`"decode_failed"`); the profile counts rows per reason.
    pub reason: String,
}

/// Passed to every operator call: the worker it runs on, the epoch, and a place to report
/// rejected rows or ask the job to stop.
///
/// ```
/// use latentflow_engine::OpContext;
/// let mut ctx = OpContext::detached("transform");
/// ctx.reject("42", "decode_failed");
/// assert_eq!(ctx.take_rejections()[0].reason, "decode_failed");
/// ```
pub struct OpContext {
    node: Arc<str>,
    worker: WorkerInfo,
    epoch: u64,
    rejections: Vec<Rejection>,
    counts: Vec<(String, u64)>,
    stop: Option<Arc<StopSignal>>,
    positions: Option<Arc<PositionLedger>>,
    collective: Option<Collective>,
    budget: ByteBudget,
}

/// The job's byte budget (`job.max_bytes_in_flight`) as an operator that holds data outside
/// batches sees it: bytes it [`hold`](Self::hold)s count as in flight (sources wait while the
/// job is over budget) until it [`release`](Self::release)s them. Cheap to clone and to share
/// with download tasks.
///
/// ```
/// use latentflow_engine::OpContext;
/// let budget = OpContext::detached("fetch").byte_budget();
/// budget.hold(1 << 20);
/// assert!(!budget.is_exhausted(), "a detached context has no budget");
/// budget.release(1 << 20);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ByteBudget {
    status: Option<Arc<crate::runtime::JobStatus>>,
    limit: Option<u64>,
}

impl ByteBudget {
    pub(crate) fn new(status: Arc<crate::runtime::JobStatus>, limit: Option<u64>) -> Self {
        ByteBudget { status: Some(status), limit }
    }

    /// Counts `bytes` as in flight.
    pub fn hold(&self, bytes: u64) {
        if let Some(status) = &self.status {
            status.hold(bytes);
        }
    }

    /// Stops counting `bytes` held before.
    pub fn release(&self, bytes: u64) {
        if let Some(status) = &self.status {
            status.release(bytes);
        }
    }

    /// True while the job has at least its budget in flight (never without a budget).
    pub fn is_exhausted(&self) -> bool {
        match (&self.status, self.limit) {
            (Some(status), Some(limit)) => status.bytes_in_flight() >= limit,
            _ => false,
        }
    }
}

impl OpContext {
    pub(crate) fn new(
        node: Arc<str>,
        worker: WorkerInfo,
        stop: Arc<StopSignal>,
        positions: Arc<PositionLedger>,
        collective: Option<Collective>,
        budget: ByteBudget,
    ) -> Self {
        OpContext {
            node,
            worker,
            epoch: 0,
            rejections: Vec::new(),
            counts: Vec::new(),
            stop: Some(stop),
            positions: Some(positions),
            collective,
            budget,
        }
    }

    /// A context outside any running job: for unit tests and plain loops.
    pub fn detached(node: &str) -> Self {
        OpContext {
            node: node.into(),
            worker: WorkerInfo::single(),
            epoch: 0,
            rejections: Vec::new(),
            counts: Vec::new(),
            stop: None,
            positions: None,
            collective: None,
            budget: ByteBudget::default(),
        }
    }

    /// The node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The worker this instance runs on.
    pub fn worker(&self) -> &WorkerInfo {
        &self.worker
    }

    /// The epoch of the batch being handled (the last one opened, for sources).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Records that the row `key` was dropped for `reason`. The engine counts it per reason.
    pub fn reject(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.rejections.push(Rejection { key: key.into(), reason: reason.into() });
    }

    /// How many rows the call so far rejected (the engine checks a map's accounting with it).
    pub(crate) fn rejected(&self) -> usize {
        self.rejections.len()
    }

    /// The rejections recorded since the last call.
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }

    /// Adds `n` to the operator's own counter `name`, which the profile shows beside the
    /// engine's counters (summed over workers): events that are not rejections, such as
    /// retried requests or key hash collisions.
    ///
    /// ```
    /// use latentflow_engine::OpContext;
    /// let mut ctx = OpContext::detached("fetch");
    /// ctx.count("http_retries", 2);
    /// assert_eq!(ctx.take_counts(), vec![("http_retries".to_string(), 2)]);
    /// ```
    pub fn count(&mut self, name: impl Into<String>, n: u64) {
        if n > 0 {
            self.counts.push((name.into(), n));
        }
    }

    /// The counts recorded since the last call.
    pub fn take_counts(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.counts)
    }

    /// Asks the job to stop reading new data: sources stop everywhere, in-flight work drains and
    /// stateful operators get their final flush (as on Ctrl-C, but the exit code stays 0).
    pub fn request_stop(&self) {
        if let Some(stop) = &self.stop {
            stop.request(crate::runtime::StopReason::Requested);
        }
    }

    /// Where this process's sources stood once `epoch` and every epoch before it were read, as
    /// a checkpoint saves it for [`NodeSpec::resume_data_position`](super::NodeSpec::resume_data_position);
    /// `None` outside a running job. Ask for epochs in increasing order.
    pub fn data_position(&self, epoch: u64) -> Option<serde_json::Value> {
        self.positions.as_ref().map(|p| p.after_epoch(epoch))
    }

    /// The collective over the workers that run this node, for a node that asked for one
    /// ([`NodeSpec::collective`](super::NodeSpec::collective)) and runs on more than one worker;
    /// `None` otherwise (a single instance works alone, and on later calls). Stages and sinks
    /// keep one context for their whole life: take it in `start` and keep it.
    pub fn take_collective(&mut self) -> Option<Collective> {
        self.collective.take()
    }

    /// The job's byte budget, for data held outside batches.
    pub fn byte_budget(&self) -> ByteBudget {
        self.budget.clone()
    }

    /// True once the job was asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.is_stopped())
    }

    /// Why the job was first asked to stop; `None` while it runs (or ran) to the end of its data.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop.as_ref().and_then(|s| s.reason())
    }

    /// True once an operator of the job failed (in any process): the rows of later epochs may
    /// be incomplete, so stateful operators must not commit work on them (a trainer neither
    /// steps nor checkpoints).
    pub fn job_failed(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.is_failed())
    }
}
