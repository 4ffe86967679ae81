//! The training math against diffusers / PyTorch on the fixture pipeline: the noise schedule,
//! noising and velocity, one full training step (loss, backward, global gradient norm, listed
//! gradients, AdamW), plus gradient coverage and an f64 finite-difference check.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use latentflow_operators::models::config::read_config;
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::models::{UNet, UNetConfig, Weights};
use latentflow_operators::training::{grads, AdamW, AdamWConfig, Draws, NoiseSchedule, Trainer, TrainingOptions};
use latentflow_tests::{fixture, golden_tensors, max_abs, max_abs_diff, test_device};

/// The parameters the fixtures record before/grad/after for.
const LISTED: [&str; 7] = [
    "conv_in.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "time_embedding.linear_1.weight",
    "conv_out.bias",
];

fn check(name: &str, ours: &Tensor, golden: &Tensor, atol: f32) {
    let diff = max_abs_diff(ours, golden);
    println!("{name}: max abs diff {diff:.3e} (max abs value {:.3e})", max_abs(golden));
    assert!(diff <= atol, "{name}: max abs diff {diff} > {atol}");
}

fn schedule() -> NoiseSchedule {
    NoiseSchedule::from_folder(&fixture("tiny-sd/scheduler")).unwrap()
}

fn timesteps(g: &HashMap<String, Tensor>) -> Vec<usize> {
    g["timesteps"].to_vec1::<i64>().unwrap().into_iter().map(|t| t as usize).collect()
}

/// The fixture's step: lr 1e-3, weight decay 1e-2, no clipping.
fn fixture_trainer() -> Trainer {
    fixture_trainer_on(&Device::Cpu)
}

fn fixture_trainer_on(device: &Device) -> Trainer {
    let (unet, weights) = load_unet(&ModelSource::Folder(fixture("tiny-sd/unet")), device, true, 0).unwrap();
    let options = TrainingOptions { lr: 1e-3, weight_decay: 1e-2, max_grad_norm: None, ..TrainingOptions::default() };
    Trainer::new(unet, &weights, schedule(), options).unwrap()
}

fn fixture_draws(g: &HashMap<String, Tensor>) -> Draws {
    Draws { timesteps: timesteps(g), noise: g["noise"].clone(), keep_caption: vec![true; 4] }
}

#[test]
fn schedule_noising_and_velocity_match_diffusers() {
    let g = golden_tensors();
    let s = schedule();
    let ours = Tensor::new(s.alphas_cumprod.as_slice(), &Device::Cpu).unwrap();
    check("alphas_cumprod", &ours, &g["alphas_cumprod"], 5e-6);
    let t = timesteps(&g);
    check("noisy", &s.add_noise(&g["latents"], &g["noise"], &t).unwrap(), &g["noisy"], 5e-6);
    check("velocity", &s.velocity(&g["latents"], &g["noise"], &t).unwrap(), &g["velocity"], 2e-6);
}

#[test]
fn loss_gradients_and_norm_match_pytorch() {
    let g = golden_tensors();
    let trainer = fixture_trainer();
    let loss = trainer.loss(&g["latents"], &g["text_embeds"], None, &fixture_draws(&g)).unwrap();
    check("loss", &loss, &g["loss"], 1e-6);
    let store = loss.backward().unwrap();
    let grads = grads::collect(trainer.params(), &store);
    assert_eq!(trainer.params().len(), 208, "the fixture UNet has 208 parameters");
    let silent: Vec<&String> = trainer
        .params()
        .keys()
        .filter(|n| {
            grads.get(*n).is_none_or(|g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0)
        })
        .collect();
    assert!(silent.is_empty(), "parameters without a gradient: {silent:?}");
    let norm = grads::global_norm(&grads).unwrap();
    let golden_norm = g["grad_norm"].to_scalar::<f32>().unwrap();
    println!("grad_norm: {norm} vs {golden_norm} (diff {:.3e})", (norm - f64::from(golden_norm)).abs());
    assert!((norm - f64::from(golden_norm)).abs() <= 1e-6);
    for name in LISTED {
        let golden = &g[&format!("grad.{name}")];
        // Relative to the tensor's largest value, as the fixtures recommend.
        let relative = max_abs_diff(&grads[name], golden) / max_abs(golden);
        println!("grad.{name}: max abs diff / max abs {relative:.3e}");
        assert!(relative <= 5e-5, "grad.{name}: {relative}");
    }
}

