//! # latentflow-pipelines
//!
//! latentflow's pipelines defined in Rust, the topology files under `topologies/`, and the
//! `latentflow` command line ([`cli`]): the data-path [`demo`], and the reference's three jobs,
//! [`preprocess`] (images to latents), [`train`] (latents to a UNet) and [`online`] (both in one
//! graph), sized by [`Settings`].

pub mod cli;
pub mod demo;
pub mod online;
pub mod preprocess;
mod settings;
pub mod train;

pub use settings::Settings;

#[cfg(test)]
mod tests {
    use latentflow_engine::Plan;

    use super::*;

    fn describe(p: &Plan) -> Vec<String> {
        let mut lines = vec![format!("{:?}", p.job)];
        lines.extend(
            p.nodes
                .iter()
                .map(|n| format!("{} {} {:?} {} {} {:?}", n.id, n.type_name, n.inputs, n.placement, n.schema, n.spec)),
        );
        lines
    }

    fn file(name: &str) -> Plan {
        let path = format!("{}/topologies/{name}", env!("CARGO_MANIFEST_DIR"));
        Plan::from_file(path.as_ref(), &[], &latentflow_operators::registry()).unwrap()
    }

    #[test]
    fn the_rust_pipelines_equal_the_topology_files() {
        let s = Settings::default();
        assert_eq!(describe(&online::plan(&s).unwrap()), describe(&file("online.toml")));
        assert_eq!(describe(&preprocess::plan(&s).unwrap()), describe(&file("preprocess.toml")));
        assert_eq!(describe(&train::plan(&s, "runs/preprocess/latents").unwrap()), describe(&file("train.toml")));
    }
}
