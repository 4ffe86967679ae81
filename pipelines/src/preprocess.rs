//! The preprocessing job in Rust: demo images → transform → tokenize → VAE and text encoders →
//! latents parquet under `runs/preprocess/latents`. `topologies/preprocess.toml` is the same job.

use latentflow_engine::{Plan, PlanErrors};
use latentflow_operators::LatentsSinkConfig;

use crate::Settings;

/// The preprocessing job, writing under `runs/preprocess`.
///
/// ```
/// let plan = latentflow_pipelines::preprocess::plan(&latentflow_pipelines::Settings::default()).unwrap();
/// assert_eq!(plan.nodes.last().unwrap().type_name, "latents_sink");
/// ```
pub fn plan(settings: &Settings) -> Result<Plan, PlanErrors> {
    let (mut g, text) = settings.encoders("preprocess", Some(settings.global_batch_size), |_, read| read);
    g.add("latents", LatentsSinkConfig::default(), [text]);
    g.compile(&latentflow_operators::registry())
}
