//! # latentflow-engine
//!
//! The engine of latentflow: it checks topologies into [`Plan`]s and runs them as one timely
//! dataflow with end-to-end backpressure. Operators (in the `latentflow-operators` crate)
//! implement one of four shapes, [`Source`], [`Map`], [`Stage`] and [`Sink`], and never see
//! timely: this crate decides which thread runs them, holds each epoch open until its work is
//! done, routes batches to the workers a node is placed on, and counts everything.
//!
//! Time is a `u64` epoch: one global training step, or one batch when nothing trains. A source
//! opens epoch `t` only once every sink has finished epoch `t - K` (`job.max_epochs_in_flight`),
//! so memory stays bounded whatever the dataset size and whichever stage is slowest.
//!
//! ```no_run
//! use latentflow_engine::{run, Catalog, Plan, RunOptions};
//! # fn demo(catalog: Catalog) -> Result<(), Box<dyn std::error::Error>> {
//! let plan = Plan::from_file("pipelines/topologies/online.toml".as_ref(), &[], &catalog)?;
//! let report = run(&plan, &RunOptions { workers: 2, ..RunOptions::default() })?;
//! print!("{}", report.profile.table());
//! # Ok(()) }
//! ```

pub mod catalog;
pub mod collective;
pub mod data;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod operator;
pub mod plan;
pub mod runtime;

pub use catalog::{Catalog, DeviceCheck, DuplicateOperator, OperatorEntry};
pub use collective::{Collective, CollectiveError};
pub use data::{Batch, Column, ColumnType, DataError, DeviceTensor, DeviceValues, Field, Ports, Schema};
pub use error::{EngineError, OpError};
pub use metrics::{OperatorProfile, Profile, ProgressMode};
pub use operator::{
    ByteBudget, ContentKey, ContentKeys, InstanceContext, KeyError, Map, NodeSpec, OpContext, OperatorConfig,
    OperatorImpl, OperatorKind, Rejection, Sink, Source, Stage, WorkerInfo,
};
pub use plan::{JobConfig, MapFn, Node, Pipeline, Placement, Plan, PlanErrors, TopologyBuilder, CLOSURE_MAP_TYPE};
pub use runtime::{run, ClusterOptions, RunOptions, RunReport, StopReason};
