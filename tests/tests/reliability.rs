//! Reliability as a user meets it through the binary: bad model configs caught at `validate`,
//! SIGTERM that drains, checkpoints and leaves no final model, and a resume after it that
//! trains every good row once and logs every bad row once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use latentflow_operators::demo::{demo_image, img2dataset_schema};
use latentflow_operators::tables::AtomicParquetWriter;
use latentflow_tests::{fixture, latentflow, stop_run_after_steps, text, topology, trained_keys};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

#[test]
fn validate_lists_every_bad_model_config_value_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    let config = std::fs::read_to_string(fixture("tiny-sd/vae/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["norm_num_groups"] = 0.into();
    config["act_fn"] = "gelu".into();
    config["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    std::fs::write(vae.join("config.json"), config.to_string()).unwrap();
    let set = format!("nodes.vae.path=\"{}\"", vae.display());
    let preprocess = topology("preprocess.toml");
    let out = latentflow(BIN, dir.path(), &["validate", preprocess.to_str().unwrap(), "--set", &set]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = vae.join("config.json").display().to_string();
    for field in ["`norm_num_groups` = 0", "`act_fn` = gelu", "`up_block_types` = AttnUpDecoderBlock2D"] {
        assert!(stderr.lines().any(|l| l.contains(&file) && l.contains(field)), "{field} not named:\n{stderr}");
    }
    assert!(stderr.contains("has 3 problems"), "{stderr}");
    // `run` refuses the same before loading anything: no panic, no hang.
    let out = latentflow(BIN, dir.path(), &["run", preprocess.to_str().unwrap(), "--set", &set]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// img2dataset-style rows: keys `0..rows`; `k % 10 == 3` has no image (the source rejects it),
/// `k % 10 == 7` holds an HTML error page (the transform rejects it); the rest are demo JPEGs.
fn rows_with_bad_ones(path: &Path, rows: i64) {
    let schema = img2dataset_schema();
    let mut writer = AtomicParquetWriter::create(path, Arc::clone(&schema), &[]).unwrap();
    for start in (0..rows).step_by(16) {
        let keys: Vec<i64> = (start..(start + 16).min(rows)).collect();
        let images: Vec<Option<Vec<u8>>> = keys
            .iter()
            .map(|&k| match k % 10 {
                3 => None,
                7 => Some(b"<html><body>404 Not Found</body></html>".to_vec()),
                _ => Some(demo_image(0, k as u64, 90).jpeg),
            })
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(keys.clone())),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| format!("caption {k}")))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|_| 256.0))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|_| 256.0))),
            Arc::new(BinaryArray::from_iter(images.iter().map(|i| i.as_deref()))),
        ];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()).unwrap();
        writer.end_row_group().unwrap();
    }
    writer.finish().unwrap();
}

const TRAIN_ON_PARQUET: &str = r#"
[job]
name = "sigterm"
max_epochs_in_flight = 2

[nodes.read]
type = "parquet_source"
path = "rows.parquet"
reject_log = "rejects.jsonl"

[nodes.transform]
type = "image_transform"
inputs = ["read"]
resolution = 32
reject_log = "rejects.jsonl"

[nodes.tokenize]
type = "tokenize"
inputs = ["transform"]

[nodes.vae]
type = "vae_encode"
inputs = ["tokenize"]
preset = "tiny"

[nodes.text]
type = "text_encode"
inputs = ["vae"]
preset = "tiny"

[nodes.train]
type = "train"
inputs = ["text"]
preset = "tiny"
global_batch_size = 8
checkpoint_every = 4
resume = "latest"
log_keys = true
"#;

/// Runs the parquet training job, stops it with `signal` after its third step (its sixth for
/// SIGKILL, past the first checkpoint at step 4), checks what a stopped run leaves, resumes it to the end, and checks that over both runs every good row
/// trained once and every bad row is logged once.
fn stop_then_resume(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rows = 240;
    rows_with_bad_ones(&dir.path().join("rows.parquet"), rows);
    std::fs::write(dir.path().join("job.toml"), TRAIN_ON_PARQUET).unwrap();
    let metrics = dir.path().join("runs/sigterm/metrics.jsonl");

    // Past the first checkpoint (step 4) for SIGKILL.
    let steps = if signal == "-KILL" { 6 } else { 3 };
    let out = stop_run_after_steps(BIN, dir.path(), &metrics, steps, signal);
    let run_dir = dir.path().join("runs/sigterm");
    if signal == "-TERM" {
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        let steps_before = trained_keys(&metrics).values().sum::<usize>() / 8;
        assert!(steps_before < 24, "the first run stopped early ({steps_before} steps)");
        let checkpoints = std::fs::read_dir(&run_dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("checkpoint-"))
            .count();
        assert!(checkpoints > 0, "the drain checkpoints");
    }
    assert!(!run_dir.join("final").exists(), "a stopped run leaves no final model");
    assert!(!run_dir.join("loss.png").exists(), "nor a loss plot");

    let out = latentflow(BIN, dir.path(), &["run", "job.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(run_dir.join("final/unet/config.json").is_file(), "{}", text(&out));
    assert!(run_dir.join("loss.png").is_file());

    let good: Vec<i64> = (0..rows).filter(|k| k % 10 != 3 && k % 10 != 7).collect();
    let trained = trained_keys(&metrics);
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), good, "every good row trained");
    let twice: Vec<_> = trained.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "rows trained more than once over the two runs: {twice:?}");

    let log = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let mut logged: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let key: i64 = entry["key"].as_str().unwrap().parse().unwrap();
        let what = (entry["node"].as_str().unwrap().to_string(), entry["reason"].as_str().unwrap().to_string());
        logged.entry(key).or_default().push(what);
    }
    let bad: Vec<i64> = (0..rows).filter(|k| k % 10 == 3 || k % 10 == 7).collect();
    assert_eq!(logged.keys().copied().collect::<Vec<_>>(), bad, "every bad row logged:\n{log}");
    for (key, entries) in &logged {
        let node = if key % 10 == 3 { "read" } else { "transform" };
        assert_eq!(entries.len(), 1, "row {key} logged once: {entries:?}");
        assert_eq!(entries[0].0, node, "row {key}: {entries:?}");
    }
}

