//! `metrics.jsonl`: one line per optimizer step, written by the first trainer; on resume the
//! lines after the checkpoint's step are dropped, as those steps are trained again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use latentflow_engine::OpError;
use serde_json::json;

use crate::training::StepReport;

/// The open `metrics.jsonl` and the losses so far (for `loss.png`).
pub(super) struct MetricsLog {
    file: Option<File>,
    pub losses: Vec<(u64, f64)>,
}

impl MetricsLog {
    /// Opens `path` for appending after dropping the lines past `step`; `write = false` (a
    /// trainer other than the first) keeps the losses in memory only.
    pub fn open(path: &Path, step: u64, write: bool) -> Result<MetricsLog, OpError> {
        if !write {
            return Ok(MetricsLog { file: None, losses: Vec::new() });
        }
        let losses = keep_metrics_up_to(path, step)?;
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| OpError::io(path, e))?;
        Ok(MetricsLog { file: Some(file), losses })
    }

    /// Appends one step's line (and logs it every 10 steps). `reduced`: with replicas, the
    /// seconds this trainer spent in the gradient all-reduce (waiting for the others included)
    /// and the bytes it sent; `resolution`: the step's `[width, height]` in pixels.
    pub fn write(
        &mut self,
        report: &StepReport,
        waited_s: f64,
        step_s: f64,
        keys: Option<&[i64]>,
        reduced: Option<(f64, u64)>,
        resolution: Option<[usize; 2]>,
    ) -> Result<(), OpError> {
        let samples_per_s = report.samples as f64 / (step_s + waited_s).max(1e-9);
        self.losses.push((report.step, report.loss));
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let mut line = json!({
            "step": report.step,
            "loss": report.loss,
            "lr": report.lr,
            "grad_norm": report.grad_norm,
            "samples": report.samples,
            "samples_per_s": samples_per_s,
            "step_s": step_s,
            "wait_s": waited_s,
        });
        if let Some(resolution) = resolution {
            line["resolution"] = json!(resolution);
        }
        if let Some((seconds, bytes)) = reduced {
            line["allreduce_s"] = json!(seconds);
            line["allreduce_bytes"] = json!(bytes);
        }
        if let Some(keys) = keys {
            line["keys"] = json!(keys);
        }
        writeln!(file, "{line}").map_err(|e| OpError::io("metrics.jsonl", e))?;
        file.flush().map_err(|e| OpError::io("metrics.jsonl", e))?;
        if report.step % 10 == 0 || report.step == 1 {
            tracing::info!(
                step = report.step,
                loss = format!("{:.4}", report.loss),
                lr = report.lr,
                samples_per_s = format!("{samples_per_s:.1}"),
                "train"
            );
        }
        Ok(())
    }
}

/// Reads `(step, loss)` from an existing `metrics.jsonl`, keeping only the lines up to `step`.
fn keep_metrics_up_to(path: &Path, step: u64) -> Result<Vec<(u64, f64)>, OpError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).map_err(|e| OpError::io(path, e))?;
    let mut kept = String::new();
    let mut losses = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| OpError::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let (Some(s), Some(loss)) = (value["step"].as_u64(), value["loss"].as_f64()) else { continue };
        if s <= step {
            losses.push((s, loss));
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept).map_err(|e| OpError::io(path, e))?;
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_after_the_resumed_step_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"loss\":0.3}\n")
            .unwrap();
        assert_eq!(keep_metrics_up_to(&path, 2).unwrap(), [(1, 0.5), (2, 0.4)]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
