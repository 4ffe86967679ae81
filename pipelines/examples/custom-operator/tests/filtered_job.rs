//! The user's operator end to end: `latentflow-filtered` (this crate's binary: latentflow's
//! command line over latentflow's operators plus `caption_filter`) lists it, runs the online job
//! with it, and accounts for every row it drops; and the engine holds a user's map to the same
//! accounting as a built-in one.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use latentflow_engine::{
    run, Batch, InstanceContext, Map, NodeSpec, OpContext, OpError, OperatorConfig, OperatorEntry, OperatorImpl,
    OperatorKind, Ports, RunOptions, TopologyBuilder,
};
use latentflow_operators::{DemoSourceConfig, NullSinkConfig};
use serde::{Deserialize, Serialize};

const BIN: &str = env!("CARGO_BIN_EXE_latentflow-filtered");

fn topology() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("online-filtered.toml").display().to_string()
}

fn filtered(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(dir).env("RUST_LOG", "warn").output().expect("run latentflow-filtered")
}

#[test]
fn the_users_binary_lists_validates_and_runs_its_operator_with_every_row_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let listed = String::from_utf8(filtered(dir, &["operators"]).stdout).unwrap();
    assert!(listed.contains("caption_filter (map)") && listed.contains("train (sink)"), "{listed}");
    let valid = filtered(dir, &["validate", &topology()]);
    assert_eq!(valid.status.code(), Some(0), "{}", String::from_utf8_lossy(&valid.stderr));
    let typo = filtered(dir, &["validate", &topology(), "--set", "nodes.filter.min_wrds=2"]);
    assert_eq!(typo.status.code(), Some(2), "an unknown key of the user's operator is a usage error");
    assert!(String::from_utf8_lossy(&typo.stderr).contains("min_wrds"));

    let out = filtered(dir, &["run", &topology(), "--set", "nodes.train.max_steps=3", "--profile", "profile.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("profile.json")).unwrap()).unwrap();
    let filter = profile["operators"].as_array().unwrap().iter().find(|o| o["id"] == "filter").unwrap();
    let rejected = filter["rejected"]["caption_banned_word"].as_u64().unwrap_or(0);
    assert!(rejected > 0, "the demo's captions name red: {filter}");
    assert_eq!(filter["items_in"].as_u64().unwrap(), filter["items_out"].as_u64().unwrap() + rejected, "{filter}");
    let log = std::fs::read_to_string(dir.join("rejected.jsonl")).unwrap();
    assert_eq!(log.lines().count() as u64, rejected);
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!((entry["node"].as_str(), entry["reason"].as_str()), (Some("filter"), Some("caption_banned_word")));
    }
    assert!(dir.join("runs/filtered/final/unet/diffusion_pytorch_model.safetensors").is_file());
}

/// A user's map that drops every other row without rejecting it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetfulConfig {}

impl OperatorConfig for ForgetfulConfig {
    const TYPE: &'static str = "forgetful";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "drops every other row and says nothing";
    const EXAMPLE: &'static str = "";
    const KEYS: &'static [(&'static str, &'static str)] = &[];
}

impl NodeSpec for ForgetfulConfig {
    fn ports(&self) -> Ports {
        Ports::default()
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(Forgetful)))
    }
}

struct Forgetful;

impl Map for Forgetful {
    fn map(&self, mut batch: Batch, _ctx: &mut OpContext) -> Result<Batch, OpError> {
        let keep: Vec<bool> = (0..batch.rows()).map(|i| i % 2 == 0).collect();
        batch.retain_rows(&keep);
        Ok(batch)
    }
}

#[test]
fn a_map_that_drops_rows_without_rejecting_them_fails_the_job_naming_it() {
    let catalog =
        latentflow_example_custom_operator::catalog().unwrap().with(OperatorEntry::of::<ForgetfulConfig>()).unwrap();
    let plan = TopologyBuilder::new("forgetful")
        .node("read", DemoSourceConfig { count: 8, ..Default::default() }, &[])
        .node("forget", ForgetfulConfig {}, &["read"])
        .node("sink", NullSinkConfig::default(), &["forget"])
        .compile(&catalog)
        .unwrap();
    let err = run(&plan, &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("node `forget` (worker 0)") && err.contains("are lost"), "{err}");
}
