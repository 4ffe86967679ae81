//! What an operator is to the engine: one of four shapes ([`Source`], [`Map`], [`Stage`],
//! [`Sink`]), built from a checked config ([`NodeSpec`]).

mod context;
mod traits;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use context::{ByteBudget, InstanceContext, OpContext, Rejection, WorkerInfo};
pub use traits::{ContentKey, ContentKeys, Map, OperatorImpl, Sink, Source, Stage};

use crate::data::Ports;
use crate::error::OpError;

/// The shape of an operator, which decides how the engine schedules it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperatorKind {
    /// Emits batches; takes no inputs.
    Source,
    /// Stateless per-batch work on the thread pool.
    Map,
    /// A stateful long-lived thread per worker (a model on a device).
    Stage,
    /// Consumes batches; its progress drives the backpressure gate.
    Sink,
    /// Keeps the first row of every content key across all workers and processes (the engine
    /// runs differential-dataflow's `distinct` on the keys); drops the others as `duplicate`.
    Distinct,
}

impl fmt::Display for OperatorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OperatorKind::Source => "source",
            OperatorKind::Map => "map",
            OperatorKind::Stage => "stage",
            OperatorKind::Sink => "sink",
            OperatorKind::Distinct => "distinct",
        })
    }
}

/// A bad value for one key of a node, found by [`NodeSpec::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError {
    /// The key.
    pub key: String,
    /// What is wrong, with the allowed range.
    pub message: String,
}

impl KeyError {
    /// An error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        KeyError { key: key.into(), message: message.into() }
    }

    /// Checks `lo <= value <= hi` and returns an error naming the range otherwise.
    ///
    /// ```
    /// use latentflow_engine::KeyError;
    /// assert!(KeyError::check_range("count", 5, 1, 10).is_none());
    /// let e = KeyError::check_range("count", 0, 1, 10).unwrap();
    /// assert_eq!(e.message, "must be between 1 and 10, got 0");
    /// ```
    pub fn check_range<T: PartialOrd + fmt::Display>(key: &str, value: T, lo: T, hi: T) -> Option<KeyError> {
        (value < lo || value > hi).then(|| KeyError::new(key, format!("must be between {lo} and {hi}, got {value}")))
    }
}

/// A node's checked configuration: what it needs and produces, and how to build an instance.
pub trait NodeSpec: Send + Sync + fmt::Debug + 'static {
    /// Every bad value, one error per key (empty when the config is valid).
    fn validate(&self) -> Vec<KeyError> {
        Vec::new()
    }

    /// The columns the operator needs, adds and drops.
    fn ports(&self) -> Ports;

    /// Builds one instance for one worker. Heavy state (models) belongs in the instance's
    /// `start`, which runs on the instance's own thread.
    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError>;

    /// True for a node whose instances work together (a data-parallel trainer): when it runs on
    /// more than one worker, each instance's context carries a [`Collective`](crate::Collective)
    /// over those workers ([`OpContext::take_collective`]).
    fn collective(&self) -> bool {
        false
    }

    /// For a source: the rows per epoch each instance emits by its own config (its `batch_size`).
    /// When the topology leaves `batch_size` out and a node trains, the plan derives it instead
    /// ([`InstanceContext::batch_size`](super::InstanceContext::batch_size)).
    fn source_batch_size(&self) -> Option<usize> {
        None
    }

    /// For a source: where shard `shard` of `shards` continues, given the positions the shards of
    /// an earlier run with a different number of workers saved (`saved[s]` for its shard `s`;
    /// `None` where a shard had emitted nothing). This is what lets a checkpoint resume on more
    /// or fewer workers or processes; `None` starts the shard at the beginning. By default a
    /// source cannot.
    fn reshard_position(
        &self,
        _saved: &[Option<serde_json::Value>],
        _shard: usize,
        _shards: usize,
    ) -> Result<Option<serde_json::Value>, OpError> {
        Err(OpError::msg("this source cannot continue a position saved with another number of workers; resume with the run's --workers and --processes"))
    }

    /// For a node that trains: the rows every epoch must bring over all its instances (one
    /// optimizer step). Sources that leave their batch size to the plan emit their share of it,
    /// and the plan checks the sources' batch sizes against it.
    fn global_batch_size(&self) -> Option<usize> {
        None
    }

    /// For a node that checkpoints (the trainer): the data position its checkpoint saved
    /// ([`OpContext::data_position`]), which the job's sources seek to before their first
    /// batch. `None` (the default): the sources start at the beginning.
    fn resume_data_position(&self, _job: &crate::plan::JobConfig) -> Result<Option<serde_json::Value>, OpError> {
        Ok(None)
    }
}

/// A config struct that is a registered operator type: its `type` name, shape, documentation
/// and an example the registry's tests check.
///
/// Implementors use `#[serde(deny_unknown_fields)]`; the compiler lists the keys from the
/// struct itself, so documentation and fields cannot drift apart unnoticed.
pub trait OperatorConfig: NodeSpec + Serialize + DeserializeOwned + Sized {
    /// The `type` name in topology files.
    const TYPE: &'static str;
    /// The operator's shape.
    const KIND: OperatorKind;
    /// One line on what it does.
    const SUMMARY: &'static str;
    /// The keys of an example node (TOML, without `type` and `inputs`).
    const EXAMPLE: &'static str;
    /// `(key, description)` for every key.
    const KEYS: &'static [(&'static str, &'static str)];
}
