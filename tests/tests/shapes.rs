//! The operator shapes as the engine schedules them: stages see whole epochs and a final flush,
//! failures stop the job and name the node, rejections are counted per reason, and an operator
//! can stop the job.

use std::sync::atomic::Ordering::SeqCst;

use latentflow_engine::{run, EngineError, Plan, RunOptions};
use latentflow_tests::testops::{catalog, probe};

fn plan(text: &str) -> Plan {
    Plan::from_toml("shapes.toml", text, &[], &catalog()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn stages_see_complete_epochs_and_flush_once() {
    let p = plan(
        r#"
[nodes.read]
type = "probe_source"
probe = "shapes-stage-src"
count = 100
batch_size = 10

[nodes.sum]
type = "epoch_sum"
inputs = ["read"]

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "shapes-stage"
"#,
    );
    run(&p, &RunOptions::default()).unwrap();
    let probe = probe("shapes-stage");
    let by_epoch = probe.epoch_keys.lock().unwrap().clone();
    // One source batch per epoch: epoch t holds keys 10t..10t+9, and the stage emits their sum
    // at that epoch; the total comes with the final flush.
    for t in 0..10u64 {
        let expected: i64 = (10 * t as i64..10 * t as i64 + 10).sum();
        let sums: Vec<i64> = by_epoch[&t].iter().copied().filter(|k| *k >= 0).collect();
        assert_eq!(sums, [expected], "epoch {t}: the stage saw exactly that epoch's rows");
    }
    let all: Vec<i64> = by_epoch.values().flatten().copied().collect();
    assert!(all.contains(&-(0..100).sum::<i64>()), "total at finish: {all:?}");
    assert_eq!(probe.finishes.load(SeqCst), 1);
    let mut ended: Vec<u64> = probe.epochs_ended.lock().unwrap().iter().map(|(_, e)| *e).collect();
    ended.sort_unstable();
    ended.dedup();
    assert!(ended.len() >= 10, "end_epoch for every epoch with data: {ended:?}");
}

#[test]
fn an_epoch_s_rows_never_depend_on_timing() {
    // The map finishes odd epochs before even ones; the stage must still see each epoch's rows
    // alone, after the epoch before it has ended.
    let p = plan(
        r#"
[job]
max_epochs_in_flight = 4
cpu_threads = 4

[nodes.read]
type = "probe_source"
probe = "shapes-order-src"
count = 48
batch_size = 4

[nodes.slow]
type = "fail_at"
inputs = ["read"]
delay_even_epochs_ms = 60

[nodes.sum]
type = "epoch_sum"
inputs = ["slow"]

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "shapes-order"
"#,
    );
    run(&p, &RunOptions::default()).unwrap();
    let by_epoch = probe("shapes-order").epoch_keys.lock().unwrap().clone();
    for t in 0..12u64 {
        let expected: i64 = (4 * t as i64..4 * t as i64 + 4).sum();
        let sums: Vec<i64> = by_epoch[&t].iter().copied().filter(|k| *k >= 0).collect();
        assert_eq!(sums, [expected], "epoch {t} holds its own rows only: {by_epoch:?}");
    }
}

#[test]
fn an_operator_failure_stops_the_job_and_names_the_node() {
    let p = plan(
        r#"
[nodes.read]
type = "probe_source"
probe = "shapes-fail"
count = 1000
batch_size = 10

[nodes.poison]
type = "fail_at"
inputs = ["read"]
key = 55

[nodes.sink]
type = "probe_sink"
inputs = ["poison"]
probe = "shapes-fail"
delay_ms = 1
"#,
    );
    let err = run(&p, &RunOptions::default()).unwrap_err();
    assert!(matches!(err, EngineError::Operator { .. }));
    assert_eq!(err.to_string(), "node `poison` (worker 0): row 55 is poison");
    let seen: usize = probe("shapes-fail").keys.lock().unwrap().values().map(Vec::len).sum();
    assert!(seen < 1000, "sources stopped early: {seen} rows reached the sink");
    assert_eq!(probe("shapes-fail").finishes.load(SeqCst), 1, "the sink still flushed");
}

#[test]
fn rejections_are_counted_per_reason_and_nothing_is_lost() {
    let p = plan(
        r#"
[nodes.read]
type = "probe_source"
probe = "shapes-reject"
count = 101
batch_size = 8

[nodes.filter]
type = "fail_at"
inputs = ["read"]
reject_odd = true

[nodes.sink]
type = "probe_sink"
inputs = ["filter"]
probe = "shapes-reject"
"#,
    );
    let report = run(&p, &RunOptions { workers: 2, ..RunOptions::default() }).unwrap();
    let filter = report.profile.operator("filter").unwrap();
    assert_eq!(filter.items_in, 101);
    assert_eq!(filter.rejected.get("odd_key"), Some(&50));
    assert_eq!(filter.items_out + 50, filter.items_in, "every row is output or rejected");
}

#[test]
fn an_operator_can_stop_the_job_and_stages_still_flush() {
    let p = plan(
        r#"
[job]
max_epochs_in_flight = 2

[nodes.read]
type = "probe_source"
probe = "shapes-stop-src"
count = 100000
batch_size = 10

[nodes.sum]
type = "epoch_sum"
inputs = ["read"]
stop_after = 50

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "shapes-stop"
"#,
    );
    let report = run(&p, &RunOptions::default()).unwrap();
    assert!(report.stopped && !report.interrupted);
    let read = report.profile.operator("read").unwrap();
    assert!(read.items_out < 200, "sources stopped within a few epochs: {}", read.items_out);
    assert_eq!(probe("shapes-stop").finishes.load(SeqCst), 1);
    let position = &report.positions[&("read".to_string(), 0)];
    assert!(position["emitted"].as_u64().unwrap() >= read.items_out, "{position}");
}

#[test]
fn the_trace_records_operator_spans() {
    let p = plan(
        r#"
[nodes.read]
type = "bytes_source"
count = 64
batch_size = 8

[nodes.sink]
type = "null_sink"
inputs = ["read"]
"#,
    );
    let report = run(&p, &RunOptions { trace: true, ..RunOptions::default() }).unwrap();
    let trace = report.trace.expect("trace requested");
    // 8 source batches + 8 sink writes + 8 end_epoch + 1 finish.
    assert!(trace.len() >= 16, "{} spans", trace.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    trace.write(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["name"] == "read" && e["ph"] == "X"));
    assert!(events.iter().any(|e| e["ph"] == "M" && e["args"]["name"].as_str().unwrap().contains("sink")));
}

#[test]
fn chained_maps_count_and_fail_as_their_own_nodes() {
    let text = |poison: &str| {
        format!(
            r#"
[nodes.read]
type = "bytes_source"
count = 101
batch_size = 8

[nodes.filter]
type = "fail_at"
inputs = ["read"]
reject_odd = true

[nodes.sum]
type = "checksum"
inputs = ["filter"]

[nodes.last]
type = "fail_at"
inputs = ["sum"]
{poison}

[nodes.sink]
type = "null_sink"
inputs = ["last"]
"#
        )
    };
    let report = run(&plan(&text("")), &RunOptions::default()).unwrap();
    let counts: Vec<(u64, u64)> = ["filter", "sum", "last"]
        .iter()
        .map(|id| report.profile.operator(id).unwrap())
        .map(|o| (o.items_in, o.items_out))
        .collect();
    assert_eq!(counts, [(101, 51), (51, 51), (51, 51)]);
    assert!(report.profile.operator("sum").unwrap().batches_in > 0);
    let err = run(&plan(&text("key = 40")), &RunOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "node `last` (worker 0): row 40 is poison");
}
