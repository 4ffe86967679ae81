//! `image_transform`: decode, resize the short side, crop, optionally flip. Emits the crop as
//! u8 CHW (`pixels`); normalisation to [-1, 1] happens where the tensor is made, so batches cross
//! threads at a quarter of the f32 size.

use std::sync::Arc;

use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, KeyError, Map, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorImpl, OperatorKind, Ports,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::pixels::geometry::{center_offset, resized_size, unit_random};
use crate::pixels::{decode, resize_crop, CropPlan, DecodeOptions, Filter};

/// Resampling filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterName {
    /// Antialiased triangle filter (the reference).
    #[default]
    Bilinear,
    /// Catmull-Rom cubic (Pillow `BICUBIC`).
    Bicubic,
    /// Lanczos-3.
    Lanczos,
}

/// Where the square crop is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// The middle (the reference), offsets rounded half to even.
    #[default]
    Center,
    /// Anywhere along the long side, chosen per row from the job seed and the row key.
    Random,
}

/// Config of `image_transform`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageTransformConfig {
    /// Side of the square output, in pixels.
    pub resolution: u32,
    /// `"bilinear"` (default), `"bicubic"` or `"lanczos"`.
    pub filter: FilterName,
    /// `"center"` (default) or `"random"`.
    pub crop: CropMode,
    /// Probability of a horizontal flip per row (0 by default).
    pub hflip_prob: f64,
    /// Apply the EXIF orientation (default true).
    pub exif_transpose: bool,
    /// Reject images with more pixels than this (checked in the header, before decoding).
    pub max_pixels: u64,
    /// Reject images whose long side is more than this many times the short one (checked in
    /// the header, before decoding).
    pub max_aspect_ratio: f64,
    /// Decode JPEGs at least twice the resolution at 1/2, 1/4 or 1/8 scale (default false:
    /// with the Rust decoders available it is slower than a full-size decode, see
    /// `bench/results/`).
    pub dct_scaling: bool,
}

impl Default for ImageTransformConfig {
    fn default() -> Self {
        ImageTransformConfig {
            resolution: 256,
            filter: FilterName::Bilinear,
            crop: CropMode::Center,
            hflip_prob: 0.0,
            exif_transpose: true,
            max_pixels: 100_000_000,
            max_aspect_ratio: 20.0,
            dct_scaling: false,
        }
    }
}

impl OperatorConfig for ImageTransformConfig {
    const TYPE: &'static str = "image_transform";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "decode, resize the short side, crop and flip: `image` -> u8 CHW `pixels`";
    const EXAMPLE: &'static str = "resolution = 256\nfilter = \"bilinear\"\ncrop = \"center\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("resolution", "side of the square crop in pixels (default 256)"),
        ("filter", "\"bilinear\" (default, the reference), \"bicubic\" or \"lanczos\""),
        ("crop", "\"center\" (default, the reference) or \"random\" (seeded per row)"),
        ("hflip_prob", "probability of a horizontal flip per row (default 0)"),
        ("exif_transpose", "apply the EXIF orientation (default true)"),
        ("max_pixels", "reject images with more pixels, read from the header (default 100000000)"),
        ("max_aspect_ratio", "reject images whose long side is more than this many times the short one, read from the header (default 20)"),
        ("dct_scaling", "decode large JPEGs at 1/2, 1/4 or 1/8 scale, then resize (default false: slower with the available decoders)"),
    ];
}

impl NodeSpec for ImageTransformConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> = [
            KeyError::check_range("resolution", self.resolution, 8, 8192),
            KeyError::check_range("max_pixels", self.max_pixels, 1, 1 << 40),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !(self.max_aspect_ratio >= 1.0 && self.max_aspect_ratio <= 1000.0) {
            errors.push(KeyError::new(
                "max_aspect_ratio",
                format!("must be between 1 and 1000, got {}", self.max_aspect_ratio),
            ));
        }
        if !(0.0..=1.0).contains(&self.hflip_prob) {
            errors.push(KeyError::new("hflip_prob", format!("must be between 0 and 1, got {}", self.hflip_prob)));
        }
        errors
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("image", ColumnType::Bytes)],
            adds: vec![
                Field::new("pixels", ColumnType::U8Tensor),
                Field::new("original_size", ColumnType::I64Tensor),
                Field::new("crop_top_left", ColumnType::I64Tensor),
            ],
            removes: vec!["image".into()],
        }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(ImageTransform { config: self.clone(), seed: ctx.job.seed })))
    }
}

