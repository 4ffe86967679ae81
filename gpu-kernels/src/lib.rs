//! # latentflow-gpu-kernels
//!
//! Kernels for the device side of latentflow's pipelines: CUDA C sources in `src/cuda/`,
//! compiled at run time with NVRTC and cached per device (`kernel`, behind the `cuda`
//! feature), each with a typed launcher and a CPU reference implementation side by side in
//! `ops/<op>.rs`. The CPU references are what the GPU results are tested against, and what runs
//! on machines without CUDA.
//!
//! ```
//! use latentflow_gpu_kernels::ops::noising::noise_and_target;
//! let (noisy, target) = noise_and_target(&[1.0, 2.0], &[0.5, 0.5], &[0.6], &[0.8], 2, false).unwrap();
//! assert_eq!(noisy, vec![0.6 * 1.0 + 0.8 * 0.5, 0.6 * 2.0 + 0.8 * 0.5]);
//! assert_eq!(target, vec![0.5, 0.5]);
//! ```

pub mod error;
#[cfg(feature = "cuda")]
pub mod kernel;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ops;
pub mod source;

pub use error::KernelError;

/// An element type the kernels read and write: f32, or bf16 (stored as raw bits on the
/// device, converted with round-to-nearest-even, as `half::bf16::from_f32` does).
pub trait Element: Copy + Send + Sync + 'static {
    /// The suffix of the kernels for this type (`f32`, `bf16`).
    const NAME: &'static str;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}

impl Element for half::bf16 {
    const NAME: &'static str = "bf16";
}