#[test]
fn adamw_step_from_the_golden_gradients_matches_pytorch() {
    let g = golden_tensors();
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };
    let mut optimizer = AdamW::new(config);
    let params =
        LISTED.iter().map(|n| (n.to_string(), Var::from_tensor(&g[&format!("before.{n}")]).unwrap())).collect();
    let grads = LISTED.iter().map(|n| (n.to_string(), g[&format!("grad.{n}")].clone())).collect();
    optimizer.step(&params, &grads, 1e-3).unwrap();
    for name in LISTED {
        check(&format!("after.{name}"), params[name].as_tensor(), &g[&format!("after.{name}")], 1e-6);
    }
}

#[test]
fn one_training_step_end_to_end_matches_pytorch() {
    // On the GPU in a `cuda` build that has one: flash attention backward, the fused noising
    // kernel and the multi-tensor AdamW against PyTorch's step.
    let (g, device) = (golden_tensors(), test_device());
    let mut trainer = fixture_trainer_on(&device);
    for name in LISTED {
        check(&format!("before.{name}"), trainer.params()[name].as_tensor(), &g[&format!("before.{name}")], 0.0);
    }
    let on = |name: &str| g[name].to_device(&device).unwrap();
    let mut draws = fixture_draws(&g);
    draws.noise = draws.noise.to_device(&device).unwrap();
    let report = trainer.train_with(&on("latents"), &on("text_embeds"), None, &draws).unwrap().unwrap();
    assert_eq!(report.step, 1);
    // GPU reductions sum in another order than the CPU's: 1e-5 there.
    let tolerance = if device.is_cuda() { 1e-5 } else { 1e-6 };
    assert!((report.loss - 1.0531415939331055).abs() <= tolerance, "loss {}", report.loss);
    assert!((report.grad_norm - 2.9437692165374756).abs() <= tolerance, "grad_norm {}", report.grad_norm);
    for name in LISTED {
        // End to end a gradient element near eps can flip its update (fixtures README):
        // atol 1e-4, with a few elements allowed up to 2e-3.
        let ours: Vec<f32> = trainer.params()[name]
            .as_tensor()
            .to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let golden: Vec<f32> = g[&format!("after.{name}")].flatten_all().unwrap().to_vec1().unwrap();
        let diffs: Vec<f32> = ours.iter().zip(&golden).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().fold(0f32, |m, &d| m.max(d));
        let over = diffs.iter().filter(|&&d| d > 1e-4).count();
        println!("after.{name} end to end: max abs diff {max:.3e}, {over} of {} over 1e-4", diffs.len());
        assert!(max <= 2e-3 && over <= 3, "after.{name}: max {max}, {over} over 1e-4");
    }
}

/// The UNet in f64 and the loss of the golden batch.
fn f64_loss(unet: &UNet, g: &HashMap<String, Tensor>) -> Tensor {
    let t: Vec<f32> = timesteps(g).iter().map(|&t| t as f32).collect();
    let f64 = |name: &str| g[name].to_dtype(DType::F64).unwrap();
    let out = unet.forward(&f64("noisy"), &t, &f64("text_embeds")).unwrap();
    (out - f64("noise")).unwrap().sqr().unwrap().mean_all().unwrap()
}

