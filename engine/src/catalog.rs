//! The closed set of operator types a topology may name, as the `operators` crate registers
//! them.

use std::sync::Arc;

use crate::operator::{NodeSpec, OperatorConfig, OperatorKind};

/// One registered operator type.
#[derive(Clone)]
pub struct OperatorEntry {
    /// The `type` name.
    pub type_name: &'static str,
    /// The operator's shape.
    pub kind: OperatorKind,
    /// One line on what it does.
    pub summary: &'static str,
    /// Example keys (TOML).
    pub example: &'static str,
    /// `(key, description)` for every documented key.
    pub key_docs: &'static [(&'static str, &'static str)],
    /// The keys the config struct accepts, read from its serde definition.
    pub fields: &'static [&'static str],
    parse: Parse,
}

/// How an entry turns a node's keys into its spec.
type Parse = Arc<dyn Fn(toml::Table) -> Result<Arc<dyn NodeSpec>, String> + Send + Sync>;

impl OperatorEntry {
    /// The entry for config type `C`.
    pub fn of<C: OperatorConfig>() -> Self {
        OperatorEntry {
            type_name: C::TYPE,
            kind: C::KIND,
            summary: C::SUMMARY,
            example: C::EXAMPLE,
            key_docs: C::KEYS,
            fields: serde_aux::serde_introspection::serde_introspect::<C>(),
            parse: Arc::new(parse_config::<C>),
        }
    }

    /// An entry whose specs `parse` makes (the closure maps of a [`crate::Pipeline`]); it has no
    /// example and documents no keys.
    pub(crate) fn custom(
        type_name: &'static str,
        kind: OperatorKind,
        summary: &'static str,
        fields: &'static [&'static str],
        parse: Parse,
    ) -> Self {
        OperatorEntry { type_name, kind, summary, example: "", key_docs: &[], fields, parse }
    }

    /// Parses a node's operator keys (without `type`, `inputs` and the engine's own keys).
    pub fn parse(&self, table: toml::Table) -> Result<Arc<dyn NodeSpec>, String> {
        (self.parse)(table)
    }

    /// The example config, parsed.
    pub fn example_spec(&self) -> Result<Arc<dyn NodeSpec>, String> {
        let table: toml::Table = self.example.parse().map_err(|e| format!("example is not TOML: {e}"))?;
        self.parse(table)
    }

    /// The description of `key`, if documented.
    pub fn key_doc(&self, key: &str) -> Option<&'static str> {
        self.key_docs.iter().find(|(k, _)| *k == key).map(|(_, d)| *d)
    }
}

fn parse_config<C: OperatorConfig>(table: toml::Table) -> Result<Arc<dyn NodeSpec>, String> {
    let config: C = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
    Ok(Arc::new(config))
}

/// The registry of operator types.
///
/// ```
/// use latentflow_engine::Catalog;
/// let catalog = Catalog::new(vec![]);
/// assert!(catalog.get("demo_source").is_none());
/// ```
#[derive(Clone)]
pub struct Catalog {
    entries: Vec<OperatorEntry>,
    device_check: Option<DeviceCheck>,
}

/// An operator type added to a catalog that has one of that name.
#[derive(Debug, thiserror::Error)]
#[error("operator type `{0}` is registered twice")]
pub struct DuplicateOperator(pub &'static str);

/// Says why a device named in `job.devices` cannot be used on this machine (or `None` when it
/// can): the operators' side knows which backends this build has and which GPUs exist.
pub type DeviceCheck = fn(&str) -> Option<String>;

impl Catalog {
    /// A catalog of these entries.
    pub fn new(entries: Vec<OperatorEntry>) -> Self {
        Catalog { entries, device_check: None }
    }

    /// The catalog with `entry` added: how a user's own operator joins latentflow's
    /// (`latentflow_operators::registry().with(OperatorEntry::of::<MyConfig>())`), in the user's
    /// crate, without editing latentflow. A type name registered already is an error.
    ///
    /// ```
    /// use latentflow_engine::{Catalog, OperatorEntry};
    /// # use latentflow_engine::{InstanceContext, NodeSpec, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports};
    /// # #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
    /// # struct MineConfig {}
    /// # impl OperatorConfig for MineConfig {
    /// #     const TYPE: &'static str = "mine";
    /// #     const KIND: OperatorKind = OperatorKind::Sink;
    /// #     const SUMMARY: &'static str = "";
    /// #     const EXAMPLE: &'static str = "";
    /// #     const KEYS: &'static [(&'static str, &'static str)] = &[];
    /// # }
    /// # impl NodeSpec for MineConfig {
    /// #     fn ports(&self) -> Ports { Ports::default() }
    /// #     fn instantiate(&self, _: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> { Err(OpError::msg("")) }
    /// # }
    /// let catalog = Catalog::new(vec![]).with(OperatorEntry::of::<MineConfig>())?;
    /// assert!(catalog.get("mine").is_some());
    /// let twice = catalog.with(OperatorEntry::of::<MineConfig>()).err().unwrap();
    /// assert_eq!(twice.to_string(), "operator type `mine` is registered twice");
    /// # Ok::<(), latentflow_engine::DuplicateOperator>(())
    /// ```
    pub fn with(mut self, entry: OperatorEntry) -> Result<Self, DuplicateOperator> {
        if self.get(entry.type_name).is_some() {
            return Err(DuplicateOperator(entry.type_name));
        }
        self.entries.push(entry);
        Ok(self)
    }

    /// The catalog with a check of `job.devices` that validation runs, so a GPU topology on a
    /// machine (or a build) without that GPU fails before anything starts.
    ///
    /// ```
    /// use latentflow_engine::Catalog;
    /// let catalog = Catalog::new(vec![]).with_device_check(|d| (d != "cpu").then(|| "no GPUs here".into()));
    /// assert_eq!(catalog.device_problem("cuda:0").as_deref(), Some("no GPUs here"));
    /// assert!(catalog.device_problem("cpu").is_none());
    /// ```
    pub fn with_device_check(mut self, check: DeviceCheck) -> Self {
        self.device_check = Some(check);
        self
    }

    /// Why `device` cannot be used here, if the catalog has a check and it fails.
    pub fn device_problem(&self, device: &str) -> Option<String> {
        self.device_check.and_then(|check| check(device))
    }

    /// Every entry, in registration order.
    pub fn entries(&self) -> &[OperatorEntry] {
        &self.entries
    }

    /// The entry for `type_name`.
    pub fn get(&self, type_name: &str) -> Option<&OperatorEntry> {
        self.entries.iter().find(|e| e.type_name == type_name)
    }

    /// The registered name closest to `type_name`, for "did you mean" hints.
    pub fn closest(&self, type_name: &str) -> Option<&'static str> {
        crate::plan::closest(type_name, self.entries.iter().map(|e| e.type_name))
    }
}
