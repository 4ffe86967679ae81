//! A convolution's patches (im2col) for f32 on the CPU as one op with its own backward pass.
//!
//! Composed from candle ops, the patches of a 3x3 convolution are two zero paddings, nine
//! strided windows and a stack: three copies of the activation plus nine window copies, and a
//! backward pass that pads each of the nine window gradients back to the full size and sums
//! them (nine image-sized buffers and adds). Here the forward writes each patch row once,
//! straight from the input, and the backward (col2im) adds each patch row's gradient straight
//! into the input gradient; both are split over (sample, channel) pairs with rayon, so each
//! task owns its output slice.
//!
//! Layout: `x` [B, C, H, W] contiguous; the patches are [B, C*k*k, oh*ow], row `(c, ky, kx)`
//! holding `x[b, c, oy*stride + ky - padding, ox*stride + kx - padding]` (0 outside), the order
//! a `[out, C, k, k]` weight flattens in.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values::{contiguous, with_values};

/// The sizes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Values of one (sample, channel) pair's k*k patch rows.
    fn patch_rows_len(&self) -> usize {
        self.kernel * self.kernel * self.out_height() * self.out_width()
    }

    /// The input column `x` that output column `ox` of kernel column `kx` reads, if inside.
    #[inline(always)]
    fn source(&self, out: usize, k: usize, size: usize) -> Option<usize> {
        (out * self.stride + k).checked_sub(self.padding).filter(|&i| i < size)
    }

    /// Calls `row(ky, kx, oy, input_row, out_range)` for every patch row segment that reads
    /// input: `input_row` is the input row read, `out_range` the output columns `ox` whose
    /// input columns lie inside (the rest read padding).
    fn for_each_segment(&self, mut row: impl FnMut(usize, usize, usize, usize, std::ops::Range<usize>)) {
        let (oh, ow) = (self.out_height(), self.out_width());
        for ky in 0..self.kernel {
            for kx in 0..self.kernel {
                // The first and last output columns whose input column is inside.
                let first = (0..ow).find(|&ox| self.source(ox, kx, self.width).is_some());
                let Some(first) = first else { continue };
                let last = (first..ow).rev().find(|&ox| self.source(ox, kx, self.width).is_some()).unwrap_or(first);
                for oy in 0..oh {
                    if let Some(iy) = self.source(oy, ky, self.height) {
                        row(ky, kx, oy, iy, first..last + 1);
                    }
                }
            }
        }
    }
}

