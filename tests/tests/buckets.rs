//! Aspect-ratio buckets end to end on the demo images (aspect 0.5 to 2): a bucketed online run
//! trains every row exactly once in steps of one resolution each, at three resolutions;
//! bucketed preprocessing then training gives the online run's steps and losses; two
//! data-parallel trainers give them too; and a run killed with rows waiting in half-full
//! buckets resumes to exactly the run it would have been.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use latentflow_tests::{kill_run_once_exists, latentflow, text, topology, trained_keys};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lf");

/// Three buckets of about 64 x 64: 48 x 80, 64 x 64 and 80 x 48.
const BUCKETS: &str = "nodes.transform.buckets={ area = 4096, step = 16, min = 48, max = 80 }";
const ROWS: i64 = 96;

fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `run TOPOLOGY` with the bucketed demo settings, writing under `dir/out`.
fn args(dir: &Path, topology_name: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into(), topology(topology_name).display().to_string()];
    let mut sets = vec![format!("job.output_dir={}", dir.join("out").display())];
    if topology_name != "train.toml" {
        sets.extend([BUCKETS.to_string(), format!("nodes.read.count={ROWS}"), "nodes.vae.mode=mean".into()]);
    }
    if topology_name != "preprocess.toml" {
        sets.extend(["nodes.train.log_keys=true".into(), "nodes.train.checkpoint_every=2".into()]);
    }
    for set in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        a.extend(["--set".into(), set.into()]);
    }
    a
}

fn run_ok(dir: &Path, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = latentflow(BIN, dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

fn assert_same_steps(expected: &[Value], got: &[Value], tolerance: f64) {
    assert_eq!(expected.len(), got.len());
    for (a, b) in expected.iter().zip(got) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["keys"], b["keys"], "step {}: the same rows", a["step"]);
        assert_eq!(a["resolution"], b["resolution"], "step {}", a["step"]);
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= tolerance, "step {}: loss {la} vs {lb}", a["step"]);
    }
}

#[test]
fn bucketed_runs_train_every_row_once_at_each_resolution_however_they_run() {
    let online = tempfile::tempdir().unwrap();
    run_ok(online.path(), &args(online.path(), "online.toml", &[]));
    let run = online.path().join("out");
    let steps = metrics(&run);
    let seen = trained_keys(&run.join("metrics.jsonl"));
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..ROWS).collect::<Vec<_>>(), "every row trained");
    assert!(seen.values().all(|&n| n == 1), "each row once: {seen:?}");
    let mut per_resolution: BTreeMap<String, usize> = BTreeMap::new();
    for step in &steps {
        let rows = step["keys"].as_array().unwrap().len();
        assert!((1..=16).contains(&rows), "{step}");
        *per_resolution.entry(step["resolution"].to_string()).or_default() += rows;
    }
    let resolutions: BTreeSet<&str> = per_resolution.keys().map(String::as_str).collect();
    assert_eq!(resolutions, BTreeSet::from(["[48,80]", "[64,64]", "[80,48]"]), "{per_resolution:?}");
    let full = steps.iter().filter(|s| s["keys"].as_array().unwrap().len() == 16).count();
    assert!(full >= 3, "most steps are full batches of one bucket: {per_resolution:?}");
    for part in ["unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json"] {
        assert!(run.join("final").join(part).is_file(), "final/ is a diffusers pipeline folder: {part}");
    }
    assert!(run.join("final/model_index.json").is_file() && run.join("final/tokenizer/merges.txt").is_file());

    // Preprocessing writes each row's shape; training reads them back into the same epochs.
    let offline = tempfile::tempdir().unwrap();
    run_ok(offline.path(), &args(offline.path(), "preprocess.toml", &[]));
    let latents = offline.path().join("out/latents");
    let files = std::fs::read_dir(&latents).unwrap().count();
    assert!(files >= 3, "one file per run of one shape: {files}");
    let read = format!("nodes.read.path={}", latents.display());
    run_ok(offline.path(), &args(offline.path(), "train.toml", &[&read]));
    assert_same_steps(&steps, &metrics(&offline.path().join("out")), 1e-6);

    // Two data-parallel trainers: the same steps, the same losses.
    let parallel = tempfile::tempdir().unwrap();
    let mut two = args(parallel.path(), "online.toml", &["job.devices=[\"cpu\", \"cpu\"]"]);
    two.extend(["--workers".into(), "2".into()]);
    run_ok(parallel.path(), &two);
    assert_same_steps(&steps, &metrics(&parallel.path().join("out")), 1e-6);

    // Killed after a checkpoint with rows waiting in their buckets, then resumed: the same run.
    let killed = tempfile::tempdir().unwrap();
    let out = killed.path().join("out");
    kill_run_once_exists(
        BIN,
        killed.path(),
        &args(killed.path(), "online.toml", &[]),
        &out.join("checkpoint-2/state.json"),
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-2/state.json")).unwrap()).unwrap();
    assert!(state["waiting"].is_object(), "rows waited in half-full buckets at the checkpoint: {state}");
    assert!(out.join("checkpoint-2/waiting.safetensors").is_file());
    run_ok(killed.path(), &args(killed.path(), "online.toml", &[]));
    let resumed = metrics(&out);
    assert_same_steps(&steps, &resumed, 0.0);
}
