//! Sums of squares of many f32 tensors in one launch, for the global gradient norm that
//! clipping needs: the tensors are cut into chunks, one block sums each chunk, and the chunks'
//! sums come back to the host in one copy, where each tensor's chunks are added in order. The
//! per-tensor way (a reduction and a host read per tensor) stalls the GPU once per parameter.

/// Values one block sums.
pub const CHUNK: usize = 1 << 16;

/// CPU reference: the sum of squares of each tensor, in f64.
///
/// ```
/// use latentflow_gpu_kernels::ops::grad_norm::sums_of_squares;
/// assert_eq!(sums_of_squares(&[&[3.0, 4.0], &[1.0]]), vec![25.0, 1.0]);
/// ```
pub fn sums_of_squares(tensors: &[&[f32]]) -> Vec<f64> {
    tensors.iter().map(|t| t.iter().map(|&v| f64::from(v) * f64::from(v)).sum()).collect()
}

/// The chunks of tensors of these lengths: `(tensor index, first value, values)`.
///
/// ```
/// use latentflow_gpu_kernels::ops::grad_norm::{chunks, CHUNK};
/// assert_eq!(chunks(&[CHUNK + 1, 0, 2]), vec![(0, 0, CHUNK), (0, CHUNK, 1), (2, 0, 2)]);
/// ```
pub fn chunks(lens: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (t, &len) in lens.iter().enumerate() {
        let mut start = 0;
        while start < len {
            let n = CHUNK.min(len - start);
            out.push((t, start, n));
            start += n;
        }
    }
    out
}

/// [`sums_of_squares`] of contiguous f32 device buffers given as `(address, length)` pairs, on
/// `stream`; chunk sums in f32 on the GPU, added per tensor in f64 on the host.
///
/// # Safety
/// Each address must be the start of at least `length` f32 values on `stream`'s device that
/// stay allocated until this call returns (it waits for the copy of the sums).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub unsafe fn sums_of_squares_cuda(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    tensors: &[(u64, usize)],
) -> Result<Vec<f64>, crate::KernelError> {
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use crate::KernelError;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let lens: Vec<usize> = tensors.iter().map(|t| t.1).collect();
    let chunks = chunks(&lens);
    let mut sums = vec![0f64; tensors.len()];
    if chunks.is_empty() {
        return Ok(sums);
    }
    let pointers: Vec<u64> = chunks.iter().map(|&(t, start, _)| tensors[t].0 + (start * 4) as u64).collect();
    let counts: Vec<i32> = chunks.iter().map(|&(_, _, n)| n as i32).collect();
    let pointers = stream.clone_htod(&pointers).map_err(KernelError::driver)?;
    let counts = stream.clone_htod(&counts).map_err(KernelError::driver)?;
    let mut partial = stream.alloc_zeros::<f32>(chunks.len()).map_err(KernelError::driver)?;
    let func = function(stream, Kernel::Optimizer, "sum_squares_chunks")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&pointers).arg(&counts).arg(&mut partial);
    let config = LaunchConfig { grid_dim: (chunks.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match `sum_squares_chunks` (256 threads); the caller guarantees the
    // addresses.
    launched(unsafe { launch.launch(config) })?;
    let partial = stream.clone_dtoh(&partial).map_err(KernelError::driver)?;
    for (&(t, _, _), sum) in chunks.iter().zip(partial) {
        sums[t] += f64::from(sum);
    }
    Ok(sums)
}
