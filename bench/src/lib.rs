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

/// What the GPU benchmark binaries (`gpu_train_step`, `gpu_components`, `gpu_encoders`) share.
#[cfg(feature = "cuda")]
pub mod gpu {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::Device;

    /// A benchmark's error.
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// The value after `name` on the command line, if given.
    pub fn arg(name: &str) -> Option<String> {
        let args: Vec<String> = std::env::args().collect();
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
    }

    /// Milliseconds per call of `f` on `device`'s stream: CUDA events around `iters` calls after
    /// two warm-up calls, so gaps where the GPU waits for the host count, as they do in a job.
    pub fn time_ms(device: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..2 {
            f()?;
        }
        let stream = device.as_cuda_device()?.cuda_stream();
        device.synchronize()?;
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        for _ in 0..iters {
            f()?;
        }
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(f64::from(start.elapsed_ms(&end)?) / iters as f64)
    }
}
