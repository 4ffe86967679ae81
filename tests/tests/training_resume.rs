//! Checkpoints: the diffusers layout, atomic writes, `keep_last`, and an exact resume (the
//! losses and weights after a resume equal the uninterrupted run's, bit for bit).

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::checkpoint::{self, CheckpointState};
use latentflow_operators::training::{LrDecay, NoiseSchedule, SchedulerConfig, Trainer, TrainingOptions};

const BATCH: usize = 2;

/// Every option that draws randomness or keeps state is on.
fn options() -> TrainingOptions {
    TrainingOptions {
        lr: 1e-3,
        warmup_steps: 2,
        lr_decay: LrDecay::Cosine,
        total_steps: 20,
        max_grad_norm: Some(0.5),
        gradient_accumulation_steps: 2,
        snr_gamma: Some(5.0),
        noise_offset: 0.05,
        caption_dropout: 0.3,
        ema_decay: Some(0.99),
        ema_start_step: 1,
        seed: 11,
        ..TrainingOptions::default()
    }
}

fn schedule() -> NoiseSchedule {
    NoiseSchedule::new(&SchedulerConfig::default(), Path::new("default")).unwrap()
}

fn fresh() -> Trainer {
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap();
    Trainer::new(unet, &weights, schedule(), options()).unwrap()
}

/// Micro-batch `i` of a deterministic data stream: latents, text and the empty caption.
fn batch(i: u64) -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(99, i);
    let latents = Tensor::from_vec(rng.normals(BATCH * 4 * 8 * 8), (BATCH, 4, 8, 8), &Device::Cpu).unwrap();
    let text = Tensor::from_vec(rng.normals(BATCH * 77 * 32), (BATCH, 77, 32), &Device::Cpu).unwrap();
    let empty = Tensor::from_vec(Rng::new(99, u64::MAX).normals(77 * 32), (1, 77, 32), &Device::Cpu).unwrap();
    (latents, text, empty)
}

/// Trains until `steps` optimizer steps are done, reading micro-batches from `next`.
fn train(trainer: &mut Trainer, next: &mut u64, steps: u64) -> Vec<f64> {
    let mut losses = Vec::new();
    while trainer.step() < steps {
        let (latents, text, empty) = batch(*next);
        *next += 1;
        if let Some(report) = trainer.train(&latents, &text, Some(&empty)).unwrap() {
            losses.push(report.loss);
        }
    }
    losses
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn resume_continues_bit_for_bit() {
    let mut straight = fresh();
    let mut position = 0;
    let expected = train(&mut straight, &mut position, 6);
    assert_eq!(expected.len(), 6);
    assert!(expected.iter().all(|l| l.is_finite()));

    let run = tempfile::tempdir().unwrap();
    let mut first = fresh();
    let mut position = 0;
    let mut losses = train(&mut first, &mut position, 3);
    let saved =
        checkpoint::save(run.path(), &first, serde_json::json!({ "micro_batch": position }), Some(losses[2]), 0)
            .unwrap();
    assert_eq!(saved, run.path().join("checkpoint-3"));
    drop(first);

    let latest = checkpoint::latest(run.path()).unwrap().unwrap();
    let (mut resumed, state) = checkpoint::resume(&latest, schedule(), options(), &Device::Cpu).unwrap();
    assert_eq!(state.step, 3);
    let mut position = state.data_position["micro_batch"].as_u64().unwrap();
    losses.extend(train(&mut resumed, &mut position, 6));
    let expected_bits: Vec<u64> = expected.iter().map(|l| l.to_bits()).collect();
    assert_eq!(losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), expected_bits, "{losses:?} vs {expected:?}");
    for (name, var) in straight.params() {
        assert_eq!(bits(var.as_tensor()), bits(resumed.params()[name].as_tensor()), "{name}");
        let (a, b) = (&straight.ema().unwrap().tensors()[name], &resumed.ema().unwrap().tensors()[name]);
        assert_eq!(bits(a), bits(b), "ema {name}");
    }
}

