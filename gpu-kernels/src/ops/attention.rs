//! Multi-head attention, forward and backward, without materialising the `[Nq, Nk]` score
//! matrix on the GPU (FlashAttention's recomputation scheme; see `cuda/attention.cu`).
//!
//! Layout as the projections produce it: `q` `[B, Nq, H*D]`, `k` and `v` `[B, Nk, H*D]`, output
//! `[B, Nq, H*D]`; head `h` is the slice `h*D..(h+1)*D` of the last dimension. Scale `1/sqrt(D)`.

use crate::KernelError;

/// Head sizes the CUDA kernels are compiled for (SD2: 64; SD1: 40, 80, 160; the test models:
/// 16, 32). Each is its own NVRTC program, compiled when first used.
pub const HEAD_DIMS: [usize; 7] = [16, 32, 40, 64, 80, 128, 160];

/// The problem sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Queries.
    pub nq: usize,
    /// Keys (and values).
    pub nk: usize,
    /// Query `i` attends to keys `0..=i` only (CLIP's text encoder); the CUDA kernels take it
    /// on the tensor-core path.
    pub causal: bool,
}

impl AttentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn check(&self, q: usize, k: usize, v: usize) -> Result<(), KernelError> {
        let (want_q, want_k) = (self.batch * self.nq * self.width(), self.batch * self.nk * self.width());
        for (found, expected, rows) in [(q, want_q, self.nq), (k, want_k, self.nk), (v, want_k, self.nk)] {
            if found != expected {
                return Err(KernelError::Shape {
                    op: "attention",
                    shape: vec![self.batch, rows, self.width()],
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    /// Index of element `c` of head `h` of row `r` of batch `b` in a `[B, rows, H*D]` buffer.
    fn at(&self, b: usize, r: usize, rows: usize, h: usize, c: usize) -> usize {
        (b * rows + r) * self.width() + h * self.head_dim + c
    }
}

/// Head sizes that also get the tensor-core kernels for bf16 (`mma.sync` m16n8k16 on sm_80 and
/// newer: multiples of 16, up to 128 so the accumulators stay in registers). SD2's 64 is one;
/// SD1's 40 and 160 run the f32-accumulating CUDA-core kernels.
pub const TENSOR_CORE_HEAD_DIMS: [usize; 5] = [16, 32, 64, 80, 128];

const PASSES: [&str; 4] = ["forward", "backward_stats", "backward_query", "backward_key"];

/// The CUDA entry points for one head size: the CUDA-core kernels per element type, then the
/// tensor-core ones (bf16) where the head size has them.
pub fn kernel_names(head_dim: usize) -> Vec<String> {
    let mut names = Vec::new();
    for ty in ["f32", "bf16"] {
        for pass in PASSES {
            names.push(format!("attention_{pass}_{ty}_d{head_dim}"));
        }
    }
    if TENSOR_CORE_HEAD_DIMS.contains(&head_dim) {
        names.extend(PASSES.iter().map(|pass| format!("attention_tc_{pass}_d{head_dim}")));
    }
    names
}

/// Softmax probabilities of query row `i` of head `(b, h)` over all keys.
fn probabilities(q: &[f32], k: &[f32], s: &AttentionShape, b: usize, h: usize, i: usize) -> Vec<f32> {
    let scale = s.scale();
    let scores: Vec<f32> = (0..s.nk)
        .map(|j| {
            if s.causal && j > i {
                return f32::NEG_INFINITY;
            }
            (0..s.head_dim).map(|c| q[s.at(b, i, s.nq, h, c)] * scale * k[s.at(b, j, s.nk, h, c)]).sum()
        })
        .collect();
    let top = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let exp: Vec<f32> = scores.iter().map(|&x| (x - top).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|&e| e / total).collect()
}

/// CPU reference of the forward pass: `softmax(q k^T / sqrt(D)) v` per head.
///
/// ```
/// use latentflow_gpu_kernels::ops::attention::{attention_forward, AttentionShape};
/// let shape = AttentionShape { batch: 1, heads: 1, head_dim: 1, nq: 1, nk: 2, causal: false };
/// // Equal scores: the output is the mean of the values.
/// let o = attention_forward(&[0.0], &[1.0, 2.0], &[4.0, 8.0], shape).unwrap();
/// assert!((o[0] - 6.0).abs() < 1e-6);
/// ```
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Result<Vec<f32>, KernelError> {
    s.check(q.len(), k.len(), v.len())?;
    let mut o = vec![0f32; q.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.nq {
                let p = probabilities(q, k, &s, b, h, i);
                for c in 0..s.head_dim {
                    o[s.at(b, i, s.nq, h, c)] = (0..s.nk).map(|j| p[j] * v[s.at(b, j, s.nk, h, c)]).sum();
                }
            }
        }
    }
    Ok(o)
}

/// Gradients `(dq, dk, dv)` of the attention output's gradient `go`.
pub type AttentionGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// CPU reference of the backward pass: with `P = softmax(S)`, `dV = P^T dO`,
/// `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = dS K / sqrt(D)`, `dK = dS^T Q / sqrt(D)`.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    go: &[f32],
    s: AttentionShape,
) -> Result<AttentionGrads, KernelError> {
    let o = attention_forward(q, k, v, s)?;
    if go.len() != q.len() {
        return Err(KernelError::Shape {
            op: "attention",
            shape: vec![s.batch, s.nq, s.width()],
            expected: q.len(),
            found: go.len(),
        });
    }
    let scale = s.scale();
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.nq {
                let p = probabilities(q, k, &s, b, h, i);
                let row = |x: &[f32], j: usize, rows: usize| -> Vec<f32> {
                    (0..s.head_dim).map(|c| x[s.at(b, j, rows, h, c)]).collect()
                };
                let (goi, oi, qi) = (row(go, i, s.nq), row(&o, i, s.nq), row(q, i, s.nq));
                let delta: f32 = goi.iter().zip(&oi).map(|(a, b)| a * b).sum();
                for j in 0..s.nk {
                    let vj = row(v, j, s.nk);
                    let dp: f32 = goi.iter().zip(&vj).map(|(a, b)| a * b).sum();
                    let ds = p[j] * (dp - delta);
                    for c in 0..s.head_dim {
                        dq[s.at(b, i, s.nq, h, c)] += ds * k[s.at(b, j, s.nk, h, c)] * scale;
                        dk[s.at(b, j, s.nk, h, c)] += ds * qi[c] * scale;
                        dv[s.at(b, j, s.nk, h, c)] += p[j] * goi[c];
                    }
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

#[cfg(feature = "cuda")]
fn head_dim_supported(s: &AttentionShape) -> Result<(), KernelError> {
    if HEAD_DIMS.contains(&s.head_dim) {
        Ok(())
    } else {
        Err(KernelError::Unsupported {
            op: "attention",
            message: format!("head size {} (kernels exist for {HEAD_DIMS:?})", s.head_dim),
        })
    }
}

/// Threads per block and rows per block of the attention kernels (`ATT_ROWS`).
/// Rows (queries or keys) per block of every attention kernel.
#[cfg(feature = "cuda")]
const ROWS_PER_BLOCK: usize = 64;

/// Which kernels run: the CUDA-core ones (one thread per row, `attention_<pass>_<T>_d<D>`) or
/// the tensor-core ones (a warp per 16 rows, `attention_tc_<pass>_d<D>`).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy)]
struct Kernels {
    tensor_cores: bool,
    threads: u32,
}

#[cfg(feature = "cuda")]
impl Kernels {
    /// Tensor cores for bf16 at the head sizes that have them, on sm_80 and newer.
    fn pick<T: crate::Element>(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        s: &AttentionShape,
    ) -> Result<Kernels, KernelError> {
        let tensor_cores = T::NAME == "bf16"
            && TENSOR_CORE_HEAD_DIMS.contains(&s.head_dim)
            && stream.context().compute_capability().map_err(KernelError::driver)?.0 >= 8;
        if s.causal && !tensor_cores {
            return Err(KernelError::Unsupported {
                op: "attention",
                message: format!(
                    "causal attention runs on the tensor-core kernels only: bf16, head sizes \
                     {TENSOR_CORE_HEAD_DIMS:?}, sm_80 or newer (got {}, head size {})",
                    T::NAME,
                    s.head_dim
                ),
            });
        }
        Ok(Kernels { tensor_cores, threads: if tensor_cores { 128 } else { ROWS_PER_BLOCK as u32 } })
    }

    /// Pushes the arguments after `heads`: the tensor-core kernels also take `causal`.
    fn push_tail<'a>(&self, launch: &mut cudarc::driver::LaunchArgs<'a>, causal: &'a i32, scale: &'a f32) {
        use cudarc::driver::PushKernelArg;
        if self.tensor_cores {
            launch.arg(causal);
        }
        launch.arg(scale);
    }

    fn name<T: crate::Element>(&self, pass: &str, s: &AttentionShape) -> String {
        if self.tensor_cores {
            format!("attention_tc_{pass}_d{}", s.head_dim)
        } else {
            format!("attention_{pass}_{}_d{}", T::NAME, s.head_dim)
        }
    }

    fn config(&self, rows: usize, s: &AttentionShape) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, (s.batch * s.heads) as u32, 1),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The CUDA forward kernel: [`attention_forward`] on device buffers, into `o`.
#[cfg(feature = "cuda")]
pub fn attention_forward_cuda<T: crate::Element + cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    q: &cudarc::driver::CudaView<'_, T>,
    k: &cudarc::driver::CudaView<'_, T>,
    v: &cudarc::driver::CudaView<'_, T>,
    s: AttentionShape,
    o: &mut cudarc::driver::CudaViewMut<'_, T>,
) -> Result<(), KernelError> {
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    s.check(q.len(), k.len(), v.len())?;
    head_dim_supported(&s)?;
    s.check(o.len(), k.len(), v.len())?;
    if q.is_empty() || s.nk == 0 {
        return Ok(());
    }
    let kernels = Kernels::pick::<T>(stream, &s)?;
    let func = function(stream, Kernel::Attention { head_dim: s.head_dim }, &kernels.name::<T>("forward", &s))?;
    let (nq, nk, heads, causal, scale) = (s.nq as i32, s.nk as i32, s.heads as i32, i32::from(s.causal), s.scale());
    let mut launch = stream.launch_builder(&func);
    launch.arg(q).arg(k).arg(v).arg(o).arg(&nq).arg(&nk).arg(&heads);
    kernels.push_tail(&mut launch, &causal, &scale);
    // SAFETY: arguments match `attention_forward_<T>_d<D>` and `attention_tc_forward_d<D>`
    // (bf16 only); every buffer's size is checked.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(kernels.config(s.nq, &s)) })
}

/// The CUDA backward kernels: [`attention_backward`] on device buffers, into `dq`, `dk`, `dv`
/// (three launches: per-query statistics, query gradients, key and value gradients).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_cuda<T: crate::Element + cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    q: &cudarc::driver::CudaView<'_, T>,
    k: &cudarc::driver::CudaView<'_, T>,
    v: &cudarc::driver::CudaView<'_, T>,
    o: &cudarc::driver::CudaView<'_, T>,
    go: &cudarc::driver::CudaView<'_, T>,
    s: AttentionShape,
    dq: &mut cudarc::driver::CudaViewMut<'_, T>,
    dk: &mut cudarc::driver::CudaViewMut<'_, T>,
    dv: &mut cudarc::driver::CudaViewMut<'_, T>,
) -> Result<(), KernelError> {
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    s.check(q.len(), k.len(), v.len())?;
    head_dim_supported(&s)?;
    s.check(o.len(), dk.len(), dv.len())?;
    s.check(go.len(), k.len(), v.len())?;
    s.check(dq.len(), k.len(), v.len())?;
    if q.is_empty() || s.nk == 0 {
        return Ok(());
    }
    let kernels = Kernels::pick::<T>(stream, &s)?;
    let name = |pass: &str| kernels.name::<T>(pass, &s);
    let rows = s.batch * s.heads * s.nq;
    let mut lse = stream.alloc_zeros::<f32>(rows).map_err(crate::KernelError::driver)?;
    let mut delta = stream.alloc_zeros::<f32>(rows).map_err(crate::KernelError::driver)?;
    let (nq, nk, heads, causal, scale) = (s.nq as i32, s.nk as i32, s.heads as i32, i32::from(s.causal), s.scale());

    let stats = function(stream, Kernel::Attention { head_dim: s.head_dim }, &name("backward_stats"))?;
    let mut launch = stream.launch_builder(&stats);
    launch.arg(q).arg(k).arg(o).arg(go).arg(&mut lse).arg(&mut delta).arg(&nq).arg(&nk).arg(&heads);
    kernels.push_tail(&mut launch, &causal, &scale);
    // SAFETY: arguments match `attention_backward_stats_*`; lse and delta hold B*H*Nq values.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(kernels.config(s.nq, &s)) })?;

    let query = function(stream, Kernel::Attention { head_dim: s.head_dim }, &name("backward_query"))?;
    let mut launch = stream.launch_builder(&query);
    launch.arg(q).arg(k).arg(v).arg(go).arg(&lse).arg(&delta).arg(dq).arg(&nq).arg(&nk).arg(&heads);
    kernels.push_tail(&mut launch, &causal, &scale);
    // SAFETY: arguments match `attention_backward_query_*`; sizes checked above.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(kernels.config(s.nq, &s)) })?;

    let key = function(stream, Kernel::Attention { head_dim: s.head_dim }, &name("backward_key"))?;
    let mut launch = stream.launch_builder(&key);
    launch.arg(q).arg(k).arg(v).arg(go).arg(&lse).arg(&delta).arg(dk).arg(dv);
    launch.arg(&nq).arg(&nk).arg(&heads);
    kernels.push_tail(&mut launch, &causal, &scale);
    // SAFETY: arguments match `attention_backward_key_*`; sizes checked above.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(kernels.config(s.nk, &s)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let s = AttentionShape { batch: 1, heads: 2, head_dim: 2, nq: 3, nk: 4, causal: false };
        let (q, k, v) = (values(12, 1), values(16, 2), values(16, 3));
        let go = values(12, 4);
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &go, s).unwrap();
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let o = attention_forward(q, k, v, s).unwrap();
            o.iter().zip(&go).map(|(a, b)| f64::from(a * b)).sum()
        };
        let eps = 1e-2f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in 0..grad.len() {
                let (mut qp, mut kp, mut vp) = (q.clone(), k.clone(), v.clone());
                let (mut qm, mut km, mut vm) = (q.clone(), k.clone(), v.clone());
                let (plus, minus) = match which {
                    0 => (&mut qp[i], &mut qm[i]),
                    1 => (&mut kp[i], &mut km[i]),
                    _ => (&mut vp[i], &mut vm[i]),
                };
                *plus += eps;
                *minus -= eps;
                let numeric = (loss(&qp, &kp, &vp) - loss(&qm, &km, &vm)) / (2.0 * f64::from(eps));
                assert!((numeric - f64::from(grad[i])).abs() < 2e-3, "input {which} [{i}]: {numeric} vs {}", grad[i]);
            }
        }
    }

    #[test]
    fn names_cover_every_head_size_and_type() {
        let names = kernel_names(160);
        assert_eq!(names.len(), 2 * 4);
        assert_eq!(kernel_names(64).len(), 3 * 4);
        assert!(kernel_names(64).contains(&"attention_tc_backward_key_d64".to_string()));
        assert!(names.contains(&"attention_backward_key_bf16_d160".to_string()));
        let wrong = attention_forward(
            &[0.0; 3],
            &[0.0; 4],
            &[0.0; 4],
            AttentionShape { batch: 1, heads: 1, head_dim: 2, nq: 2, nk: 2, causal: false },
        );
        assert!(wrong.is_err());
    }
}
