//! Topology errors: each names the file, line and column (or the `--set` that caused it), the
//! node and key, and what to do.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

/// Where a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A line and column (1-based) in the topology file.
    File {
        /// Line.
        line: usize,
        /// Column.
        column: usize,
    },
    /// A `--set` override on the command line.
    Override(String),
    /// Nowhere more precise than the file.
    Unknown,
}

/// One problem in a topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError {
    /// The topology's origin (file path or `<builder>`).
    pub origin: String,
    /// Where in it.
    pub location: Location,
    /// The node, when the problem is in one.
    pub node: Option<String>,
    /// The key, when the problem is in one.
    pub key: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::File { line, column } => write!(f, "{}:{line}:{column}: ", self.origin)?,
            Location::Override(set) => write!(f, "{} (--set {set}): ", self.origin)?,
            Location::Unknown => write!(f, "{}: ", self.origin)?,
        }
        match (&self.node, &self.key) {
            (Some(node), Some(key)) => write!(f, "node `{node}`, key `{key}`: ")?,
            (Some(node), None) => write!(f, "node `{node}`: ")?,
            (None, Some(key)) => write!(f, "key `{key}`: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a topology, in file order; displayed one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PlanErrors(pub Vec<PlanError>);

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Positions of keys and values in the source text, by key path (`["nodes", "read", "count"]`),
/// plus which paths were set by `--set`.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceMap {
    keys: HashMap<Vec<String>, usize>,
    values: HashMap<Vec<String>, usize>,
    overrides: HashMap<Vec<String>, String>,
    line_starts: Vec<usize>,
}

impl SourceMap {
    /// Indexes `text` (already known to parse).
    pub(crate) fn new(text: &str) -> Self {
        let mut map = SourceMap {
            line_starts: std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect(),
            ..SourceMap::default()
        };
        if let Ok(doc) = toml::de::DeTable::parse(text) {
            map.walk(&mut Vec::new(), doc.get_ref());
        }
        map
    }

    fn walk(&mut self, path: &mut Vec<String>, table: &toml::de::DeTable<'_>) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            self.keys.insert(path.clone(), key.span().start);
            self.values.insert(path.clone(), value.span().start);
            if let toml::de::DeValue::Table(inner) = value.get_ref() {
                self.walk(path, inner);
            }
            path.pop();
        }
    }

    pub(crate) fn record_override(&mut self, path: Vec<String>, text: String) {
        self.overrides.insert(path, text);
    }

    /// Where the key at `path` is (or its nearest enclosing table's).
    pub(crate) fn key(&self, path: &[&str]) -> Location {
        self.locate(path, &self.keys)
    }

    /// Where the value at `path` is.
    pub(crate) fn value(&self, path: &[&str]) -> Location {
        self.locate(path, &self.values)
    }

    fn locate(&self, path: &[&str], offsets: &HashMap<Vec<String>, usize>) -> Location {
        for len in (1..=path.len()).rev() {
            let prefix: Vec<String> = path[..len].iter().map(|s| s.to_string()).collect();
            if let Some(set) = self.overrides.get(&prefix) {
                return Location::Override(set.clone());
            }
            if let Some(&offset) = offsets.get(&prefix).or_else(|| self.keys.get(&prefix)) {
                return self.line_column(offset);
            }
        }
        Location::Unknown
    }

    fn line_column(&self, offset: usize) -> Location {
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let column = offset - self.line_starts[line - 1] + 1;
        Location::File { line, column }
    }

    /// The location of a TOML parse error's span.
    pub(crate) fn span(&self, span: Option<Range<usize>>) -> Location {
        match span {
            Some(span) if !self.line_starts.is_empty() => self.line_column(span.start),
            _ => Location::Unknown,
        }
    }
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo (or
/// one is a prefix of the other).
///
/// ```
/// use latentflow_engine::plan::closest;
/// assert_eq!(closest("resolutin", ["resolution", "crop"]), Some("resolution"));
/// assert_eq!(closest("delay", ["delay_ms"]), Some("delay_ms"));
/// assert_eq!(closest("zzz", ["resolution", "crop"]), None);
/// ```
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            let prefix = name.len() >= 3 && (c.starts_with(name) || name.starts_with(c));
            (if prefix { 1 } else { strsim::damerau_levenshtein(name, c) }, c)
        })
        .filter(|(d, c)| *d <= (name.len().max(c.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_map_finds_lines_and_columns() {
        let text = "[job]\nname = \"x\"\n\n[nodes.read]\ntype = \"demo_source\"\ncount = 5\n";
        let map = SourceMap::new(text);
        assert_eq!(map.key(&["nodes", "read", "count"]), Location::File { line: 6, column: 1 });
        assert_eq!(map.value(&["nodes", "read", "type"]), Location::File { line: 5, column: 8 });
        // A key that is not in the file falls back to its table.
        assert_eq!(map.key(&["nodes", "read", "inputs"]), Location::File { line: 4, column: 8 });
    }

    #[test]
    fn overrides_win_over_file_positions() {
        let mut map = SourceMap::new("[nodes.read]\ncount = 5\n");
        map.record_override(vec!["nodes".into(), "read".into(), "count".into()], "nodes.read.count=0".into());
        assert_eq!(map.key(&["nodes", "read", "count"]), Location::Override("nodes.read.count=0".into()));
    }
}
