//! A topology document: the TOML table, where each key came from, and `--set` overrides.

use super::diagnostics::{closest, Location, PlanError, SourceMap};

/// A parsed topology before it is checked: plain TOML plus positions for error messages.
#[derive(Clone, Debug)]
pub struct Document {
    pub(crate) origin: String,
    pub(crate) table: toml::Table,
    pub(crate) map: SourceMap,
}

impl Document {
    /// Parses TOML text; `origin` names it in errors (usually the file path).
    pub fn parse(origin: &str, text: &str) -> Result<Self, PlanError> {
        let map = SourceMap::new(text);
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| PlanError {
            origin: origin.to_string(),
            location: map.span(e.span()),
            node: None,
            key: None,
            message: format!("not valid TOML: {}", e.message()),
        })?;
        Ok(Document { origin: origin.to_string(), table, map })
    }

    /// A document built in code (no positions).
    pub fn from_table(origin: &str, table: toml::Table) -> Self {
        Document { origin: origin.to_string(), table, map: SourceMap::default() }
    }

    /// The TOML table.
    pub fn table(&self) -> &toml::Table {
        &self.table
    }

    /// Applies `--set path.to.key=value` overrides. The value is read as TOML when it parses
    /// (`2000`, `true`, `["a"]`, `"text"`) and as a plain string otherwise (`runs/x`).
    /// Returns every bad override.
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<(), Vec<PlanError>> {
        let mut errors = Vec::new();
        for set in overrides {
            if let Err(message) = self.apply_override(set) {
                errors.push(PlanError {
                    origin: self.origin.clone(),
                    location: Location::Override(set.clone()),
                    node: None,
                    key: None,
                    message,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn apply_override(&mut self, set: &str) -> Result<(), String> {
        let (path, raw) = set.split_once('=').ok_or("expected KEY=VALUE, e.g. nodes.read.count=2000")?;
        let path: Vec<String> = path.trim().split('.').map(|s| s.trim().to_string()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
            return Err("the key must name a table and a key, e.g. job.seed or nodes.read.count".into());
        }
        match path[0].as_str() {
            "job" => {}
            "nodes" => {
                let nodes = self.table.get("nodes").and_then(|n| n.as_table());
                if !nodes.is_some_and(|n| n.contains_key(&path[1])) {
                    let ids: Vec<&str> = nodes.map(|n| n.keys().map(|k| k.as_str()).collect()).unwrap_or_default();
                    let hint = closest(&path[1], ids.iter().copied())
                        .map(|c| format!(" (did you mean `{c}`?)"))
                        .unwrap_or_default();
                    return Err(format!("no node `{}` in this topology{hint}; nodes: {}", path[1], ids.join(", ")));
                }
                if path.len() < 3 {
                    return Err("set a key of the node, e.g. nodes.read.count=2000".into());
                }
            }
            other => return Err(format!("unknown table `{other}`; overrides start with `job.` or `nodes.`")),
        }
        let value = parse_value(raw.trim());
        let mut table = &mut self.table;
        for part in &path[..path.len() - 1] {
            let entry = table.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
        }
        table.insert(path[path.len() - 1].clone(), value);
        self.map.record_override(path, set.to_string());
        Ok(())
    }
}

/// Reads a `--set` value: TOML when it parses, otherwise the text itself.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: &str = "[job]\nname = \"t\"\n[nodes.read]\ntype = \"demo_source\"\ncount = 5\n";

    #[test]
    fn overrides_parse_values_as_toml_or_text() {
        let mut doc = Document::parse("t.toml", TOPOLOGY).unwrap();
        doc.apply_overrides(&[
            "nodes.read.count=2000".into(),
            "nodes.read.path=runs/x".into(),
            "job.devices=[\"cpu\", \"cuda:0\"]".into(),
        ])
        .unwrap();
        let read = doc.table["nodes"]["read"].as_table().unwrap();
        assert_eq!(read["count"].as_integer(), Some(2000));
        assert_eq!(read["path"].as_str(), Some("runs/x"));
        assert_eq!(doc.table["job"]["devices"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn bad_overrides_are_all_reported() {
        let mut doc = Document::parse("t.toml", TOPOLOGY).unwrap();
        let errors =
            doc.apply_overrides(&["nodes.raed.count=1".into(), "count".into(), "other.x=1".into()]).unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            [
                "t.toml (--set nodes.raed.count=1): no node `raed` in this topology (did you mean `read`?); nodes: read",
                "t.toml (--set count): expected KEY=VALUE, e.g. nodes.read.count=2000",
                "t.toml (--set other.x=1): unknown table `other`; overrides start with `job.` or `nodes.`",
            ]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Document::parse("t.toml", "[job]\nname = \n").unwrap_err();
        assert!(err.to_string().starts_with("t.toml:2:"), "{err}");
    }
}
