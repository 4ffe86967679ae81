//! The per-head passes with AVX2 and FMA intrinsics: eight keys per vector, one sweep of
//! multiply-adds per channel, exponentials in base 2. The portable passes in the parent module
//! compute the same thing (the tests check one against the other); the compiler does not
//! vectorise their eight-lane loops across channels, which made them several times slower.

// Index loops: the kernels walk several arrays with different strides by the same index.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::f32::consts::{LN_2, LOG2_E};

use super::{exp_nonpositive, score_one, Head, LANES};

/// True when this CPU runs these passes.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `2^x` of eight `x <= 0` to ~2.5e-7 relative: `2^n * p(f)` with `x = n + f`, `|f| <= 1/2`,
/// and a degree-5 polynomial for `2^f` (Chebyshev fit). The passes work in base 2 (the scale
/// times log2(e) folded into the queries), which spares the exp's range reduction by ln 2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp2_8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0)), _mm256_setzero_ps());
    let round = _mm256_set1_ps(12_582_912.0); // 1.5 * 2^23: adding it rounds to an integer.
    let shifted = _mm256_add_ps(x, round);
    let f = _mm256_sub_ps(x, _mm256_sub_ps(shifted, round));
    let mut p = _mm256_set1_ps(1.339_528_5e-3);
    for c in [9.670_77e-3, 5.550_341e-2, 0.240_222_12, LN_2, 1.000_000_05] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    // The low mantissa bits of `shifted` hold n (two's complement, |n| < 2^22).
    let n_bits = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(round));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127))));
    _mm256_mul_ps(p, two_n)
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

/// Runs `$pass::<D>` with the head dim as a constant for the sizes models use (the channel
/// loops unrolled, the per-row vectors' indices checked at compile time), `D = 0` (the size
/// read at run time) otherwise.
macro_rules! by_head_dim {
    ($d:expr, $pass:ident($($arg:expr),*)) => {
        match $d {
            4 => $pass::<4>($($arg),*),
            8 => $pass::<8>($($arg),*),
            16 => $pass::<16>($($arg),*),
            32 => $pass::<32>($($arg),*),
            40 => $pass::<40>($($arg),*),
            64 => $pass::<64>($($arg),*),
            _ => $pass::<0>($($arg),*),
        }
    };
}

/// The head dim: `D`, or the head's own when `D` is 0.
#[inline(always)]
fn head_dim<const D: usize>(head: &Head) -> usize {
    if D == 0 {
        head.d
    } else {
        D
    }
}

/// Checks the sizes the passes' pointer loads rely on: `kt` and `vt` are [d, nk].
fn check_sizes(head: &Head, d: usize) {
    assert!(d > 0 && head.d == d, "head dim {} vs {d}", head.d);
    assert_eq!(head.kt.len() % d, 0, "keys of {d} channels");
    assert_eq!(head.vt.len(), head.kt.len(), "as many values as keys");
}

/// Eight values of `x` from `at`.
///
/// # Safety
/// `at + LANES <= x.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_at(x: &[f32], at: usize) -> __m256 {
    debug_assert!(at + LANES <= x.len());
    // SAFETY: the caller keeps `at..at + LANES` inside `x`; unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
}

/// Writes eight values to `x` from `at`.
///
/// # Safety
/// `at + LANES <= x.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_at(x: &mut [f32], at: usize, v: __m256) {
    debug_assert!(at + LANES <= x.len());
    // SAFETY: the caller keeps `at..at + LANES` inside `x`; unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(at), v) }
}

/// Per-block buffers of the forward pass, allocated once per head.
struct ForwardScratch {
    /// Each row's base-2 scores, then its exponentials [R, nk].
    rows: Vec<f32>,
    /// The block's queries times scale * log2(e) [R * d], and as broadcast vectors.
    qs: Vec<f32>,
    qv: Vec<__m256>,
    /// Weighted values per (row, channel), eight keys a lane, and the tail keys' sums.
    weighted: Vec<__m256>,
    tail: Vec<f32>,
}

