//! Data-parallel training end to end: the main job (`online.toml`) on 1 worker, on 2 worker
//! threads and on 2 processes on loopback trains the same rows in every step to the same
//! numbers; a process killed mid-run ends its peer with the lost-peer error, and the rerun
//! resumes the checkpoint step for step, also on a different number of trainers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use latentflow_tests::{free_port, max_abs_diff, text, topology};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

/// The main job, short: `steps` steps, a checkpoint every `every`, no previews; with the random
/// `tiny` CLIP, whose every weight gets a real gradient. (The demo's `words` encoder gives the
/// same vector at every position, so cross-attention's query and key weights get a gradient of
/// rounding noise only, which AdamW turns into updates that differ with the summation order.)
fn settings(out: &str, steps: u64, every: u64) -> Vec<String> {
    [
        format!("job.output_dir={out}"),
        "nodes.text.preset=\"tiny\"".into(),
        "nodes.train.text_encoder_preset=\"tiny\"".into(),
        format!("nodes.train.max_steps={steps}"),
        format!("nodes.train.checkpoint_every={every}"),
        "nodes.train.sample_every=0".into(),
        "nodes.train.log_keys=true".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn command(dir: &Path, args: &[String]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("run").arg(topology("online.toml")).args(args).current_dir(dir).env("RUST_LOG", "warn");
    command
}

fn run(dir: &Path, args: &[String]) -> Output {
    let out = command(dir, args).output().expect("run latentflow");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    out
}

/// Starts process `id` of a 2-process run on `hosts`.
fn spawn_process(dir: &Path, id: usize, args: &[String]) -> Child {
    let cluster = ["--processes", "2", "--process-id", &id.to_string(), "--hostfile", "hosts"].map(String::from);
    command(dir, &[&cluster[..], args].concat()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn write_hosts(dir: &Path) {
    std::fs::write(dir.join("hosts"), format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
}

fn run_processes(dir: &Path, args: &[String]) {
    write_hosts(dir);
    let children: Vec<Child> = (0..2).map(|id| spawn_process(dir, id, args)).collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
}

/// `metrics.jsonl` by step: (row keys, loss).
fn metrics(dir: &Path) -> Vec<(u64, Vec<i64>, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let keys = v["keys"].as_array().unwrap().iter().map(|k| k.as_i64().unwrap()).collect();
            (v["step"].as_u64().unwrap(), keys, v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn unet(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("final/unet/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap()
}

fn assert_same_steps(a: &[(u64, Vec<i64>, f64)], b: &[(u64, Vec<i64>, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.0, &x.1), (y.0, &y.1), "{what}: the rows of step {}", x.0);
        assert!((x.2 - y.2).abs() < 1e-5, "{what}: step {} loss {} vs {}", x.0, x.2, y.2);
    }
}

fn two_workers() -> Vec<String> {
    ["--workers", "2", "--set", r#"job.devices=["cpu","cpu"]"#].map(String::from).to_vec()
}

#[test]
fn one_worker_two_threads_and_two_processes_train_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    run(dir, &settings("w1", 10, 5));
    run(dir, &[two_workers(), settings("w2", 10, 5)].concat());
    run_processes(dir, &settings("p2", 10, 5));
    let (w1, w2, p2) = (metrics(&dir.join("w1")), metrics(&dir.join("w2")), metrics(&dir.join("p2")));
    assert_eq!(w1.len(), 10);
    assert_eq!(w1[0].1, (0..16).collect::<Vec<i64>>(), "step 1 trains keys 0..16 whatever the workers");
    assert_same_steps(&w1, &w2, "1 worker vs 2 threads");
    assert_same_steps(&w1, &p2, "1 worker vs 2 processes");
    // Threads and processes reduce in the same fixed order: the same bits.
    let losses = |m: &[(u64, Vec<i64>, f64)]| m.iter().map(|s| s.2.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&w2), losses(&p2), "2 threads and 2 processes bit for bit");
    let (a, b, c) = (unet(&dir.join("w1")), unet(&dir.join("w2")), unet(&dir.join("p2")));
    for (name, t) in &a {
        assert!(max_abs_diff(t, &b[name]) < 1e-5, "{name}: 1 vs 2 workers");
        assert_eq!(max_abs_diff(&b[name], &c[name]), 0.0, "{name}: threads vs processes");
    }
    // Only the first trainer writes: one metrics file, checkpoints at 5 and 10.
    assert!(dir.join("p2/checkpoint-10/state.json").is_file());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("p2/checkpoint-5/state.json")).unwrap()).unwrap();
    let position = &state["data_position"];
    assert_eq!(position["covered"], serde_json::json!([0, 1]), "both processes' sources saved: {position}");
    assert_eq!(position["sources"]["read"].as_object().unwrap().len(), 2, "{position}");
}

/// The shape of `sd2-base-256/online-8gpu.toml` on 4 CPU "devices": encoders on devices 2-3,
/// data-parallel trainers on 0-1. The encoders' outputs reach the trainers as device columns
/// (never turned into host columns on the way, also when they change trainer) and train the same
/// steps as one worker.
#[test]
fn encoders_on_their_own_devices_hand_their_outputs_to_the_trainers_devices() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    run(dir, &settings("w1", 4, 4));
    let placed = [
        "--workers",
        "4",
        "--profile",
        "profile.json",
        "--set",
        r#"job.devices=["cpu","cpu","cpu","cpu"]"#,
        "--set",
        r#"nodes.vae.placement="devices:2-3""#,
        "--set",
        r#"nodes.text.placement="devices:2-3""#,
        "--set",
        r#"nodes.train.placement="devices:0-1""#,
    ]
    .map(String::from);
    run(dir, &[placed.to_vec(), settings("placed", 4, 4)].concat());
    assert_same_steps(
        &metrics(&dir.join("w1")),
        &metrics(&dir.join("placed")),
        "1 worker vs encoders and trainers apart",
    );
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("profile.json")).unwrap()).unwrap();
    let node = |id: &str| profile["operators"].as_array().unwrap().iter().find(|o| o["id"] == id).unwrap().clone();
    assert_eq!(node("vae")["workers"], serde_json::json!([2, 3]), "{profile}");
    let train = node("train");
    assert_eq!(train["workers"], serde_json::json!([0, 1]), "{profile}");
    let counted = &train["counted"];
    assert_eq!(counted["rows_on_device"], 4 * 16, "every trained row came as the encoders left it: {counted}");
    assert!(counted.get("rows_from_host").is_none(), "no row went through a host column: {counted}");
}

#[test]
fn a_killed_process_fails_its_peer_and_the_rerun_resumes_step_for_step() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let reference = {
        run(dir, &settings("straight", 9, 3));
        metrics(&dir.join("straight"))
    };
    write_hosts(dir);
    let args = settings("cluster", 9, 3);
    let survivor = spawn_process(dir, 0, &args);
    let mut victim = spawn_process(dir, 1, &args);
    let checkpoint = dir.join("cluster/checkpoint-3/state.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !checkpoint.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(checkpoint.exists(), "no checkpoint-3 in time");
    victim.kill().unwrap();
    let _ = victim.wait();
    let killed = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    assert!(killed.elapsed() < Duration::from_secs(60), "the survivor took {:?}", killed.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: lost the connection to a peer process (process 1"), "{stderr}");
    // The checkpoint stays whole; the rerun continues from the newest one.
    let saved: Vec<PathBuf> = std::fs::read_dir(dir.join("cluster"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    // Elastic: the 2-process checkpoint resumed by 1 worker trains the same rows in every step.
    let kept = dir.join("checkpoint-3-copy");
    copy_dir(&saved[0], &kept);
    let resume = format!("nodes.train.resume={}", kept.display());
    run(dir, &[settings("elastic", 9, 3), vec!["--set".into(), resume]].concat());
    assert_same_steps(&reference[3..], &metrics(&dir.join("elastic")), "2 processes resumed by 1 worker");
    // The rerun of both processes continues from the newest checkpoint.
    run_processes(dir, &args);
    assert_same_steps(&reference, &metrics(&dir.join("cluster")), "killed and resumed on 2 processes");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
