//! Placement: a node restricted to device-owning workers runs only there, and every batch is
//! routed to it.

use latentflow_engine::{run, Plan, RunOptions};
use latentflow_tests::testops::{catalog, probe};

fn plan(probe_name: &str, devices: &str) -> Plan {
    let text = format!(
        r#"
[job]
name = "placement"
devices = {devices}

[nodes.read]
type = "probe_source"
probe = "{probe_name}"
count = 300
batch_size = 7

[nodes.sink]
type = "probe_sink"
inputs = ["read"]
probe = "{probe_name}"
placement = "gpu"
"#
    );
    Plan::from_toml("placement.toml", &text, &[], &catalog()).expect("valid topology")
}

#[test]
fn gpu_nodes_run_only_on_device_workers_and_get_every_row() {
    for (devices, expected) in [("[\"cpu\"]", vec![0]), ("[\"cpu\", \"cpu\"]", vec![0, 1])] {
        let name = format!("placement-{}", expected.len());
        let report = run(&plan(&name, devices), &RunOptions { workers: 3, ..RunOptions::default() }).unwrap();
        let keys = probe(&name).keys.lock().unwrap().clone();
        let workers: Vec<usize> = keys.keys().copied().collect();
        assert_eq!(workers, expected, "sink ran on {workers:?}");
        let mut all: Vec<i64> = keys.into_values().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        // The source ran on all three workers; the sink's profile names only its own workers.
        assert_eq!(report.profile.operator("read").unwrap().workers, vec![0, 1, 2]);
        let mut sink_rows: Vec<(usize, u64)> = report
            .instances
            .iter()
            .filter(|i| i.node == "sink" && i.metrics.items_in > 0)
            .map(|i| (i.worker, i.metrics.items_in))
            .collect();
        sink_rows.sort_unstable();
        assert_eq!(sink_rows.iter().map(|(w, _)| *w).collect::<Vec<_>>(), expected);
        assert_eq!(sink_rows.iter().map(|(_, n)| n).sum::<u64>(), 300);
    }
}
