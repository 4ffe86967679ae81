//! Topologies: TOML files (or the Rust builder) checked into a [`Plan`].
//!
//! Both paths share one compiler: the builder writes the same TOML table a file would hold, so
//! a pipeline defined in code is validated exactly like one read from disk.

mod builder;
mod compile;
mod diagnostics;
mod document;
mod epochs;
mod job;
mod pipeline;
mod placement;

use std::path::Path;
use std::sync::Arc;

pub use builder::TopologyBuilder;
pub use compile::{compile, ENGINE_KEYS};
pub use diagnostics::{closest, Location, PlanError, PlanErrors};
pub use document::Document;
pub use job::{parse_device, JobConfig};
pub use pipeline::{MapFn, Node, Pipeline, CLOSURE_MAP_TYPE};
pub use placement::Placement;

use crate::catalog::Catalog;
use crate::data::Schema;
use crate::operator::{NodeSpec, OperatorKind};

/// A checked topology, ready to run: nodes in dependency order with their output schemas.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where it came from (file path or `<builder>`).
    pub origin: String,
    /// The `[job]` settings.
    pub job: JobConfig,
    /// Nodes, every node after its inputs.
    pub nodes: Vec<PlanNode>,
}

/// One node of a [`Plan`].
#[derive(Clone, Debug)]
pub struct PlanNode {
    /// The node id.
    pub id: String,
    /// Its operator type.
    pub type_name: &'static str,
    /// Its shape.
    pub kind: OperatorKind,
    /// Indices (into [`Plan::nodes`]) of its inputs.
    pub inputs: Vec<usize>,
    /// Which workers run it.
    pub placement: Placement,
    /// Where its rejected rows are logged as JSON lines, if anywhere.
    pub reject_log: Option<std::path::PathBuf>,
    /// The columns it outputs.
    pub schema: Schema,
    /// Its checked config.
    pub spec: Arc<dyn NodeSpec>,
}

impl Plan {
    /// Reads, overrides (`--set`) and checks a topology file.
    pub fn from_file(path: &Path, overrides: &[String], catalog: &Catalog) -> Result<Plan, PlanErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PlanErrors(vec![PlanError {
                origin: origin.clone(),
                location: Location::Unknown,
                node: None,
                key: None,
                message: format!("cannot read the topology file: {e}"),
            }])
        })?;
        Plan::from_toml(&origin, &text, overrides, catalog)
    }

    /// Checks topology text; `origin` names it in errors.
    pub fn from_toml(origin: &str, text: &str, overrides: &[String], catalog: &Catalog) -> Result<Plan, PlanErrors> {
        let mut doc = Document::parse(origin, text).map_err(|e| PlanErrors(vec![e]))?;
        // Bad overrides are reported together with whatever else is wrong.
        let mut errors = doc.apply_overrides(overrides).err().unwrap_or_default();
        match compile(&doc, catalog) {
            Ok(plan) if errors.is_empty() => Ok(plan),
            Ok(_) => Err(PlanErrors(errors)),
            Err(PlanErrors(more)) => {
                errors.extend(more);
                Err(PlanErrors(errors))
            }
        }
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&PlanNode> {
        self.nodes.iter().find(|n| n.id == id)
    }
}
