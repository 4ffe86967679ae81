//! Cluster mode: the same topology over two processes on loopback processes every row exactly
//! once; a process that never starts, or dies, ends the job with a clear error, not a hang.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use latentflow_tests::{free_port, text};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

const TOPOLOGY: &str = r#"
[job]
name = "cluster"
output_dir = "out"
connect_timeout_s = 30

[nodes.read]
type = "bytes_source"
count = 5000
batch_size = 16

[nodes.sum]
type = "checksum"
inputs = ["read"]

# Runs only on each process's first worker, so rows cross processes to get there.
[nodes.rows]
type = "jsonl_sink"
inputs = ["sum"]
columns = ["key", "checksum"]
placement = "gpu"
"#;

fn setup(dir: &Path) {
    std::fs::write(dir.join("cluster.toml"), TOPOLOGY).unwrap();
    let hosts = format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port());
    std::fs::write(dir.join("hosts"), hosts).unwrap();
}

fn process(dir: &Path, id: usize, extra: &[&str]) -> Child {
    let id = id.to_string();
    Command::new(BIN)
        .args(["run", "cluster.toml", "--workers", "2", "--processes", "2", "--process-id", &id, "--hostfile", "hosts"])
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_processes_process_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let p0 = process(dir.path(), 0, &["--profile", "profile.json"]);
    let p1 = process(dir.path(), 1, &["--profile", "profile.json"]);
    for child in [p0, p1] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path().join("out/rows")).unwrap() {
        files += 1;
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            *seen.entry(row["key"].as_i64().unwrap()).or_default() += 1;
        }
    }
    // Workers 0 and 2 own the "device" (thread 0 of each process).
    assert_eq!(files, 2, "one file per sink worker");
    assert_eq!(seen.len(), 5000, "every key arrived");
    assert!(seen.values().all(|&n| n == 1), "no key twice");
    assert_eq!(seen.keys().next(), Some(&0));
    // Each process profiles its own workers.
    for p in 0..2 {
        let profile: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(format!("profile.p{p}.json"))).unwrap()).unwrap();
        assert_eq!(profile["operators"][0]["items_out"], 2500, "process {p} read its half");
    }
}

#[test]
fn a_process_that_never_starts_fails_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let started = Instant::now();
    let out = process(dir.path(), 0, &["--set", "job.connect_timeout_s=2"]).wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: process 0 could not connect to all 2 processes within 2 s"), "{stderr}");
}

#[test]
fn a_peer_that_dies_ends_the_job_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // Slow enough that the job is still running when process 1 dies.
    let slow = ["--set", "nodes.read.count=1000000", "--set", "nodes.read.batch_size=2"];
    let p0 = process(dir.path(), 0, &slow);
    let mut p1 = process(dir.path(), 1, &slow);
    let temp = dir.path().join("out/rows/.part-00002.jsonl.tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !temp.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    p1.kill().unwrap();
    let _ = p1.wait();
    let killed = Instant::now();
    let out = p0.wait_with_output().unwrap();
    assert!(killed.elapsed() < Duration::from_secs(20), "took {:?}", killed.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: lost the connection to a peer process"), "{stderr}");
}

#[test]
fn a_failure_in_one_process_fails_the_other_too() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // Process 1's sink (worker 2) cannot create its file: a folder is in the way.
    std::fs::create_dir_all(dir.path().join("out/rows/.part-00002.jsonl.tmp")).unwrap();
    let p0 = process(dir.path(), 0, &[]);
    let p1 = process(dir.path(), 1, &[]);
    let out1 = p1.wait_with_output().unwrap();
    assert_eq!(out1.status.code(), Some(1), "{}", text(&out1));
    let stderr1 = String::from_utf8_lossy(&out1.stderr);
    assert!(stderr1.contains("error: node `rows` (worker 2)"), "{}", text(&out1));
    assert_eq!(stderr1.matches("Is a directory").count(), 1, "the cause is said once: {stderr1}");
    // Process 0 drained what it had, but the job failed: never exit 0 on part of the data.
    let out0 = p0.wait_with_output().unwrap();
    assert_eq!(out0.status.code(), Some(1), "{}", text(&out0));
    let stderr = String::from_utf8_lossy(&out0.stderr);
    assert!(
        stderr.contains("another process of the job failed") || stderr.contains("lost the connection to a peer"),
        "{stderr}"
    );
}