/// [`Head::forward`]: per block of query rows, the scores and their maxima, then the
/// exponentials, their sums and the weighted values in one sweep.
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward(head: &Head) -> (Vec<f32>, Vec<f32>) {
    by_head_dim!(head.d, forward_d(head))
}

#[target_feature(enable = "avx2,fma")]
fn forward_d<const D: usize>(head: &Head) -> (Vec<f32>, Vec<f32>) {
    let d = head_dim::<D>(head);
    check_sizes(head, d);
    let nq = head.q.len() / d;
    let (mut out, mut lse) = (vec![0f32; nq * d], vec![0f32; nq]);
    let zero = _mm256_setzero_ps();
    let mut scratch = ForwardScratch {
        rows: vec![0f32; BLOCK * head.nk()],
        qs: vec![0f32; BLOCK * d],
        qv: vec![zero; BLOCK * d],
        weighted: vec![zero; BLOCK * d],
        tail: vec![0f32; BLOCK * d],
    };
    let full_blocks = nq / BLOCK * BLOCK;
    for i in (0..full_blocks).step_by(BLOCK) {
        forward_rows::<BLOCK, D>(head, i, &mut out, &mut lse, &mut scratch);
    }
    for i in full_blocks..nq {
        forward_rows::<1, D>(head, i, &mut out, &mut lse, &mut scratch);
    }
    (out, lse)
}

/// Rows `first..first + R` of [`forward`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn forward_rows<const R: usize, const D: usize>(
    head: &Head,
    first: usize,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut ForwardScratch,
) {
    let (d, nk) = (head_dim::<D>(head), head.nk());
    let full = nk / LANES * LANES;
    let zero = _mm256_setzero_ps();
    let (kt, vt) = (&head.kt[..d * nk], &head.vt[..d * nk]);
    let rows = &mut scratch.rows[..R * nk];
    // Scores in base 2: the queries times scale * log2(e).
    let (qs, qv) = (&mut scratch.qs[..R * d], &mut scratch.qv[..R * d]);
    for ((s, v), &q) in qs.iter_mut().zip(qv.iter_mut()).zip(&head.q[first * d..(first + R) * d]) {
        *s = q * head.scale * LOG2_E;
        *v = _mm256_set1_ps(*s);
    }
    let mut top = [_mm256_set1_ps(f32::NEG_INFINITY); R];
    for j in (0..full).step_by(LANES) {
        let mut scores = [zero; R];
        for c in 0..d {
            // SAFETY: c < d and j + LANES <= nk, so the lanes lie in `kt` [d, nk].
            let k = unsafe { load_at(kt, c * nk + j) };
            for r in 0..R {
                scores[r] = _mm256_fmadd_ps(qv[r * d + c], k, scores[r]);
            }
        }
        for r in 0..R {
            top[r] = _mm256_max_ps(top[r], scores[r]);
            // SAFETY: r < R and j + LANES <= nk: inside `rows` [R, nk].
            unsafe { store_at(rows, r * nk + j, scores[r]) };
        }
    }
    let mut tops = [0f32; R];
    for r in 0..R {
        tops[r] = horizontal_max(top[r]);
        for j in full..nk {
            let score = score_one(&qs[r * d..(r + 1) * d], kt, nk, j);
            rows[r * nk + j] = score;
            tops[r] = tops[r].max(score);
        }
    }
    let top_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(tops[r]));
    let weighted = &mut scratch.weighted[..R * d];
    weighted.fill(zero);
    let mut sums = [zero; R];
    for j in (0..full).step_by(LANES) {
        let mut p = [zero; R];
        for r in 0..R {
            // SAFETY: as for the stores above.
            p[r] = exp2_8(_mm256_sub_ps(unsafe { load_at(rows, r * nk + j) }, top_v[r]));
            sums[r] = _mm256_add_ps(sums[r], p[r]);
        }
        for c in 0..d {
            // SAFETY: as for the keys above; `vt` has the same size.
            let v = unsafe { load_at(vt, c * nk + j) };
            for r in 0..R {
                weighted[r * d + c] = _mm256_fmadd_ps(p[r], v, weighted[r * d + c]);
            }
        }
    }
    let tail = &mut scratch.tail[..R * d];
    tail.fill(0.0);
    for r in 0..R {
        let mut total = horizontal_sum(sums[r]);
        for j in full..nk {
            let p = exp_nonpositive((rows[r * nk + j] - tops[r]) * LN_2);
            total += p;
            for c in 0..d {
                tail[r * d + c] += p * vt[c * nk + j];
            }
        }
        let (i, inv) = (first + r, 1.0 / total);
        for c in 0..d {
            out[i * d + c] = (horizontal_sum(weighted[r * d + c]) + tail[r * d + c]) * inv;
        }
        lse[i] = tops[r] * LN_2 + total.ln();
    }
}

