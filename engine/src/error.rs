//! Errors of the engine and of the operators it runs.

use std::path::PathBuf;

use crate::collective::CollectiveError;
use crate::data::DataError;
use crate::plan::PlanErrors;

/// Why an operator call failed. A failure ends the job (exit code 1); bad rows are rejections
/// ([`OpContext::reject`](crate::OpContext::reject)), not errors.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A batch did not have the expected columns.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The operator panicked; the engine caught it and ends the job.
    #[error("panicked: {0}")]
    Panicked(String),
    /// A collective over the node's workers failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// An error of the operator's own type (a model error, say), kept whole: downcast
    /// [`source`](std::error::Error::source) to branch on it.
    #[error(transparent)]
    Operator(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Anything else, as a message for the user.
    #[error("{0}")]
    Other(String),
}

impl OpError {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        OpError::Other(message.into())
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OpError::Io { path: path.into(), source }
    }

    /// An operator's own error, kept typed.
    ///
    /// ```
    /// use latentflow_engine::OpError;
    /// let e = OpError::wrap(std::fmt::Error);
    /// assert!(matches!(&e, OpError::Operator(inner) if inner.is::<std::fmt::Error>()));
    /// ```
    pub fn wrap(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        OpError::Operator(Box::new(error))
    }

    /// True for a failure that only follows from another one (a collective aborted or cut off
    /// because some other part of the job failed): the job reports the other one first.
    pub fn is_consequence(&self) -> bool {
        matches!(self, OpError::Collective(CollectiveError::Aborted { .. } | CollectiveError::Disconnected { .. }))
    }
}

/// Why a job could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The topology is invalid: every problem, one per line.
    #[error("{0}")]
    Plan(#[from] PlanErrors),
    /// An operator failed (on a GPU worker the message names the device too).
    #[error("node `{node}` (worker {worker}{}): {source}", device.as_deref().map(|d| format!(", {d}")).unwrap_or_default())]
    Operator {
        /// The node id.
        node: String,
        /// The worker it ran on.
        worker: usize,
        /// The worker's device when it is not the CPU (`cuda:0`).
        device: Option<String>,
        /// The cause.
        #[source]
        source: OpError,
    },
    /// The run options are inconsistent (bad hostfile, worker counts, ...).
    #[error("{0}")]
    Options(String),
    /// A cluster peer did not connect in time.
    #[error(
        "process {process} could not connect to all {processes} processes within {timeout_s} s \
         (addresses: {addresses}); check that every process was started with the same hostfile \
         and that the ports are reachable"
    )]
    ConnectTimeout {
        /// This process.
        process: usize,
        /// Number of processes.
        processes: usize,
        /// The hostfile addresses.
        addresses: String,
        /// The timeout.
        timeout_s: f64,
    },
    /// A cluster peer went away mid-run.
    #[error(
        "lost the connection to a peer process ({0}); the job stops here and can be resumed from its last checkpoint"
    )]
    PeerLost(String),
    /// Another process of the cluster failed; this one stopped with it.
    #[error(
        "another process of the job failed (its own error names the node and worker); this one stopped too \
         and the job can be resumed from its last checkpoint"
    )]
    PeerFailed,
    /// A worker thread panicked.
    #[error("worker failed: {0}")]
    Worker(String),
    /// The job stopped but its in-flight work did not drain in time.
    #[error(
        "the job stopped ({reason}) but did not drain within {timeout_s} s (job.drain_timeout_s); \
         exiting without it: outputs after the last checkpoint are incomplete"
    )]
    DrainTimeout {
        /// Why it stopped.
        reason: String,
        /// The timeout.
        timeout_s: f64,
    },
    /// Writing the profile or trace failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_failure_names_the_node_the_worker_and_a_gpu() {
        let failed = |device: Option<&str>| EngineError::Operator {
            node: "text".into(),
            worker: 1,
            device: device.map(str::to_string),
            source: OpError::msg("CUDA_ERROR_OUT_OF_MEMORY"),
        };
        assert_eq!(failed(None).to_string(), "node `text` (worker 1): CUDA_ERROR_OUT_OF_MEMORY");
        assert_eq!(failed(Some("cuda:0")).to_string(), "node `text` (worker 1, cuda:0): CUDA_ERROR_OUT_OF_MEMORY");
    }
}
