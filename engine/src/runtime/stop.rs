//! Stopping a job cleanly: sources stop, in-flight work drains, stateful operators flush.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use timely::scheduling::SyncActivator;

/// Why a job stops before its sources are exhausted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Ctrl-C (exit code 130).
    Interrupted,
    /// An operator asked (`OpContext::request_stop`), e.g. a trainer at `max_steps`.
    Requested,
    /// An operator failed.
    Failed,
    /// Another process of the cluster stopped.
    Peer,
    /// Another process of the cluster stopped because an operator there failed.
    PeerFailed,
}

/// The job's stop flag. Setting it wakes every local source, which then broadcasts the stop to
/// the other processes through the dataflow.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    interrupted: AtomicBool,
    failed: AtomicBool,
    first_reason: Mutex<Option<StopReason>>,
    wakers: Mutex<Vec<SyncActivator>>,
}

impl StopSignal {
    /// Stops the job (idempotent).
    pub fn request(&self, reason: StopReason) {
        if reason == StopReason::Interrupted {
            self.interrupted.store(true, Ordering::SeqCst);
        }
        if matches!(reason, StopReason::Failed | StopReason::PeerFailed) {
            self.failed.store(true, Ordering::SeqCst);
        }
        let _ = self.first_reason.lock().map(|mut first| *first.get_or_insert(reason));
        if !self.stopped.swap(true, Ordering::SeqCst) {
            tracing::info!(?reason, "stopping: sources stop, in-flight work drains");
        }
        for waker in self.wakers.lock().expect("stop lock").iter() {
            let _ = waker.activate();
        }
    }

    /// True once a stop was requested.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Why the job was first asked to stop, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        self.first_reason.lock().ok().and_then(|r| *r)
    }

    /// True once an operator of the job failed (here or in another process): collectives
    /// waiting for peers give up, and the data after the failure is incomplete.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// True when the stop came from Ctrl-C.
    pub fn was_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    pub(crate) fn register(&self, waker: SyncActivator) {
        self.wakers.lock().expect("stop lock").push(waker);
    }
}

static CURRENT_JOB: Mutex<Option<Arc<StopSignal>>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// Routes Ctrl-C (and SIGTERM) to `signal` while the returned guard lives. A second Ctrl-C
/// exits at once with code 130.
pub(crate) fn handle_interrupts(signal: &Arc<StopSignal>) -> InterruptGuard {
    INSTALL.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            let current = CURRENT_JOB.lock().ok().and_then(|c| c.clone());
            match current {
                Some(job) if !job.was_interrupted() => {
                    eprintln!("\ninterrupted: stopping sources and draining in-flight work (Ctrl-C again to exit now)");
                    job.request(StopReason::Interrupted);
                }
                _ => {
                    eprintln!("\ninterrupted again: exiting now");
                    std::process::exit(130);
                }
            }
        });
        if let Err(e) = installed {
            tracing::warn!("cannot handle Ctrl-C: {e}");
        }
    });
    *CURRENT_JOB.lock().expect("job lock") = Some(Arc::clone(signal));
    InterruptGuard
}

/// Unroutes Ctrl-C when the job ends.
pub(crate) struct InterruptGuard;

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        if let Ok(mut current) = CURRENT_JOB.lock() {
            *current = None;
        }
    }
}
