//! Defining a topology in Rust code.

use serde::Serialize;

use super::{compile, Document, JobConfig, Placement, Plan, PlanErrors};
use crate::catalog::Catalog;
use crate::operator::OperatorConfig;

/// Builds a topology in code. It writes the same TOML table a file would hold and checks it
/// with the same compiler, so errors read the same.
///
/// ```
/// use latentflow_engine::{Catalog, TopologyBuilder};
/// // With the real registry (`latentflow_operators::registry()`) this compiles to a Plan;
/// // here the catalog is empty, so the compiler reports the unknown types.
/// let errors = TopologyBuilder::new("demo")
///     .raw_node("read", "demo_source", &[], toml::toml! { count = 64 })
///     .raw_node("sink", "null_sink", &["read"], toml::Table::new())
///     .compile(&Catalog::new(vec![]))
///     .unwrap_err();
/// assert!(errors.to_string().contains("unknown operator type `demo_source`"));
/// ```
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    job: JobConfig,
    nodes: toml::Table,
    serialize_errors: Vec<String>,
}

impl TopologyBuilder {
    /// A topology for a job called `name`, with default job settings.
    pub fn new(name: &str) -> Self {
        let job = JobConfig { name: name.to_string(), ..JobConfig::default() };
        TopologyBuilder { job, nodes: toml::Table::new(), serialize_errors: Vec::new() }
    }

    /// Changes job settings.
    pub fn job(mut self, edit: impl FnOnce(&mut JobConfig)) -> Self {
        edit(&mut self.job);
        self
    }

    /// Adds a node of operator config `config`, reading from `inputs`.
    pub fn node<C: OperatorConfig>(self, id: &str, config: C, inputs: &[&str]) -> Self {
        match toml::Value::try_from(&config) {
            Ok(toml::Value::Table(table)) => self.raw_node(id, C::TYPE, inputs, table),
            Ok(_) => self.fail(format!("node `{id}`: config is not a table")),
            Err(e) => self.fail(format!("node `{id}`: {e}")),
        }
    }

    /// Adds a node from raw keys, as a topology file would write them.
    pub fn raw_node(mut self, id: &str, type_name: &str, inputs: &[&str], mut keys: toml::Table) -> Self {
        keys.insert("type".into(), type_name.into());
        if !inputs.is_empty() {
            keys.insert("inputs".into(), inputs.iter().map(|s| toml::Value::from(*s)).collect::<Vec<_>>().into());
        }
        self.nodes.insert(id.to_string(), toml::Value::Table(keys));
        self
    }

    /// Restricts a node to some workers.
    pub fn placement(mut self, id: &str, placement: Placement) -> Self {
        if let Some(toml::Value::Table(node)) = self.nodes.get_mut(id) {
            node.insert("placement".into(), placement.to_string().into());
        }
        self
    }

    fn fail(mut self, message: String) -> Self {
        self.serialize_errors.push(message);
        self
    }

    /// The TOML this builder would write to a file.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table()).unwrap_or_default()
    }

    fn table(&self) -> toml::Table {
        let mut table = toml::Table::new();
        if let Ok(job) = toml::Value::try_from(&self.job) {
            table.insert("job".into(), job);
        }
        table.insert("nodes".into(), toml::Value::Table(self.nodes.clone()));
        table
    }

    /// Checks the topology and returns its plan, or every problem.
    pub fn compile(self, catalog: &Catalog) -> Result<Plan, PlanErrors> {
        if !self.serialize_errors.is_empty() {
            let errors = self.serialize_errors.iter().map(|m| super::PlanError {
                origin: "<builder>".into(),
                location: super::Location::Unknown,
                node: None,
                key: None,
                message: m.clone(),
            });
            return Err(PlanErrors(errors.collect()));
        }
        compile(&Document::from_table("<builder>", self.table()), catalog)
    }
}

impl Serialize for TopologyBuilder {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.table().serialize(serializer)
    }
}
