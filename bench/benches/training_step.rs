//! Model benchmarks on the CPU (fp32):
//!
//! - one training step (forward, backward, clipping + AdamW) of the well-known tiny UNet
//!   (`block_out_channels` (32, 64), 2 layers per block, cross-attention 32, 8 heads, 32 norm
//!   groups, ~1.1 M parameters) at batch 8, latents 4x32x32, text 77x32. The baseline is
//!   PyTorch + diffusers running the same step from the same config
//!   (`bench/gpu/pytorch_step.py --device cpu`) in the same run, when the Python interpreter
//!   (`LATENTFLOW_PYTHON`, default `python3`) has `torch` and `diffusers`; the ratio is
//!   latentflow's median step over PyTorch's;
//! - VAE-encode images/s and text-encode captions/s at batch 8 for the `tiny` preset (64 px) and
//!   the real SD2 sizes (512 px, OpenCLIP ViT-H text tower), random weights.
//!
//! Set `LATENTFLOW_BENCH_SKIP_SD2=1` to leave out the (minutes-long) SD2-size encoders and
//! `LATENTFLOW_BENCH_STEPS=N` for another number of training steps (0: none).

#![allow(missing_docs)]

use std::time::Instant;

use candle_core::{Device, Tensor};
use latentflow_operators::models::config::PerBlock;
use latentflow_operators::models::{
    AutoencoderKl, ClipTextConfig, ClipTextModel, UNet, UNetConfig, VaeConfig, Weights,
};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{NoiseSchedule, SchedulerConfig, StepReport, Trainer, TrainingOptions};

const BATCH: usize = 8;

fn tiny_unet_config() -> UNetConfig {
    let mut c = UNetConfig::preset("tiny").expect("preset");
    c.layers_per_block = 2;
    c.norm_num_groups = 32;
    c.attention_head_dim = PerBlock::One(8);
    c.use_linear_projection = false;
    c.sample_size = Some(32);
    c
}

fn normals(rng: &mut Rng, shape: &[usize]) -> Tensor {
    Tensor::from_vec(rng.normals(shape.iter().product()), shape, &Device::Cpu).expect("tensor")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// PyTorch + diffusers' median step for the same config, or why it could not run.
fn pytorch_step(config: &UNetConfig, steps: usize) -> Result<(f64, String), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("unet_config.json");
    let mut json = serde_json::to_value(config).map_err(|e| e.to_string())?;
    json["_class_name"] = "UNet2DConditionModel".into();
    std::fs::write(&path, json.to_string()).map_err(|e| e.to_string())?;
    let python = std::env::var("LATENTFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/gpu/pytorch_step.py");
    let steps = steps.saturating_sub(2).max(1).to_string();
    let batch = BATCH.to_string();
    let args = ["--config", path.to_str().ok_or("path")?, "--device", "cpu", "--batches", &batch, "--steps", &steps];
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(args.iter().chain(&["--warmup", "2", "--latent-size", "32"]))
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{python} printed no result: {}", String::from_utf8_lossy(&out.stderr)))?;
    match line["step_s_median"].as_f64() {
        Some(median) => {
            Ok((median, format!("PyTorch {} ({} threads)", line["torch"].as_str().unwrap_or("?"), line["threads"])))
        }
        None => Err(line["error"].as_str().unwrap_or("no step_s_median").to_string()),
    }
}

fn training_step() {
    let steps: usize = std::env::var("LATENTFLOW_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let weights = Weights::random(1, &Device::Cpu, true);
    let config = tiny_unet_config();
    let unet = UNet::new(&config, &weights).expect("unet");
    let params: usize = weights.vars().values().map(|v| v.elem_count()).sum();
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), std::path::Path::new("default")).expect("schedule");
    let mut trainer = Trainer::new(unet, &weights, schedule, TrainingOptions::default()).expect("trainer");
    let mut rng = Rng::new(2, 0);
    let (latents, text) = (normals(&mut rng, &[BATCH, 4, 32, 32]), normals(&mut rng, &[BATCH, 77, 32]));
    if steps == 0 {
        return;
    }
    let mut reports: Vec<(f64, StepReport)> = Vec::new();
    for i in 0..steps {
        let started = Instant::now();
        let report = trainer.train(&latents, &text, None).expect("step").expect("one micro-batch per step");
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "step {i}: {took:.3} s (forward {:.3}, backward {:.3}, optimizer {:.3})",
            report.forward_s, report.backward_s, report.optimizer_s
        );
        if i >= 2 || steps <= 2 {
            reports.push((started.elapsed().as_secs_f64(), report));
        }
    }
    let total = median(reports.iter().map(|(s, _)| *s).collect());
    let forward = median(reports.iter().map(|(_, r)| r.forward_s).collect());
    let backward = median(reports.iter().map(|(_, r)| r.backward_s).collect());
    let optimizer = median(reports.iter().map(|(_, r)| r.optimizer_s).collect());
    let measured = reports.len();
    let baseline = pytorch_step(&config, steps);
    println!("tiny UNet training step ({params} parameters, batch {BATCH}, 4x32x32, fp32, median of {measured} steps after the warm-up):");
    println!("| median step | forward (+loss) | backward | clip + AdamW | PyTorch + diffusers, same run | latentflow / PyTorch |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let (theirs, ratio) = match &baseline {
        Ok((median, who)) => (format!("{median:.3} s ({who})"), format!("**{:.2}**", total / median)),
        Err(why) => (format!("not measured: {why}"), "-".into()),
    };
    println!("| {total:.3} s | {forward:.3} s | {backward:.3} s | {optimizer:.3} s | {theirs} | {ratio} |");
}

fn rate(label: &str, batches: usize, mut run: impl FnMut()) {
    if batches > 1 {
        run(); // warm-up
    }
    let started = Instant::now();
    for _ in 0..batches {
        run();
    }
    let per_batch = started.elapsed().as_secs_f64() / batches as f64;
    println!("| {label} | {per_batch:.3} s | {:.3}/s |", BATCH as f64 / per_batch);
}

fn encoders(preset: &str, resolution: usize, batches: usize) {
    let vae = AutoencoderKl::new(&VaeConfig::preset(preset).expect("preset"), &Weights::random(3, &Device::Cpu, false))
        .expect("vae");
    let text =
        ClipTextModel::new(&ClipTextConfig::preset(preset).expect("preset"), &Weights::random(4, &Device::Cpu, false))
            .expect("text encoder");
    let mut rng = Rng::new(5, 0);
    let images = normals(&mut rng, &[BATCH, 3, resolution, resolution]);
    let ids: Vec<u32> = (0..BATCH * 77).map(|i| (i % 77) as u32 * 17 + 400).collect();
    let ids = Tensor::from_vec(ids, (BATCH, 77), &Device::Cpu).expect("ids");
    rate(&format!("{preset} VAE encode, {resolution} px"), batches, || {
        vae.encode(&images).expect("encode");
    });
    rate(&format!("{preset} text encode, 77 tokens"), batches, || {
        text.forward(&ids, false).expect("encode");
    });
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse. The allocator policy jobs run with.
    latentflow_engine::memory::keep_freed_memory();
    training_step();
    println!("\nencoders at batch {BATCH} (fp32, random weights):");
    println!("| model | per batch | rate |");
    println!("| --- | --- | --- |");
    encoders("tiny", 64, 10);
    if std::env::var_os("LATENTFLOW_BENCH_SKIP_SD2").is_none() {
        encoders("sd2-base", 512, 1);
    }
}
