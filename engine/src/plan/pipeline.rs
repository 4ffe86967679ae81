//! Pipelines in Rust with nodes as handles: a node's inputs are the values [`Pipeline::add`]
//! returned, so the compiler checks the wiring, and a closure is a map node of its own
//! ([`Pipeline::map`]), with no operator type to register.
//!
//! Underneath it is the [`TopologyBuilder`]: the same TOML tables, the same checks, the same
//! errors as a topology file.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{builder::TopologyBuilder, Location, PlanError, PlanErrors};
use super::{JobConfig, Placement, Plan};
use crate::catalog::{Catalog, OperatorEntry};
use crate::data::{Batch, Ports};
use crate::error::OpError;
use crate::operator::{InstanceContext, Map, NodeSpec, OpContext, OperatorConfig, OperatorImpl, OperatorKind};

/// The operator type closure maps have in plans and profiles.
pub const CLOSURE_MAP_TYPE: &str = "rust_map";

/// A node of a [`Pipeline`], to name as a later node's input or to place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pipeline: u64,
    index: usize,
}

/// The function of a closure map: one batch in, the batch out with the rows it keeps; every row
/// it drops is rejected with [`OpContext::reject`] (the engine fails a map that loses rows).
pub type MapFn = dyn Fn(Batch, &mut OpContext) -> Result<Batch, OpError> + Send + Sync;

/// A pipeline defined in Rust.
///
/// ```
/// use latentflow_engine::{Batch, Catalog, OpContext, OpError, Pipeline};
/// let mut g = Pipeline::new("demo");
/// let read = g.raw("read", "demo_source", [], toml::toml! { count = 64 });
/// // A filter of one's own, as a closure: keeps rows with even keys, rejecting the others.
/// let even = g.map("even", [read], |mut batch: Batch, ctx: &mut OpContext| -> Result<Batch, OpError> {
///     let keep: Vec<bool> = batch.i64s("key")?.iter().map(|k| k % 2 == 0).collect();
///     for (row, kept) in keep.iter().enumerate() {
///         if !kept {
///             ctx.reject(batch.row_key(row), "odd_key");
///         }
///     }
///     batch.retain_rows(&keep);
///     Ok(batch)
/// });
/// g.raw("sink", "null_sink", [even], toml::Table::new());
/// assert_eq!(g.id(even), "even");
/// // With latentflow's operators (`latentflow_operators::registry()`) this compiles to a Plan;
/// // here the catalog is empty, so the compiler reports the unknown types.
/// let errors = g.compile(&Catalog::new(vec![])).unwrap_err().to_string();
/// assert!(errors.contains("unknown operator type `demo_source`"), "{errors}");
/// ```
#[derive(Clone)]
pub struct Pipeline {
    /// Tells this pipeline's handles from another's.
    identity: u64,
    builder: TopologyBuilder,
    ids: Vec<String>,
    closures: Vec<ClosureMap>,
    errors: Vec<String>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline").field("nodes", &self.ids).finish()
    }
}

impl Pipeline {
    /// A pipeline for a job called `name`, with default job settings.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Pipeline {
            identity: NEXT.fetch_add(1, Ordering::Relaxed),
            builder: TopologyBuilder::new(name),
            ids: Vec::new(),
            closures: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Changes job settings.
    pub fn job(&mut self, edit: impl FnOnce(&mut JobConfig)) -> &mut Self {
        self.edit(|b| b.job(edit));
        self
    }

    /// Adds a node of operator config `config` reading from `inputs` (none for a source).
    pub fn add<C: OperatorConfig>(&mut self, id: &str, config: C, inputs: impl IntoIterator<Item = Node>) -> Node {
        let inputs = self.input_ids(id, inputs);
        self.edit(|b| b.node(id, config, &inputs.iter().map(String::as_str).collect::<Vec<_>>()));
        self.push(id)
    }

    /// Adds a node from raw keys, as a topology file would write them (for operator types whose
    /// config struct is not at hand).
    pub fn raw(
        &mut self,
        id: &str,
        type_name: &str,
        inputs: impl IntoIterator<Item = Node>,
        keys: toml::Table,
    ) -> Node {
        let inputs = self.input_ids(id, inputs);
        self.edit(|b| b.raw_node(id, type_name, &inputs.iter().map(String::as_str).collect::<Vec<_>>(), keys));
        self.push(id)
    }

    /// Adds a map node that runs `f` on every batch, keeping its input's columns (a filter, or
    /// an edit of existing columns). See [`Pipeline::map_with_ports`] for one that adds or
    /// removes columns.
    pub fn map<F>(&mut self, id: &str, inputs: impl IntoIterator<Item = Node>, f: F) -> Node
    where
        F: Fn(Batch, &mut OpContext) -> Result<Batch, OpError> + Send + Sync + 'static,
    {
        self.map_with_ports(id, inputs, Ports::default(), f)
    }

