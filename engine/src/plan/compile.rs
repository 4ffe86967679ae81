//! The topology compiler: a [`Document`] becomes a checked [`Plan`], or every problem in it
//! is reported at once.

use std::collections::HashMap;
use std::sync::Arc;

use super::diagnostics::{closest, Location, PlanError, PlanErrors};
use super::{Document, JobConfig, Placement, Plan, PlanNode};
use crate::catalog::{Catalog, OperatorEntry};
use crate::data::Schema;
use crate::operator::{NodeSpec, OperatorKind};

/// Keys of a node that the engine reads itself; the rest belong to the operator.
pub const ENGINE_KEYS: &[&str] = &["type", "inputs", "placement", "reject_log"];

/// A node after its own keys were checked, before the graph is.
struct Draft<'c> {
    id: String,
    entry: Option<&'c OperatorEntry>,
    inputs: Vec<String>,
    placement: Placement,
    reject_log: Option<std::path::PathBuf>,
    spec: Option<Arc<dyn NodeSpec>>,
}

struct Compiler<'a> {
    doc: &'a Document,
    catalog: &'a Catalog,
    errors: Vec<PlanError>,
}

/// Checks `doc` against `catalog`: the job, every node's type and keys, the inputs, cycles, and
/// the column types along every edge.
pub fn compile(doc: &Document, catalog: &Catalog) -> Result<Plan, PlanErrors> {
    let mut c = Compiler { doc, catalog, errors: Vec::new() };
    for key in doc.table.keys() {
        if key != "job" && key != "nodes" {
            c.error(
                c.doc.map.key(&[key]),
                None,
                None,
                format!("unknown table `{key}`; a topology has `[job]` and `[nodes.ID]` tables"),
            );
        }
    }
    let job = c.job();
    let drafts = c.nodes();
    let nodes = c.graph(&job, drafts);
    if c.errors.is_empty() {
        Ok(Plan { origin: doc.origin.clone(), job, nodes: nodes.expect("a graph without errors") })
    } else {
        Err(PlanErrors(c.errors))
    }
}

impl<'a> Compiler<'a> {
    fn error(&mut self, location: Location, node: Option<&str>, key: Option<&str>, message: String) {
        self.errors.push(PlanError {
            origin: self.doc.origin.clone(),
            location,
            node: node.map(str::to_string),
            key: key.map(str::to_string),
            message,
        });
    }

    fn job(&mut self) -> JobConfig {
        let table = match self.doc.table.get("job") {
            None => return JobConfig::default(),
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => {
                self.error(self.doc.map.key(&["job"]), None, None, "`job` must be a table".into());
                return JobConfig::default();
            }
        };
        let fields = serde_aux::serde_introspection::serde_introspect::<JobConfig>();
        let mut known = toml::Table::new();
        for (key, value) in table {
            if fields.contains(&key.as_str()) {
                known.insert(key, value);
            } else {
                let hint = hint(&key, fields.iter().copied());
                self.error(self.doc.map.key(&["job", &key]), None, None, format!("unknown key `job.{key}`{hint}"));
            }
        }
        let (job, problems) =
            parse_keys(known, |t| toml::Value::Table(t).try_into::<JobConfig>().map_err(|e| e.message().to_string()));
        for (key, message) in problems {
            let location = match &key {
                Some(k) => self.doc.map.value(&["job", k]),
                None => self.doc.map.key(&["job"]),
            };
            let key = key.map(|k| format!("job.{k}"));
            self.error(location, None, key.as_deref(), message);
        }
        let job = job.unwrap_or_default();
        let problems = job.validate();
        let devices_valid = problems.iter().all(|e| e.key != "devices");
        for e in problems {
            let location = self.doc.map.value(&["job", &e.key]);
            self.error(location, None, Some(&format!("job.{}", e.key)), e.message);
        }
        if devices_valid {
            let mut seen = std::collections::HashSet::new();
            for device in job.devices.iter().filter(|d| seen.insert(d.as_str())) {
                if let Some(problem) = self.catalog.device_problem(device) {
                    let location = self.doc.map.value(&["job", "devices"]);
                    self.error(location, None, Some("job.devices"), format!("`{device}`: {problem}"));
                }
            }
        }
        job
    }

