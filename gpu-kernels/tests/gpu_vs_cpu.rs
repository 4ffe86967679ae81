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
use latentflow_gpu_kernels::ops::conv::{
    conv2d, conv2d_backward_data, conv2d_backward_data_cuda, conv2d_backward_filter, conv2d_backward_filter_cuda,
    conv2d_cuda, ConvShape,
};
use latentflow_gpu_kernels::ops::ema::{ema, ema_multi_cuda, EmaTensor};
use latentflow_gpu_kernels::ops::group_norm::{
    group_norm, group_norm_backward, group_norm_backward_cuda, group_norm_cuda, GroupNormShape,
};
use latentflow_gpu_kernels::ops::layer_norm::{
    layer_norm, layer_norm_backward, layer_norm_backward_cuda, layer_norm_cuda, LayerNormShape,
};
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
    // Self-attention with a ragged last tile, cross-attention over 77 keys, and (for the bf16
    // tensor-core kernels: 16, 64 and 128) several blocks and key tiles.
    for (head_dim, nq, nk) in [(16, 100, 100), (64, 70, 77), (40, 33, 77), (64, 200, 200), (128, 130, 77)] {
        let s = AttentionShape { batch: 2, heads: 3, head_dim, nq, nk, causal: false };
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
        // bf16 backward (the tensor-core kernels where the head size has them), against the f32
        // reference on the same bf16-rounded inputs, within bf16 rounding of the gradients' scale.
        let round = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        let (qr, kr, vr, gor) = (round(&q), round(&k), round(&v), round(&go));
        let (want_dq, want_dk, want_dv) = attention_backward(&qr, &kr, &vr, &gor, s).unwrap();
        let go16 = up16(&go);
        let mut dq16 = stream.alloc_zeros::<bf16>(q.len()).unwrap();
        let mut dk16 = stream.alloc_zeros::<bf16>(k.len()).unwrap();
        let mut dv16 = stream.alloc_zeros::<bf16>(v.len()).unwrap();
        attention_backward_cuda(
            &stream,
            &q16.as_view(),
            &k16.as_view(),
            &v16.as_view(),
            &o16.as_view(),
            &go16.as_view(),
            s,
            &mut dq16.as_view_mut(),
            &mut dk16.as_view_mut(),
            &mut dv16.as_view_mut(),
        )
        .unwrap();
        for (name, got, want) in [("dq", &dq16, &want_dq), ("dk", &dk16, &want_dk), ("dv", &dv16, &want_dv)] {
            let got: Vec<f32> = stream.clone_dtoh(got).unwrap().iter().map(|v| v.to_f32()).collect();
            let scale = want.iter().fold(0.1f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, want);
            assert!(diff < 4e-2 * scale, "bf16 {name} d{head_dim} nq {nq} nk {nk}: {diff} (scale {scale})");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn group_norm_forward_and_backward_match_the_references() {
    let Some(stream) = stream() else { return };
    let shape = GroupNormShape { batch: 2, channels: 64, spatial: 9 * 11, groups: 32 };
    let x: Vec<f32> = values(2 * 64 * 99, 5).iter().map(|v| v * 3.0 + 0.5).collect();
    let dy = values(x.len(), 8);
    let (gamma, beta) = (values(64, 6), values(64, 7));
    let up = |x: &[f32]| stream.clone_htod(x).unwrap();
    let (xd, dyd, gd, bd) = (up(&x), up(&dy), up(&gamma), up(&beta));
    for silu in [true, false] {
        let want = group_norm(&x, &gamma, &beta, shape, 1e-6, silu).unwrap();
        let mut y = stream.alloc_zeros::<f32>(x.len()).unwrap();
        group_norm_cuda(&stream, &xd.as_view(), &gd.as_view(), &bd.as_view(), shape, 1e-6, silu, &mut y.as_view_mut())
            .unwrap();
        let got = stream.clone_dtoh(&y).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "silu {silu}: {}", max_abs_diff(&got, &want));

        let want = group_norm_backward(&x, &dy, &gamma, &beta, shape, 1e-6, silu).unwrap();
        let mut dx = stream.alloc_zeros::<f32>(x.len()).unwrap();
        let mut dgamma = stream.alloc_zeros::<f32>(2 * 64).unwrap();
        let mut dbeta = stream.alloc_zeros::<f32>(2 * 64).unwrap();
        group_norm_backward_cuda(
            &stream,
            &xd.as_view(),
            &dyd.as_view(),
            &gd.as_view(),
            &bd.as_view(),
            shape,
            1e-6,
            silu,
            &mut dx.as_view_mut(),
            &mut dgamma.as_view_mut(),
            &mut dbeta.as_view_mut(),
        )
        .unwrap();
        for (name, got, want) in
            [("dx", &dx, &want.dx), ("dgamma", &dgamma, &want.dgamma), ("dbeta", &dbeta, &want.dbeta)]
        {
            let got = stream.clone_dtoh(got).unwrap();
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(&got, want) < 1e-4 * scale, "silu {silu} {name}: {}", max_abs_diff(&got, want));
        }
    }
}

