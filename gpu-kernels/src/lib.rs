//! # latentflow-gpu-kernels
//!
//! Kernels for the device side of latentflow's pipelines. Each op lives in `ops/<op>.rs` with a
//! CPU reference implementation, which is what runs on machines without CUDA and what the CUDA
//! kernels (compiled at run time with NVRTC behind the `cuda` feature) are tested against.

pub mod error;
pub mod ops;

pub use error::KernelError;