    fn nodes(&mut self) -> Vec<Draft<'a>> {
        let nodes = match self.doc.table.get("nodes") {
            Some(toml::Value::Table(t)) => t,
            Some(_) => {
                self.error(
                    self.doc.map.key(&["nodes"]),
                    None,
                    None,
                    "`nodes` must be a table of `[nodes.ID]` tables".into(),
                );
                return Vec::new();
            }
            None => {
                self.error(
                    Location::Unknown,
                    None,
                    None,
                    "no nodes; add `[nodes.ID]` tables, starting with a source".into(),
                );
                return Vec::new();
            }
        };
        let mut drafts = Vec::new();
        for (id, value) in nodes {
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                self.error(
                    self.doc.map.key(&["nodes", id]),
                    Some(id),
                    None,
                    "node ids are letters, digits, `_` and `-`".into(),
                );
            }
            match value {
                toml::Value::Table(table) => drafts.push(self.node(id, table)),
                _ => self.error(
                    self.doc.map.key(&["nodes", id]),
                    Some(id),
                    None,
                    "must be a table (`[nodes.ID]`)".into(),
                ),
            }
        }
        drafts
    }

    fn node(&mut self, id: &str, table: &toml::Table) -> Draft<'a> {
        let map = &self.doc.map;
        let mut draft = Draft {
            id: id.to_string(),
            entry: None,
            inputs: Vec::new(),
            placement: Placement::All,
            reject_log: None,
            spec: None,
        };
        match table.get("type") {
            None => self.error(
                map.key(&["nodes", id]),
                Some(id),
                None,
                "missing `type`; `latentflow operators` lists them".into(),
            ),
            Some(toml::Value::String(name)) => match self.catalog.get(name) {
                Some(entry) => draft.entry = Some(entry),
                None => {
                    let hint =
                        self.catalog.closest(name).map(|c| format!(" (did you mean `{c}`?)")).unwrap_or_default();
                    self.error(
                        map.value(&["nodes", id, "type"]),
                        Some(id),
                        Some("type"),
                        format!("unknown operator type `{name}`{hint}; `latentflow operators` lists them"),
                    );
                }
            },
            Some(_) => self.error(map.value(&["nodes", id, "type"]), Some(id), Some("type"), "must be a string".into()),
        }
        match table.get("inputs") {
            None => {}
            Some(toml::Value::String(s)) => draft.inputs.push(s.clone()),
            Some(toml::Value::Array(items)) if items.iter().all(|v| v.is_str()) => {
                draft.inputs = items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            }
            Some(_) => self.error(
                map.value(&["nodes", id, "inputs"]),
                Some(id),
                Some("inputs"),
                "must be a list of node ids, e.g. [\"read\"]".into(),
            ),
        }
        match table.get("placement") {
            None => {}
            Some(toml::Value::String(s)) => match s.parse() {
                Ok(p) => draft.placement = p,
                Err(message) => {
                    self.error(map.value(&["nodes", id, "placement"]), Some(id), Some("placement"), message)
                }
            },
            Some(_) => self.error(
                map.value(&["nodes", id, "placement"]),
                Some(id),
                Some("placement"),
                "must be \"all\" or \"gpu\"".into(),
            ),
        }
        match table.get("reject_log") {
            None => {}
            Some(toml::Value::String(path)) if !path.is_empty() => draft.reject_log = Some(path.into()),
            Some(_) => self.error(
                map.value(&["nodes", id, "reject_log"]),
                Some(id),
                Some("reject_log"),
                "must be a file path, e.g. \"runs/rejects.jsonl\"".into(),
            ),
        }
        let Some(entry) = draft.entry else {
            return draft;
        };
        let mut own = toml::Table::new();
        for (key, value) in table {
            if ENGINE_KEYS.contains(&key.as_str()) {
                continue;
            }
            if entry.fields.contains(&key.as_str()) {
                own.insert(key.clone(), value.clone());
            } else {
                let hint = hint(key, entry.fields.iter().chain(ENGINE_KEYS).copied());
                self.error(
                    map.key(&["nodes", id, key]),
                    Some(id),
                    None,
                    format!("unknown key `{key}` for `{}`{hint}", entry.type_name),
                );
            }
        }
        let (spec, problems) = parse_keys(own, |t| entry.parse(t));
        for (key, message) in problems {
            let location = match &key {
                Some(k) => map.value(&["nodes", id, k]),
                None => map.key(&["nodes", id]),
            };
            self.error(location, Some(id), key.as_deref(), message);
        }
        if let Some(spec) = spec {
            for e in spec.validate() {
                self.error(map.value(&["nodes", id, &e.key]), Some(id), Some(&e.key), e.message);
            }
            draft.spec = Some(spec);
        }
        draft
    }

    /// Resolves inputs, finds cycles, orders the nodes and checks every edge's columns.
    fn graph(&mut self, job: &JobConfig, drafts: Vec<Draft<'a>>) -> Option<Vec<PlanNode>> {
        let index: HashMap<&str, usize> = drafts.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); drafts.len()];
        let mut consumed = vec![false; drafts.len()];
        // Nodes whose inputs are wrong are not type-checked: the input error says it all.
        let mut inputs_ok = vec![true; drafts.len()];
        for (i, d) in drafts.iter().enumerate() {
            let inputs_at = self.doc.map.value(&["nodes", &d.id, "inputs"]);
            if let Some(entry) = d.entry {
                if entry.kind == OperatorKind::Source && !d.inputs.is_empty() {
                    inputs_ok[i] = false;
                    self.error(
                        inputs_at.clone(),
                        Some(&d.id),
                        Some("inputs"),
                        format!("`{}` is a source and takes no inputs", entry.type_name),
                    );
                } else if entry.kind != OperatorKind::Source && d.inputs.is_empty() {
                    inputs_ok[i] = false;
                    self.error(
                        self.doc.map.key(&["nodes", &d.id]),
                        Some(&d.id),
                        Some("inputs"),
                        format!(
                            "missing `inputs`: `{}` is a {} and needs at least one input",
                            entry.type_name, entry.kind
                        ),
                    );
                }
            }
            for input in &d.inputs {
                match index.get(input.as_str()) {
                    Some(&j) => {
                        edges[i].push(j);
                        consumed[j] = true;
                    }
                    None => {
                        inputs_ok[i] = false;
                        let hint = hint(input, drafts.iter().map(|d| d.id.as_str()));
                        self.error(
                            inputs_at.clone(),
                            Some(&d.id),
                            Some("inputs"),
                            format!("unknown input `{input}`{hint}"),
                        );
                    }
                }
            }
            let placement_error = match d.placement {
                Placement::Gpu if job.devices.is_empty() => {
                    Some("placement \"gpu\" needs at least one entry in `job.devices`".to_string())
                }
                Placement::Device(n) if n >= job.devices.len() => Some(format!(
                    "placement \"device:{n}\" needs `job.devices` to have at least {} entries, it has {}",
                    n + 1,
                    job.devices.len()
                )),
                Placement::Devices(a, b) if b >= job.devices.len() => Some(format!(
                    "placement \"devices:{a}-{b}\" needs `job.devices` to have at least {} entries, it has {}",
                    b + 1,
                    job.devices.len()
                )),
                _ => None,
            };
            if let Some(message) = placement_error {
                self.error(self.doc.map.value(&["nodes", &d.id, "placement"]), Some(&d.id), Some("placement"), message);
            }
        }
        for cycle in find_cycles(&edges) {
            let chain: Vec<&str> = cycle.iter().map(|&i| drafts[i].id.as_str()).collect();
            let at = self.doc.map.key(&["nodes", chain[0]]);
            self.error(at, None, None, format!("cycle: {}", chain.join(" -> ")));
        }
        let mut sources = 0;
        let mut sinks = 0;
        for (d, used) in drafts.iter().zip(&consumed) {
            let Some(entry) = d.entry else { continue };
            match entry.kind {
                OperatorKind::Source => sources += 1,
                OperatorKind::Sink => sinks += 1,
                _ => {}
            }
            // With an unknown input somewhere, "goes nowhere" is likely the same typo again.
            if entry.kind != OperatorKind::Sink && !used && inputs_ok.iter().all(|ok| *ok) {
                self.error(self.doc.map.key(&["nodes", &d.id]), Some(&d.id), None, format!("its output goes nowhere; list `{}` in the `inputs` of another node or of a sink such as `null_sink`", d.id));
            }
        }
        let all_known = drafts.iter().all(|d| d.entry.is_some());
        if !drafts.is_empty() && all_known && (sources == 0 || sinks == 0) {
            let missing = if sources == 0 { "source" } else { "sink" };
            self.error(
                Location::Unknown,
                None,
                None,
                format!("the topology has no {missing}; every job needs at least one source and one sink"),
            );
        }
        let order = topological_order(&edges)?;
        let mut schemas: Vec<Option<Schema>> = vec![None; drafts.len()];
        for &i in &order {
            let d = &drafts[i];
            let Some(spec) = d.spec.as_ref().filter(|_| inputs_ok[i]) else {
                continue;
            };
            let ports = spec.ports();
            let inputs: Option<Vec<&Schema>> = edges[i].iter().map(|&j| schemas[j].as_ref()).collect();
            let Some(inputs) = inputs else { continue };
            let input = match inputs.split_first() {
                None => Schema::default(),
                Some((first, rest)) => {
                    if let Some(other) = rest.iter().position(|s| s != first) {
                        let (a, b) = (&drafts[edges[i][0]].id, &drafts[edges[i][other + 1]].id);
                        self.error(self.doc.map.value(&["nodes", &d.id, "inputs"]), Some(&d.id), Some("inputs"), format!("inputs `{a}` and `{b}` carry different columns ({first} vs {}); merged inputs must match", rest[other]));
                        continue;
                    }
                    (*first).clone()
                }
            };
            match ports.apply(&input) {
                Ok(out) => schemas[i] = Some(out),
                Err(problems) => {
                    let from: Vec<&str> = edges[i].iter().map(|&j| drafts[j].id.as_str()).collect();
                    for p in problems {
                        self.error(
                            self.doc.map.value(&["nodes", &d.id, "inputs"]),
                            Some(&d.id),
                            Some("inputs"),
                            format!(
                                "type mismatch on input `{}`: `{}` {p}",
                                from.join("`, `"),
                                d.entry.map_or("", |e| e.type_name)
                            ),
                        );
                    }
                }
            }
        }
        if !self.errors.is_empty() {
            return None;
        }
        let position: HashMap<usize, usize> = order.iter().enumerate().map(|(pos, &i)| (i, pos)).collect();
        let mut drafts: Vec<Option<Draft>> = drafts.into_iter().map(Some).collect();
        let nodes = order
            .iter()
            .map(|&i| {
                let d = drafts[i].take().expect("each node once");
                let entry = d.entry.expect("checked");
                PlanNode {
                    type_name: entry.type_name,
                    kind: entry.kind,
                    inputs: edges[i].iter().map(|j| position[j]).collect(),
                    placement: d.placement,
                    reject_log: d.reject_log,
                    schema: schemas[i].take().expect("checked"),
                    spec: d.spec.expect("checked"),
                    id: d.id,
                }
            })
            .collect();
        Some(nodes)
    }
}