#[test]
fn gradients_agree_with_finite_differences_in_f64() {
    let g = golden_tensors();
    let dir = fixture("tiny-sd/unet");
    let (config, _): (UNetConfig, _) = read_config(&dir).unwrap();
    let weights = Weights::load(&dir, &Device::Cpu, true).unwrap().in_dtype(DType::F64);
    let unet = UNet::new(&config, &weights).unwrap();
    let vars = weights.vars();
    let grads = grads::collect(&vars, &f64_loss(&unet, &g).backward().unwrap());
    let h = 1e-5;
    for (name, index) in [
        ("conv_in.weight", 7),
        ("down_blocks.0.resnets.0.norm1.weight", 3),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", 100),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 33),
        ("time_embedding.linear_1.bias", 5),
        ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", 250),
        ("conv_out.bias", 2),
    ] {
        let var = &vars[name];
        let original = var.as_tensor().copy().unwrap();
        let values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        let at = |delta: f64| {
            let mut v = values.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap()).unwrap();
            f64_loss(&unet, &g).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&original).unwrap();
        let analytic: f64 = grads[name].flatten_all().unwrap().to_vec1::<f64>().unwrap()[index];
        let error = (numeric - analytic).abs() / analytic.abs().max(1e-3);
        println!("{name}[{index}]: analytic {analytic:.9e}, numeric {numeric:.9e}, relative error {error:.2e}");
        assert!(error < 1e-5, "{name}[{index}]: analytic {analytic} vs numeric {numeric}");
    }
}

/// The encoders' hand-off to the trainer: batches made on an encoder's own device, on its own
/// thread (another candle device on the same GPU in a CUDA build with one, and another GPU when
/// there are two), stacked on the trainer's device in key order with one device-to-device copy
/// per batch; the encoder's memory is freed on the trainer's thread after the step.
#[test]
fn encoder_rows_reach_the_trainers_device_in_one_copy_per_batch() {
    use latentflow_engine::{Batch, Column};
    use latentflow_operators::device_column::device_column;
    use latentflow_operators::train::rows::{stack, RowBuffer};

    let trainer = test_device();
    let mut encoders = vec![trainer.clone()];
    if trainer.is_cuda() {
        encoders.push(Device::new_cuda(0).unwrap()); // another handle and stream on the same GPU
        if let Ok(second) = Device::new_cuda(1) {
            println!("hand-off from cuda:1");
            encoders.push(second);
        }
    }
    for encoder in encoders {
        let moved = !encoder.same_device(&trainer);
        // Two batches of keys made on an encoder thread: latents [key, key + 0.5], captions [-key].
        let batches: Vec<Batch> = std::thread::spawn({
            let encoder = encoder.clone();
            move || {
                [[4i64, 1, 3], [0, 5, 2]]
                    .iter()
                    .map(|keys| {
                        let latents: Vec<f32> = keys.iter().flat_map(|&k| [k as f32, k as f32 + 0.5]).collect();
                        let captions: Vec<f32> = keys.iter().map(|&k| -k as f32).collect();
                        let latents = Tensor::from_vec(latents, (3, 2), &encoder).unwrap();
                        let captions =
                            Tensor::from_vec(captions, (3, 1), &encoder).unwrap().to_dtype(DType::BF16).unwrap();
                        Batch::new()
                            .with("key", Column::I64(keys.to_vec()))
                            .unwrap()
                            .with("latents", device_column(&latents).unwrap())
                            .unwrap()
                            .with("caption_latents", device_column(&captions).unwrap())
                            .unwrap()
                    })
                    .collect()
            }
        })
        .join()
        .unwrap();
        let mut buffer = RowBuffer::default();
        for batch in batches {
            buffer.push(batch).unwrap();
        }
        let mut rows = buffer.take();
        rows.sort_by_key(|r| r.key);
        let step = stack(&rows, &(vec![2], vec![1]), &trainer).unwrap();
        assert!(step.latents.device().same_device(&trainer) && step.captions.device().same_device(&trainer));
        let want: Vec<Vec<f32>> = (0..6).map(|k| vec![k as f32, k as f32 + 0.5]).collect();
        assert_eq!(step.latents.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap(), want);
        let captions = step.captions.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(captions, (0..6).map(|k| vec![-k as f32]).collect::<Vec<_>>());
        let h = step.handoff;
        match moved {
            true => assert_eq!((h.rows_moved, h.device_copies, h.rows_on_device), (6, 2, 0), "{encoder:?}"),
            false => assert_eq!((h.rows_moved, h.device_copies, h.rows_on_device), (0, 0, 6), "{encoder:?}"),
        }
        drop(rows); // the encoder's buffers go here, on the trainer's thread
                    // The trainer's device still works (its context is current again).
        let sum = (step.latents.sum_all().unwrap().to_device(&Device::Cpu).unwrap()).to_scalar::<f32>().unwrap();
        assert_eq!(sum, 33.0);
    }
}
