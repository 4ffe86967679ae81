//! u8 CHW images → f32 in [-1, 1], optionally flipped horizontally.
//!
//! Image batches cross threads (and later PCIe) as u8 and are normalised where the tensor is
//! made. The float operations follow torchvision exactly, `to_tensor` (`x / 255`) then
//! `normalize(0.5, 0.5)` (`(x - 0.5) / 0.5`), in f32 and in that order, so the result is
//! bit-identical to the reference preprocessing.

use crate::KernelError;

/// Normalises a batch of u8 images, shape `[n, c, h, w]`, to f32 in [-1, 1]. Images whose entry
/// in `flip` is true are mirrored left to right (`flip` may be empty for no flips).
///
/// ```
/// use latentflow_gpu_kernels::ops::normalize::normalize_u8_chw;
/// let out = normalize_u8_chw(&[0, 255, 128, 64], [1, 1, 2, 2], &[true]).unwrap();
/// assert_eq!(out, vec![1.0, -1.0, (64.0f32 / 255.0 - 0.5) / 0.5, (128.0f32 / 255.0 - 0.5) / 0.5]);
/// ```
pub fn normalize_u8_chw(src: &[u8], shape: [usize; 4], flip: &[bool]) -> Result<Vec<f32>, KernelError> {
    let [n, c, h, w] = shape;
    let expected = n * c * h * w;
    if src.len() != expected {
        return Err(KernelError::Shape { op: "normalize_u8_chw", shape: shape.to_vec(), expected, found: src.len() });
    }
    // One lookup table: 256 possible inputs, each computed with the reference's float ops.
    let table: Vec<f32> = (0..=255u8).map(|x| (f32::from(x) / 255.0 - 0.5) / 0.5).collect();
    let mut out = vec![0.0f32; expected];
    let image = c * h * w;
    for (i, (dst, src)) in out.chunks_exact_mut(image).zip(src.chunks_exact(image)).enumerate() {
        let mirrored = flip.get(i).copied().unwrap_or(false);
        for (dst_row, src_row) in dst.chunks_exact_mut(w).zip(src.chunks_exact(w)) {
            if mirrored {
                for (d, s) in dst_row.iter_mut().zip(src_row.iter().rev()) {
                    *d = table[usize::from(*s)];
                }
            } else {
                for (d, s) in dst_row.iter_mut().zip(src_row) {
                    *d = table[usize::from(*s)];
                }
            }
        }
    }
    Ok(out)
}

/// The CUDA kernel: `src` u8 `[n, c, h, w]` on the device into `dst` (f32 or bf16), with an
/// optional per-image flip mask (`flip[i] != 0` mirrors image `i`). Same results as
/// [`normalize_u8_chw`] (bit for bit in f32; bf16 is that value rounded to nearest even).
#[cfg(feature = "cuda")]
pub fn normalize_u8_chw_cuda<T: crate::Element + cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    src: &cudarc::driver::CudaView<'_, u8>,
    flip: Option<&cudarc::driver::CudaView<'_, u8>>,
    shape: [usize; 4],
    dst: &mut cudarc::driver::CudaViewMut<'_, T>,
) -> Result<(), KernelError> {
    use crate::kernel::{elementwise, function, launched};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    let [n, c, h, w] = shape;
    let total = n * c * h * w;
    if src.len() != total || dst.len() != total {
        return Err(KernelError::Shape {
            op: "normalize_u8_chw",
            shape: shape.to_vec(),
            expected: total,
            found: src.len().min(dst.len()),
        });
    }
    if flip.is_some_and(|f| f.len() != n) {
        return Err(KernelError::Unsupported {
            op: "normalize_u8_chw",
            message: format!("flip has {} entries for {n} images", flip.map_or(0, |f| f.len())),
        });
    }
    if total == 0 {
        return Ok(());
    }
    let func = function(stream, Kernel::Normalize, &format!("normalize_u8_{}", T::NAME))?;
    let (images, image_len, width) = (n as i64, (c * h * w) as i64, w as i32);
    let no_flip = 0u64;
    let mut launch = stream.launch_builder(&func);
    launch.arg(src);
    match flip {
        Some(f) => launch.arg(f),
        None => launch.arg(&no_flip),
    };
    launch.arg(dst).arg(&images).arg(&image_len).arg(&width);
    // SAFETY: the argument list matches `normalize_u8_<T>` in cuda/normalize.cu, and every
    // buffer holds the `total` elements (or `n` flags) the kernel touches, checked above.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(elementwise(total)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_float_ops_for_every_value() {
        let src: Vec<u8> = (0..=255).collect();
        let out = normalize_u8_chw(&src, [1, 1, 1, 256], &[]).unwrap();
        for (x, y) in src.iter().zip(&out) {
            assert_eq!(y.to_bits(), ((f32::from(*x) / 255.0 - 0.5) / 0.5).to_bits());
        }
        assert_eq!(out[0], -1.0);
        assert_eq!(out[255], 1.0);
    }

    #[test]
    fn flips_only_the_chosen_images_row_by_row() {
        // Two images, 1 channel, 2x2: flip the second only.
        let src = [0, 255, 255, 0, 10, 20, 30, 40];
        let out = normalize_u8_chw(&src, [2, 1, 2, 2], &[false, true]).unwrap();
        let v = |x: u8| (f32::from(x) / 255.0 - 0.5) / 0.5;
        assert_eq!(out, vec![v(0), v(255), v(255), v(0), v(20), v(10), v(40), v(30)]);
    }

    #[test]
    fn rejects_a_shape_that_does_not_fit() {
        let err = normalize_u8_chw(&[0; 5], [1, 1, 2, 2], &[]).unwrap_err();
        assert_eq!(err.to_string(), "normalize_u8_chw: input has 5 values but shape [1, 1, 2, 2] needs 4");
    }
}
