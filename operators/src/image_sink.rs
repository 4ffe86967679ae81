//! `image_sink`: writes transformed crops as PNG files named by key (with the caption beside
//! each as `.txt`), so a user can see what the model will see.

use std::path::PathBuf;

use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorImpl, OperatorKind, Ports, Sink,
};
use serde::{Deserialize, Serialize};

/// Config of `image_sink`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSinkConfig {
    /// Folder for the files; `OUTPUT_DIR/<node id>` by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Write at most this many images per worker; later rows are consumed and not written.
    pub max_images: u64,
}

impl Default for ImageSinkConfig {
    fn default() -> Self {
        ImageSinkConfig { dir: None, max_images: 64 }
    }
}

impl OperatorConfig for ImageSinkConfig {
    const TYPE: &'static str = "image_sink";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "writes `pixels` crops as KEY.png (and the caption as KEY.txt)";
    const EXAMPLE: &'static str = "max_images = 16";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("dir", "folder for the files (default OUTPUT_DIR/<node id>)"),
        ("max_images", "images to write per worker at most (default 64)"),
    ];
}

impl NodeSpec for ImageSinkConfig {
    fn validate(&self) -> Vec<KeyError> {
        KeyError::check_range("max_images", self.max_images, 0, 10_000_000).into_iter().collect()
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("key", ColumnType::I64), Field::new("pixels", ColumnType::U8Tensor)],
            ..Ports::default()
        }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let dir = self.dir.clone().unwrap_or_else(|| ctx.job.output_dir().join(ctx.node));
        Ok(OperatorImpl::Sink(Box::new(ImageSink { dir, left: self.max_images })))
    }
}

/// The `image_sink` sink.
#[derive(Debug)]
pub struct ImageSink {
    dir: PathBuf,
    left: u64,
}

impl Sink for ImageSink {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| OpError::io(&self.dir, e))
    }

    fn write(&mut self, batch: Batch, _ctx: &mut OpContext) -> Result<(), OpError> {
        let Column::U8Tensor { shape, data } = batch.column("pixels")? else {
            return Err(OpError::msg("`pixels` is not a u8 tensor"));
        };
        let [3, h, w] = shape[..] else {
            return Err(OpError::msg(format!("`pixels` rows have shape {shape:?}, expected [3, H, W]")));
        };
        let keys = batch.i64s("key")?;
        let captions = batch.strs("caption").ok();
        let plane = h * w;
        for (row, chw) in data.chunks_exact(3 * plane).enumerate() {
            if self.left == 0 {
                return Ok(());
            }
            self.left -= 1;
            let hwc: Vec<u8> = (0..plane).flat_map(|i| [chw[i], chw[plane + i], chw[2 * plane + i]]).collect();
            let path = self.dir.join(format!("{}.png", keys[row]));
            image::save_buffer(&path, &hwc, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                .map_err(|e| OpError::io(&path, std::io::Error::other(e)))?;
            if let Some(captions) = captions {
                let path = path.with_extension("txt");
                std::fs::write(&path, &captions[row]).map_err(|e| OpError::io(&path, e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pngs_and_captions_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ImageSink { dir: dir.path().to_path_buf(), left: 1 };
        let mut ctx = OpContext::detached("images");
        sink.start(&mut ctx).unwrap();
        let batch = Batch::new()
            .with("key", Column::I64(vec![7, 8]))
            .unwrap()
            .with("caption", Column::Str(vec!["a red circle".into(), "x".into()]))
            .unwrap()
            .with("pixels", Column::U8Tensor { shape: vec![3, 2, 2], data: (0..24).collect() })
            .unwrap();
        sink.write(batch, &mut ctx).unwrap();
        let png = image::open(dir.path().join("7.png")).unwrap().into_rgb8();
        assert_eq!(png.get_pixel(1, 0).0, [1, 5, 9], "CHW planes interleaved back to RGB");
        assert_eq!(std::fs::read_to_string(dir.path().join("7.txt")).unwrap(), "a red circle");
        assert!(!dir.path().join("8.png").exists(), "max_images reached");
    }
}
