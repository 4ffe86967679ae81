//! Shared pieces of latentflow's benchmarks: the pipelines they run and how they read memory.
//!
//! Run them with `cargo bench -p latentflow-bench`; results of past runs are in
//! `bench/results/`.

use latentflow_engine::{Plan, PlanErrors, TopologyBuilder};
use latentflow_operators::{BytesSourceConfig, ChecksumConfig, NullSinkConfig};

/// `bytes_source → checksum → checksum → null_sink`: four operators of cheap, fixed work per
/// row (generating and hashing `payload_bytes` bytes), for measuring what the engine adds.
pub fn four_operator_plan(
    count: u64,
    batch_size: usize,
    payload_bytes: usize,
    workers_threads: usize,
) -> Result<Plan, PlanErrors> {
    TopologyBuilder::new("overhead")
        .job(|job| job.cpu_threads = Some(workers_threads))
        .node("read", BytesSourceConfig { count, batch_size: Some(batch_size), payload_bytes }, &[])
        .node("sum1", ChecksumConfig::default(), &["read"])
        .node("sum2", ChecksumConfig::default(), &["sum1"])
        .node("sink", NullSinkConfig::default(), &["sum2"])
        .compile(&latentflow_operators::registry())
}

pub use latentflow_engine::metrics::peak_rss_bytes;

/// CPU seconds (user + system) used by this process so far, from `/proc/self/stat`.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