fn hint<'s>(name: &str, candidates: impl IntoIterator<Item = &'s str>) -> String {
    closest(name, candidates).map(|c| format!(" (did you mean `{c}`?)")).unwrap_or_default()
}

/// Parses a table with `parse`; on failure finds every key whose value is at fault by parsing
/// each key alone (a lone key fails only for its own value, or for a missing required key,
/// which is not its fault), so one bad value does not hide the next. Returns the parse of the
/// keys that are not at fault (so their values can still be validated) and the problems.
fn parse_keys<T>(
    table: toml::Table,
    parse: impl Fn(toml::Table) -> Result<T, String>,
) -> (Option<T>, Vec<(Option<String>, String)>) {
    let whole = match parse(table.clone()) {
        Ok(value) => return (Some(value), Vec::new()),
        Err(message) => message,
    };
    let mut problems = Vec::new();
    let mut good = toml::Table::new();
    for (key, value) in table {
        match parse(toml::Table::from_iter([(key.clone(), value.clone())])) {
            Err(message) if !message.starts_with("missing field") => problems.push((Some(key), message)),
            _ => {
                good.insert(key, value);
            }
        }
    }
    if problems.is_empty() {
        return (None, vec![(None, whole)]);
    }
    (parse(good).ok(), problems)
}

