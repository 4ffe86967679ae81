//! The three jobs on the embedded defaults (procedural images, `tiny` random models, 64 px,
//! the `tiny` VAE and CLIP in place of the demo's fixed `pixels` and `words`, so encoding costs
//! what the real encoders cost,
//! global batch 16), run through the Rust API as `latentflow run ... --profile` would:
//!
//! - `online`: images → encoders → trainer in one graph;
//! - `preprocess` then `train`: the same images through the same encoders into latents parquet,
//!   then the trainer reading them back.
//!
//! Reported: samples/s of each, the trainer's wait-for-data fraction (from `metrics.jsonl`:
//! `wait_s / (wait_s + step_s)`), the online rate as a ratio of the train-from-latents rate
//! (the goal for GPU runs is ≥ 0.95 whenever the encoders have capacity), and each job's
//! profile table (where the time goes). `LATENTFLOW_BENCH_IMAGES=N` changes the image count
//! (default 1600: 100 steps).

#![allow(missing_docs)]

use std::path::Path;

use latentflow_engine::{run, Plan, RunOptions, RunReport};
use latentflow_pipelines::{online, preprocess, train, Settings};

struct Trained {
    samples: u64,
    wall_s: f64,
    wait_s: f64,
    step_s: f64,
}

fn run_plan(mut plan: Plan, out: &Path) -> RunReport {
    plan.job.output_dir = Some(out.to_path_buf());
    let report = run(&plan, &RunOptions::default()).expect("the job runs");
    println!("\n== {} ({:.1} s)\n{}", plan.job.name, report.profile.wall_seconds, report.profile.table());
    report
}

fn trained(run_dir: &Path, report: &RunReport) -> Trained {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let mut t = Trained { samples: 0, wall_s: report.profile.wall_seconds, wait_s: 0.0, step_s: 0.0 };
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        t.samples += v["samples"].as_u64().unwrap_or(0);
        t.wait_s += v["wait_s"].as_f64().unwrap_or(0.0);
        t.step_s += v["step_s"].as_f64().unwrap_or(0.0);
    }
    t
}

fn main() {
    let images: u64 = std::env::var("LATENTFLOW_BENCH_IMAGES").ok().and_then(|s| s.parse().ok()).unwrap_or(1600);
    // The random `tiny` VAE and CLIP, not the demo's free fixed ones: the encoders' real cost.
    let settings = Settings { images, autoencoder: "tiny".into(), text_encoder: "tiny".into(), ..Settings::default() };
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();

    let report = run_plan(online::plan(&settings).expect("online plan"), &d.join("online"));
    let on = trained(&d.join("online"), &report);
    let pre = run_plan(preprocess::plan(&settings).expect("preprocess plan"), &d.join("preprocess"));
    let latents = d.join("preprocess/latents").display().to_string();
    let report = run_plan(train::plan(&settings, &latents).expect("train plan"), &d.join("train"));
    let off = trained(&d.join("train"), &report);

    let rate = |t: &Trained| t.samples as f64 / t.wall_s;
    let wait = |t: &Trained| t.wait_s / (t.wait_s + t.step_s);
    let pre_rate = images as f64 / pre.profile.wall_seconds;
    println!("\n== summary ({images} images, global batch {})", settings.global_batch_size);
    println!("online                 {:7.1} samples/s  trainer waits {:4.1} %", rate(&on), 100.0 * wait(&on));
    println!("preprocess             {:7.1} images/s", pre_rate);
    println!("train (from latents)   {:7.1} samples/s  trainer waits {:4.1} %", rate(&off), 100.0 * wait(&off));
    let offline = off.samples as f64 / (pre.profile.wall_seconds + off.wall_s);
    println!("preprocess + train     {:7.1} samples/s end to end", offline);
    println!("ratio online / train-from-latents: {:.3}", rate(&on) / rate(&off));
    println!("ratio online / preprocess+train:   {:.3}", rate(&on) / offline);
}
