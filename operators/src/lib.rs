//! # latentflow-operators
//!
//! Every operator a topology can name, one per file: its config struct (the keys of its
//! `[nodes.ID]` table), its logic and its unit tests. [`registry`] is the closed list the
//! topology compiler knows; `latentflow operators` prints it.
//!
//! The models and the training math live in their own crates below this one
//! (`latentflow-models`, `latentflow-training`). They are re-exported here under their old
//! paths (`latentflow_operators::models`, `::training`, `::clip`, `::rng`, `::durable`,
//! `::cuda`) for one release: new code names the crates.

pub mod bytes_source;
pub mod checksum;
pub mod dedup;
pub mod demo;
pub mod demo_source;
pub mod device_column;
pub mod folder_source;
pub mod http;
pub mod image_sink;
pub mod image_transform;
pub mod jsonl_sink;
pub mod keys;
pub mod latents_sink;
pub mod latents_source;
pub mod model_keys;
pub mod null_sink;
pub mod parquet_source;
pub mod pixels;
pub mod sharding;
pub mod source_rows;
pub mod tables;
pub mod text_encode;
pub mod tokenize;
pub mod train;
pub mod url_source;
pub mod vae_encode;
pub mod webdataset;

pub use latentflow_models as models;
#[cfg(feature = "cuda")]
pub use latentflow_models::cuda;
pub use latentflow_models::{clip, rng};
pub use latentflow_training as training;
pub use latentflow_training::durable;

use latentflow_engine::{Catalog, OperatorEntry};

pub use bytes_source::BytesSourceConfig;
pub use checksum::ChecksumConfig;
pub use dedup::DedupConfig;
pub use demo_source::DemoSourceConfig;
pub use folder_source::FolderSourceConfig;
pub use image_sink::ImageSinkConfig;
pub use image_transform::ImageTransformConfig;
pub use jsonl_sink::JsonlSinkConfig;
pub use latents_sink::LatentsSinkConfig;
pub use latents_source::LatentsSourceConfig;
pub use null_sink::NullSinkConfig;
pub use parquet_source::ParquetSourceConfig;
pub use text_encode::TextEncodeConfig;
pub use tokenize::TokenizeConfig;
pub use train::TrainConfig;
pub use url_source::UrlSourceConfig;
pub use vae_encode::VaeEncodeConfig;
pub use webdataset::WebdatasetSourceConfig;

/// Every registered operator type.
///
/// ```
/// let catalog = latentflow_operators::registry();
/// assert!(catalog.get("demo_source").is_some());
/// ```
pub fn registry() -> Catalog {
    Catalog::new(vec![
        OperatorEntry::of::<DemoSourceConfig>(),
        OperatorEntry::of::<BytesSourceConfig>(),
        OperatorEntry::of::<ParquetSourceConfig>(),
        OperatorEntry::of::<FolderSourceConfig>(),
        OperatorEntry::of::<WebdatasetSourceConfig>(),
        OperatorEntry::of::<UrlSourceConfig>(),
        OperatorEntry::of::<ChecksumConfig>(),
        OperatorEntry::of::<DedupConfig>(),
        OperatorEntry::of::<NullSinkConfig>(),
        OperatorEntry::of::<JsonlSinkConfig>(),
        OperatorEntry::of::<TokenizeConfig>(),
        OperatorEntry::of::<ImageTransformConfig>(),
        OperatorEntry::of::<ImageSinkConfig>(),
        OperatorEntry::of::<VaeEncodeConfig>(),
        OperatorEntry::of::<TextEncodeConfig>(),
        OperatorEntry::of::<LatentsSinkConfig>(),
        OperatorEntry::of::<LatentsSourceConfig>(),
        OperatorEntry::of::<TrainConfig>(),
    ])
    .with_device_check(model_keys::device_problem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentflow_engine::{InstanceContext, JobConfig, WorkerInfo};

    #[test]
    fn every_operator_documents_exactly_its_keys_and_its_example_builds() {
        let job = JobConfig::default();
        for entry in registry().entries() {
            let documented: Vec<&str> = entry.key_docs.iter().map(|(k, _)| *k).collect();
            let mut fields = entry.fields.to_vec();
            fields.sort_unstable();
            let mut sorted = documented.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, fields, "{}: documented keys differ from the config's fields", entry.type_name);
            let spec = entry.example_spec().unwrap_or_else(|e| panic!("{}: example: {e}", entry.type_name));
            let errors = spec.validate();
            // Examples that name data files cannot find them here; everything else must pass.
            if errors.iter().any(|e| {
                e.key == "path"
                    && (e.message.contains("match")
                        || e.message.contains("not a folder")
                        || e.message.contains("does not exist"))
            }) {
                continue;
            }
            assert!(errors.is_empty(), "{}: example does not validate: {errors:?}", entry.type_name);
            let ctx = InstanceContext { node: "n", job: &job, worker: WorkerInfo::single(), batch_size: None };
            let instance = spec.instantiate(&ctx).unwrap_or_else(|e| panic!("{}: {e}", entry.type_name));
            assert_eq!(instance.kind(), entry.kind, "{}", entry.type_name);
        }
    }

    #[test]
    fn type_names_are_unique() {
        let catalog = registry();
        let mut names: Vec<_> = catalog.entries().iter().map(|e| e.type_name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), catalog.entries().len());
    }
}
