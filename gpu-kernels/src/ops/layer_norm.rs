//! LayerNorm over the last dimension, forward and backward, one warp per row: the transformer
//! blocks' three norms and every CLIP layer's two. The backward recomputes each row's statistics
//! from the input, and sums the parameter gradients per block of rows.

use crate::KernelError;

/// The widest row the CUDA kernels take (their shared-memory partial sums are sized for it);
/// wider rows use candle's ops.
pub const MAX_WIDTH: usize = 1280;

/// Rows of one block of the backward kernel (`LN_BACKWARD_WARPS`, one warp per row).
pub const BACKWARD_ROWS_PER_BLOCK: usize = 4;

/// The sizes: `x` is `[rows, width]`, normalised over each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerNormShape {
    /// Rows (every dimension but the last).
    pub rows: usize,
    /// Values per row (the last dimension).
    pub width: usize,
}

impl LayerNormShape {
    fn check(&self, op: &'static str, lens: &[usize], gamma: usize) -> Result<(), KernelError> {
        let expected = self.rows * self.width;
        if let Some(&found) = lens.iter().find(|&&n| n != expected) {
            return Err(KernelError::Shape { op, shape: vec![self.rows, self.width], expected, found });
        }
        if gamma != self.width || self.width == 0 {
            return Err(KernelError::Unsupported { op, message: format!("{gamma} scales for rows of {}", self.width) });
        }
        Ok(())
    }

    /// Blocks of the backward kernel for these rows: enough to fill a large GPU, each summing
    /// its rows' parameter gradients.
    pub fn backward_blocks(&self) -> usize {
        self.rows.div_ceil(BACKWARD_ROWS_PER_BLOCK).clamp(1, 1024)
    }
}

/// Mean and `1/sqrt(var + eps)` of a row (sums in f64, biased variance).
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = (row.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
    let var = row.iter().map(|&v| f64::from(v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var as f32 + eps).sqrt())
}

/// CPU reference: `(x - mean) / sqrt(var + eps) * gamma + beta` over each row.
///
/// ```
/// use latentflow_gpu_kernels::ops::layer_norm::{layer_norm, LayerNormShape};
/// let y = layer_norm(&[1.0, 3.0], &[2.0, 2.0], &[0.5, 0.5], LayerNormShape { rows: 1, width: 2 }, 0.0).unwrap();
/// assert_eq!(y, vec![-1.5, 2.5]);
/// ```
pub fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shape: LayerNormShape,
    eps: f32,
) -> Result<Vec<f32>, KernelError> {
    shape.check("layer_norm", &[x.len()], gamma.len())?;
    shape.check("layer_norm", &[x.len()], beta.len())?;
    let mut y = vec![0f32; x.len()];
    for (xs, ys) in x.chunks_exact(shape.width).zip(y.chunks_exact_mut(shape.width)) {
        let (mean, rstd) = stats(xs, eps);
        for (c, (&v, out)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            *out = (v - mean) * rstd * gamma[c] + beta[c];
        }
    }
    Ok(y)
}

/// Gradients `(dx, dgamma, dbeta)` of a LayerNorm.
pub type LayerNormGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// CPU reference of the backward pass: `(dx, dgamma, dbeta)` with `dgamma = sum dy xhat` and
/// `dbeta = sum dy` over all rows, and `dx = rstd (gamma dy - mean(gamma dy) - xhat mean(gamma dy
/// xhat))` per row.
///
/// ```
/// use latentflow_gpu_kernels::ops::layer_norm::{layer_norm_backward, LayerNormShape};
/// // A constant gradient moves no input: the mean absorbs it.
/// let (dx, _, dbeta) =
///     layer_norm_backward(&[1.0, 2.0, 4.0], &[1.0; 3], &[3.0; 3], LayerNormShape { rows: 1, width: 3 }, 1e-6).unwrap();
/// assert!(dx.iter().all(|v| v.abs() < 1e-5) && dbeta == vec![1.0; 3]);
/// ```
pub fn layer_norm_backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    shape: LayerNormShape,
    eps: f32,
) -> Result<LayerNormGrads, KernelError> {
    shape.check("layer_norm_backward", &[x.len(), dy.len()], gamma.len())?;
    let w = shape.width;
    let (mut dx, mut dgamma, mut dbeta) = (vec![0f32; x.len()], vec![0f32; w], vec![0f32; w]);
    for ((xs, dys), dxs) in x.chunks_exact(w).zip(dy.chunks_exact(w)).zip(dx.chunks_exact_mut(w)) {
        let (mean, rstd) = stats(xs, eps);
        let xhat: Vec<f32> = xs.iter().map(|&v| (v - mean) * rstd).collect();
        let mut sums = (0f64, 0f64);
        for c in 0..w {
            dgamma[c] += dys[c] * xhat[c];
            dbeta[c] += dys[c];
            sums.0 += f64::from(gamma[c] * dys[c]);
            sums.1 += f64::from(gamma[c] * dys[c] * xhat[c]);
        }
        let (mean_g, mean_gx) = ((sums.0 / w as f64) as f32, (sums.1 / w as f64) as f32);
        for c in 0..w {
            dxs[c] = rstd * (gamma[c] * dys[c] - mean_g - xhat[c] * mean_gx);
        }
    }
    Ok((dx, dgamma, dbeta))
}

