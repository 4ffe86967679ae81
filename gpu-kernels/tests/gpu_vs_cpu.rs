//! Each CUDA kernel against its CPU reference, on the first GPU. Ignored unless asked for
//! (`--include-ignored`, as `bench/gpu/run.sh` does): a machine without a GPU reports them as
//! ignored, never as passed (the NVRTC compile test still runs there).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use half::bf16;
use latentflow_gpu_kernels::kernel::gpu_available;
use latentflow_gpu_kernels::ops::adamw::{adamw, adamw_multi_cuda, AdamWScalars, AdamWTensor};
use latentflow_gpu_kernels::ops::attention::{
    attention_backward, attention_backward_cuda, attention_forward, attention_forward_cuda, AttentionShape,
};
use latentflow_gpu_kernels::ops::ema::{ema, ema_multi_cuda, EmaTensor};
use latentflow_gpu_kernels::ops::group_norm_silu::{group_norm_silu, group_norm_silu_cuda, GroupNormShape};
use latentflow_gpu_kernels::ops::noising::{noise_and_target, noise_and_target_cuda};
use latentflow_gpu_kernels::ops::normalize::{normalize_u8_chw, normalize_u8_chw_cuda};

fn stream() -> Option<Arc<CudaStream>> {
    assert!(gpu_available(), "no NVIDIA GPU on this machine (the CPU references are tested in the unit tests)");
    Some(CudaContext::new(0).expect("CUDA context on GPU 0").default_stream())
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn normalize_is_bit_identical_in_f32_and_rounded_in_bf16() {
    let Some(stream) = stream() else { return };
    let shape = [3, 3, 17, 29];
    let n: usize = shape.iter().product();
    let src: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
    let flips = [true, false, true];
    let want = normalize_u8_chw(&src, shape, &flips).unwrap();
    let src_d = stream.clone_htod(&src).unwrap();
    let flip_d = stream.clone_htod(&flips.map(u8::from)).unwrap();
    let mut out = stream.alloc_zeros::<f32>(n).unwrap();
    normalize_u8_chw_cuda(&stream, &src_d.as_view(), Some(&flip_d.as_view()), shape, &mut out.as_view_mut()).unwrap();
    let got = stream.clone_dtoh(&out).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    let mut out16 = stream.alloc_zeros::<bf16>(n).unwrap();
    normalize_u8_chw_cuda(&stream, &src_d.as_view(), Some(&flip_d.as_view()), shape, &mut out16.as_view_mut()).unwrap();
    let got16 = stream.clone_dtoh(&out16).unwrap();
    assert!(got16.iter().zip(&want).all(|(a, b)| *a == bf16::from_f32(*b)));
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn noising_matches_the_reference_bit_for_bit() {
    let Some(stream) = stream() else { return };
    let (b, per) = (5, 4 * 8 * 8);
    let (x0, noise) = (values(b * per, 1), values(b * per, 2));
    let acp = [0.99f32, 0.5, 0.1, 0.0047, 0.7];
    let a: Vec<f32> = acp.iter().map(|a| a.sqrt()).collect();
    let s: Vec<f32> = acp.iter().map(|a| (1.0 - a).sqrt()).collect();
    for v_prediction in [false, true] {
        let (want_noisy, want_target) = noise_and_target(&x0, &noise, &a, &s, per, v_prediction).unwrap();
        let up = |x: &[f32]| stream.clone_htod(x).unwrap();
        let (x0_d, noise_d, a_d, s_d) = (up(&x0), up(&noise), up(&a), up(&s));
        let (mut noisy, mut target) =
            (stream.alloc_zeros::<f32>(b * per).unwrap(), stream.alloc_zeros::<f32>(b * per).unwrap());
        noise_and_target_cuda(
            &stream,
            &x0_d.as_view(),
            &noise_d.as_view(),
            &a_d.as_view(),
            &s_d.as_view(),
            per,
            v_prediction,
            &mut noisy.as_view_mut(),
            &mut target.as_view_mut(),
        )
        .unwrap();
        assert_eq!(stream.clone_dtoh(&noisy).unwrap(), want_noisy);
        assert_eq!(stream.clone_dtoh(&target).unwrap(), want_target);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
#[allow(unsafe_code)]
fn adamw_and_ema_over_many_tensors_match_the_reference() {
    use cudarc::driver::DevicePtr;
    let Some(stream) = stream() else { return };
    let lens = [1usize, 300, 7, 4096];
    let s = AdamWScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 3);
    let mut host = Vec::new();
    let mut device = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let seed = 10 * i as u64;
        let (p, g, m) = (values(len, seed), values(len, seed + 1), values(len, seed + 2));
        let v: Vec<f32> = values(len, seed + 3).iter().map(|x| x.abs()).collect();
        let up = |x: &[f32]| stream.clone_htod(x).unwrap();
        device.push((up(&p), up(&g), up(&m), up(&v), stream.alloc_zeros::<bf16>(len).unwrap()));
        host.push((p, g, m, v));
    }
    let ptr = |x: &cudarc::driver::CudaSlice<f32>| x.device_ptr(&stream).0;
    let tensors: Vec<AdamWTensor> = device
        .iter()
        .zip(lens)
        .map(|((p, g, m, v, c), len)| AdamWTensor {
            param: ptr(p),
            grad: ptr(g),
            exp_avg: ptr(m),
            exp_avg_sq: ptr(v),
            bf16_copy: c.device_ptr(&stream).0,
            len,
        })
        .collect();
    // SAFETY: every address is a live buffer of `len` values owned by `device`.
    unsafe { adamw_multi_cuda(&stream, &tensors, &s) }.unwrap();
    for ((p, g, m, v), (pd, _, md, vd, copy)) in host.iter_mut().zip(&device) {
        adamw(p, g, m, v, &s).unwrap();
        assert_eq!(&stream.clone_dtoh(pd).unwrap(), p);
        assert_eq!(&stream.clone_dtoh(md).unwrap(), m);
        assert_eq!(&stream.clone_dtoh(vd).unwrap(), v);
        let copy = stream.clone_dtoh(copy).unwrap();
        assert!(copy.iter().zip(p.iter()).all(|(c, p)| *c == bf16::from_f32(*p)));
    }
    // EMA of the updated weights into shadows of the gradients' buffers.
    let shadows: Vec<EmaTensor> =
        device.iter().zip(lens).map(|((p, g, ..), len)| EmaTensor { shadow: ptr(g), param: ptr(p), len }).collect();
    // SAFETY: as above.
    unsafe { ema_multi_cuda(&stream, &shadows, 0.25) }.unwrap();
    for ((p, g, ..), (_, gd, ..)) in host.iter_mut().zip(&device) {
        ema(g, p, 0.25).unwrap();
        assert_eq!(&stream.clone_dtoh(gd).unwrap(), g);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn attention_forward_and_backward_match_the_reference() {
    let Some(stream) = stream() else { return };
    // Self-attention with a ragged last tile, and cross-attention over 77 keys.
    for (head_dim, nq, nk) in [(16, 100, 100), (64, 70, 77), (40, 33, 77)] {
        let s = AttentionShape { batch: 2, heads: 3, head_dim, nq, nk };
        let width = s.heads * head_dim;
        let (q, k, v) = (values(2 * nq * width, 1), values(2 * nk * width, 2), values(2 * nk * width, 3));
        let go = values(2 * nq * width, 4);
        let want_o = attention_forward(&q, &k, &v, s).unwrap();
        let (want_dq, want_dk, want_dv) = attention_backward(&q, &k, &v, &go, s).unwrap();
        let up = |x: &[f32]| stream.clone_htod(x).unwrap();
        let (qd, kd, vd, god) = (up(&q), up(&k), up(&v), up(&go));
        let mut o = stream.alloc_zeros::<f32>(q.len()).unwrap();
        attention_forward_cuda(&stream, &qd.as_view(), &kd.as_view(), &vd.as_view(), s, &mut o.as_view_mut()).unwrap();
        let got_o = stream.clone_dtoh(&o).unwrap();
        assert!(max_abs_diff(&got_o, &want_o) < 1e-5, "forward d{head_dim}: {}", max_abs_diff(&got_o, &want_o));
        let mut dq = stream.alloc_zeros::<f32>(q.len()).unwrap();
        let mut dk = stream.alloc_zeros::<f32>(k.len()).unwrap();
        let mut dv = stream.alloc_zeros::<f32>(v.len()).unwrap();
        attention_backward_cuda(
            &stream,
            &qd.as_view(),
            &kd.as_view(),
            &vd.as_view(),
            &o.as_view(),
            &god.as_view(),
            s,
            &mut dq.as_view_mut(),
            &mut dk.as_view_mut(),
            &mut dv.as_view_mut(),
        )
        .unwrap();
        for (name, got, want) in [("dq", &dq, &want_dq), ("dk", &dk, &want_dk), ("dv", &dv, &want_dv)] {
            let got = stream.clone_dtoh(got).unwrap();
            let diff = max_abs_diff(&got, want);
            assert!(diff < 1e-4, "{name} d{head_dim}: max abs diff {diff}");
        }
        // bf16 inputs: within bf16 rounding of the f32 result.
        let up16 = |x: &[f32]| stream.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
        let (q16, k16, v16) = (up16(&q), up16(&k), up16(&v));
        let mut o16 = stream.alloc_zeros::<bf16>(q.len()).unwrap();
        attention_forward_cuda(&stream, &q16.as_view(), &k16.as_view(), &v16.as_view(), s, &mut o16.as_view_mut())
            .unwrap();
        let got16: Vec<f32> = stream.clone_dtoh(&o16).unwrap().iter().map(|v| v.to_f32()).collect();
        assert!(max_abs_diff(&got16, &want_o) < 3e-2, "bf16 forward d{head_dim}: {}", max_abs_diff(&got16, &want_o));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn group_norm_silu_matches_the_reference() {
    let Some(stream) = stream() else { return };
    let shape = GroupNormShape { batch: 2, channels: 64, spatial: 9 * 11, groups: 32 };
    let x: Vec<f32> = values(2 * 64 * 99, 5).iter().map(|v| v * 3.0 + 0.5).collect();
    let (gamma, beta) = (values(64, 6), values(64, 7));
    let want = group_norm_silu(&x, &gamma, &beta, shape, 1e-6).unwrap();
    let up = |x: &[f32]| stream.clone_htod(x).unwrap();
    let (xd, gd, bd) = (up(&x), up(&gamma), up(&beta));
    let mut y = stream.alloc_zeros::<f32>(x.len()).unwrap();
    group_norm_silu_cuda(&stream, &xd.as_view(), &gd.as_view(), &bd.as_view(), shape, 1e-6, &mut y.as_view_mut())
        .unwrap();
    let got = stream.clone_dtoh(&y).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
}
