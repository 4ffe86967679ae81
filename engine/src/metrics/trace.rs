//! Chrome trace (`--trace FILE.json`): a span per batch of operator work, viewable in Perfetto.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::error::EngineError;

#[derive(Debug, Serialize)]
struct Event {
    name: String,
    cat: &'static str,
    ph: &'static str,
    ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    pid: usize,
    tid: usize,
    args: serde_json::Value,
}

/// Collects spans of operator activity.
#[derive(Debug)]
pub struct TraceRecorder {
    start: Instant,
    process: usize,
    inner: Mutex<(Vec<Event>, HashMap<String, usize>)>,
}

impl TraceRecorder {
    pub(crate) fn new(start: Instant, process: usize) -> Self {
        TraceRecorder { start, process, inner: Mutex::new((Vec::new(), HashMap::new())) }
    }

    /// Records that `name` (a node id) ran on `track` (a thread) from `begin` to now.
    pub(crate) fn span(&self, name: &str, cat: &'static str, track: &str, begin: Instant, epoch: u64) {
        let ts = begin.duration_since(self.start).as_secs_f64() * 1e6;
        let dur = begin.elapsed().as_secs_f64() * 1e6;
        let mut inner = self.inner.lock().expect("trace lock");
        let next = inner.1.len() + 1;
        let tid = *inner.1.entry(track.to_string()).or_insert(next);
        inner.0.push(Event {
            name: name.to_string(),
            cat,
            ph: "X",
            ts,
            dur: Some(dur),
            pid: self.process,
            tid,
            args: serde_json::json!({ "epoch": epoch }),
        });
    }

    /// Writes the trace in the Chrome trace event format.
    pub fn write(&self, path: &Path) -> Result<(), EngineError> {
        let inner = self.inner.lock().expect("trace lock");
        let names = inner.1.iter().map(|(track, &tid)| Event {
            name: "thread_name".into(),
            cat: "__metadata",
            ph: "M",
            ts: 0.0,
            dur: None,
            pid: self.process,
            tid,
            args: serde_json::json!({ "name": track }),
        });
        let events: Vec<&Event> = inner.0.iter().collect();
        let names: Vec<Event> = names.collect();
        let doc = serde_json::json!({
            "displayTimeUnit": "ms",
            "traceEvents": names.iter().chain(events).collect::<Vec<_>>(),
        });
        std::fs::write(path, doc.to_string()).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })
    }

    /// Number of spans recorded.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("trace lock").0.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
