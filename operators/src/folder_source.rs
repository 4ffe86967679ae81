//! `folder_source`: a folder tree of images with same-named `.txt` captions
//! (`cat/001.jpg` + `cat/001.txt`), listed once in sorted order and split across workers.

use std::path::PathBuf;

use latentflow_engine::{
    Batch, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Source,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::sharding::KeyShard;
use crate::source_rows;
use crate::tables::files::expand;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Config of `folder_source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderSourceConfig {
    /// The folder (searched recursively for .jpg, .jpeg, .png and .webp files).
    pub path: PathBuf,
    /// Rows per epoch on each worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

impl OperatorConfig for FolderSourceConfig {
    const TYPE: &'static str = "folder_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "images in a folder tree with same-named .txt captions";
    const EXAMPLE: &'static str = "path = \"data/images\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("path", "a folder, searched recursively for .jpg/.jpeg/.png/.webp; captions are same-named .txt files (missing: empty caption)"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
    ];
}

impl FolderSourceConfig {
    fn images(&self) -> Result<Vec<PathBuf>, String> {
        if !self.path.is_dir() {
            return Err(format!("{} is not a folder", self.path.display()));
        }
        expand(&self.path.display().to_string(), &IMAGE_EXTENSIONS)
    }
}

impl NodeSpec for FolderSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> =
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)).into_iter().collect();
        if let Err(message) = self.images() {
            errors.push(KeyError::new("path", message));
        }
        errors
    }

    fn ports(&self) -> Ports {
        source_rows::ports()
    }

    fn source_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn reshard_position(
        &self,
        saved: &[Option<serde_json::Value>],
        shard: usize,
        shards: usize,
    ) -> Result<Option<serde_json::Value>, OpError> {
        KeyShard::reshard(saved, shard, shards).map(Some)
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let files = self.images().map_err(OpError::msg)?;
        let keys = KeyShard::new(files.len() as u64, ctx.worker.shard as u64, ctx.worker.shards as u64);
        Ok(OperatorImpl::Source(Box::new(FolderSource {
            files,
            keys,
            batch_size: source_rows::batch_size(ctx, self.batch_size),
        })))
    }
}

/// One worker's share of the files. Row `key` is the file's index in the sorted listing.
#[derive(Debug)]
pub struct FolderSource {
    files: Vec<PathBuf>,
    keys: KeyShard,
    batch_size: usize,
}

impl Source for FolderSource {
    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let keys = self.keys.next_keys(self.batch_size);
        if keys.is_empty() {
            return Ok(None);
        }
        let (mut kept, mut captions, mut images) = (Vec::new(), Vec::new(), Vec::new());
        for key in keys {
            let path = &self.files[key as usize];
            match std::fs::read(path) {
                Ok(bytes) => {
                    // A missing caption file is an empty caption; `tokenize` decides what to do.
                    let caption = std::fs::read_to_string(path.with_extension("txt")).unwrap_or_default();
                    kept.push(key);
                    captions.push(caption.trim().to_string());
                    images.push(ByteBuf::from(bytes));
                }
                Err(e) => {
                    tracing::warn!(node = ctx.node(), "{}: {e}", path.display());
                    ctx.reject(key.to_string(), "unreadable_file");
                }
            }
        }
        Ok(Some(source_rows::batch(kept, captions, images)?))
    }

    fn position(&self) -> serde_json::Value {
        self.keys.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        self.keys.seek(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_images_with_their_captions_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/2.png"), b"png bytes").unwrap();
        std::fs::write(dir.path().join("b/2.txt"), "a dog\n").unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"jpg bytes").unwrap();
        std::fs::write(dir.path().join("notes.md"), b"ignored").unwrap();
        let config = FolderSourceConfig { path: dir.path().to_path_buf(), batch_size: Some(8) };
        assert!(config.validate().is_empty());
        let files = config.images().unwrap();
        let mut source = FolderSource { keys: KeyShard::new(files.len() as u64, 0, 1), files, batch_size: 8 };
        let batch = source.next_batch(&mut OpContext::detached("read")).unwrap().unwrap();
        assert_eq!(batch.strs("caption").unwrap(), &["".to_string(), "a dog".to_string()]);
        assert_eq!(batch.bytes("image").unwrap()[1].as_ref(), b"png bytes");
        let missing = FolderSourceConfig { path: dir.path().join("none"), batch_size: Some(8) };
        assert!(missing.validate()[0].message.ends_with("none is not a folder"));
    }
}
