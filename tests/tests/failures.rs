//! Failure is a feature: a panic in any operator kind, at any point of its life, ends the job
//! within seconds with an error naming node and worker and the panic's text. Never a hang,
//! never success on part of the data.

use std::time::{Duration, Instant};

use latentflow_engine::{run, EngineError, OpError, Plan, RunOptions};
use latentflow_tests::testops::catalog;

/// source -> map -> stage -> sink over 40 rows in 10 epochs, with `panic` on the node named.
fn topology(panicking: &str, panic: &str, workers_note: &str) -> String {
    let option = |node: &str| if node == panicking { panic.to_string() } else { String::new() };
    format!(
        r#"
# {workers_note}
[nodes.read]
type = "probe_source"
probe = "failures-{panicking}"
count = 40
batch_size = 4
{}

[nodes.check]
type = "fail_at"
inputs = ["read"]
{}

[nodes.sum]
type = "epoch_sum"
inputs = ["check"]
{}

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "failures-{panicking}-sink"
{}
"#,
        option("read"),
        option("check"),
        option("sum"),
        option("sink")
    )
}

fn run_expecting_panic(node: &str, panic: &str, workers: usize) {
    let text = topology(node, panic, &format!("{workers} workers"));
    let plan = Plan::from_toml("failures.toml", &text, &[], &catalog()).unwrap_or_else(|e| panic!("{e}"));
    let began = Instant::now();
    let options = RunOptions { workers, ..RunOptions::default() };
    // A hang would block here forever; run on a thread so the test can fail instead.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(&plan, &options).map(|_| ()));
    });
    let result = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("{node} / {panic}: the job hung"));
    let err = result.expect_err(&format!("{node} / {panic}: a panic must fail the job"));
    match &err {
        EngineError::Operator { node: failed, source: OpError::Panicked(message), .. } => {
            assert_eq!(failed, node, "{node} / {panic}: {err}");
            assert!(message.contains("panic") || message.contains("poison"), "{node} / {panic}: {err}");
        }
        other => panic!("{node} / {panic}: expected the panic, got {other}"),
    }
    let text = err.to_string();
    assert!(text.starts_with(&format!("node `{node}` (worker ")), "{text}");
    assert!(began.elapsed() < Duration::from_secs(10), "{node} / {panic}: took {:?}", began.elapsed());
}

#[test]
fn a_panicking_source_fails_the_job_at_start_mid_run_and_at_its_end() {
    for workers in [1, 2] {
        for panic in ["start", "process", "finish"] {
            run_expecting_panic("read", &format!("panic_in = \"{panic}\""), workers);
        }
    }
}

#[test]
fn a_panicking_map_fails_the_job_on_its_first_middle_and_last_row() {
    for workers in [1, 2] {
        for key in [0, 17, 39] {
            run_expecting_panic("check", &format!("key = {key}\npanic = true"), workers);
        }
    }
}

#[test]
fn a_panicking_stage_fails_the_job_wherever_it_panics() {
    for workers in [1, 2] {
        for panic in ["start", "process", "end_epoch", "finish"] {
            run_expecting_panic("sum", &format!("panic_in = \"{panic}\""), workers);
        }
    }
}

#[test]
fn a_panicking_sink_fails_the_job_wherever_it_panics() {
    for workers in [1, 2] {
        for panic in ["start", "process", "end_epoch", "finish"] {
            run_expecting_panic("sink", &format!("panic_in = \"{panic}\""), workers);
        }
    }
}

#[test]
fn a_drain_that_outlasts_drain_timeout_s_ends_the_job_anyway() {
    // The map fails on row 5; the sink sleeps 100 s on every batch, so the drain cannot finish.
    let text = r#"
[job]
drain_timeout_s = 1

[nodes.read]
type = "probe_source"
probe = "failures-drain"
count = 40
batch_size = 4

[nodes.check]
type = "fail_at"
inputs = ["read"]
key = 5

[nodes.sink]
type = "probe_sink"
inputs = ["check"]
probe = "failures-drain-sink"
delay_ms = 100000
"#;
    let plan = Plan::from_toml("drain.toml", text, &[], &catalog()).unwrap_or_else(|e| panic!("{e}"));
    let began = Instant::now();
    let err = run(&plan, &RunOptions::default()).expect_err("the drain cannot finish");
    let elapsed = began.elapsed();
    assert!(matches!(err, EngineError::DrainTimeout { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("node `check` (worker 0): row 5 is poison"), "{message}");
    assert!(message.contains("did not drain within 1 s"), "{message}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}
