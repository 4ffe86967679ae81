//! Cluster mode: timely's own multi-process communication, with a deadline on start-up and a
//! clear error when a peer goes away.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use crossbeam_channel::Sender;

use crate::error::EngineError;

/// This process's place in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Number of processes.
    pub processes: usize,
    /// This process's index, `0..processes`.
    pub process_id: usize,
    /// `host:port` of every process, in process order.
    pub addresses: Vec<String>,
}

impl ClusterOptions {
    /// Reads a hostfile (one `host:port` per line; blank lines and `#` comments skipped) and
    /// checks it against the process count and index.
    pub fn from_hostfile(path: &Path, processes: usize, process_id: usize) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Options(format!("cannot read hostfile {}: {e}", path.display())))?;
        let addresses: Vec<String> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let options = ClusterOptions { processes, process_id, addresses };
        options.check(&path.display().to_string())?;
        Ok(options)
    }

    pub(crate) fn check(&self, origin: &str) -> Result<(), EngineError> {
        if self.processes == 0 {
            return Err(EngineError::Options("--processes must be at least 1".into()));
        }
        if self.process_id >= self.processes {
            return Err(EngineError::Options(format!(
                "--process-id {} is out of range for {} processes (0..{})",
                self.process_id,
                self.processes,
                self.processes - 1
            )));
        }
        if self.addresses.len() < self.processes {
            return Err(EngineError::Options(format!(
                "{origin}: {} processes need {} `host:port` lines, found {}",
                self.processes,
                self.processes,
                self.addresses.len()
            )));
        }
        for (line, address) in self.addresses.iter().enumerate() {
            let port = address.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(EngineError::Options(format!(
                    "{origin}: address {} (`{address}`) is not `host:port`",
                    line + 1
                )));
            }
        }
        Ok(())
    }
}

static HOOK: Once = Once::new();
static PEER_LOST: Mutex<Option<Sender<String>>> = Mutex::new(None);
/// Set once a peer was lost: the panics that follow on timely's threads are consequences, not news.
static LOST: AtomicBool = AtomicBool::new(false);

/// Reports timely's network failures ("timely communication error: ...", raised as panics on
/// its network threads) to `events` instead of leaving the workers waiting forever.
pub(crate) fn watch_peers(events: Sender<String>) {
    *PEER_LOST.lock().expect("peer lock") = Some(events);
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = super::panics::message(info.payload());
            let sender = PEER_LOST.lock().ok().and_then(|s| s.clone());
            let is_network =
                message.starts_with("timely communication error") || message.contains("MergeQueue poisoned");
            match sender {
                Some(sender) if is_network => {
                    LOST.store(true, Ordering::SeqCst);
                    let _ = sender.send(name_the_peer(std::thread::current().name(), message));
                }
                Some(_) if LOST.load(Ordering::SeqCst) => {}
                _ => previous(info),
            }
        }));
    });
}

/// Names the lost process: timely's network threads are `timely:recv-N` / `timely:send-N` for
/// peer process `N`.
fn name_the_peer(thread: Option<&str>, message: String) -> String {
    let peer = thread.and_then(|t| t.strip_prefix("timely:recv-").or_else(|| t.strip_prefix("timely:send-")));
    match peer {
        Some(n) => format!("process {n}: {message}"),
        None => message,
    }
}

/// Stops routing network failures for the finished job.
pub(crate) fn unwatch_peers() {
    if let Ok(mut s) = PEER_LOST.lock() {
        *s = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_process_is_named() {
        let message = "timely communication error: reading data: reset".to_string();
        assert_eq!(name_the_peer(Some("timely:recv-1"), message.clone()), format!("process 1: {message}"));
        assert_eq!(name_the_peer(Some("lf-timely"), message.clone()), message);
    }

    #[test]
    fn hostfiles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "# cluster\n127.0.0.1:2101\n\n127.0.0.1:2102\n").unwrap();
        let ok = ClusterOptions::from_hostfile(&path, 2, 1).unwrap();
        assert_eq!(ok.addresses, ["127.0.0.1:2101", "127.0.0.1:2102"]);
        let err = ClusterOptions::from_hostfile(&path, 3, 0).unwrap_err().to_string();
        assert!(err.ends_with("3 processes need 3 `host:port` lines, found 2"), "{err}");
        let err = ClusterOptions::from_hostfile(&path, 2, 2).unwrap_err().to_string();
        assert_eq!(err, "--process-id 2 is out of range for 2 processes (0..1)");
        std::fs::write(&path, "localhost\nlocalhost:1\n").unwrap();
        let err = ClusterOptions::from_hostfile(&path, 2, 0).unwrap_err().to_string();
        assert!(err.ends_with("address 1 (`localhost`) is not `host:port`"), "{err}");
    }
}
