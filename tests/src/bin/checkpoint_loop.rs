//! For the kill test: trains the tiny UNet one step at a time and checkpoints after every step
//! into `DIR` (keeping the newest two), forever, resuming from `DIR`'s latest checkpoint when it
//! has one. Prints `saved STEP` after each checkpoint.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{checkpoint, NoiseSchedule, SchedulerConfig, Trainer, TrainingOptions};

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: checkpoint_loop DIR"));
    std::fs::create_dir_all(&dir).expect("create DIR");
    checkpoint::remove_stale(&dir).expect("sweep");
    let schedule = || NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).expect("schedule");
    let options = TrainingOptions { ema_decay: Some(0.99), ..TrainingOptions::default() };
    let mut trainer = match checkpoint::latest(&dir).expect("list") {
        Some(latest) => checkpoint::resume(&latest, schedule(), options, &Device::Cpu).expect("resume").0,
        None => {
            let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 0).expect("unet");
            Trainer::new(unet, &weights, schedule(), options).expect("trainer")
        }
    };
    loop {
        let mut rng = Rng::new(7, trainer.step());
        let latents = Tensor::from_vec(rng.normals(2 * 4 * 8 * 8), (2, 4, 8, 8), &Device::Cpu).expect("latents");
        let text = Tensor::from_vec(rng.normals(2 * 77 * 32), (2, 77, 32), &Device::Cpu).expect("text");
        let report = trainer.train(&latents, &text, None).expect("step").expect("one micro-batch a step");
        let position = serde_json::json!({ "step": trainer.step() });
        checkpoint::save(&dir, &trainer, position, Some(report.loss), 2).expect("save");
        println!("saved {}", trainer.step());
    }
}
