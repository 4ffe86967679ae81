//! Helpers for latentflow's end-to-end tests: paths, running the binary, and test-only
//! operators ([`testops`]) that record what the engine did to them.

pub mod http_server;
pub mod testops;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root: `LATENTFLOW_REPO` when set (test binaries copied to another machine, as
/// `bench/gpu/run.sh` runs them), else where this crate was built.
pub fn root() -> PathBuf {
    match std::env::var_os("LATENTFLOW_REPO") {
        Some(repo) => PathBuf::from(repo),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf(),
    }
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// A topology file under `pipelines/topologies/`.
pub fn topology(name: &str) -> PathBuf {
    root().join("pipelines/topologies").join(name)
}

/// Runs the `latentflow` binary (`bin` is `env!("CARGO_BIN_EXE_lf")`) in `dir`.
pub fn latentflow(bin: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).current_dir(dir).env("RUST_LOG", "warn").output().expect("run latentflow")
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A tensor from `tests/fixtures/golden.safetensors`: its shape and raw little-endian bytes.
pub fn golden(name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(fixture("golden.safetensors")).expect("golden.safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let view = tensors.tensor(name).unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    (view.shape().to_vec(), view.data().to_vec())
}

/// A golden `int64` tensor's values.
pub fn golden_i64(name: &str) -> (Vec<usize>, Vec<i64>) {
    let (shape, data) = golden(name);
    (shape, data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// A golden `float32` tensor's values.
pub fn golden_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    let (shape, data) = golden(name);
    (shape, data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// Every tensor of `tests/fixtures/golden.safetensors`, as candle tensors on the CPU.
pub fn golden_tensors() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(fixture("golden.safetensors"), &candle_core::Device::Cpu)
        .expect("golden.safetensors")
}

/// The device the parity tests run on: the first GPU in a `cuda` build on a machine with one
/// (so `bench/gpu/run.sh` runs them on CUDA), else the CPU.
pub fn test_device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if latentflow_gpu_kernels::kernel::gpu_available() {
        println!("parity on cuda:0");
        return candle_core::Device::new_cuda(0).expect("cuda:0");
    }
    candle_core::Device::Cpu
}

/// Largest absolute difference between two tensors of the same shape (on any devices).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let cpu = |t: &candle_core::Tensor| {
        t.to_device(&candle_core::Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap()
    };
    let d = (cpu(a) - cpu(b)).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(a: &candle_core::Tensor) -> f32 {
    a.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs `latentflow run job.toml` in `dir` and stops it with `signal` (`"-TERM"`, `"-KILL"`) once
/// `metrics` (its `metrics.jsonl`) has `steps` lines; panics if it ends first or takes over two
/// minutes. Returns what the stopped run printed.
pub fn stop_run_after_steps(bin: &str, dir: &Path, metrics: &Path, steps: usize, signal: &str) -> Output {
    let mut run = Command::new(bin)
        .args(["run", "job.toml"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run latentflow");
    let began = Instant::now();
    while std::fs::read_to_string(metrics).map_or(0, |m| m.lines().count()) < steps {
        assert!(began.elapsed() < Duration::from_secs(120), "no training steps within 2 minutes");
        assert!(run.try_wait().expect("wait").is_none(), "the first run ended before it was stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill").args([signal, &run.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    run.wait_with_output().expect("wait")
}

/// Runs `bin` with `args` in `dir` and SIGKILLs it as soon as `marker` exists (a checkpoint's
/// `state.json`, say); panics if the run ends first or `marker` takes over 300 s.
pub fn kill_run_once_exists<S: AsRef<std::ffi::OsStr>>(bin: &str, dir: &Path, args: &[S], marker: &Path) {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run latentflow");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "no {} after 300 s", marker.display());
        assert!(child.try_wait().expect("wait").is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill"); // SIGKILL
    child.wait().expect("wait");
}

/// How many times each key was trained over every line of a `metrics.jsonl` written with
/// `log_keys = true` (empty when there is no file yet).
pub fn trained_keys(metrics: &Path) -> BTreeMap<i64, usize> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        for key in line["keys"].as_array().expect("log_keys") {
            *seen.entry(key.as_i64().expect("an integer key")).or_default() += 1;
        }
    }
    seen
}