#[test]
fn sigterm_drains_without_a_final_model_and_the_resume_trains_good_rows_once_and_logs_bad_rows_once() {
    stop_then_resume("-TERM");
}

#[test]
fn after_sigkill_the_resume_trains_good_rows_once_and_logs_bad_rows_once() {
    // Steps after the last checkpoint are trained again; metrics.jsonl drops their first lines.
    stop_then_resume("-KILL");
}

#[test]
fn a_kill_at_any_moment_of_a_checkpoint_write_never_leaves_a_half_checkpoint() {
    use latentflow_operators::training::checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut newest_seen = 0;
    let mut random = 0x2545_f491_4f6c_dd1du64;
    for kill in 0..16 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_checkpoint_loop"))
            .arg(&run_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A pseudo-random moment: 0.2 to 1.4 s in, through model loading, steps and writes.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        std::thread::sleep(Duration::from_millis(200 + random % 1200));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let Some(latest) = checkpoint::latest(&run_dir).unwrap() else { continue };
        let state = checkpoint::read_state(&latest).unwrap_or_else(|e| panic!("kill {kill}: {e}"));
        assert_eq!(latest.file_name().unwrap().to_string_lossy(), format!("checkpoint-{}", state.step));
        assert_eq!(state.data_position["step"], state.step, "kill {kill}");
        let schedule = latentflow_operators::training::NoiseSchedule::new(
            &latentflow_operators::training::SchedulerConfig::default(),
            "default".as_ref(),
        )
        .unwrap();
        let options = latentflow_operators::training::TrainingOptions { ema_decay: Some(0.99), ..Default::default() };
        let (trainer, _) = checkpoint::resume(&latest, schedule, options, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("kill {kill}: the latest checkpoint does not resume: {e}"));
        assert_eq!(trainer.step(), state.step);
        assert!(state.step >= newest_seen, "kill {kill}: went back from {newest_seen} to {}", state.step);
        newest_seen = state.step;
    }
    assert!(newest_seen >= 3, "the loop got to checkpoint only {newest_seen} steps: kills too early to test");
    // What the kills left half-written goes at the next start.
    checkpoint::remove_stale(&run_dir).unwrap();
    let left: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The peak resident memory of `lf run` over `rows` demo rows (demo_source -> image_transform
/// -> null_sink on 2 workers), from its profile.
fn peak_rss_of_demo_rows(dir: &Path, rows: u64) -> u64 {
    let topology = "[job]\nname = \"rss\"\n\n[nodes.read]\ntype = \"demo_source\"\ncount = 1000\nbatch_size = 32\n\n\
                    [nodes.transform]\ntype = \"image_transform\"\ninputs = [\"read\"]\nresolution = 64\n\n\
                    [nodes.sink]\ntype = \"null_sink\"\ninputs = [\"transform\"]\n";
    std::fs::write(dir.join("rss.toml"), topology).unwrap();
    let profile = format!("rss-{rows}.json");
    let count = format!("nodes.read.count={rows}");
    let args = ["run", "rss.toml", "--workers", "2", "--set", &count, "--profile", &profile];
    let out = latentflow(BIN, dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(&profile)).unwrap()).unwrap();
    assert_eq!(profile["operators"][2]["items_in"], rows);
    profile["peak_rss_bytes"].as_u64().expect("peak_rss_bytes in the profile")
}

#[test]
fn resident_memory_does_not_grow_with_the_rows_of_a_demo_source() {
    let dir = tempfile::tempdir().unwrap();
    // The least of two runs each: a run's peak also holds what the allocator's per-thread arenas
    // happened to keep (seen: the same 10,000 rows peaking 4 MB apart), noise that only adds.
    let least = |rows| (0..2).map(|_| peak_rss_of_demo_rows(dir.path(), rows)).min().unwrap();
    let small = least(1_000);
    let large = least(10_000);
    let ratio = large as f64 / small as f64;
    println!("peak RSS: {small} B at 1,000 rows, {large} B at 10,000 rows: {ratio:.3}x");
    assert!(ratio <= 1.15, "{small} B at 1,000 rows, {large} B at 10,000 rows: {ratio:.3}x");
}
