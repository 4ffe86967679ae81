//! Kernel errors.

/// Why a kernel could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The input's length does not match its shape.
    #[error("{op}: input has {found} values but shape {shape:?} needs {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The shape given.
        shape: Vec<usize>,
        /// Values the shape needs.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// Inputs that the op cannot take (sizes that disagree, an unsupported head size).
    #[error("{op}: {message}")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// NVRTC rejected a source.
    #[error("NVRTC could not compile {file} for {arch}: {message}")]
    Compile {
        /// The source file under `src/cuda/`.
        file: &'static str,
        /// The target architecture.
        arch: String,
        /// NVRTC's log.
        message: String,
    },
    /// cuDNN refused or failed a call (an unsupported shape, out of memory).
    #[error("cuDNN: {0}")]
    Cudnn(String),
    /// The CUDA driver failed (no device, out of memory, a failed launch).
    #[error("CUDA driver: {0}")]
    Driver(String),
}

impl KernelError {
    /// A driver error.
    #[cfg(feature = "cuda")]
    pub fn driver(e: cudarc::driver::DriverError) -> KernelError {
        KernelError::Driver(e.to_string())
    }
}
