//! The per-head passes with AVX2 and FMA intrinsics: eight keys per vector, one sweep of
//! multiply-adds per channel. The portable passes in the parent module compute the same
//! thing (the tests check one against the other); the compiler does not vectorise their
//! eight-lane loops across channels, which made them several times slower.

// Index loops: the kernels walk several arrays with different strides by the same index.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{exp_nonpositive, score_one, Head, LANES};

/// True when this CPU runs these passes.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `exp(x)` of eight `x <= 0`: [`exp_nonpositive`] on a vector.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_setzero_ps());
    let round = _mm256_set1_ps(12_582_912.0);
    let shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
    let n = _mm256_sub_ps(shifted, round);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let n_bits = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(round));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127))));
    _mm256_mul_ps(p, two_n)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn load(x: &[f32], at: usize) -> __m256 {
    let lanes = &x[at..at + LANES];
    // SAFETY: `lanes` holds eight f32s; unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn store(x: &mut [f32], at: usize, v: __m256) {
    let lanes = &mut x[at..at + LANES];
    // SAFETY: `lanes` holds eight f32s; unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: __m256) -> f32 {
    let mut lanes = [0f32; LANES];
    store(&mut lanes, 0, v);
    lanes.iter().sum()
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn horizontal_max(v: __m256) -> f32 {
    let mut lanes = [0f32; LANES];
    store(&mut lanes, 0, v);
    lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Query rows handled together: each key and value vector loaded serves this many rows, and
/// the key and value gradients are read and written once per block instead of once per row.
const BLOCK: usize = 4;

/// [`Head::forward`]: per block of query rows, the scores and their maxima, then the
/// exponentials, their sums and the weighted values in one sweep.
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward(head: &Head) -> (Vec<f32>, Vec<f32>) {
    let nq = head.q.len() / head.d;
    let (mut out, mut lse) = (vec![0f32; nq * head.d], vec![0f32; nq]);
    let mut rows = vec![0f32; BLOCK * head.nk()];
    let full_blocks = nq / BLOCK * BLOCK;
    for i in (0..full_blocks).step_by(BLOCK) {
        forward_rows::<BLOCK>(head, i, &mut out, &mut lse, &mut rows);
    }
    for i in full_blocks..nq {
        forward_rows::<1>(head, i, &mut out, &mut lse, &mut rows);
    }
    (out, lse)
}

/// Rows `first..first + R` of [`forward`]; `rows` is scratch of at least R * nk.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn forward_rows<const R: usize>(head: &Head, first: usize, out: &mut [f32], lse: &mut [f32], rows: &mut [f32]) {
    let (d, nk) = (head.d, head.nk());
    let full = nk / LANES * LANES;
    let zero = _mm256_setzero_ps();
    // Scaled queries: scalars for the tail, broadcast vectors [r * d + c] for the groups.
    let qs: Vec<f32> = head.q[first * d..(first + R) * d].iter().map(|q| q * head.scale).collect();
    let qv: Vec<__m256> = qs.iter().map(|&q| _mm256_set1_ps(q)).collect();
    let mut top = [_mm256_set1_ps(f32::NEG_INFINITY); R];
    for j in (0..full).step_by(LANES) {
        let mut scores = [zero; R];
        for c in 0..d {
            let k = load(&head.kt, c * nk + j);
            for r in 0..R {
                scores[r] = _mm256_fmadd_ps(qv[r * d + c], k, scores[r]);
            }
        }
        for r in 0..R {
            top[r] = _mm256_max_ps(top[r], scores[r]);
            store(rows, r * nk + j, scores[r]);
        }
    }
    let mut tops = [0f32; R];
    for r in 0..R {
        tops[r] = horizontal_max(top[r]);
        for j in full..nk {
            let score = score_one(&qs[r * d..(r + 1) * d], &head.kt, nk, j);
            rows[r * nk + j] = score;
            tops[r] = tops[r].max(score);
        }
    }
    let top_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(tops[r]));
    let (mut sums, mut weighted) = ([zero; R], vec![zero; R * d]);
    for j in (0..full).step_by(LANES) {
        let mut p = [zero; R];
        for r in 0..R {
            p[r] = exp8(_mm256_sub_ps(load(rows, r * nk + j), top_v[r]));
            sums[r] = _mm256_add_ps(sums[r], p[r]);
        }
        for c in 0..d {
            let v = load(&head.vt, c * nk + j);
            for r in 0..R {
                weighted[r * d + c] = _mm256_fmadd_ps(p[r], v, weighted[r * d + c]);
            }
        }
    }
    for r in 0..R {
        let mut total = horizontal_sum(sums[r]);
        let mut tail = vec![0f32; d];
        for j in full..nk {
            let p = exp_nonpositive(rows[r * nk + j] - tops[r]);
            total += p;
            for (c, t) in tail.iter_mut().enumerate() {
                *t += p * head.vt[c * nk + j];
            }
        }
        let (i, inv) = (first + r, 1.0 / total);
        for c in 0..d {
            out[i * d + c] = (horizontal_sum(weighted[r * d + c]) + tail[c]) * inv;
        }
        lse[i] = tops[r] + total.ln();
    }
}

