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

/// The most spans a trace keeps (about 200 bytes each): a week-long job traced by mistake must
/// not grow without bound. Later spans are counted, not kept.
pub const MAX_SPANS: usize = 1_000_000;

/// Collects spans of operator activity: the first [`MAX_SPANS`] of them.
#[derive(Debug)]
pub struct TraceRecorder {
    start: Instant,
    process: usize,
    limit: usize,
    inner: Mutex<(Vec<Event>, HashMap<String, usize>)>,
    dropped: std::sync::atomic::AtomicU64,
}

impl TraceRecorder {
    pub(crate) fn new(start: Instant, process: usize) -> Self {
        Self::with_limit(start, process, MAX_SPANS)
    }

    fn with_limit(start: Instant, process: usize, limit: usize) -> Self {
        let inner = Mutex::new((Vec::new(), HashMap::new()));
        TraceRecorder { start, process, limit, inner, dropped: Default::default() }
    }

    /// Spans not kept because the trace was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that `name` (a node id) ran on `track` (a thread) from `begin` to now.
    pub(crate) fn span(&self, name: &str, cat: &'static str, track: &str, begin: Instant, epoch: u64) {
        let ts = begin.duration_since(self.start).as_secs_f64() * 1e6;
        let dur = begin.elapsed().as_secs_f64() * 1e6;
        let mut inner = self.inner.lock().expect("trace lock");
        if inner.0.len() >= self.limit {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
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
            "otherData": { "spans_dropped_after_the_first": self.limit, "spans_dropped": self.dropped() },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_trace_counts_what_it_drops() {
        let trace = TraceRecorder::with_limit(Instant::now(), 0, 3);
        for epoch in 0..5 {
            trace.span("read", "operator", "w0 read (source)", Instant::now(), epoch);
        }
        assert_eq!((trace.len(), trace.dropped()), (3, 2));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        trace.write(&path).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(doc["otherData"]["spans_dropped"], 2);
        assert_eq!(doc["traceEvents"].as_array().unwrap().len(), 4, "one thread name and three spans");
    }
}