/// Values rounded to bf16 and back, so the CPU reference sees exactly what the GPU reads.
fn bf16_rounded(x: &[f32]) -> (Vec<bf16>, Vec<f32>) {
    let rounded: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let back = rounded.iter().map(|v| v.to_f32()).collect();
    (rounded, back)
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn cudnn_convolutions_match_the_references_in_f32_and_bf16() {
    let Some(stream) = stream() else { return };
    let shapes = [
        ConvShape { batch: 2, in_channels: 8, out_channels: 16, height: 9, width: 7, kernel: 3, stride: 1, padding: 1 },
        ConvShape { batch: 3, in_channels: 16, out_channels: 8, height: 8, width: 8, kernel: 3, stride: 2, padding: 1 },
        ConvShape {
            batch: 2,
            in_channels: 32,
            out_channels: 16,
            height: 5,
            width: 6,
            kernel: 1,
            stride: 1,
            padding: 0,
        },
    ];
    for s in shapes {
        let (x, w, dy) = (values(s.input_len(), 11), values(s.weight_len(), 12), values(s.output_len(), 13));
        let up = |x: &[f32]| stream.clone_htod(x).unwrap();
        // f32: FMA math, so the results agree with the f64-summed reference to rounding.
        let (xd, wd, dyd) = (up(&x), up(&w), up(&dy));
        let mut y = stream.alloc_zeros::<f32>(s.output_len()).unwrap();
        conv2d_cuda(&stream, &xd.as_view(), &wd.as_view(), s, &mut y.as_view_mut()).unwrap();
        let mut dx = stream.alloc_zeros::<f32>(s.input_len()).unwrap();
        conv2d_backward_data_cuda(&stream, &dyd.as_view(), &wd.as_view(), s, &mut dx.as_view_mut()).unwrap();
        let mut dw = stream.alloc_zeros::<f32>(s.weight_len()).unwrap();
        conv2d_backward_filter_cuda(&stream, &xd.as_view(), &dyd.as_view(), s, &mut dw.as_view_mut()).unwrap();
        let want = [
            conv2d(&x, &w, s).unwrap(),
            conv2d_backward_data(&dy, &w, s).unwrap(),
            conv2d_backward_filter(&x, &dy, s).unwrap(),
        ];
        for (name, got, want) in [("y", &y, &want[0]), ("dx", &dx, &want[1]), ("dw", &dw, &want[2])] {
            let got = stream.clone_dtoh(got).unwrap();
            assert!(max_abs_diff(&got, want) < 1e-4, "f32 {s:?} {name}: {}", max_abs_diff(&got, want));
        }
        // bf16 inputs, f32 accumulation, bf16 outputs: within the output's rounding.
        let ((xb, x16), (wb, w16), (dyb, dy16)) = (bf16_rounded(&x), bf16_rounded(&w), bf16_rounded(&dy));
        let upb = |x: &[bf16]| stream.clone_htod(x).unwrap();
        let (xd, wd, dyd) = (upb(&xb), upb(&wb), upb(&dyb));
        let mut y = stream.alloc_zeros::<bf16>(s.output_len()).unwrap();
        conv2d_cuda(&stream, &xd.as_view(), &wd.as_view(), s, &mut y.as_view_mut()).unwrap();
        let mut dx = stream.alloc_zeros::<bf16>(s.input_len()).unwrap();
        conv2d_backward_data_cuda(&stream, &dyd.as_view(), &wd.as_view(), s, &mut dx.as_view_mut()).unwrap();
        let mut dw = stream.alloc_zeros::<bf16>(s.weight_len()).unwrap();
        conv2d_backward_filter_cuda(&stream, &xd.as_view(), &dyd.as_view(), s, &mut dw.as_view_mut()).unwrap();
        let want = [
            conv2d(&x16, &w16, s).unwrap(),
            conv2d_backward_data(&dy16, &w16, s).unwrap(),
            conv2d_backward_filter(&x16, &dy16, s).unwrap(),
        ];
        for (name, got, want) in [("y", &y, &want[0]), ("dx", &dx, &want[1]), ("dw", &dw, &want[2])] {
            let got: Vec<f32> = stream.clone_dtoh(got).unwrap().iter().map(|v| v.to_f32()).collect();
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(&got, want) < 1e-2 * scale, "bf16 {s:?} {name}: {}", max_abs_diff(&got, want));
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn layer_norm_forward_and_backward_match_the_references() {
    let Some(stream) = stream() else { return };
    for shape in [LayerNormShape { rows: 300, width: 320 }, LayerNormShape { rows: 77, width: 1024 }] {
        let n = shape.rows * shape.width;
        let x: Vec<f32> = values(n, 21).iter().map(|v| v * 2.0 + 0.3).collect();
        let dy = values(n, 22);
        let (gamma, beta) = (values(shape.width, 23), values(shape.width, 24));
        let up = |x: &[f32]| stream.clone_htod(x).unwrap();
        let (xd, dyd, gd, bd) = (up(&x), up(&dy), up(&gamma), up(&beta));
        let mut y = stream.alloc_zeros::<f32>(n).unwrap();
        layer_norm_cuda(&stream, &xd.as_view(), &gd.as_view(), &bd.as_view(), shape, 1e-5, &mut y.as_view_mut())
            .unwrap();
        let want = layer_norm(&x, &gamma, &beta, shape, 1e-5).unwrap();
        let got = stream.clone_dtoh(&y).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "{shape:?} y: {}", max_abs_diff(&got, &want));
        let blocks = shape.backward_blocks();
        let mut dx = stream.alloc_zeros::<f32>(n).unwrap();
        let mut dgamma = stream.alloc_zeros::<f32>(blocks * shape.width).unwrap();
        let mut dbeta = stream.alloc_zeros::<f32>(blocks * shape.width).unwrap();
        layer_norm_backward_cuda(
            &stream,
            &xd.as_view(),
            &dyd.as_view(),
            &gd.as_view(),
            shape,
            1e-5,
            &mut dx.as_view_mut(),
            &mut dgamma.as_view_mut(),
            &mut dbeta.as_view_mut(),
        )
        .unwrap();
        let (want_dx, want_dgamma, want_dbeta) = layer_norm_backward(&x, &dy, &gamma, shape, 1e-5).unwrap();
        let summed = |partial: Vec<f32>| -> Vec<f32> {
            (0..shape.width).map(|c| (0..blocks).map(|b| partial[b * shape.width + c]).sum()).collect()
        };
        let got = [
            stream.clone_dtoh(&dx).unwrap(),
            summed(stream.clone_dtoh(&dgamma).unwrap()),
            summed(stream.clone_dtoh(&dbeta).unwrap()),
        ];
        for (name, got, want) in
            [("dx", &got[0], &want_dx), ("dgamma", &got[1], &want_dgamma), ("dbeta", &got[2], &want_dbeta)]
        {
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(got, want) < 1e-4 * scale, "{shape:?} {name}: {}", max_abs_diff(got, want));
        }
    }
}
