//! The GPU training-step benchmark (built with `--features cuda`, run by `bench/gpu/run.sh`):
//! the SD2-base UNet (random weights, from scratch as the reference pre-trains it) at 256 px
//! (latents 4x32x32, text 77x1024), bf16 compute with f32 master weights, AdamW, one optimizer
//! step per batch, at each batch size given (one model, stepped at each size in turn). Prints one
//! JSON line per batch size: median step seconds, images/s and the peak GPU memory in use after
//! any measured step (the whole run's peak is sampled by run.sh with nvidia-smi).
//!
//! ```text
//! gpu_train_step [--batches 8,32,64] [--steps 10] [--warmup 3] [--config-out unet_config.json]
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};
use latentflow_bench::gpu::arg;
use latentflow_operators::models::{UNet, UNetConfig, Weights};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{NoiseSchedule, Precision, SchedulerConfig, Trainer, TrainingOptions};

fn gib_in_use() -> f64 {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    CudaContext::new(0)
        .and_then(|c| c.mem_get_info())
        .map(|(free, total)| (total - free) as f64 / (1u64 << 30) as f64)
        .unwrap_or(f64::NAN)
}

/// The trainer, built once (random SD2-base weights take a while to draw) and stepped at every
/// batch size in turn.
fn trainer(config: &UNetConfig, device: &Device) -> candle_core::Result<(Trainer, usize)> {
    let weights = Weights::random(1, device, true);
    let unet = UNet::new(config, &weights).map_err(candle_core::Error::wrap)?;
    let params: usize = weights.vars().values().map(|v| v.elem_count()).sum();
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), std::path::Path::new("default"))
        .map_err(candle_core::Error::wrap)?;
    let options = TrainingOptions { precision: Precision::Bf16, lr: 1e-4, ..TrainingOptions::default() };
    Ok((Trainer::new(unet, &weights, schedule, options).map_err(candle_core::Error::wrap)?, params))
}

fn run(
    trainer: &mut Trainer,
    device: &Device,
    batch: usize,
    steps: usize,
    warmup: usize,
) -> candle_core::Result<serde_json::Value> {
    let mut rng = Rng::new(2, batch as u64);
    let latents = Tensor::from_vec(rng.normals(batch * 4 * 32 * 32), (batch, 4, 32, 32), device)?;
    let text = Tensor::from_vec(rng.normals(batch * 77 * 1024), (batch, 77, 1024), device)?;
    let mut times = Vec::new();
    let mut peak: f64 = 0.0;
    let mut last_loss = f64::NAN;
    for i in 0..warmup + steps {
        let started = Instant::now();
        let report = trainer.train_batch(&latents, &text, None).map_err(candle_core::Error::wrap)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64());
            peak = peak.max(gib_in_use());
        }
        last_loss = report.loss;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(serde_json::json!({
        "framework": "latentflow",
        "batch": batch,
        "steps": steps,
        "step_s_median": median,
        "images_per_s": batch as f64 / median,
        "peak_gpu_gib_in_use": peak,
        "last_loss": last_loss,
    }))
}

fn main() {
    if !latentflow_gpu_kernels::kernel::gpu_available() {
        eprintln!("gpu_train_step: no NVIDIA GPU (or driver) on this machine");
        std::process::exit(2);
    }
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| "8,32,64".into())
        .split(',')
        .map(|b| b.trim().parse().expect("--batches: comma-separated sizes"))
        .collect();
    let steps: usize = arg("--steps").map_or(10, |s| s.parse().expect("--steps"));
    let warmup: usize = arg("--warmup").map_or(3, |s| s.parse().expect("--warmup"));
    let mut config = UNetConfig::preset("sd2-base").expect("sd2-base preset");
    config.sample_size = Some(32);
    if let Some(path) = arg("--config-out") {
        // The same architecture for the PyTorch side (diffusers' config.json keys).
        let mut json = serde_json::to_value(&config).expect("config");
        json["_class_name"] = "UNet2DConditionModel".into();
        std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json")).expect("write config");
    }
    let device = Device::new_cuda(0).expect("cuda:0");
    let started = Instant::now();
    let (mut trainer, params) = trainer(&config, &device).expect("SD2-base UNet");
    eprintln!("SD2-base UNet: {params} parameters, built in {:.1} s", started.elapsed().as_secs_f64());
    let mut failed = false;
    for batch in batches {
        match run(&mut trainer, &device, batch, steps, warmup) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed = true;
                println!("{}", serde_json::json!({"framework": "latentflow", "batch": batch, "error": e.to_string()}));
            }
        }
    }
    std::process::exit(i32::from(failed));
}
