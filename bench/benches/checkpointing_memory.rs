//! Gradient checkpointing's memory: one training step of the tiny UNet at 256 px (latents
//! 4 x 32 x 32), batch 8, with and without `gradient_checkpointing`, each in a fresh child
//! process so the peak resident memory (`VmHWM`) is its own. Goal: peak RSS with it <= 0.85x
//! without; the losses must agree (to 1e-6).

use std::process::Command;

use candle_core::{Device, Tensor};
use latentflow_bench::peak_rss_bytes;
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{NoiseSchedule, SchedulerConfig, Trainer, TrainingOptions};

const CHILD: &str = "LATENTFLOW_BENCH_CHECKPOINTING";
const BATCH: usize = 8;
const SIDE: usize = 32;

fn child(checkpointing: bool) {
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).expect("tiny UNet");
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).expect("schedule");
    let options = TrainingOptions { gradient_checkpointing: checkpointing, ..TrainingOptions::default() };
    let mut trainer = Trainer::new(unet, &weights, schedule, options).expect("trainer");
    let mut rng = Rng::new(1, 2);
    let latents = Tensor::from_vec(rng.normals(BATCH * 4 * SIDE * SIDE), (BATCH, 4, SIDE, SIDE), &Device::Cpu).unwrap();
    let text = Tensor::from_vec(rng.normals(BATCH * 77 * 32), (BATCH, 77, 32), &Device::Cpu).unwrap();
    let began = std::time::Instant::now();
    let report = trainer.train(&latents, &text, None).expect("step").expect("one optimizer step");
    println!("{} {} {}", peak_rss_bytes().unwrap_or(0), began.elapsed().as_secs_f64(), report.loss);
}

fn measure(checkpointing: bool) -> (f64, f64, f64) {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD, if checkpointing { "1" } else { "0" })
        .output()
        .expect("child");
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<f64> = text.split_whitespace().map(|f| f.parse().expect("a number")).collect();
    (fields[0] / (1 << 20) as f64, fields[1], fields[2])
}

fn main() {
    if let Ok(on) = std::env::var(CHILD) {
        child(on == "1");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; there is nothing to list.
    }
    let (plain, t_plain, loss_plain) = measure(false);
    let (recomputed, t_recomputed, loss_recomputed) = measure(true);
    println!("checkpointing_memory: tiny UNet, batch {BATCH}, latents 4x{SIDE}x{SIDE} (256 px), one step");
    println!("checkpointing_memory: without: peak RSS {plain:.1} MiB, {t_plain:.2} s, loss {loss_plain:.8}");
    println!(
        "checkpointing_memory: with:    peak RSS {recomputed:.1} MiB, {t_recomputed:.2} s, loss {loss_recomputed:.8}"
    );
    println!(
        "checkpointing_memory: peak RSS ratio {:.3} (goal <= 0.85), step time ratio {:.2}, loss difference {:.1e}",
        recomputed / plain,
        t_recomputed / t_plain,
        (loss_plain - loss_recomputed).abs()
    );
}