    /// Adds a map node that runs `f` on every batch and declares the columns it needs, adds and
    /// removes, so the compiler checks them against its neighbours.
    pub fn map_with_ports<F>(&mut self, id: &str, inputs: impl IntoIterator<Item = Node>, ports: Ports, f: F) -> Node
    where
        F: Fn(Batch, &mut OpContext) -> Result<Batch, OpError> + Send + Sync + 'static,
    {
        let mut keys = toml::Table::new();
        keys.insert("closure".into(), toml::Value::Integer(self.closures.len() as i64));
        self.closures.push(ClosureMap { ports, f: Arc::new(f) });
        self.raw(id, CLOSURE_MAP_TYPE, inputs, keys)
    }

    /// Restricts `node` to some workers (devices); returns it.
    pub fn place(&mut self, node: Node, placement: Placement) -> Node {
        if let Some(id) = self.own(node).map(str::to_string) {
            self.edit(|b| b.placement(&id, placement));
        }
        node
    }

    /// The id of `node`.
    pub fn id(&self, node: Node) -> &str {
        self.own(node).unwrap_or("<a node of another pipeline>")
    }

    /// Checks the pipeline against `catalog` (plus its closure maps) and returns its plan, or
    /// every problem.
    pub fn compile(&self, catalog: &Catalog) -> Result<Plan, PlanErrors> {
        if !self.errors.is_empty() {
            let errors = self.errors.iter().map(|message| PlanError {
                origin: "<pipeline>".into(),
                location: Location::Unknown,
                node: None,
                key: None,
                message: message.clone(),
            });
            return Err(PlanErrors(errors.collect()));
        }
        let catalog = match self.closures.is_empty() {
            true => catalog.clone(),
            false => catalog.clone().with(closure_entry(Arc::new(self.closures.clone()))).map_err(|e| {
                PlanErrors(vec![PlanError {
                    origin: "<pipeline>".into(),
                    location: Location::Unknown,
                    node: None,
                    key: None,
                    message: format!("{e}: `{CLOSURE_MAP_TYPE}` is the type of the pipeline's closure maps"),
                }])
            })?,
        };
        self.builder.clone().compile(&catalog)
    }

    fn edit(&mut self, f: impl FnOnce(TopologyBuilder) -> TopologyBuilder) {
        let builder = std::mem::replace(&mut self.builder, TopologyBuilder::new(""));
        self.builder = f(builder);
    }

    fn own(&self, node: Node) -> Option<&str> {
        (node.pipeline == self.identity).then(|| self.ids.get(node.index).map(String::as_str)).flatten()
    }

    fn input_ids(&mut self, id: &str, inputs: impl IntoIterator<Item = Node>) -> Vec<String> {
        let mut ids = Vec::new();
        for input in inputs {
            match self.own(input) {
                Some(input) => ids.push(input.to_string()),
                None => self.errors.push(format!("node `{id}`: an input is a node of another pipeline")),
            }
        }
        ids
    }

    fn push(&mut self, id: &str) -> Node {
        if self.ids.iter().any(|i| i == id) {
            self.errors.push(format!("node `{id}` is defined twice"));
        }
        self.ids.push(id.to_string());
        Node { pipeline: self.identity, index: self.ids.len() - 1 }
    }
}

/// A closure map's node spec.
#[derive(Clone)]
struct ClosureMap {
    ports: Ports,
    f: Arc<MapFn>,
}

impl fmt::Debug for ClosureMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClosureMap").field("ports", &self.ports).finish()
    }
}

impl NodeSpec for ClosureMap {
    fn ports(&self) -> Ports {
        self.ports.clone()
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(ClosureMapOp(Arc::clone(&self.f)))))
    }
}

struct ClosureMapOp(Arc<MapFn>);

impl Map for ClosureMapOp {
    fn map(&self, batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        (self.0)(batch, ctx)
    }
}

/// The catalog entry of a pipeline's closure maps: `closure = N` names the N-th.
fn closure_entry(closures: Arc<Vec<ClosureMap>>) -> OperatorEntry {
    OperatorEntry::custom(
        CLOSURE_MAP_TYPE,
        OperatorKind::Map,
        "a Rust closure of the pipeline",
        &["closure"],
        Arc::new(move |table: toml::Table| {
            let n = table.get("closure").and_then(toml::Value::as_integer).ok_or("a closure map needs `closure`")?;
            let spec = closures.get(n as usize).ok_or_else(|| format!("no closure {n} in this pipeline"))?;
            Ok(Arc::new(spec.clone()) as Arc<dyn NodeSpec>)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_of_another_pipeline_and_ids_defined_twice_are_errors() {
        let mut other = Pipeline::new("other");
        let foreign = other.raw("read", "demo_source", [], toml::Table::new());
        let mut g = Pipeline::new("g");
        let read = g.raw("read", "demo_source", [], toml::Table::new());
        g.raw("sink", "null_sink", [foreign], toml::Table::new());
        g.raw("read", "null_sink", [read], toml::Table::new());
        let errors = g.compile(&Catalog::new(vec![])).unwrap_err().to_string();
        assert!(errors.contains("node `sink`: an input is a node of another pipeline"), "{errors}");
        assert!(errors.contains("node `read` is defined twice"), "{errors}");
    }
}
