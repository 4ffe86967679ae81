//! Backpressure: with a slow sink, sources never run more than K epochs ahead, whatever the
//! dataset size.

use std::sync::atomic::Ordering::SeqCst;

use latentflow_engine::{run, Plan, RunOptions};
use latentflow_tests::testops::{catalog, probe};

fn slow_pipeline(probe_name: &str, k: u64, count: u64, batch: usize, delay_ms: u64, overrides: &[String]) -> Plan {
    let text = format!(
        r#"
[job]
name = "backpressure"
max_epochs_in_flight = {k}

[nodes.read]
type = "probe_source"
probe = "{probe_name}"
count = {count}
batch_size = {batch}

[nodes.sum]
type = "checksum"
inputs = ["read"]

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "{probe_name}"
delay_ms = {delay_ms}
"#
    );
    Plan::from_toml("backpressure.toml", &text, overrides, &catalog()).expect("valid topology")
}

#[test]
fn items_in_flight_stay_within_k_epochs_of_a_slow_sink() {
    for (k, workers) in [(1, 1), (3, 1), (2, 2)] {
        let name = format!("bp-{k}-{workers}");
        let (count, batch) = (600, 10);
        let plan = slow_pipeline(&name, k, count, batch, 2, &[]);
        let report = run(&plan, &RunOptions { workers, ..RunOptions::default() }).unwrap();
        let bound = k * batch as u64 * workers as u64;
        // The engine's own count: rows emitted in epochs that no sink has finished.
        assert!(report.max_items_in_flight <= bound, "k={k} w={workers}: {} > {bound}", report.max_items_in_flight);
        assert!(report.max_items_in_flight >= batch as u64, "something was in flight");
        // The operators' count: rows produced by the source and not yet written by the sink.
        // Each source thread reads at most two batches ahead of the gate.
        let p = probe(&name);
        let seen = p.max_in_flight.load(SeqCst) as u64;
        let loose = bound + 2 * batch as u64 * workers as u64;
        assert!(seen <= loose, "k={k} w={workers}: operators saw {seen} rows in flight > {loose}");
        assert!(seen < count / 4, "the gate held the source back: {seen} of {count} in flight");
        let keys: usize = p.keys.lock().unwrap().values().map(Vec::len).sum();
        assert_eq!(keys as u64, count, "every row arrived");
        assert_eq!(p.in_flight.load(SeqCst), 0);
    }
}

#[test]
fn a_byte_budget_holds_back_new_epochs() {
    let name = "bp-bytes";
    // Each batch is ~0.4 KB at the source and again after the checksum; a budget of 2 KB allows
    // a few epochs, far below K = 64.
    let plan = slow_pipeline(name, 64, 400, 10, 1, &["job.max_bytes_in_flight=2048".into()]);
    let report = run(&plan, &RunOptions::default()).unwrap();
    let p = probe(name);
    assert!(report.max_items_in_flight <= 60, "budget ignored: {} rows in flight", report.max_items_in_flight);
    let keys: usize = p.keys.lock().unwrap().values().map(Vec::len).sum();
    assert_eq!(keys, 400);
    // The same job without the budget runs far ahead: the budget, not K, held it back.
    let unbounded = run(&slow_pipeline("bp-bytes-off", 64, 400, 10, 1, &[]), &RunOptions::default()).unwrap();
    assert!(unbounded.max_items_in_flight > 100, "{}", unbounded.max_items_in_flight);
}
