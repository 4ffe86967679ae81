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

/// `sum_c weights[c] * rows[c][j..j+8]` for `rows` [d, nk].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn weighted_lanes(weights: &[__m256], rows: &[f32], nk: usize, j: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for (c, &w) in weights.iter().enumerate() {
        acc = _mm256_fmadd_ps(w, load(rows, c * nk + j), acc);
    }
    acc
}

/// [`Head::forward`]: scores and their maximum, then exponentials, their sum and the weighted
/// values in one sweep.
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward(head: &Head) -> (Vec<f32>, Vec<f32>) {
    let (d, nk) = (head.d, head.nk());
    let nq = head.q.len() / d;
    let full = nk / LANES * LANES;
    let (mut out, mut lse) = (vec![0f32; nq * d], vec![0f32; nq]);
    let mut row = vec![0f32; nk];
    let (mut qs, mut qv, mut weighted) = (vec![0f32; d], vec![_mm256_setzero_ps(); d], vec![_mm256_setzero_ps(); d]);
    for i in 0..nq {
        for c in 0..d {
            qs[c] = head.q[i * d + c] * head.scale;
            qv[c] = _mm256_set1_ps(qs[c]);
        }
        let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(LANES) {
            let scores = weighted_lanes(&qv, &head.kt, nk, j);
            top = _mm256_max_ps(top, scores);
            store(&mut row, j, scores);
        }
        let mut top = horizontal_max(top);
        for j in full..nk {
            row[j] = score_one(&qs, &head.kt, nk, j);
            top = top.max(row[j]);
        }
        let (top_v, mut sum) = (_mm256_set1_ps(top), _mm256_setzero_ps());
        weighted.iter_mut().for_each(|w| *w = _mm256_setzero_ps());
        for j in (0..full).step_by(LANES) {
            let p = exp8(_mm256_sub_ps(load(&row, j), top_v));
            sum = _mm256_add_ps(sum, p);
            for (c, w) in weighted.iter_mut().enumerate() {
                *w = _mm256_fmadd_ps(p, load(&head.vt, c * nk + j), *w);
            }
        }
        let mut total = horizontal_sum(sum);
        let mut tail = vec![0f32; d];
        for j in full..nk {
            let p = exp_nonpositive(row[j] - top);
            total += p;
            for (c, t) in tail.iter_mut().enumerate() {
                *t += p * head.vt[c * nk + j];
            }
        }
        let inv = 1.0 / total;
        for c in 0..d {
            out[i * d + c] = (horizontal_sum(weighted[c]) + tail[c]) * inv;
        }
        lse[i] = top + total.ln();
    }
    (out, lse)
}

/// [`Head::backward`]: one sweep over the keys per query.
#[target_feature(enable = "avx2,fma")]
pub(super) fn backward(head: &Head, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, nk) = (head.d, head.nk());
    let nq = head.q.len() / d;
    let full = nk / LANES * LANES;
    let (mut dq, mut dkt, mut dvt) = (vec![0f32; nq * d], vec![0f32; d * nk], vec![0f32; d * nk]);
    let zero = _mm256_setzero_ps();
    let (mut qs, mut qv, mut q_raw, mut gv, mut dq_lanes) =
        (vec![0f32; d], vec![zero; d], vec![zero; d], vec![zero; d], vec![zero; d]);
    let scale_v = _mm256_set1_ps(head.scale);
    for i in 0..nq {
        let (qi, oi, goi) = (&head.q[i * d..(i + 1) * d], &o[i * d..(i + 1) * d], &go[i * d..(i + 1) * d]);
        for c in 0..d {
            qs[c] = qi[c] * head.scale;
            qv[c] = _mm256_set1_ps(qs[c]);
            q_raw[c] = _mm256_set1_ps(qi[c]);
            gv[c] = _mm256_set1_ps(goi[c]);
            dq_lanes[c] = zero;
        }
        // dS = P * (dP - rowsum(dO * O)) * scale, with dP = dO V^T and P = exp(S - lse).
        let delta: f32 = goi.iter().zip(oi).map(|(g, o)| g * o).sum();
        let (delta_v, lse_v) = (_mm256_set1_ps(delta), _mm256_set1_ps(lse[i]));
        for j in (0..full).step_by(LANES) {
            let p = exp8(_mm256_sub_ps(weighted_lanes(&qv, &head.kt, nk, j), lse_v));
            let dp = weighted_lanes(&gv, &head.vt, nk, j);
            let ds = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(dp, delta_v)), scale_v);
            for c in 0..d {
                let at = c * nk + j;
                dq_lanes[c] = _mm256_fmadd_ps(ds, load(&head.kt, at), dq_lanes[c]);
                let (dk, dv) =
                    (_mm256_fmadd_ps(q_raw[c], ds, load(&dkt, at)), _mm256_fmadd_ps(gv[c], p, load(&dvt, at)));
                store(&mut dkt, at, dk);
                store(&mut dvt, at, dv);
            }
        }
        for c in 0..d {
            dq[i * d + c] = horizontal_sum(dq_lanes[c]);
        }
        for j in full..nk {
            let p = exp_nonpositive(score_one(&qs, &head.kt, nk, j) - lse[i]);
            let ds = p * (score_one(goi, &head.vt, nk, j) - delta) * head.scale;
            for c in 0..d {
                dq[i * d + c] += ds * head.kt[c * nk + j];
                dkt[c * nk + j] += qi[c] * ds;
                dvt[c * nk + j] += goi[c] * p;
            }
        }
    }
    (dq, dkt, dvt)
}
