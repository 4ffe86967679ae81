//! The data-path demo pipeline, defined in Rust: procedural captioned images → transform →
//! tokenize → PNG crops. `topologies/demo.toml` is the same pipeline as a file.

use latentflow_engine::{Pipeline, Plan, PlanErrors};
use latentflow_operators::{DemoSourceConfig, ImageSinkConfig, ImageTransformConfig, TokenizeConfig};

/// The demo pipeline over `count` procedural images, written under `runs/demo`.
///
/// ```
/// let plan = latentflow_pipelines::demo::plan(64).unwrap();
/// assert_eq!(plan.nodes.len(), 4);
/// ```
pub fn plan(count: u64) -> Result<Plan, PlanErrors> {
    let mut g = Pipeline::new("demo");
    let read = g.add("read", DemoSourceConfig { count, batch_size: Some(32), ..DemoSourceConfig::default() }, []);
    let transform = g.add("transform", ImageTransformConfig::default(), [read]);
    let tokenize = g.add("tokenize", TokenizeConfig::default(), [transform]);
    g.add("images", ImageSinkConfig { max_images: 32, ..ImageSinkConfig::default() }, [tokenize]);
    g.compile(&latentflow_operators::registry())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rust_pipeline_equals_the_topology_file() {
        let from_code = plan(512).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/demo.toml");
        let from_file = Plan::from_file(path.as_ref(), &[], &latentflow_operators::registry()).unwrap();
        assert_eq!(format!("{:?}", from_code.job), format!("{:?}", from_file.job));
        let describe = |p: &Plan| -> Vec<String> {
            p.nodes
                .iter()
                .map(|n| format!("{} {} {:?} {} {:?}", n.id, n.type_name, n.inputs, n.schema, n.spec))
                .collect()
        };
        assert_eq!(describe(&from_code), describe(&from_file));
    }
}