#[cfg(feature = "cuda")]
pub use gpu::{layer_norm_backward_cuda, layer_norm_cuda};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::{LayerNormShape, BACKWARD_ROWS_PER_BLOCK, MAX_WIDTH};
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use crate::KernelError;

    /// The kernel: [`super::layer_norm`] on device buffers (`x`, `y` f32 or bf16; `gamma`,
    /// `beta` f32), eight rows (warps) per block.
    pub fn layer_norm_cuda<T: crate::Element + DeviceRepr>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        gamma: &CudaView<'_, f32>,
        beta: &CudaView<'_, f32>,
        shape: LayerNormShape,
        eps: f32,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        shape.check("layer_norm", &[x.len(), y.len()], gamma.len())?;
        shape.check("layer_norm", &[x.len()], beta.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let func = function(stream, Kernel::LayerNorm, &format!("layer_norm_forward_{}", T::NAME))?;
        let (rows, width) = (shape.rows as i64, shape.width as i32);
        let mut launch = stream.launch_builder(&func);
        launch.arg(x).arg(gamma).arg(beta).arg(y).arg(&rows).arg(&width).arg(&eps);
        let blocks = shape.rows.div_ceil(8).clamp(1, 65_535) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match `layer_norm_forward_<T>`; sizes checked.
        #[allow(unsafe_code)]
        launched(unsafe { launch.launch(config) })
    }

    /// The kernel: [`super::layer_norm_backward`] on device buffers, the parameter gradients as
    /// f32 partial sums `[shape.backward_blocks(), width]`. Rows up to [`MAX_WIDTH`] wide.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_backward_cuda<T: crate::Element + DeviceRepr>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        gamma: &CudaView<'_, f32>,
        shape: LayerNormShape,
        eps: f32,
        dx: &mut CudaViewMut<'_, T>,
        dgamma: &mut CudaViewMut<'_, f32>,
        dbeta: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        shape.check("layer_norm_backward", &[x.len(), dy.len(), dx.len()], gamma.len())?;
        if shape.width > MAX_WIDTH {
            return Err(KernelError::Unsupported {
                op: "layer_norm_backward",
                message: format!("rows of {} (at most {MAX_WIDTH})", shape.width),
            });
        }
        let blocks = shape.backward_blocks();
        for found in [dgamma.len(), dbeta.len()] {
            if found != blocks * shape.width {
                return Err(KernelError::Shape {
                    op: "layer_norm_backward parameter gradients",
                    shape: vec![blocks, shape.width],
                    expected: blocks * shape.width,
                    found,
                });
            }
        }
        if x.is_empty() {
            return Ok(());
        }
        let func = function(stream, Kernel::LayerNorm, &format!("layer_norm_backward_{}", T::NAME))?;
        let (rows, width) = (shape.rows as i64, shape.width as i32);
        let mut launch = stream.launch_builder(&func);
        launch.arg(x).arg(dy).arg(gamma).arg(dx).arg(dgamma).arg(dbeta).arg(&rows).arg(&width).arg(&eps);
        let threads = (32 * BACKWARD_ROWS_PER_BLOCK) as u32;
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match `layer_norm_backward_<T>` (LN_BACKWARD_WARPS warps); sizes checked.
        #[allow(unsafe_code)]
        launched(unsafe { launch.launch(config) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backward reference against central differences of the forward one.
    #[test]
    fn backward_matches_finite_differences() {
        let shape = LayerNormShape { rows: 3, width: 5 };
        let x: Vec<f32> = (0..15).map(|i| ((i * 37 % 23) as f32 / 7.0) - 1.5).collect();
        let dy: Vec<f32> = (0..15).map(|i| ((i * 11 % 13) as f32 / 6.0) - 1.0).collect();
        let (gamma, beta) = ([0.5, -1.5, 2.0, 1.0, 0.3], [0.1, 0.0, -0.3, 0.7, 0.2]);
        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
            let y = layer_norm(x, gamma, beta, shape, 1e-5).unwrap();
            y.iter().zip(&dy).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
        };
        let (dx, dgamma, dbeta) = layer_norm_backward(&x, &dy, &gamma, shape, 1e-5).unwrap();
        let h = 1e-2f32;
        let central = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
        for i in 0..15 {
            let numeric = central(&|e| {
                let mut moved = x.clone();
                moved[i] += e;
                loss(&moved, &gamma, &beta)
            });
            assert!((numeric as f32 - dx[i]).abs() < 2e-2, "dx[{i}]: {numeric} vs {}", dx[i]);
        }
        for c in 0..5 {
            let g = central(&|e| {
                let mut moved = gamma;
                moved[c] += e;
                loss(&x, &moved, &beta)
            });
            let b = central(&|e| {
                let mut moved = beta;
                moved[c] += e;
                loss(&x, &gamma, &moved)
            });
            assert!((g as f32 - dgamma[c]).abs() < 2e-2 && (b as f32 - dbeta[c]).abs() < 2e-2, "channel {c}");
        }
    }
}