/// The patches op (see the module docs).
struct Patches {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Patches {
    fn geometry(&self, shape: &Shape) -> candle_core::Result<Geometry> {
        let (batch, channels, height, width) = shape.dims4()?;
        if self.kernel == 0 || self.stride == 0 || height.min(width) + 2 * self.padding < self.kernel {
            candle_core::bail!("conv patches: kernel {} stride {} on {:?}", self.kernel, self.stride, shape.dims());
        }
        let (kernel, stride, padding) = (self.kernel, self.stride, self.padding);
        Ok(Geometry { batch, channels, height, width, kernel, stride, padding })
    }
}

impl CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        "conv-patches"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(layout.shape())?;
        let x = contiguous(storage, layout)?;
        let (oh, ow) = (g.out_height(), g.out_width());
        let plane = g.height * g.width;
        // Every value is written: the padding's zeros by the fill, the rest below.
        let mut out = vec![0f32; g.batch * g.channels * g.patch_rows_len()];
        out.par_chunks_mut(g.patch_rows_len()).zip(x.par_chunks(plane)).for_each(|(rows, x)| {
            g.for_each_segment(|ky, kx, oy, iy, range| {
                let row = &mut rows[(ky * g.kernel + kx) * oh * ow + oy * ow..][..ow];
                let input = &x[iy * g.width..][..g.width];
                if g.stride == 1 {
                    let shift = kx + range.start - g.padding;
                    row[range.clone()].copy_from_slice(&input[shift..shift + range.len()]);
                } else {
                    for ox in range {
                        row[ox] = input[ox * g.stride + kx - g.padding];
                    }
                }
            });
        });
        let shape = Shape::from((g.batch, g.channels * g.kernel * g.kernel, oh * ow));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, _patches: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.geometry(x.shape())?;
        let (oh, ow) = (g.out_height(), g.out_width());
        let plane = g.height * g.width;
        let dx = with_values([grad], |[grad]| {
            let mut dx = vec![0f32; x.elem_count()];
            dx.par_chunks_mut(plane).zip(grad.par_chunks(g.patch_rows_len())).for_each(|(dx, rows)| {
                g.for_each_segment(|ky, kx, oy, iy, range| {
                    let row = &rows[(ky * g.kernel + kx) * oh * ow + oy * ow..][..ow];
                    let input = &mut dx[iy * g.width..][..g.width];
                    if g.stride == 1 {
                        let shift = kx + range.start - g.padding;
                        for (d, &v) in input[shift..shift + range.len()].iter_mut().zip(&row[range]) {
                            *d += v;
                        }
                    } else {
                        for ox in range {
                            input[ox * g.stride + kx - g.padding] += row[ox];
                        }
                    }
                });
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Whether [`patches`] runs as the fused op for `x`: f32 on the CPU.
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The patches of a `kernel` x `kernel` convolution of `x` [B, C, H, W] with this stride and
/// zero padding: [B, C*kernel*kernel, oh*ow], differentiable (see the module docs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::conv_patches::patches;
///
/// let x = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?; // [1, 1, 2, 2]
/// let p = patches(&x, 2, 1, 1)?; // 2x2 kernel, padding 1: a 3x3 output
/// assert_eq!(p.dims(), [1, 4, 9]);
/// // Kernel position (0, 0) sees the input shifted down and right by one.
/// assert_eq!(p.get(0)?.get(0)?.to_vec1::<f32>()?, [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn patches(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Patches { kernel, stride, padding })
}

/// The same patches as [`patches`] from candle ops, for any device and dtype: two zero
/// paddings, the k*k strided windows and a stack (see the module docs for what that costs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::conv_patches::{composed_patches, patches};
///
/// let x = Tensor::arange(0f32, 18.0, &Device::Cpu)?.reshape((1, 2, 3, 3))?;
/// let (fused, composed) = (patches(&x, 3, 2, 1)?, composed_patches(&x, 3, 2, 1)?);
/// assert_eq!(composed.to_vec3::<f32>()?, fused.to_vec3::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn composed_patches(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let k = kernel;
    let (oh, ow) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
    // Zero padding, plus stride - 1 at the end so every strided window below fits.
    let pad_end = padding + stride - 1;
    let padded = x.pad_with_zeros(2, padding, pad_end)?.pad_with_zeros(3, padding, pad_end)?;
    let mut windows = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            let window = padded.narrow(2, ky, oh * stride)?.narrow(3, kx, ow * stride)?;
            let window = if stride == 1 {
                window
            } else {
                window
                    .reshape((b, c, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, oh, ow))?
            };
            windows.push(window);
        }
    }
    // [B, C, k*k, oh, ow] flattens in the weight's (c, ky, kx) order.
    Tensor::stack(&windows, 2)?.reshape((b, c * k * k, oh * ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    #[test]
    fn patches_and_their_gradients_match_the_composed_ops() {
        let mut rng = Rng::new(5, 0);
        // (batch, channels, height, width, kernel, stride, padding): the UNet's 3x3 convs, its
        // stride-2 downsamplers, the VAE's unpadded stride 2, odd sizes and a 1x1.
        for (b, c, h, w, k, stride, padding) in [
            (2, 3, 8, 8, 3, 1, 1),
            (1, 2, 7, 5, 3, 2, 1),
            (2, 2, 9, 9, 3, 2, 0),
            (1, 4, 6, 3, 1, 1, 0),
            (1, 1, 4, 4, 2, 1, 1),
            (1, 2, 3, 3, 3, 3, 2),
        ] {
            let x = Var::from_vec(rng.normals(b * c * h * w), (b, c, h, w), &Device::Cpu).unwrap();
            let fused = patches(x.as_tensor(), k, stride, padding).unwrap();
            let expected = composed_patches(x.as_tensor(), k, stride, padding).unwrap();
            let case = format!("{:?}", (b, c, h, w, k, stride, padding));
            assert_eq!(fused.dims(), expected.dims(), "{case}");
            let diff = (&fused - &expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{case}: the same values");
            // A weighted sum, so every patch value's gradient differs.
            let weights = Tensor::from_vec(rng.normals(fused.elem_count()), fused.shape(), &Device::Cpu).unwrap();
            let grad_of = |p: &Tensor| {
                let grads = (p * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (got, want) = (grad_of(&fused), grad_of(&expected));
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{case}: gradient {i}: {g} vs {e}");
            }
        }
    }
}
