//! The pieces of the SD2-base training step timed one by one on the GPU (built with `--features
//! cuda`, run by `bench/gpu/run.sh` next to `bench/gpu/pytorch_components.py`, which times the
//! same pieces in PyTorch + diffusers): 3x3 convolutions at each UNet resolution, GroupNorm +
//! SiLU, self- and cross-attention alone, a ResNet block and a transformer block at the top
//! level (forward + backward, bf16 activations, f32 master weights), and the optimizer step
//! (global gradient norm + clipped AdamW over all SD2-base parameters). Each is timed with CUDA
//! events around `--iters` runs after two warm-up runs, so gaps where the GPU waits for the host
//! count, as they do in a step. Prints one JSON line per piece.
//!
//! ```text
//! gpu_components [--batch 32] [--iters 5]
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use latentflow_bench::gpu::{arg, time_ms, Result};
use latentflow_operators::models::blocks::ResnetBlock;
use latentflow_operators::models::nn::{attention, Conv2d, GroupNorm};
use latentflow_operators::models::unet::Transformer2D;
use latentflow_operators::models::{UNet, UNetConfig, Weights};
use latentflow_operators::training::adamw::{AdamW, AdamWConfig};
use latentflow_operators::training::grads::{clip_coefficient, global_norm};

/// A random bf16 activation that takes gradients.
fn activation(device: &Device, shape: &[usize], seed: u64) -> Result<Var> {
    let mut rng = latentflow_operators::rng::Rng::new(seed, 7);
    let values = Tensor::from_vec(rng.normals(shape.iter().product()), shape, device)?.to_dtype(DType::BF16)?;
    Ok(Var::from_tensor(&values)?)
}

/// Forward, then backward from the sum of the output (what PyTorch's side does too).
fn forward_backward(forward: impl Fn() -> Result<Tensor>) -> impl FnMut() -> Result<()> {
    move || {
        let y = forward()?;
        y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        Ok(())
    }
}

fn main() -> Result<()> {
    if !latentflow_gpu_kernels::kernel::gpu_available() {
        eprintln!("gpu_components: no NVIDIA GPU (or driver) on this machine");
        std::process::exit(2);
    }
    let batch: usize = arg("--batch").map_or(32, |s| s.parse().expect("--batch"));
    let iters: usize = arg("--iters").map_or(5, |s| s.parse().expect("--iters"));
    let device = Device::new_cuda(0)?;
    let weights = Weights::random(3, &device, true);
    let report = |component: &str, ms: Result<f64>| {
        let line = match ms {
            Ok(ms) => serde_json::json!({"framework": "latentflow", "component": component, "batch": batch, "ms": ms}),
            Err(e) => {
                serde_json::json!({"framework": "latentflow", "component": component, "batch": batch, "error": e.to_string()})
            }
        };
        println!("{line}");
    };

    for (channels, size) in [(320, 32), (640, 16), (1280, 8), (1280, 4)] {
        let conv = Conv2d::new(&weights.at(&format!("conv{channels}_{size}")), channels, channels, 3, 1, 1)?;
        let x = activation(&device, &[batch, channels, size, size], 1)?;
        let ms = time_ms(&device, iters, forward_backward(|| Ok(conv.forward(x.as_tensor())?)));
        report(&format!("conv3x3 {channels}ch {size}x{size} fwd+bwd"), ms);
    }

    let norm = GroupNorm::new(&weights.at("norm"), 32, 320, 1e-5)?;
    let x = activation(&device, &[batch, 320, 32, 32], 2)?;
    report(
        "groupnorm+silu 320ch 32x32 fwd+bwd",
        time_ms(&device, iters, forward_backward(|| Ok(norm.forward_silu(x.as_tensor())?))),
    );

    let q = activation(&device, &[batch, 1024, 320], 3)?;
    let kv = activation(&device, &[batch, 1024, 320], 4)?;
    let text_kv = activation(&device, &[batch, 77, 320], 5)?;
    report(
        "attention self 1024 tokens, 5 heads x 64 fwd+bwd",
        time_ms(
            &device,
            iters,
            forward_backward(|| Ok(attention(q.as_tensor(), kv.as_tensor(), kv.as_tensor(), 5, None)?)),
        ),
    );
    report(
        "attention cross 1024x77, 5 heads x 64 fwd+bwd",
        time_ms(
            &device,
            iters,
            forward_backward(|| Ok(attention(q.as_tensor(), text_kv.as_tensor(), text_kv.as_tensor(), 5, None)?)),
        ),
    );

    let resnet = ResnetBlock::new(&weights.at("resnet"), 320, 320, Some(1280), 32, 1e-5, 1.0)?;
    let temb = activation(&device, &[batch, 1280], 6)?;
    report(
        "resnet block 320ch 32x32 fwd+bwd",
        time_ms(&device, iters, forward_backward(|| Ok(resnet.forward(x.as_tensor(), Some(temb.as_tensor()))?))),
    );

    let transformer = Transformer2D::new(&weights.at("transformer"), 320, 5, 1, 1024, 32, true)?;
    let context = activation(&device, &[batch, 77, 1024], 7)?;
    report(
        "transformer block 320ch 32x32 fwd+bwd",
        time_ms(&device, iters, forward_backward(|| Ok(transformer.forward(x.as_tensor(), context.as_tensor())?))),
    );

    // The optimizer over every SD2-base parameter, with gradients of the same shapes.
    let unet_weights = Weights::random(4, &device, true);
    let mut config = UNetConfig::preset("sd2-base").expect("sd2-base preset");
    config.sample_size = Some(32);
    let _unet = UNet::new(&config, &unet_weights)?;
    let params = unet_weights.vars();
    let grads: HashMap<String, Tensor> = params
        .iter()
        .map(|(name, var)| Ok((name.clone(), (var.as_tensor().randn_like(0.0, 1e-3)?))))
        .collect::<candle_core::Result<_>>()?;
    let mut optimizer = AdamW::new(AdamWConfig::default());
    report(
        &format!("optimizer step: grad norm + clipped AdamW, {} tensors", params.len()),
        time_ms(&device, iters, || {
            let norm = global_norm(&grads)?;
            optimizer.step_with_grad_scale(&params, &grads, 1e-4, clip_coefficient(norm, 1.0))?;
            Ok(())
        }),
    );
    Ok(())
}
