//! The `latentflow` binary: exit codes, `validate`, `operators`, `run` with `--set`,
//! `--profile` and `--trace`, and Ctrl-C.

use std::process::Command;
use std::time::Duration;

use latentflow_tests::{fixture, latentflow, text, topology};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

#[test]
fn validate_accepts_the_shipped_topologies() {
    let dir = tempfile::tempdir().unwrap();
    // Phase 2 starts from phase 1's run: stand-ins for its final UNet and checkpoint.
    let checkpoint = dir.path().join("runs/online/checkpoint-1");
    std::fs::create_dir_all(&checkpoint).unwrap();
    std::fs::write(checkpoint.join("state.json"), "{}").unwrap();
    let unet = format!("nodes.train.path={}", latentflow_tests::fixture("tiny-sd/unet").display());
    for entry in std::fs::read_dir(topology("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let mut args = vec!["validate", path.to_str().unwrap()];
            if path.ends_with("online-phase2.toml") {
                args.extend(["--set", &unet]);
            }
            let out = latentflow(BIN, dir.path(), &args);
            assert_eq!(out.status.code(), Some(0), "{}: {}", path.display(), text(&out));
        }
    }
}

#[test]
fn validate_lists_every_error_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[nodes.read]\ntype = \"demo_sorce\"\n\n[nodes.sink]\ntype = \"null_sink\"\ninputs = [\"raed\"]\ndelay = 1\n",
    )
    .unwrap();
    let out = latentflow(BIN, dir.path(), &["validate", "bad.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "bad.toml:2:8: node `read`, key `type`: unknown operator type `demo_sorce` (did you mean `demo_source`?); `latentflow operators` lists them",
            "bad.toml:7:1: node `sink`: unknown key `delay` for `null_sink` (did you mean `delay_ms`?)",
            "bad.toml:6:10: node `sink`, key `inputs`: unknown input `raed` (did you mean `read`?)",
            "error: bad.toml has 3 problems",
        ]
    );
}

#[test]
fn overrides_are_checked_like_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let demo = topology("demo.toml");
    let out = latentflow(BIN, dir.path(), &["validate", demo.to_str().unwrap(), "--set", "nodes.read.count=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "(--set nodes.read.count=0): node `read`, key `count`: must be between 1 and 1000000000000, got 0"
        ),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = latentflow(BIN, dir.path(), &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = latentflow(BIN, dir.path(), &["run", "x.toml", "--process-id", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = latentflow(BIN, dir.path(), &["run", "missing.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml: cannot read the topology file"));
}

#[test]
fn operators_lists_types_ports_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = latentflow(BIN, dir.path(), &["operators"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for entry in latentflow_operators::registry().entries() {
        assert!(stdout.contains(&format!("{} ({})", entry.type_name, entry.kind)), "{}", entry.type_name);
        for (key, _) in entry.key_docs {
            assert!(stdout.contains(key), "{}: {key}", entry.type_name);
        }
    }
    assert!(stdout.contains("checksum (map): adds `checksum`"));
    assert!(stdout.contains("  accepts: {image: bytes}\n  adds:    {checksum: i64}"), "{stdout}");
}

#[test]
fn run_writes_outputs_profile_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    let demo = fixture("engine.toml");
    let out = latentflow(
        BIN,
        dir.path(),
        &[
            "run",
            demo.to_str().unwrap(),
            "--set",
            "nodes.read.count=300",
            "--workers",
            "2",
            "--profile",
            "p.json",
            "--trace",
            "t.json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("node "), "profile table: {stdout}");
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
    assert!(profile["wall_seconds"].as_f64().unwrap() > 0.0);
    let ops = profile["operators"].as_array().unwrap();
    assert_eq!(ops.iter().map(|o| o["id"].as_str().unwrap()).collect::<Vec<_>>(), ["read", "checksum", "rows"]);
    for key in ["type", "items_in", "items_out", "rejected", "bytes_out", "busy_seconds", "wait_seconds"] {
        assert!(ops[0].get(key).is_some(), "profile lacks `{key}`");
    }
    assert_eq!(ops[0]["items_out"], 300);
    assert_eq!(ops[2]["items_in"], 300);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("t.json")).unwrap()).unwrap();
    assert!(trace["traceEvents"].as_array().unwrap().len() > 10);
    // The sink wrote every row, one file per worker, under the job's output directory.
    let rows: usize = (0..2)
        .map(|w| {
            std::fs::read_to_string(dir.path().join(format!("runs/engine/rows/part-0000{w}.jsonl")))
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(rows, 300);
}

#[test]
fn an_operator_failure_exits_1_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("blocker"), "a file where a folder should be").unwrap();
    let demo = fixture("engine.toml");
    let out = latentflow(BIN, dir.path(), &["run", demo.to_str().unwrap(), "--set", "nodes.rows.dir=blocker/rows"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: node `rows` (worker 0): blocker/rows:"), "{stderr}");
}

#[test]
fn ctrl_c_drains_flushes_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let demo = fixture("engine.toml");
    let child = Command::new(BIN)
        .args(["run", demo.to_str().unwrap(), "--set", "nodes.read.count=1000000", "--set", "nodes.read.batch_size=4"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the sink has opened its file, so the job is under way.
    let temp = dir.path().join("runs/engine/rows/.part-00000.jsonl.tmp");
    for _ in 0..200 {
        if temp.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    std::thread::sleep(Duration::from_millis(200));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    // The sink got its final flush: the file has its final name and whole lines only.
    let rows = std::fs::read_to_string(dir.path().join("runs/engine/rows/part-00000.jsonl")).unwrap();
    assert!(!rows.is_empty() && rows.ends_with('\n'));
    let n = rows.lines().count();
    assert!(n < 1_000_000, "stopped early");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("rows      jsonl_sink  {n:>9}")) || stdout.contains(&n.to_string()), "{stdout}");
}

#[test]
fn validate_checks_the_global_batch_against_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let online = topology("online.toml");
    let online = online.to_str().unwrap();
    let out = latentflow(BIN, dir.path(), &["validate", online, "--workers", "2", "--processes", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("read emits 4 rows per epoch"), "{}", text(&out));
    let out = latentflow(BIN, dir.path(), &["validate", online, "--workers", "3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not split evenly over its 3 workers") && stderr.contains("(such as 18)"), "{stderr}");
    let fixed = ["validate", online, "--workers", "2", "--set", "nodes.read.batch_size=16"];
    let out = latentflow(BIN, dir.path(), &fixed);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the sources bring 32 rows per epoch") && stderr.contains("set batch_size = 8"),
        "{stderr}"
    );
    // `run` refuses the same before loading any model.
    let out = latentflow(BIN, dir.path(), &["run", online, "--workers", "3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
