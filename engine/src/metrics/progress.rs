//! The live progress display: a status line on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::MetricsRegistry;
use crate::runtime::JobStatus;

/// How progress is shown while a job runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live status line when stderr is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Always log lines (`tracing`, level info).
    Log,
    /// Nothing.
    Off,
}

/// The reporting thread; stops when dropped.
pub(crate) struct ProgressReporter {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressReporter {
    pub(crate) fn start(
        mode: ProgressMode,
        log_interval: Duration,
        nodes: Vec<String>,
        metrics: Arc<MetricsRegistry>,
        status: Arc<JobStatus>,
    ) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let bar = match mode {
            ProgressMode::Off => return ProgressReporter { done, thread: None },
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {wide_msg}")
                        .expect("template"),
                );
                Some(bar)
            }
            _ => None,
        };
        let tick = if bar.is_some() { Duration::from_millis(500) } else { log_interval };
        let flag = Arc::clone(&done);
        let thread = std::thread::Builder::new()
            .name("latentflow-progress".into())
            .spawn(move || {
                let mut last: Vec<u64> = vec![0; nodes.len()];
                let mut last_at = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    // Sleep in short steps so the thread stops promptly.
                    let wake = Instant::now() + tick;
                    while Instant::now() < wake && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50).min(tick));
                    }
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let dt = last_at.elapsed().as_secs_f64().max(1e-9);
                    last_at = Instant::now();
                    let per_node = metrics.per_node(nodes.len());
                    let mut parts = Vec::new();
                    for (i, (m, _)) in per_node.iter().enumerate() {
                        let items = if m.items_out > 0 { m.items_out } else { m.items_in };
                        let rate = (items.saturating_sub(last[i])) as f64 / dt;
                        last[i] = items;
                        parts.push(format!("{} {items} ({rate:.0}/s)", nodes[i]));
                    }
                    let (epoch, in_flight) = status.epochs();
                    let line = format!("epoch {epoch}, {in_flight} in flight | {}", parts.join(" | "));
                    match &bar {
                        Some(bar) => {
                            bar.set_message(line);
                            bar.tick();
                        }
                        None => tracing::info!("{line}"),
                    }
                }
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
            })
            .expect("spawn progress thread");
        ProgressReporter { done, thread: Some(thread) }
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
