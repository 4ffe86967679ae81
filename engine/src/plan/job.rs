//! `[job]`: settings that apply to the whole run.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::operator::KeyError;

/// The `[job]` table of a topology.
///
/// ```
/// use latentflow_engine::JobConfig;
/// let job: JobConfig = toml::from_str("name = \"online\"\nmax_epochs_in_flight = 2").unwrap();
/// assert_eq!(job.output_dir(), std::path::PathBuf::from("runs/online"));
/// assert!(job.validate().is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// The job's name (used in logs and the default output directory).
    pub name: String,
    /// Where outputs go; `runs/<name>` by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<PathBuf>,
    /// K: a source opens epoch `t` only once every sink has finished epoch `t - K`.
    pub max_epochs_in_flight: u64,
    /// Optional byte budget: no new epoch opens while this many bytes are in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes_in_flight: Option<ByteSize>,
    /// Seed for everything random (shuffles, noise, initialisation).
    pub seed: u64,
    /// The job's CPU thread budget per process (all cores by default): one pool runs the map
    /// operators and every stage's parallel kernels (attention, norms, matrix products).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// Devices owned by worker threads: thread `i` of each process owns `devices[i]`.
    /// Nodes with `placement = "gpu"` run only on those workers.
    pub devices: Vec<String>,
    /// Cluster mode: how long to wait for every process to connect before failing.
    pub connect_timeout_s: f64,
    /// How often a progress line is logged when stderr is not a terminal.
    pub log_interval_s: f64,
    /// After a stop (Ctrl-C, SIGTERM, a failure), how long in-flight work may take to drain and
    /// checkpoint before the process exits with an error anyway.
    pub drain_timeout_s: f64,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            name: "latentflow".into(),
            output_dir: None,
            max_epochs_in_flight: 4,
            max_bytes_in_flight: None,
            seed: 0,
            cpu_threads: None,
            devices: vec!["cpu".into()],
            connect_timeout_s: 60.0,
            log_interval_s: 10.0,
            drain_timeout_s: 60.0,
        }
    }
}

impl JobConfig {
    /// The output directory: `output_dir`, else `runs/<name>`.
    pub fn output_dir(&self) -> PathBuf {
        self.output_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// Threads of the job's pool.
    pub fn cpu_threads(&self) -> usize {
        self.cpu_threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// Every bad value.
    pub fn validate(&self) -> Vec<KeyError> {
        let mut errors = Vec::new();
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            errors
                .push(KeyError::new("name", format!("must be letters, digits, `-`, `_` or `.`, got {:?}", self.name)));
        }
        errors.extend(KeyError::check_range("max_epochs_in_flight", self.max_epochs_in_flight, 1, 1 << 20));
        if let Some(b) = self.max_bytes_in_flight {
            errors.extend(KeyError::check_range("max_bytes_in_flight", b.as_u64(), 1 << 10, u64::MAX));
        }
        if let Some(n) = self.cpu_threads {
            errors.extend(KeyError::check_range("cpu_threads", n, 1, 1024));
        }
        for device in &self.devices {
            if let Err(message) = parse_device(device) {
                errors.push(KeyError::new("devices", message));
            }
        }
        for (key, seconds) in [
            ("connect_timeout_s", self.connect_timeout_s),
            ("log_interval_s", self.log_interval_s),
            ("drain_timeout_s", self.drain_timeout_s),
        ] {
            if !(seconds > 0.0 && seconds <= 86400.0) {
                errors.push(KeyError::new(key, format!("must be between 0 and 86400 seconds, got {seconds}")));
            }
        }
        errors
    }
}

/// Checks a device name: `cpu` or `cuda:N`.
pub fn parse_device(device: &str) -> Result<(), String> {
    let ok = device == "cpu"
        || device.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(format!("`{device}` is not a device; use \"cpu\" or \"cuda:N\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_all_reported() {
        assert!(JobConfig::default().validate().is_empty());
        let job = JobConfig {
            name: "a b".into(),
            max_epochs_in_flight: 0,
            devices: vec!["gpu0".into()],
            ..JobConfig::default()
        };
        let keys: Vec<_> = job.validate().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["name", "max_epochs_in_flight", "devices"]);
    }

    #[test]
    fn byte_budget_reads_human_sizes() {
        let job: JobConfig = toml::from_str("max_bytes_in_flight = \"64 MiB\"").unwrap();
        assert_eq!(job.max_bytes_in_flight.unwrap().as_u64(), 64 << 20);
    }
}
