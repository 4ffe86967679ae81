//! The training job in Rust: latents parquet (what the preprocessing job wrote) → UNet.
//! `topologies/train.toml` is the same job.

use latentflow_engine::{Pipeline, Placement, Plan, PlanErrors};
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
    let mut g = Pipeline::new("train");
    g.job(|job| job.max_epochs_in_flight = 2);
    let read = g.add("read", read, []);
    let train = g.add("train", settings.train(), [read]);
    g.place(train, Placement::Gpu);
    g.compile(&latentflow_operators::registry())
}
