//! The CUDA kernels' CPU references (`latentflow-gpu-kernels`) against the CPU code paths the
//! fixtures validated (`latentflow-operators`): the GPU tests compare each kernel to its
//! reference, and these tests tie each reference to the golden-checked implementation, so a
//! kernel that matches its reference computes what the CPU training path computes.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};
use latentflow_gpu_kernels::ops::adamw::{adamw, AdamWScalars};
use latentflow_gpu_kernels::ops::attention::{attention_backward, attention_forward, AttentionShape};
use latentflow_gpu_kernels::ops::ema::ema;
use latentflow_gpu_kernels::ops::group_norm::{group_norm, GroupNormShape};
use latentflow_gpu_kernels::ops::noising::noise_and_target;
use latentflow_operators::models::fused_attention::fused_attention;
use latentflow_operators::models::nn::{composed_attention, GroupNorm};
use latentflow_operators::models::Weights;
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{AdamW, AdamWConfig, Ema, NoiseSchedule, Prediction, SchedulerConfig};

fn normals(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed, 0).normals(n)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adamw_reference_is_bit_identical_to_the_trainers_optimizer() {
    let config = AdamWConfig::default();
    let (mut p, mut m, mut v) = (normals(1000, 1), vec![0f32; 1000], vec![0f32; 1000]);
    let var = Var::from_tensor(&Tensor::new(p.as_slice(), &Device::Cpu).unwrap()).unwrap();
    let params: BTreeMap<String, Var> = [("w".to_string(), var.clone())].into();
    let mut optimizer = AdamW::new(config);
    for step in 1..=3u64 {
        let g = normals(1000, 10 + step);
        let grads: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::new(g.as_slice(), &Device::Cpu).unwrap())].into();
        let lr = 1e-3 * step as f64;
        optimizer.step(&params, &grads, lr).unwrap();
        let s = AdamWScalars::new(lr, config.beta1, config.beta2, config.eps, config.weight_decay, step);
        adamw(&mut p, &g, &mut m, &mut v, &s).unwrap();
        assert_eq!(values(var.as_tensor()), p, "step {step}");
    }
    let state = optimizer.state_tensors();
    assert_eq!(values(&state["exp_avg.w"]), m);
    assert_eq!(values(&state["exp_avg_sq.w"]), v);
}

#[test]
fn ema_reference_is_bit_identical_to_the_trainers_ema() {
    let w = Var::from_tensor(&Tensor::new(normals(500, 2).as_slice(), &Device::Cpu).unwrap()).unwrap();
    let params: BTreeMap<String, Var> = [("w".to_string(), w.clone())].into();
    let mut trainer_ema = Ema::new(&params, 0.999, 0).unwrap();
    let mut shadow = values(w.as_tensor());
    for step in 1..=4u64 {
        w.set(&Tensor::new(normals(500, 20 + step).as_slice(), &Device::Cpu).unwrap()).unwrap();
        let keep = trainer_ema.decay_at(step);
        trainer_ema.update(&params, step).unwrap();
        if keep > 0.0 {
            ema(&mut shadow, &values(w.as_tensor()), (1.0 - keep) as f32).unwrap();
        } else {
            shadow = values(w.as_tensor());
        }
        assert_eq!(values(&trainer_ema.tensors()["w"]), shadow, "step {step}");
    }
}

#[test]
fn noising_reference_is_bit_identical_to_the_schedule() {
    let mut schedule = NoiseSchedule::new(&SchedulerConfig::default(), std::path::Path::new("default")).unwrap();
    let (b, per) = (4, 4 * 8 * 8);
    let (x0, noise) = (normals(b * per, 3), normals(b * per, 4));
    let timesteps = [0, 250, 731, 999];
    let x0_t = Tensor::from_vec(x0.clone(), (b, 4, 8, 8), &Device::Cpu).unwrap();
    let noise_t = Tensor::from_vec(noise.clone(), (b, 4, 8, 8), &Device::Cpu).unwrap();
    let (a, s) = schedule.sqrt_coefficients(&timesteps);
    for prediction in [Prediction::Epsilon, Prediction::VPrediction] {
        schedule.prediction = prediction;
        let v = prediction == Prediction::VPrediction;
        let (noisy, target) = noise_and_target(&x0, &noise, &a, &s, per, v).unwrap();
        assert_eq!(values(&schedule.add_noise(&x0_t, &noise_t, &timesteps).unwrap()), noisy);
        assert_eq!(values(&schedule.target(&x0_t, &noise_t, &timesteps).unwrap()), target);
    }
}

#[test]
fn attention_reference_matches_the_composed_and_fused_cpu_attention_and_their_gradients() {
    let shape = AttentionShape { batch: 2, heads: 2, head_dim: 16, nq: 12, nk: 9, causal: false };
    let width = shape.heads * shape.head_dim;
    let (q, k, v) = (normals(2 * 12 * width, 5), normals(2 * 9 * width, 6), normals(2 * 9 * width, 7));
    let go = normals(2 * 12 * width, 8);
    let tensor = |x: &[f32], rows: usize| {
        Var::from_tensor(&Tensor::from_vec(x.to_vec(), (2, rows, width), &Device::Cpu).unwrap()).unwrap()
    };
    let (qt, kt, vt) = (tensor(&q, 12), tensor(&k, 9), tensor(&v, 9));
    let got = tensor(&go, 12);
    let want_o = attention_forward(&q, &k, &v, shape).unwrap();
    let (dq, dk, dv) = attention_backward(&q, &k, &v, &go, shape).unwrap();
    for (name, out) in [
        ("composed", composed_attention(&qt, &kt, &vt, shape.heads, None).unwrap()),
        ("fused", fused_attention(&qt, &kt, &vt, shape.heads).unwrap()),
    ] {
        assert!(max_diff(&values(&out), &want_o) < 1e-5, "{name} forward: {}", max_diff(&values(&out), &want_o));
        let grads = (out * got.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for (input, reference) in [(&qt, &dq), (&kt, &dk), (&vt, &dv)] {
            let ours = values(grads.get(input.as_tensor()).unwrap());
            assert!(max_diff(&ours, reference) < 1e-4, "{name} gradient: {}", max_diff(&ours, reference));
        }
    }
}

#[test]
fn group_norm_silu_reference_matches_the_models_group_norm_then_silu() {
    let weights = Weights::random(1, &Device::Cpu, false);
    let norm = GroupNorm::new(&weights.at("norm"), 4, 8, 1e-6).unwrap();
    let x: Vec<f32> = normals(2 * 8 * 25, 9).iter().map(|v| v * 2.0 + 0.3).collect();
    let xt = Tensor::from_vec(x.clone(), (2, 8, 5, 5), &Device::Cpu).unwrap();
    let ours = values(&norm.forward_silu(&xt).unwrap());
    // A fresh GroupNorm has scale 1 and shift 0.
    let shape = GroupNormShape { batch: 2, channels: 8, spatial: 25, groups: 4 };
    let reference = group_norm(&x, &[1.0; 8], &[0.0; 8], shape, 1e-6, true).unwrap();
    assert!(max_diff(&ours, &reference) < 1e-5, "{}", max_diff(&ours, &reference));
}