/// One transformed image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transformed {
    /// The crop, CHW.
    pub pixels: Vec<u8>,
    /// Height and width of the image before resizing (after orientation).
    pub original_size: [i64; 2],
    /// Top and left of the crop in the resized image.
    pub crop_top_left: [i64; 2],
}

/// The `image_transform` map.
#[derive(Debug)]
pub struct ImageTransform {
    config: ImageTransformConfig,
    seed: u64,
}

impl ImageTransform {
    /// A transform with these settings; `seed` drives random crops and flips.
    pub fn new(config: ImageTransformConfig, seed: u64) -> Self {
        ImageTransform { config, seed }
    }

    /// Transforms one encoded image; `key` seeds its random crop and flip.
    pub fn apply(&self, bytes: &[u8], key: i64) -> Result<Transformed, crate::pixels::Rejected> {
        let c = &self.config;
        let res = c.resolution;
        let options = DecodeOptions {
            exif_transpose: c.exif_transpose,
            max_pixels: c.max_pixels,
            max_aspect_ratio: c.max_aspect_ratio,
            dct_target: c.dct_scaling.then_some(res),
        };
        let image = decode(bytes, &options)?;
        let (w, h) = image.original;
        let (rw, rh) = resized_size(w, h, res);
        let (left, top) = match c.crop {
            CropMode::Center => (center_offset(rw, res), center_offset(rh, res)),
            CropMode::Random => {
                let pick = |size: u32, salt| {
                    ((unit_random(self.seed, key, salt) * f64::from(size - res + 1)) as u32).min(size - res)
                };
                (pick(rw, 1), pick(rh, 2))
            }
        };
        let filter = match c.filter {
            FilterName::Bilinear => Filter::Bilinear,
            FilterName::Bicubic => Filter::Bicubic,
            FilterName::Lanczos => Filter::Lanczos,
        };
        let plan = CropPlan { resized: (rw, rh), offset: (left, top), size: (res, res) };
        let hwc = resize_crop(&image, &plan, filter);
        let flip = c.hflip_prob > 0.0 && unit_random(self.seed, key, 3) < c.hflip_prob;
        Ok(Transformed {
            pixels: hwc_to_chw(&hwc, res as usize, flip),
            original_size: [i64::from(h), i64::from(w)],
            crop_top_left: [i64::from(top), i64::from(left)],
        })
    }
}

/// `f` of every row `0..n`, run in parallel on the rayon pool the caller runs on (the job's pool
/// for a map), in row order.
fn per_row<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    (0..n).into_par_iter().map(f).collect()
}

/// Interleaved RGB rows to planar channels, mirrored left to right when `flip`.
fn hwc_to_chw(hwc: &[u8], side: usize, flip: bool) -> Vec<u8> {
    let plane = side * side;
    let mut chw = vec![0u8; 3 * plane];
    for y in 0..side {
        for x in 0..side {
            let src = (y * side + if flip { side - 1 - x } else { x }) * 3;
            for c in 0..3 {
                chw[c * plane + y * side + x] = hwc[src + c];
            }
        }
    }
    chw
}

