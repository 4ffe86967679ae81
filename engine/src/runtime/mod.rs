//! Running a plan on timely: one process (`workers` threads) or a cluster of processes.

mod cluster;
mod dataflow;
mod distinct_op;
mod map_op;
mod panics;
mod pool;
mod positions;
mod reject_log;
mod shared;
mod source_op;
mod stage_op;
mod stop;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded};

pub use cluster::ClusterOptions;
pub use panics::message as panic_message;
pub use positions::PositionLedger;
pub use shared::JobStatus;
pub use stop::{StopReason, StopSignal};

use crate::error::EngineError;
use crate::metrics::{
    MetricsRegistry, MetricsSnapshot, OperatorProfile, Profile, ProgressMode, ProgressReporter, TraceRecorder,
};
use crate::plan::Plan;
use shared::JobShared;

/// How to run a plan.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads per process.
    pub workers: usize,
    /// Cluster mode; `None` runs in this process only.
    pub cluster: Option<ClusterOptions>,
    /// Record a Chrome trace of operator activity.
    pub trace: bool,
    /// How to show progress.
    pub progress: ProgressMode,
    /// Route Ctrl-C to this job (the CLI does; tests and libraries usually do not).
    pub handle_interrupts: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { workers: 1, cluster: None, trace: false, progress: ProgressMode::Off, handle_interrupts: false }
    }
}