/// [`Head::backward`]: one sweep over the keys per block of query rows.
#[target_feature(enable = "avx2,fma")]
pub(super) fn backward(head: &Head, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, nk) = (head.d, head.nk());
    let nq = head.q.len() / d;
    let mut grads = Gradients { dq: vec![0f32; nq * d], dkt: vec![0f32; d * nk], dvt: vec![0f32; d * nk] };
    let full_blocks = nq / BLOCK * BLOCK;
    for i in (0..full_blocks).step_by(BLOCK) {
        backward_rows::<BLOCK>(head, i, o, go, lse, &mut grads);
    }
    for i in full_blocks..nq {
        backward_rows::<1>(head, i, o, go, lse, &mut grads);
    }
    (grads.dq, grads.dkt, grads.dvt)
}

/// What [`backward`] accumulates: dq [nq, d], dk and dv transposed [d, nk].
struct Gradients {
    dq: Vec<f32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
}

/// Rows `first..first + R` of [`backward`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn backward_rows<const R: usize>(head: &Head, first: usize, o: &[f32], go: &[f32], lse: &[f32], grads: &mut Gradients) {
    let (d, nk) = (head.d, head.nk());
    let full = nk / LANES * LANES;
    let zero = _mm256_setzero_ps();
    let rows = first * d..(first + R) * d;
    let (q, go) = (&head.q[rows.clone()], &go[rows.clone()]);
    let qs: Vec<f32> = q.iter().map(|q| q * head.scale).collect();
    let broadcast = |x: &[f32]| -> Vec<__m256> { x.iter().map(|&v| _mm256_set1_ps(v)).collect() };
    let (qv, q_raw, gv) = (broadcast(&qs), broadcast(q), broadcast(go));
    let mut dq_lanes = vec![zero; R * d];
    // dS = P * (dP - rowsum(dO * O)) * scale, with dP = dO V^T and P = exp(S - lse).
    let deltas: [f32; R] =
        std::array::from_fn(|r| go[r * d..(r + 1) * d].iter().zip(&o[(first + r) * d..]).map(|(g, o)| g * o).sum());
    let delta_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(deltas[r]));
    let lse_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(lse[first + r]));
    let scale_v = _mm256_set1_ps(head.scale);
    for j in (0..full).step_by(LANES) {
        let (mut scores, mut dp) = ([zero; R], [zero; R]);
        for c in 0..d {
            let (k, v) = (load(&head.kt, c * nk + j), load(&head.vt, c * nk + j));
            for r in 0..R {
                scores[r] = _mm256_fmadd_ps(qv[r * d + c], k, scores[r]);
                dp[r] = _mm256_fmadd_ps(gv[r * d + c], v, dp[r]);
            }
        }
        let (mut p, mut ds) = ([zero; R], [zero; R]);
        for r in 0..R {
            p[r] = exp8(_mm256_sub_ps(scores[r], lse_v[r]));
            ds[r] = _mm256_mul_ps(_mm256_mul_ps(p[r], _mm256_sub_ps(dp[r], delta_v[r])), scale_v);
        }
        for c in 0..d {
            let at = c * nk + j;
            let k = load(&head.kt, at);
            let (mut dk, mut dv) = (load(&grads.dkt, at), load(&grads.dvt, at));
            for r in 0..R {
                dq_lanes[r * d + c] = _mm256_fmadd_ps(ds[r], k, dq_lanes[r * d + c]);
                dk = _mm256_fmadd_ps(q_raw[r * d + c], ds[r], dk);
                dv = _mm256_fmadd_ps(gv[r * d + c], p[r], dv);
            }
            store(&mut grads.dkt, at, dk);
            store(&mut grads.dvt, at, dv);
        }
    }
    for r in 0..R {
        let (i, qr, gr) = (first + r, &q[r * d..(r + 1) * d], &go[r * d..(r + 1) * d]);
        for c in 0..d {
            grads.dq[i * d + c] = horizontal_sum(dq_lanes[r * d + c]);
        }
        for j in full..nk {
            let p = exp_nonpositive(score_one(&qs[r * d..(r + 1) * d], &head.kt, nk, j) - lse[i]);
            let ds = p * (score_one(gr, &head.vt, nk, j) - deltas[r]) * head.scale;
            for c in 0..d {
                grads.dq[i * d + c] += ds * head.kt[c * nk + j];
                grads.dkt[c * nk + j] += qr[c] * ds;
                grads.dvt[c * nk + j] += gr[c] * p;
            }
        }
    }
}
