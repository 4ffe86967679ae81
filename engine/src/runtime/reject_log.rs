//! `reject_log = "FILE.jsonl"`: one JSON line `{"node", "key", "reason"}` per rejected row.
//!
//! A fresh run starts the file anew. A run that resumes a checkpoint appends to it, and lists each
//! row only once over all runs: a row rejected after the checkpoint by a killed run is rejected
//! again when the resumed run reads it again, and that second line is skipped. To know them, a
//! resumed run holds the hash of every `(node, key)` already logged (8 bytes a row).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::EngineError;
use crate::operator::Rejection;
use crate::plan::Plan;

/// An open reject log, shared by every node and worker that names the same file.
#[derive(Debug)]
pub(crate) struct RejectLog {
    path: PathBuf,
    out: Mutex<Writer>,
}

#[derive(Debug)]
struct Writer {
    file: BufWriter<File>,
    /// Rows logged by earlier runs of a resumed job (and since), by [`row_id`].
    logged: Option<HashSet<u64>>,
}

/// A rejected row's identity in the logs: its node and key.
fn row_id(node: &str, key: &str) -> u64 {
    let mut hasher = DefaultHasher::new(); // fixed keys: the same on every run
    (node, key).hash(&mut hasher);
    hasher.finish()
}

impl RejectLog {
    pub(crate) fn write(&self, node: &str, rejections: &[Rejection]) {
        let mut guard = self.out.lock().expect("reject log lock");
        let Writer { file: out, logged } = &mut *guard;
        for r in rejections {
            if logged.as_mut().is_some_and(|seen| !seen.insert(row_id(node, &r.key))) {
                continue;
            }
            let line = serde_json::json!({ "node": node, "key": r.key, "reason": r.reason });
            if writeln!(out, "{line}").is_err() {
                tracing::warn!("cannot write to {}", self.path.display());
                return;
            }
        }
        // Handed to the OS with every call: a kill must not lose rejections of rows before the
        // checkpoint, which a resumed run never reads again.
        if let Err(e) = out.flush() {
            tracing::warn!("cannot write to {}: {e}", self.path.display());
        }
    }

    pub(crate) fn flush(&self) {
        if let Err(e) = self.out.lock().expect("reject log lock").file.flush() {
            tracing::warn!("cannot write to {}: {e}", self.path.display());
        }
    }
}

/// Opens every reject log the plan names (one file per process in cluster mode:
/// `rejects.jsonl` becomes `rejects.p1.jsonl`); `resuming` appends instead of starting anew.
pub(crate) fn open_all(
    plan: &Plan,
    process: usize,
    processes: usize,
    resuming: bool,
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
        let log = RejectLog::open(&path, actual.clone(), resuming)
            .map_err(|source| EngineError::Io { path: actual, source })?;
        logs.insert(path, Arc::new(log));
    }
    Ok(logs)
}

impl RejectLog {
    /// Opens this process's file `actual` of the log the plan names `path`: anew, or to append
    /// after the rows every process's file of the earlier runs lists (their process count may
    /// have differed).
    fn open(path: &Path, actual: PathBuf, resuming: bool) -> std::io::Result<RejectLog> {
        let writer = if resuming {
            let logged = logged_rows(path)?;
            let file = OpenOptions::new().create(true).append(true).open(&actual)?;
            Writer { file: BufWriter::new(file), logged: Some(logged) }
        } else {
            Writer { file: BufWriter::new(File::create(&actual)?), logged: None }
        };
        Ok(RejectLog { path: actual, out: Mutex::new(writer) })
    }
}

/// The rows logged in `path` and its per-process siblings (`stem.pN.ext`). A line a kill cut
/// short is cut off, so that appending starts on a line of its own.
fn logged_rows(path: &Path) -> std::io::Result<HashSet<u64>> {
    let mut logged = HashSet::new();
    for file in log_files(path)? {
        let text = BufReader::new(File::open(&file)?);
        let mut whole = 0u64;
        for line in text.split(b'\n') {
            let line = line?;
            let entry: Option<serde_json::Value> = serde_json::from_slice(&line).ok();
            let fields = entry.as_ref().and_then(|e| Some((e.get("node")?.as_str()?, e.get("key")?.as_str()?)));
            match fields {
                Some((node, key)) => {
                    logged.insert(row_id(node, key));
                    whole += line.len() as u64 + 1;
                }
                None => break, // a torn last line; nothing after it was written
            }
        }
        let len = std::fs::metadata(&file)?.len();
        if whole < len {
            OpenOptions::new().write(true).open(&file)?.set_len(whole)?;
        }
    }
    Ok(logged)
}

/// `path` and its per-process siblings that exist.
fn log_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let sibling = |n: &str| {
        n.strip_prefix(&format!("{stem}.p"))
            .and_then(|rest| rest.strip_suffix(&ext))
            .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    };
    let mut files = Vec::new();
    if !dir.is_dir() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let file = entry?.path();
        let n = name(&file);
        if n == name(path) || sibling(&n) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(key: &str) -> Rejection {
        Rejection { key: key.into(), reason: "bad".into() }
    }

    fn log(path: &Path, resuming: bool) -> RejectLog {
        RejectLog::open(path, path.to_path_buf(), resuming).unwrap()
    }

    #[test]
    fn a_resumed_log_lists_each_row_once_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rejects.jsonl");
        let first = log(&path, false);
        first.write("src", &[rejection("1"), rejection("2")]);
        first.flush();
        drop(first);
        // A kill mid-line, and a sibling from a two-process run.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"node\":\"src\",\"ke").unwrap();
        std::fs::write(dir.path().join("rejects.p1.jsonl"), "{\"node\":\"src\",\"key\":\"3\",\"reason\":\"bad\"}\n")
            .unwrap();
        let resumed = log(&path, true);
        resumed.write("src", &[rejection("2"), rejection("3"), rejection("4"), rejection("4")]);
        resumed.write("other", &[rejection("1")]);
        resumed.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<(String, String)> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["node"].as_str().unwrap().into(), v["key"].as_str().unwrap().into()))
            .collect();
        let expected = [("src", "1"), ("src", "2"), ("src", "4"), ("other", "1")];
        assert_eq!(keys, expected.map(|(n, k)| (n.to_string(), k.to_string())));
    }
}