/// One operator instance's counters.
#[derive(Clone, Debug)]
pub struct InstanceReport {
    /// Node id.
    pub node: String,
    /// Global worker index.
    pub worker: usize,
    /// Its counters.
    pub metrics: MetricsSnapshot,
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunReport {
    /// Per-node counters summed over this process's workers.
    pub profile: Profile,
    /// Per-instance counters.
    pub instances: Vec<InstanceReport>,
    /// True when Ctrl-C stopped the job (the CLI exits with 130).
    pub interrupted: bool,
    /// True when the job stopped before its sources were exhausted.
    pub stopped: bool,
    /// The most source rows in flight at once in this process.
    pub max_items_in_flight: u64,
    /// The most bytes in flight at once in this process.
    pub max_bytes_in_flight: u64,
    /// Each source instance's last position, by `(node, worker)`.
    pub positions: BTreeMap<(String, usize), serde_json::Value>,
    /// The trace, when [`RunOptions::trace`] was set.
    pub trace: Option<Arc<TraceRecorder>>,
}

enum Event {
    Started,
    Finished(Vec<Result<(), String>>),
    StartFailed(String),
}

/// Runs `plan` to completion (or until stopped) and returns its report.
///
/// ```no_run
/// # fn demo(plan: latentflow_engine::Plan) -> Result<(), latentflow_engine::EngineError> {
/// use latentflow_engine::{run, RunOptions};
/// let report = run(&plan, &RunOptions { workers: 2, ..RunOptions::default() })?;
/// println!("{}", report.profile.table());
/// # Ok(()) }
/// ```
pub fn run(plan: &Plan, options: &RunOptions) -> Result<RunReport, EngineError> {
    crate::memory::keep_freed_memory();
    let threads = options.workers;
    if threads == 0 {
        return Err(EngineError::Options("--workers must be at least 1".into()));
    }
    let (processes, process, communication) = match &options.cluster {
        None if threads == 1 => (1, 0, timely::CommunicationConfig::Thread),
        None => (1, 0, timely::CommunicationConfig::Process(threads)),
        Some(c) => {
            c.check("hostfile")?;
            let addresses = c.addresses[..c.processes].to_vec();
            let config = timely::CommunicationConfig::Cluster {
                threads,
                process: c.process_id,
                addresses,
                report: false,
                zerocopy: false,
            };
            (c.processes, c.process_id, config)
        }
    };
    for node in &plan.nodes {
        if node.placement.workers(threads, processes, plan.job.devices.len()).is_empty() {
            return Err(EngineError::Options(format!(
                "node `{}` has placement \"{}\", which no worker matches with {threads} worker(s) per process: \
                 run with more --workers",
                node.id, node.placement
            )));
        }
    }
    let source_batches = plan.source_batches(threads, processes).map_err(|e| EngineError::Options(e.join("\n")))?;
    let pool = pool::JobPool::new(plan.job.cpu_threads())?;
    let start = Instant::now();
    let resume = resume_positions(plan, threads, processes)?;
    let reject_logs = reject_log::open_all(plan, process, processes, resume.is_resuming())?;
    let devices = plan.job.devices.len();
    let source_shards = plan
        .nodes
        .iter()
        .filter(|n| n.kind == crate::operator::OperatorKind::Source)
        .map(|n| (n.id.clone(), n.placement.workers(threads, processes, devices)))
        .collect();
    let shared = Arc::new(JobShared {
        plan: plan.clone(),
        threads,
        processes,
        start,
        stop: Arc::new(StopSignal::default()),
        metrics: Arc::new(MetricsRegistry::default()),
        status: Arc::new(JobStatus::default()),
        pool,
        trace: options.trace.then(|| Arc::new(TraceRecorder::new(start, process))),
        failure: Mutex::new(None),
        ledger: Arc::new(PositionLedger::new(threads * processes, processes, process).with_shards(source_shards)),
        resume,
        reject_logs,
        local_groups: Mutex::default(),
        source_batches,
    });
    let _interrupts = options.handle_interrupts.then(|| stop::handle_interrupts(&shared.stop));
    let (peer_tx, peer_rx) = unbounded::<String>();
    if processes > 1 {
        cluster::watch_peers(peer_tx);
    }
    let progress = ProgressReporter::start(
        options.progress,
        Duration::from_secs_f64(plan.job.log_interval_s),
        plan.nodes.iter().map(|n| n.id.clone()).collect(),
        Arc::clone(&shared.metrics),
        Arc::clone(&shared.status),
    );

    let (events, event_rx) = unbounded::<Event>();
    let worker_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("lf-timely".into())
        .spawn(move || {
            let config = timely::Config { communication, worker: timely::WorkerConfig::default() };
            let started = Mutex::new(events.clone());
            let result = timely::execute(config, move |worker| {
                if worker.index() % threads == 0 {
                    let _ = started.lock().map(|s| s.send(Event::Started));
                }
                dataflow::run_worker(worker, &worker_shared);
            });
            let _ = match result {
                Ok(guards) => events.send(Event::Finished(guards.join())),
                Err(e) => events.send(Event::StartFailed(e)),
            };
        })
        .map_err(|e| EngineError::Options(format!("cannot start the engine thread: {e}")))?;

    let timeouts = Timeouts {
        connect: Duration::from_secs_f64(plan.job.connect_timeout_s),
        drain: Duration::from_secs_f64(plan.job.drain_timeout_s),
    };
    let outcome = wait(&event_rx, &peer_rx, &shared.stop, timeouts);
    drop(progress);
    cluster::unwatch_peers();
    // Whatever the outcome, the rejections so far reach the disk.
    for log in shared.reject_logs.values() {
        log.flush();
    }
    let results = match outcome {
        Ok(results) => results,
        Err(WaitError::Timeout) => {
            let c = options.cluster.as_ref().expect("timeouts only in cluster mode");
            return Err(EngineError::ConnectTimeout {
                process,
                processes,
                addresses: c.addresses[..processes].join(", "),
                timeout_s: plan.job.connect_timeout_s,
            });
        }
        Err(WaitError::PeerLost(message)) => return Err(EngineError::PeerLost(message)),
        Err(WaitError::DrainTimeout) => {
            let reason = match shared.failure.lock().expect("failure lock").take() {
                Some(failure) => failure.to_string(),
                None => format!("{:?}", shared.stop.reason().unwrap_or(StopReason::Requested)).to_lowercase(),
            };
            return Err(EngineError::DrainTimeout { reason, timeout_s: plan.job.drain_timeout_s });
        }
        Err(WaitError::Start(message)) => {
            return Err(EngineError::Options(format!("cannot start the workers: {message}")))
        }
    };
    if let Some(failure) = shared.failure.lock().expect("failure lock").take() {
        return Err(failure);
    }
    if let Some(Err(panic)) = results.into_iter().find(|r| r.is_err()) {
        return Err(EngineError::Worker(panic));
    }
    if shared.stop.is_failed() {
        // Failed elsewhere: what this process drained is part of a failed job, not a success.
        return Err(EngineError::PeerFailed);
    }
    Ok(report(&shared))
}

/// The data position a checkpointing node (the trainer) resumes from, checked against this run.
fn resume_positions(plan: &Plan, threads: usize, processes: usize) -> Result<positions::ResumePositions, EngineError> {
    let mut saved = None;
    for node in &plan.nodes {
        let position = node.spec.resume_data_position(&plan.job).map_err(|source| EngineError::Operator {
            node: node.id.clone(),
            worker: 0,
            device: None,
            source,
        })?;
        if let Some(position) = position {
            if saved.is_some() {
                return Err(EngineError::Options(format!(
                    "node `{}` resumes a data position too; only one node of a job may resume one",
                    node.id
                )));
            }
            tracing::info!(node = %node.id, "sources resume from the checkpoint's data position");
            saved = Some(position);
        }
    }
    positions::ResumePositions::new(saved, plan, threads, processes).map_err(EngineError::Options)
}

enum WaitError {
    Timeout,
    PeerLost(String),
    Start(String),
    DrainTimeout,
}

#[derive(Clone, Copy)]
struct Timeouts {
    /// For every process to connect.
    connect: Duration,
    /// For in-flight work to drain once the job was asked to stop.
    drain: Duration,
}

/// Waits for the workers to start (within the connect timeout) and then to finish, watching
/// for lost peers all along, and for a drain that outlasts its timeout once `stop` is set.
fn wait(
    events: &crossbeam_channel::Receiver<Event>,
    peers: &crossbeam_channel::Receiver<String>,
    stop: &StopSignal,
    timeouts: Timeouts,
) -> Result<Vec<Result<(), String>>, WaitError> {
    let connect_deadline = crossbeam_channel::after(timeouts.connect);
    let ticks = crossbeam_channel::tick(Duration::from_millis(100));
    let mut drain_deadline: Option<Instant> = None;
    let mut started = false;
    loop {
        let timeout = if started { crossbeam_channel::never() } else { connect_deadline.clone() };
        select! {
            recv(events) -> event => match event {
                Ok(Event::Started) => started = true,
                Ok(Event::Finished(results)) => return Ok(results),
                Ok(Event::StartFailed(e)) => return Err(WaitError::Start(e)),
                Err(_) => return Err(WaitError::Start("the engine thread ended".into())),
            },
            recv(peers) -> message => {
                return Err(WaitError::PeerLost(message.unwrap_or_default()));
            }
            recv(timeout) -> _ => return Err(WaitError::Timeout),
            recv(ticks) -> _ => {
                // A stop the job asked for itself (max_steps) is its normal end, however long the
                // final writes take; after Ctrl-C, SIGTERM or a failure the drain is bounded.
                if stop.was_interrupted() || stop.is_failed() {
                    let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + timeouts.drain);
                    if Instant::now() >= deadline {
                        return Err(WaitError::DrainTimeout);
                    }
                }
            }
        }
    }
}

