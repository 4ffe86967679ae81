//! The models against diffusers / transformers on the fixture pipeline (`tests/fixtures/tiny-sd`,
//! random weights, golden outputs computed in float32 on the CPU). Tolerances are the fixtures'
//! recommended ones (10x what a second float32 implementation differs by).

use candle_core::{DType, Tensor};
use latentflow_operators::models::load::{
    load_text_encoder, load_text_encoder_in, load_unet, load_vae, load_vae_in, ModelSource,
};
use latentflow_operators::rng::Rng;
use latentflow_tests::{fixture, golden_tensors, max_abs, max_abs_diff, test_device};

fn part(name: &str) -> ModelSource {
    ModelSource::Folder(fixture(&format!("tiny-sd/{name}")))
}

fn check(name: &str, ours: &Tensor, golden: &Tensor, atol: f32) {
    let diff = max_abs_diff(ours, golden);
    println!("{name}: max abs diff {diff:.3e} (max abs value {:.3})", max_abs(golden));
    assert!(diff <= atol, "{name}: max abs diff {diff} > {atol}");
}

#[test]
fn text_embeddings_match_transformers_with_both_paddings() {
    let (g, device) = (golden_tensors(), test_device());
    let model = load_text_encoder(&part("text_encoder"), &device, 0).unwrap();
    for (ids, expected) in [("input_ids", "text_embeds"), ("input_ids_sd1", "text_embeds_sd1")] {
        let (out, states) = model.hidden_states(&g[ids].to_device(&device).unwrap(), false).unwrap();
        if ids == "input_ids" {
            for (i, state) in states.iter().enumerate() {
                check(&format!("hidden_states.{i}"), state, &g[&format!("debug.text.hidden_states.{i}")], 2e-5);
            }
        }
        check(expected, &out, &g[expected], 2e-5);
    }
}

#[test]
fn vae_posterior_and_decoder_match_diffusers() {
    let (g, device) = (golden_tensors(), test_device());
    let vae = load_vae(&part("vae"), &device, 0).unwrap();
    let posterior = vae.encode(&g["pixels"].to_device(&device).unwrap()).unwrap();
    check("vae_mean", &posterior.mean, &g["vae_mean"], 2e-5);
    check("vae_std", &posterior.std, &g["vae_std"], 1e-5);
    // Samples: reproducible from the job's stream, and standardised they look like N(0, 1).
    let sample = posterior.sample(&mut Rng::new(3, 0)).unwrap();
    assert_eq!(max_abs_diff(&sample, &posterior.sample(&mut Rng::new(3, 0)).unwrap()), 0.0);
    let z: Vec<f32> =
        ((sample - &posterior.mean).unwrap() / &posterior.std).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mean = z.iter().sum::<f32>() / z.len() as f32;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / z.len() as f32;
    assert!(mean.abs() < 0.2 && (var - 1.0).abs() < 0.25, "standardised sample: mean {mean}, var {var}");
    let latents = (&posterior.mean * 0.18215).unwrap();
    check("latents", &latents, &g["latents"], 1e-6);
    let decoded = vae.decode(&g["vae_mean"].to_device(&device).unwrap()).unwrap();
    check("vae_decoded", &decoded, &g["vae_decoded"], 2e-4);
}

#[test]
fn unet_output_with_per_sample_timesteps_matches_diffusers() {
    let (g, device) = (golden_tensors(), test_device());
    let (unet, _) = load_unet(&part("unet"), &device, false, 0).unwrap();
    let timesteps: Vec<f32> = g["timesteps"].to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert_eq!(timesteps, [1.0, 250.0, 500.0, 999.0]);
    let on = |name: &str| g[name].to_device(&device).unwrap();
    let out = unet.forward(&on("noisy"), &timesteps, &on("text_embeds")).unwrap();
    check("unet_out", &out, &g["unet_out"], 5e-5);
}

/// The encoders in bf16 (what `text_encode` and `vae_encode` run on GPUs: the tensor-core causal
/// attention, cuDNN convolutions and fused norms there) within bf16's rounding of the f32
/// goldens: 5 % of the largest value (or of 1); the CPU run differs by 1.3 % (text) and 2.2 % (VAE).
#[test]
fn encoders_in_bf16_match_the_f32_goldens_within_bf16_tolerance() {
    let (g, device) = (golden_tensors(), test_device());
    let relative = |name: &str, ours: &Tensor, golden: &Tensor| {
        let ours = ours.to_dtype(DType::F32).unwrap();
        check(name, &ours, golden, 5e-2 * max_abs(golden).max(1.0));
    };
    let text = load_text_encoder_in(&part("text_encoder"), &device, DType::BF16, 0).unwrap();
    let out = text.forward(&g["input_ids"].to_device(&device).unwrap(), false).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    relative("text_embeds (bf16)", &out, &g["text_embeds"]);
    let vae = load_vae_in(&part("vae"), &device, DType::BF16, 0).unwrap();
    let pixels = g["pixels"].to_device(&device).unwrap().to_dtype(DType::BF16).unwrap();
    let posterior = vae.encode(&pixels).unwrap();
    relative("vae_mean (bf16)", &posterior.mean, &g["vae_mean"]);
}
