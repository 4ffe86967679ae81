//! The profile of a run: per-operator counters summed over workers, as JSON and as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// A run's profile: what `--profile FILE.json` writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Wall-clock seconds from start to the last sink's finish.
    pub wall_seconds: f64,
    /// One entry per node, in dependency order.
    pub operators: Vec<OperatorProfile>,
    /// The process's peak resident memory by the end of the run (Linux's `VmHWM`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident memory of this process so far (`VmHWM` in `/proc/self/status`), in bytes;
/// `None` where the system does not say.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One node's counters, summed over the workers it ran on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OperatorProfile {
    /// Node id.
    pub id: String,
    /// Operator type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Global indices of the workers it ran on (in this process).
    pub workers: Vec<usize>,
    /// Batches received.
    pub batches_in: u64,
    /// Rows received.
    pub items_in: u64,
    /// Batches emitted.
    pub batches_out: u64,
    /// Rows emitted.
    pub items_out: u64,
    /// Rows dropped, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// What the operator counted itself, by name (`key_hash_collisions`, `http_retries`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted: BTreeMap<String, u64>,
    /// Bytes emitted.
    pub bytes_out: u64,
    /// Seconds in the operator's own code (summed over threads, so it can exceed wall time).
    pub busy_seconds: f64,
    /// Seconds waiting for input, or for the backpressure gate (sources).
    pub wait_seconds: f64,
}

impl Profile {
    /// Writes the profile as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), EngineError> {
        let text = serde_json::to_string_pretty(self).expect("profile serialises");
        std::fs::write(path, text + "\n").map_err(|source| EngineError::Io { path: path.to_path_buf(), source })
    }

    /// The operator with this node id.
    pub fn operator(&self, id: &str) -> Option<&OperatorProfile> {
        self.operators.iter().find(|o| o.id == id)
    }

    /// A table for the terminal: one row per node with rates over the wall time.
    pub fn table(&self) -> String {
        let header = ["node", "type", "items in", "items out", "rejected", "MB out", "items/s", "busy s", "wait s"];
        let rows: Vec<[String; 9]> = self
            .operators
            .iter()
            .map(|o| {
                let items = if o.items_out > 0 { o.items_out } else { o.items_in };
                let rate = if self.wall_seconds > 0.0 { items as f64 / self.wall_seconds } else { 0.0 };
                let rejected: u64 = o.rejected.values().sum();
                [
                    o.id.clone(),
                    o.type_name.clone(),
                    o.items_in.to_string(),
                    o.items_out.to_string(),
                    rejected.to_string(),
                    format!("{:.1}", o.bytes_out as f64 / 1e6),
                    format!("{rate:.0}"),
                    format!("{:.2}", o.busy_seconds),
                    format!("{:.2}", o.wait_seconds),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Names left-aligned, numbers right-aligned.
                let _ = if i < 2 { write!(out, "{cell:<w$}  ") } else { write!(out, "{cell:>w$}  ") };
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        };
        line(&mut out, &header.map(String::from));
        for row in &rows {
            line(&mut out, row);
        }
        for o in &self.operators {
            for (reason, n) in &o.rejected {
                let _ = writeln!(out, "  {} rejected {n} rows: {reason}", o.id);
            }
            for (name, n) in &o.counted {
                let _ = writeln!(out, "  {} counted {n} {name}", o.id);
            }
        }
        let _ = write!(out, "wall time {:.2} s", self.wall_seconds);
        if let Some(rss) = self.peak_rss_bytes {
            let _ = write!(out, ", peak resident memory {:.1} MB", rss as f64 / 1e6);
        }
        let _ = writeln!(out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_operator_and_rejection() {
        let profile = Profile {
            wall_seconds: 2.0,
            operators: vec![OperatorProfile {
                id: "read".into(),
                type_name: "demo_source".into(),
                items_out: 100,
                rejected: BTreeMap::from([("decode_failed".to_string(), 3)]),
                ..OperatorProfile::default()
            }],
            peak_rss_bytes: Some(25_000_000),
        };
        let table = profile.table();
        assert!(table.ends_with("wall time 2.00 s, peak resident memory 25.0 MB\n"), "{table}");
        assert!(table.lines().nth(1).unwrap().starts_with("read  demo_source"), "{table}");
        assert!(table.contains("50"), "rate over wall time: {table}");
        assert!(table.contains("read rejected 3 rows: decode_failed"));
    }
}