/// What [`backward`] accumulates: dq [nq, d], dk and dv transposed [d, nk].
struct Gradients {
    dq: Vec<f32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
}

/// Per-block buffers of the backward pass, allocated once per head: the block's queries
/// scaled (natural, for the tail keys), as base-2 broadcast vectors, raw, the output
/// gradient's rows, and dq's lanes, all [R * d].
struct BackwardScratch {
    qs: Vec<f32>,
    qv: Vec<__m256>,
    q_raw: Vec<__m256>,
    gv: Vec<__m256>,
    dq_lanes: Vec<__m256>,
}

/// [`Head::backward`]: one sweep over the keys per block of query rows.
#[target_feature(enable = "avx2,fma")]
pub(super) fn backward(head: &Head, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    by_head_dim!(head.d, backward_d(head, o, go, lse))
}

#[target_feature(enable = "avx2,fma")]
fn backward_d<const D: usize>(head: &Head, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = head_dim::<D>(head);
    check_sizes(head, d);
    let (nk, nq) = (head.nk(), head.q.len() / d);
    let mut grads = Gradients { dq: vec![0f32; nq * d], dkt: vec![0f32; d * nk], dvt: vec![0f32; d * nk] };
    let zero = _mm256_setzero_ps();
    let mut scratch = BackwardScratch {
        qs: vec![0f32; BLOCK * d],
        qv: vec![zero; BLOCK * d],
        q_raw: vec![zero; BLOCK * d],
        gv: vec![zero; BLOCK * d],
        dq_lanes: vec![zero; BLOCK * d],
    };
    let full_blocks = nq / BLOCK * BLOCK;
    for i in (0..full_blocks).step_by(BLOCK) {
        backward_rows::<BLOCK, D>(head, i, (o, go, lse), &mut grads, &mut scratch);
    }
    for i in full_blocks..nq {
        backward_rows::<1, D>(head, i, (o, go, lse), &mut grads, &mut scratch);
    }
    (grads.dq, grads.dkt, grads.dvt)
}

