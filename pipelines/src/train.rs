//! The training job in Rust: latents parquet (what the preprocessing job wrote) → UNet.
//! `topologies/train.toml` is the same job.

use latentflow_engine::{Placement, Plan, PlanErrors, TopologyBuilder};
use latentflow_operators::LatentsSourceConfig;

use crate::Settings;

/// The training job reading `latents` (a parquet file, folder or glob), writing under `runs/train`.
///
/// ```
/// use latentflow_pipelines::{train, Settings};
/// let plan = train::plan(&Settings::default(), "runs/preprocess/latents").unwrap();
/// assert_eq!(plan.nodes[0].type_name, "latents_source");
/// ```
pub fn plan(settings: &Settings, latents: &str) -> Result<Plan, PlanErrors> {
    let read = LatentsSourceConfig { path: latents.into(), ..LatentsSourceConfig::default() };
    TopologyBuilder::new("train")
        .job(|job| job.max_epochs_in_flight = 2)
        .node("read", read, &[])
        .node("train", settings.train(), &["read"])
        .placement("train", Placement::Gpu)
        .compile(&latentflow_operators::registry())
}