impl Map for ImageTransform {
    fn map(&self, mut batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        let images = batch.bytes("image")?;
        let keys: Vec<i64> = match batch.i64s("key") {
            Ok(k) => k.to_vec(),
            Err(_) => (0..images.len() as i64).collect(),
        };
        let side = self.config.resolution as usize;
        // The rows of one batch decode in parallel on the pool this map runs on, so decoding
        // uses every pool thread however few batches are in flight.
        let results = per_row(images.len(), |row| self.apply(&images[row], keys[row]));
        let mut keep = vec![true; images.len()];
        let (mut pixels, mut sizes, mut offsets) =
            (Vec::with_capacity(images.len() * 3 * side * side), Vec::new(), Vec::new());
        for (row, result) in results.into_iter().enumerate() {
            match result {
                Ok(t) => {
                    pixels.extend_from_slice(&t.pixels);
                    sizes.extend_from_slice(&t.original_size);
                    offsets.extend_from_slice(&t.crop_top_left);
                }
                Err(rejected) => {
                    keep[row] = false;
                    tracing::debug!(
                        node = ctx.node(),
                        key = keys[row],
                        reason = rejected.reason,
                        "{}",
                        rejected.detail
                    );
                    ctx.reject(keys[row].to_string(), rejected.reason);
                }
            }
        }
        if keep.iter().any(|k| !k) {
            batch.retain_rows(&keep);
        }
        batch.remove("image");
        if batch.columns().next().is_none() {
            return Ok(Batch::new());
        }
        batch.insert("pixels", Column::U8Tensor { shape: vec![3, side, side], data: pixels })?;
        batch.insert("original_size", Column::I64Tensor { shape: vec![2], data: sizes })?;
        batch.insert("crop_top_left", Column::I64Tensor { shape: vec![2], data: offsets })?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 200]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn transforms_good_rows_and_rejects_bad_ones() {
        let t = ImageTransform::new(ImageTransformConfig { resolution: 16, ..ImageTransformConfig::default() }, 0);
        let batch = Batch::new()
            .with("key", Column::I64(vec![1, 2, 3]))
            .unwrap()
            .with(
                "image",
                Column::Bytes(vec![
                    ByteBuf::from(png(40, 20)),
                    ByteBuf::from(b"junk".to_vec()),
                    ByteBuf::from(png(1, 1)),
                ]),
            )
            .unwrap();
        let mut ctx = OpContext::detached("transform");
        let out = t.map(batch, &mut ctx).unwrap();
        assert_eq!(out.rows(), 2, "the 1x1 image is upscaled, not rejected");
        assert_eq!(out.i64s("key").unwrap(), &[1, 3]);
        let Column::I64Tensor { data, .. } = out.column("original_size").unwrap() else { panic!() };
        assert_eq!(data, &[20, 40, 1, 1]);
        let Column::I64Tensor { data, .. } = out.column("crop_top_left").unwrap() else { panic!() };
        assert_eq!(data, &[0, 8, 0, 0]);
        assert!(out.column("image").is_err(), "the encoded bytes are dropped");
        let rejected = ctx.take_rejections();
        assert_eq!((rejected[0].key.as_str(), rejected[0].reason.as_str()), ("2", "not_an_image"));
    }

    #[test]
    fn flips_mirror_each_row_and_random_crops_stay_inside() {
        let base = ImageTransformConfig { resolution: 8, ..ImageTransformConfig::default() };
        let plain = ImageTransform::new(base.clone(), 0).apply(&png(8, 8), 5).unwrap();
        let flipped = ImageTransform::new(ImageTransformConfig { hflip_prob: 1.0, ..base.clone() }, 0)
            .apply(&png(8, 8), 5)
            .unwrap();
        for y in 0..8 {
            for x in 0..8 {
                assert_eq!(plain.pixels[y * 8 + x], flipped.pixels[y * 8 + 7 - x]);
            }
        }
        let random = ImageTransform::new(ImageTransformConfig { crop: CropMode::Random, ..base }, 0);
        let lefts: std::collections::BTreeSet<i64> =
            (0..50).map(|k| random.apply(&png(30, 8), k).unwrap().crop_top_left[1]).collect();
        assert!(lefts.len() > 5 && *lefts.last().unwrap() <= 22, "{lefts:?}");
    }

    #[test]
    fn a_batch_decodes_on_several_pool_threads_and_keeps_row_order() {
        // Rows spread over the pool the map runs on (4 threads here, as the engine's pool).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let threads = std::sync::Mutex::new(std::collections::BTreeSet::new());
        let rows = pool.install(|| {
            per_row(32, |row| {
                threads.lock().unwrap().insert(rayon::current_thread_index());
                std::thread::sleep(std::time::Duration::from_millis(2));
                row
            })
        });
        assert_eq!(rows, (0..32).collect::<Vec<_>>(), "results in row order");
        assert!(threads.lock().unwrap().len() > 1, "rows of one batch spread over the pool: {threads:?}");

        let t = ImageTransform::new(ImageTransformConfig { resolution: 16, ..ImageTransformConfig::default() }, 0);
        let batch = Batch::new()
            .with("key", Column::I64((0..32).collect()))
            .unwrap()
            .with("image", Column::Bytes((0..32).map(|k| ByteBuf::from(png(40 + k, 30))).collect()))
            .unwrap();
        let out = pool.install(|| t.map(batch, &mut OpContext::detached("transform")).unwrap());
        let Column::I64Tensor { data, .. } = out.column("original_size").unwrap() else { panic!() };
        let widths: Vec<i64> = data.chunks(2).map(|hw| hw[1]).collect();
        assert_eq!(widths, (40..72).collect::<Vec<_>>(), "each row's image in its row");
    }
}
