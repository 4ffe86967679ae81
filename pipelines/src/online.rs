//! The online job in Rust: demo images → transform → tokenize → VAE and text encoders → UNet
//! training, one graph with no latents stored. `topologies/online.toml` is the same job.

use latentflow_engine::{Placement, Plan, PlanErrors};

use crate::Settings;

/// The online job, writing under `runs/online`.
///
/// ```
/// let plan = latentflow_pipelines::online::plan(&latentflow_pipelines::Settings::default()).unwrap();
/// assert_eq!(plan.nodes.last().unwrap().id, "train");
/// ```
pub fn plan(settings: &Settings) -> Result<Plan, PlanErrors> {
    settings
        .encoders("online", None)
        .node("train", settings.train(), &["text"])
        .placement("train", Placement::Gpu)
        .compile(&latentflow_operators::registry())
}