/// Rows `first..first + R` of [`backward`], given the output, its gradient and the rows'
/// log-sum-exps.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn backward_rows<const R: usize, const D: usize>(
    head: &Head,
    first: usize,
    (o, go, lse): (&[f32], &[f32], &[f32]),
    grads: &mut Gradients,
    scratch: &mut BackwardScratch,
) {
    let (d, nk) = (head_dim::<D>(head), head.nk());
    let full = nk / LANES * LANES;
    let zero = _mm256_setzero_ps();
    let (kt, vt) = (&head.kt[..d * nk], &head.vt[..d * nk]);
    let (dkt, dvt) = (&mut grads.dkt[..d * nk], &mut grads.dvt[..d * nk]);
    let rows = first * d..(first + R) * d;
    let (q, go) = (&head.q[rows.clone()], &go[rows.clone()]);
    let (qs, qv, q_raw, gv) =
        (&mut scratch.qs[..R * d], &mut scratch.qv[..R * d], &mut scratch.q_raw[..R * d], &mut scratch.gv[..R * d]);
    for (x, (&q, &g)) in q.iter().zip(go).enumerate() {
        qs[x] = q * head.scale;
        // Scores in base 2 for the vector groups (see `exp2_8`).
        qv[x] = _mm256_set1_ps(qs[x] * LOG2_E);
        q_raw[x] = _mm256_set1_ps(q);
        gv[x] = _mm256_set1_ps(g);
    }
    let dq_lanes = &mut scratch.dq_lanes[..R * d];
    dq_lanes.fill(zero);
    // dS = P * (dP - rowsum(dO * O)) * scale, with dP = dO V^T and P = exp(S - lse).
    let deltas: [f32; R] =
        std::array::from_fn(|r| go[r * d..(r + 1) * d].iter().zip(&o[(first + r) * d..]).map(|(g, o)| g * o).sum());
    let delta_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(deltas[r]));
    let lse_v: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(lse[first + r] * LOG2_E));
    let scale_v = _mm256_set1_ps(head.scale);
    for j in (0..full).step_by(LANES) {
        let (mut scores, mut dp) = ([zero; R], [zero; R]);
        for c in 0..d {
            // SAFETY: c < d and j + LANES <= nk, so the lanes lie in `kt` and `vt` [d, nk].
            let (k, v) = unsafe { (load_at(kt, c * nk + j), load_at(vt, c * nk + j)) };
            for r in 0..R {
                scores[r] = _mm256_fmadd_ps(qv[r * d + c], k, scores[r]);
                dp[r] = _mm256_fmadd_ps(gv[r * d + c], v, dp[r]);
            }
        }
        let (mut p, mut ds) = ([zero; R], [zero; R]);
        for r in 0..R {
            p[r] = exp2_8(_mm256_sub_ps(scores[r], lse_v[r]));
            ds[r] = _mm256_mul_ps(_mm256_mul_ps(p[r], _mm256_sub_ps(dp[r], delta_v[r])), scale_v);
        }
        for c in 0..d {
            let at = c * nk + j;
            // SAFETY: as above; the gradients are [d, nk] too.
            let (k, mut dk, mut dv) = unsafe { (load_at(kt, at), load_at(dkt, at), load_at(dvt, at)) };
            for r in 0..R {
                dq_lanes[r * d + c] = _mm256_fmadd_ps(ds[r], k, dq_lanes[r * d + c]);
                dk = _mm256_fmadd_ps(q_raw[r * d + c], ds[r], dk);
                dv = _mm256_fmadd_ps(gv[r * d + c], p[r], dv);
            }
            // SAFETY: as above.
            unsafe {
                store_at(dkt, at, dk);
                store_at(dvt, at, dv);
            }
        }
    }
    for r in 0..R {
        let (i, qr, gr) = (first + r, &q[r * d..(r + 1) * d], &go[r * d..(r + 1) * d]);
        for c in 0..d {
            grads.dq[i * d + c] = horizontal_sum(dq_lanes[r * d + c]);
        }
        for j in full..nk {
            let p = exp_nonpositive(score_one(&qs[r * d..(r + 1) * d], kt, nk, j) - lse[i]);
            let ds = p * (score_one(gr, vt, nk, j) - deltas[r]) * head.scale;
            for c in 0..d {
                grads.dq[i * d + c] += ds * kt[c * nk + j];
                dkt[c * nk + j] += qr[c] * ds;
                dvt[c * nk + j] += gr[c] * p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp2_8` of eight values, for a CPU with AVX2 and FMA.
    fn exp2_of(x: [f32; LANES]) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: callers check `available()`.
        unsafe { store(&mut out, 0, exp2_8(load_at(&x, 0))) };
        out
    }

    #[test]
    fn exp2_is_within_three_ten_millionths_over_its_range() {
        if !available() {
            return;
        }
        for start in 0..2_000 {
            // -100 to 0 in steps that hit every fractional position.
            let x: [f32; LANES] = std::array::from_fn(|l| -((start * LANES + l) as f32) * 0.006_25);
            for (got, x) in exp2_of(x).iter().zip(x) {
                let want = (x as f64).exp2();
                assert!(((*got as f64) - want).abs() <= 3e-7 * want, "2^{x}: {got} vs {want}");
            }
        }
        assert_eq!(exp2_of([-200.0; LANES])[0], 2f32.powi(-126), "clamped, not wrapped");
    }
}