fn report(shared: &JobShared) -> RunReport {
    let plan = &shared.plan;
    let per_node = shared.metrics.per_node(plan.nodes.len());
    let operators = plan
        .nodes
        .iter()
        .zip(per_node)
        .map(|(node, (m, mut workers))| {
            workers.sort_unstable();
            OperatorProfile {
                id: node.id.clone(),
                type_name: node.type_name.to_string(),
                workers,
                batches_in: m.batches_in,
                items_in: m.items_in,
                batches_out: m.batches_out,
                items_out: m.items_out,
                rejected: m.rejected,
                counted: m.counted,
                bytes_out: m.bytes_out,
                busy_seconds: m.busy_seconds,
                wait_seconds: m.wait_seconds,
            }
        })
        .collect();
    let instances = shared
        .metrics
        .per_instance()
        .into_iter()
        .map(|(i, worker, metrics)| InstanceReport { node: plan.nodes[i].id.clone(), worker, metrics })
        .collect();
    RunReport {
        profile: Profile {
            wall_seconds: shared.start.elapsed().as_secs_f64(),
            operators,
            peak_rss_bytes: crate::metrics::peak_rss_bytes(),
        },
        instances,
        interrupted: shared.stop.was_interrupted(),
        stopped: shared.stop.is_stopped(),
        max_items_in_flight: shared.status.max_items_in_flight(),
        max_bytes_in_flight: shared.status.max_bytes_in_flight(),
        positions: shared.ledger.latest(),
        trace: shared.trace.clone(),
    }
}