#[test]
fn checkpoints_use_the_diffusers_layout_and_keep_the_newest() {
    let run = tempfile::tempdir().unwrap();
    let mut trainer = fresh();
    let mut position = 0;
    for step in 1..=3 {
        train(&mut trainer, &mut position, step);
        checkpoint::save(run.path(), &trainer, serde_json::json!(position), None, 2).unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(run.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["checkpoint-2", "checkpoint-3"], "keep_last 2, no partial folders left");
    let dir = run.path().join("checkpoint-3");
    for file in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(config["_class_name"], "UNet2DConditionModel");
    assert_eq!(config["block_out_channels"], serde_json::json!([32, 64]));
    let state: CheckpointState = checkpoint::read_state(&dir).unwrap();
    assert_eq!((state.step, state.data_position.clone()), (3, serde_json::json!(position)));

    // The saved folder loads as a UNet that computes what the trainer's UNet computes.
    let (loaded, _) = load_unet(&ModelSource::Folder(dir.join("unet")), &Device::Cpu, false, 0).unwrap();
    let (latents, text, _) = batch(0);
    let t = [3.0, 700.0];
    let ours = trainer.unet().forward(&latents, &t, &text).unwrap();
    assert_eq!(bits(&ours), bits(&loaded.forward(&latents, &t, &text).unwrap()));

    // Between micro-batches of an accumulation a checkpoint would not be exact: refused.
    let (latents, text, empty) = batch(100);
    assert!(trainer.train(&latents, &text, Some(&empty)).unwrap().is_none());
    let err = checkpoint::save(run.path(), &trainer, serde_json::json!(0), None, 2).unwrap_err();
    assert!(err.to_string().contains("between optimizer steps"), "{err}");
}

#[test]
fn bad_options_and_a_missing_empty_caption_are_clear_errors() {
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap();
    let bad = TrainingOptions { lr: 0.0, gradient_accumulation_steps: 0, ..options() };
    let err = Trainer::new(unet, &weights, schedule(), bad).err().unwrap().to_string();
    assert!(err.contains("`lr` = 0 must be > 0") && err.contains("`gradient_accumulation_steps` = 0"), "{err}");

    let mut trainer = fresh();
    let (latents, text, _) = batch(0);
    let mut draws = trainer.draw(&latents).unwrap();
    draws.keep_caption = vec![false, true];
    let err = trainer.train_with(&latents, &text, None, &draws).unwrap_err().to_string();
    assert!(err.contains("empty caption"), "{err}");
}

#[test]
fn previews_and_the_final_model_take_the_ema_weights_when_ema_is_on() {
    let mut trainer = fresh();
    let mut next = 0;
    train(&mut trainer, &mut next, 3);
    let ema = trainer.ema().expect("EMA is on").tensors().clone();
    let shipped = trainer.inference_weights();
    let raw = trainer.detached_weights();
    let name = ema.keys().next().unwrap().clone();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff(&shipped[&name], &ema[&name]), 0.0, "the EMA's weights");
    assert!(ema.keys().any(|n| diff(&ema[n], &raw[n]) > 0.0), "which differ from the raw ones after 3 steps");
    let no_ema = Trainer::new(
        load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap().0,
        &load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap().1,
        schedule(),
        TrainingOptions { ema_decay: None, ..options() },
    )
    .unwrap();
    let (shipped, raw) = (no_ema.inference_weights(), no_ema.detached_weights());
    assert_eq!(shipped.len(), raw.len());
    assert!(raw.iter().all(|(n, t)| diff(t, &shipped[n]) == 0.0), "without EMA, the raw weights");
}

#[test]
fn a_second_phase_carries_the_first_phases_optimizer_or_says_why_it_cannot() {
    let run = tempfile::tempdir().unwrap();
    let mut first = fresh();
    let mut next = 0;
    train(&mut first, &mut next, 3);
    let dir = checkpoint::save(run.path(), &first, serde_json::json!(null), None, 0).unwrap();
    assert_eq!(checkpoint::checkpoint_in(run.path()).unwrap(), dir, "a run folder names its newest checkpoint");
    let optimizer = checkpoint::read_optimizer(&dir, &options(), &Device::Cpu).unwrap();
    let mut second = fresh();
    second.carry_optimizer(optimizer).unwrap();
    assert_eq!(second.step(), 3, "the step count goes on");
    assert_eq!(second.optimizer().state_tensors().len(), first.optimizer().state_tensors().len());

    let bogus = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let moments = [("exp_avg.nope".to_string(), bogus.clone()), ("exp_avg_sq.nope".to_string(), bogus)].into();
    let foreign = latentflow_operators::training::adamw::AdamW::restore(options().adamw(), 7, moments).unwrap();
    let err = fresh().carry_optimizer(foreign).unwrap_err().to_string();
    assert!(err.contains("`nope` is not a parameter"), "{err}");
    assert!(checkpoint::checkpoint_in(&run.path().join("nothing")).is_err());
}

#[test]
fn gradient_checkpointing_gives_the_same_losses_and_weights() {
    let (mut plain, mut next_plain) = (fresh(), 0);
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap();
    let checkpointing = TrainingOptions { gradient_checkpointing: true, ..options() };
    let (mut recomputed, mut next_recomputed) = (Trainer::new(unet, &weights, schedule(), checkpointing).unwrap(), 0);
    let a = train(&mut plain, &mut next_plain, 3);
    let b = train(&mut recomputed, &mut next_recomputed, 3);
    assert_eq!(a.len(), 3);
    for (step, (la, lb)) in a.iter().zip(&b).enumerate() {
        assert!((la - lb).abs() <= 1e-6, "step {}: loss {la} vs {lb} with checkpointing", step + 1);
    }
    let (wa, wb) = (plain.detached_weights(), recomputed.detached_weights());
    assert_eq!(wa.len(), wb.len());
    let worst = wa.iter().map(|(n, t)| latentflow_tests::max_abs_diff(t, &wb[n])).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "weights differ by up to {worst} after 3 steps");
}