/// Each cycle once, as the chain of nodes in data-flow order with the first repeated at the end.
/// `inputs[i]` lists the nodes that feed node `i`.
fn find_cycles(inputs: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = inputs.len();
    let mut outputs = vec![Vec::new(); n];
    for (i, ins) in inputs.iter().enumerate() {
        for &j in ins {
            outputs[j].push(i);
        }
    }
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut state = vec![0u8; n];
    let mut stack = Vec::new();
    let mut cycles = Vec::new();
    fn visit(v: usize, outputs: &[Vec<usize>], state: &mut [u8], stack: &mut Vec<usize>, cycles: &mut Vec<Vec<usize>>) {
        state[v] = 1;
        stack.push(v);
        for &w in &outputs[v] {
            if state[w] == 1 {
                let from = stack.iter().position(|&s| s == w).expect("on stack");
                let mut chain = stack[from..].to_vec();
                chain.push(w);
                cycles.push(chain);
            } else if state[w] == 0 {
                visit(w, outputs, state, stack, cycles);
            }
        }
        stack.pop();
        state[v] = 2;
    }
    for v in 0..n {
        if state[v] == 0 {
            visit(v, &outputs, &mut state, &mut stack, &mut cycles);
        }
    }
    cycles
}

/// Kahn's algorithm, taking ready nodes in file order; `None` on a cycle.
fn topological_order(inputs: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = inputs.len();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && inputs[i].iter().all(|&j| done[j]))?;
        done[next] = true;
        order.push(next);
    }
    Some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_reported_as_chains() {
        // a -> b -> c -> a, and d reads c.
        let inputs = vec![vec![2], vec![0], vec![1], vec![2]];
        assert_eq!(find_cycles(&inputs), vec![vec![0, 1, 2, 0]]);
        assert_eq!(topological_order(&inputs), None);
    }

    #[test]
    fn order_follows_dependencies_then_file_order() {
        let inputs = vec![vec![1], vec![], vec![0, 1]];
        assert_eq!(topological_order(&inputs), Some(vec![1, 0, 2]));
    }
}
