//! The online job in Rust: demo images → transform → tokenize → VAE and text encoders → UNet
//! training, one graph with no latents stored. `topologies/online.toml` is the same job.

use latentflow_engine::{Node, Pipeline, Placement, Plan, PlanErrors};

use crate::Settings;

/// The online job, writing under `runs/online`.
///
/// ```
/// let plan = latentflow_pipelines::online::plan(&latentflow_pipelines::Settings::default()).unwrap();
/// assert_eq!(plan.nodes.last().unwrap().id, "train");
/// ```
pub fn plan(settings: &Settings) -> Result<Plan, PlanErrors> {
    plan_with(settings, |_, read| read)
}

/// The online job with steps of the user's own over the source's rows, before the images are
/// transformed: `between` adds them (closures with [`Pipeline::map`], or operators) and returns
/// the node the transform reads.
///
/// ```
/// use latentflow_engine::{Batch, OpContext, OpError};
/// use latentflow_pipelines::{online, Settings};
/// // Keep only captions of at least four words; reject the others with a reason.
/// let plan = online::plan_with(&Settings::default(), |g, read| {
///     g.map("long_captions", [read], |mut batch: Batch, ctx: &mut OpContext| -> Result<Batch, OpError> {
///         let keep: Vec<bool> = batch.strs("caption")?.iter().map(|c| c.split_whitespace().count() >= 4).collect();
///         for row in (0..keep.len()).filter(|&r| !keep[r]) {
///             ctx.reject(batch.row_key(row), "caption_too_short");
///         }
///         batch.retain_rows(&keep);
///         Ok(batch)
///     })
/// })
/// .unwrap();
/// assert_eq!(plan.nodes[1].id, "long_captions");
/// ```
pub fn plan_with(settings: &Settings, between: impl FnOnce(&mut Pipeline, Node) -> Node) -> Result<Plan, PlanErrors> {
    let (mut g, text) = settings.encoders("online", None, between);
    let train = g.add("train", settings.train(), [text]);
    g.place(train, Placement::Gpu);
    g.compile(&latentflow_operators::registry())
}
