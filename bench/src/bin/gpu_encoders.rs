//! The encoders alone on the GPU (built with `--features cuda`, run by `bench/gpu/run.sh` next
//! to `bench/gpu/pytorch_encoders.py`): the SD2-base VAE encoder on 256 px images and the
//! OpenCLIP ViT-H text tower (SD2's text encoder, penultimate layer) on 77 tokens, random
//! weights, no gradients, in each precision given. Timed warm with CUDA events around `--iters`
//! forward passes after two warm-up passes. Prints one JSON line per encoder and precision, and
//! writes the two configs (diffusers / transformers keys) for the PyTorch side.
//!
//! ```text
//! gpu_encoders [--vae-batch 64] [--text-batch 256] [--iters 5] [--precisions bf16,f32] [--config-dir DIR]
//! ```

use candle_core::{DType, Device, Tensor};
use latentflow_bench::gpu::{arg, time_ms, Result};
use latentflow_operators::models::load::{load_text_encoder_in, load_vae_in, ModelSource};
use latentflow_operators::models::{ClipTextConfig, VaeConfig};
use latentflow_operators::rng::Rng;

fn dtype_of(name: &str) -> DType {
    match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => panic!("--precisions: f32 or bf16, not {other}"),
    }
}

fn vae_rate(device: &Device, dtype: DType, batch: usize, iters: usize) -> Result<f64> {
    let vae = load_vae_in(&ModelSource::Preset("sd2-base".into()), device, dtype, 0)?;
    let mut rng = Rng::new(5, 5);
    let images = Tensor::from_vec(rng.normals(batch * 3 * 256 * 256), (batch, 3, 256, 256), device)?
        .clamp(-1f32, 1f32)?
        .to_dtype(dtype)?;
    let ms = time_ms(device, iters, || {
        let posterior = vae.encode(&images)?;
        let _latents = (&posterior.mean + posterior.std.randn_like(0.0, 1.0)?.mul(&posterior.std)?)?;
        Ok(())
    })?;
    Ok(batch as f64 / (ms / 1000.0))
}

fn text_rate(device: &Device, dtype: DType, batch: usize, iters: usize) -> Result<f64> {
    let clip = load_text_encoder_in(&ModelSource::Preset("sd2-base".into()), device, dtype, 0)?;
    let vocab = clip.config().vocab_size as u32;
    let ids: Vec<u32> = (0..batch * 77).map(|i| (i as u32).wrapping_mul(2_654_435_761) % vocab).collect();
    let ids = Tensor::from_vec(ids, (batch, 77), device)?;
    let ms = time_ms(device, iters, || {
        clip.forward(&ids, true)?;
        Ok(())
    })?;
    Ok(batch as f64 / (ms / 1000.0))
}

fn main() -> Result<()> {
    if !latentflow_gpu_kernels::kernel::gpu_available() {
        eprintln!("gpu_encoders: no NVIDIA GPU (or driver) on this machine");
        std::process::exit(2);
    }
    let vae_batch: usize = arg("--vae-batch").map_or(64, |s| s.parse().expect("--vae-batch"));
    let text_batch: usize = arg("--text-batch").map_or(256, |s| s.parse().expect("--text-batch"));
    let iters: usize = arg("--iters").map_or(5, |s| s.parse().expect("--iters"));
    let precisions = arg("--precisions").unwrap_or_else(|| "bf16,f32".into());
    if let Some(dir) = arg("--config-dir") {
        // The same architectures for the PyTorch side.
        let mut vae = serde_json::to_value(VaeConfig::preset("sd2-base").expect("sd2-base VAE"))?;
        let levels = vae["block_out_channels"].as_array().map_or(0, Vec::len);
        vae["down_block_types"] = vec!["DownEncoderBlock2D"; levels].into();
        vae["up_block_types"] = vec!["UpDecoderBlock2D"; levels].into();
        vae["sample_size"] = 256.into();
        std::fs::write(format!("{dir}/vae_config.json"), serde_json::to_string_pretty(&vae)?)?;
        let text = serde_json::to_value(ClipTextConfig::preset("sd2-base").expect("sd2-base text encoder"))?;
        std::fs::write(format!("{dir}/text_config.json"), serde_json::to_string_pretty(&text)?)?;
    }
    let device = Device::new_cuda(0)?;
    let mut failed = false;
    for precision in precisions.split(',').map(str::trim) {
        let dtype = dtype_of(precision);
        for (encoder, batch, rate) in [
            ("vae", vae_batch, vae_rate(&device, dtype, vae_batch, iters)),
            ("text", text_batch, text_rate(&device, dtype, text_batch, iters)),
        ] {
            let mut line = serde_json::json!({"framework": "latentflow", "encoder": encoder, "precision": precision, "batch": batch});
            match rate {
                Ok(per_s) => line["per_s"] = per_s.into(),
                Err(e) => {
                    failed = true;
                    line["error"] = e.to_string().into();
                }
            }
            println!("{line}");
        }
    }
    std::process::exit(i32::from(failed));
}
