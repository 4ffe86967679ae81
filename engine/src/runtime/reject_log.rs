//! `reject_log = "FILE.jsonl"`: one JSON line `{"node", "key", "reason"}` per rejected row.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::EngineError;
use crate::operator::Rejection;
use crate::plan::Plan;

/// An open reject log, shared by every node and worker that names the same file.
#[derive(Debug)]
pub(crate) struct RejectLog {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

impl RejectLog {
    pub(crate) fn write(&self, node: &str, rejections: &[Rejection]) {
        let mut out = self.out.lock().expect("reject log lock");
        for r in rejections {
            let line = serde_json::json!({ "node": node, "key": r.key, "reason": r.reason });
            if writeln!(out, "{line}").is_err() {
                tracing::warn!("cannot write to {}", self.path.display());
                return;
            }
        }
    }

    pub(crate) fn flush(&self) {
        if let Err(e) = self.out.lock().expect("reject log lock").flush() {
            tracing::warn!("cannot write to {}: {e}", self.path.display());
        }
    }
}

/// Opens every reject log the plan names (one file per process in cluster mode:
/// `rejects.jsonl` becomes `rejects.p1.jsonl`).
pub(crate) fn open_all(
    plan: &Plan,
    process: usize,
    processes: usize,
) -> Result<HashMap<PathBuf, Arc<RejectLog>>, EngineError> {
    let mut logs = HashMap::new();
    for path in plan.nodes.iter().filter_map(|n| n.reject_log.clone()) {
        if logs.contains_key(&path) {
            continue;
        }
        let actual = per_process(&path, process, processes);
        if let Some(dir) = actual.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| EngineError::Io { path: dir.to_path_buf(), source })?;
        }
        let file = File::create(&actual).map_err(|source| EngineError::Io { path: actual.clone(), source })?;
        logs.insert(path, Arc::new(RejectLog { path: actual, out: Mutex::new(BufWriter::new(file)) }));
    }
    Ok(logs)
}

fn per_process(path: &Path, process: usize, processes: usize) -> PathBuf {
    if processes <= 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.p{process}.{}", ext.to_string_lossy()),
        None => format!("{stem}.p{process}"),
    };
    path.with_file_name(name)
}
