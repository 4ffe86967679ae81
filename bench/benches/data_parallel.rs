//! Weak scaling of data-parallel training on this machine: one trainer process against two
//! trainer processes on loopback (`--processes 2`, one worker thread each), with the same rows
//! per trainer per step, training the `tiny` UNet from latents (so no encoder competes for the
//! cores). Each trainer process gets one core's worth of threads (one map-pool thread,
//! `RAYON_NUM_THREADS=1` for candle's matmuls and the fused attention): otherwise one trainer
//! alone already uses every core and two can only share them.
//!
//! Reported: samples/s of each (from `metrics.jsonl`, steps after the first three), the ratio
//! (goal >= 1.8 on 2 cores), the all-reduce's share of the two-process step (goal <= 5 %), the
//! bytes a trainer sends per step against the ring all-reduce's `2 (N-1)/N x gradient bytes`,
//! and each trainer process's peak RSS. `LATENTFLOW_BENCH_STEPS=N` (default 40) and
//! `LATENTFLOW_BENCH_BATCH=B` (rows per trainer, default 8) change the size.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use latentflow_bench::peak_rss_bytes;
use latentflow_engine::{run, ClusterOptions, RunOptions};
use latentflow_pipelines::{preprocess, train, Settings};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn settings(images: u64, global_batch_size: usize) -> Settings {
    Settings { images, global_batch_size, checkpoint_every: 0, sample_every: 0, ..Settings::default() }
}

/// One trainer process: `LF_BENCH_ROLE` is `single` or the process id of a 2-process cluster.
fn trainer(role: &str) {
    let dir = PathBuf::from(std::env::var("LF_BENCH_OUT").expect("LF_BENCH_OUT"));
    let latents = std::env::var("LF_BENCH_LATENTS").expect("LF_BENCH_LATENTS");
    let batch = env_or("LF_BENCH_GLOBAL", 8);
    let mut plan = train::plan(&settings(0, batch), &latents).expect("train plan");
    plan.job.output_dir = Some(dir);
    plan.job.cpu_threads = Some(1);
    let cluster = (role != "single").then(|| {
        let hosts = PathBuf::from(std::env::var("LF_BENCH_HOSTS").expect("LF_BENCH_HOSTS"));
        ClusterOptions::from_hostfile(&hosts, 2, role.parse().expect("process id")).expect("hostfile")
    });
    run(&plan, &RunOptions { workers: 1, cluster, ..RunOptions::default() }).expect("the trainer runs");
    println!("peak_rss {}", peak_rss_bytes().unwrap_or(0));
}

struct Figures {
    samples_per_s: f64,
    allreduce_share: f64,
    bytes_per_step: f64,
    steps: usize,
}

fn figures(run_dir: &Path) -> Figures {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let timed = &lines[3.min(lines.len())..];
    let sum = |key: &str| timed.iter().map(|v| v[key].as_f64().unwrap_or(0.0)).sum::<f64>();
    let (samples, step_s, wait_s) = (sum("samples"), sum("step_s"), sum("wait_s"));
    Figures {
        samples_per_s: samples / (step_s + wait_s),
        allreduce_share: sum("allreduce_s") / step_s,
        bytes_per_step: sum("allreduce_bytes") / timed.len().max(1) as f64,
        steps: lines.len(),
    }
}

fn spawn(role: &str, out: &Path, latents: &str, global: usize, hosts: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("this bench"))
        .env("LF_BENCH_ROLE", role)
        .env("LF_BENCH_OUT", out)
        .env("LF_BENCH_LATENTS", latents)
        .env("LF_BENCH_GLOBAL", global.to_string())
        .env("LF_BENCH_HOSTS", hosts)
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", std::env::var("LF_BENCH_TRAINER_THREADS").unwrap_or_else(|_| "1".into()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a trainer process")
}

fn peak(child: std::process::Child) -> u64 {
    let out = child.wait_with_output().expect("trainer process");
    assert!(out.status.success(), "a trainer process failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("peak_rss ")?.parse().ok()).unwrap_or(0)
}

fn gradient_bytes(run_dir: &Path) -> u64 {
    let weights = run_dir.join("final/unet/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(weights, &candle_core::Device::Cpu).expect("final unet");
    tensors.values().map(|t| t.elem_count() as u64 * 4).sum()
}

fn main() {
    if let Ok(role) = std::env::var("LF_BENCH_ROLE") {
        return trainer(&role);
    }
    let steps = env_or("LATENTFLOW_BENCH_STEPS", 40);
    let batch = env_or("LATENTFLOW_BENCH_BATCH", 8);
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    // Latents for `steps` steps of two trainers.
    let images = (steps * 2 * batch) as u64;
    let mut plan = preprocess::plan(&settings(images, 16)).expect("preprocess plan");
    plan.job.output_dir = Some(d.join("preprocess"));
    run(&plan, &RunOptions::default()).expect("preprocess runs");
    let latents = d.join("preprocess/latents").display().to_string();
    let hosts = d.join("hosts");
    let port = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", port().unwrap(), port().unwrap())).unwrap();

    let one_rss = peak(spawn("single", &d.join("one"), &latents, batch, &hosts));
    let children: Vec<_> = (0..2).map(|p| spawn(&p.to_string(), &d.join("two"), &latents, 2 * batch, &hosts)).collect();
    let two_rss: Vec<u64> = children.into_iter().map(peak).collect();

    let (one, two) = (figures(&d.join("one")), figures(&d.join("two")));
    let grads = gradient_bytes(&d.join("two"));
    let ranks = 2.0;
    let ring = 2.0 * (ranks - 1.0) / ranks * grads as f64;
    println!("\n== data-parallel weak scaling ({batch} rows per trainer per step, tiny UNet, 64 px)");
    println!("1 process x 1 trainer   {:7.1} samples/s  ({} steps)", one.samples_per_s, one.steps);
    println!("2 processes x 1 trainer {:7.1} samples/s  ({} steps)", two.samples_per_s, two.steps);
    println!("ratio 2 / 1: {:.2} (goal >= 1.8)", two.samples_per_s / one.samples_per_s);
    println!("all-reduce share of the 2-process step: {:.1} % (goal <= 5 %)", 100.0 * two.allreduce_share);
    println!(
        "bytes sent per trainer per step: {:.0} (ring all-reduce: 2 (N-1)/N x {} gradient bytes = {:.0}; ratio {:.3})",
        two.bytes_per_step,
        grads,
        ring,
        two.bytes_per_step / ring
    );
    println!(
        "peak RSS: 1 trainer {:.1} MiB; 2 trainers {:.1} / {:.1} MiB",
        one_rss as f64 / 1048576.0,
        two_rss[0] as f64 / 1048576.0,
        two_rss[1] as f64 / 1048576.0
    );
}
