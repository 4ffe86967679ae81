//! What the engine measures for every operator, and how it reports it: the profile (JSON and
//! table), the Chrome trace, and the live progress display.

mod counters;
mod profile;
mod progress;
mod trace;

pub(crate) use counters::IdleClock;
pub use counters::{MetricsRegistry, MetricsSnapshot, OperatorMetrics};
pub use profile::{peak_rss_bytes, OperatorProfile, Profile};
pub use progress::ProgressMode;
pub(crate) use progress::ProgressReporter;
pub use trace::TraceRecorder;
