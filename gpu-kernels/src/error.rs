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
}
