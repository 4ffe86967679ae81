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

use crate::pixels::buckets::{BucketSpec, Buckets};
use crate::pixels::geometry::{center_offset, cover_size, unit_random};
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
    /// Aspect-ratio buckets instead of the `resolution` square: each image is resized to cover
    /// the bucket nearest its aspect ratio and cropped to it, and a batch comes out as one batch
    /// per bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<BucketSpec>,
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
            buckets: None,
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
        ("buckets", "aspect-ratio buckets instead of the square: { area = 65536, step = 64, min = 128, max = 512 } (equal-area sizes, sides multiples of step in [min, max]) or [[w, h], ...]; each image is cropped to the bucket nearest its aspect, one output batch per bucket"),
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
        if let Some(Err(problems)) = self.buckets.as_ref().map(Buckets::resolve) {
            errors.extend(problems.into_iter().map(|p| KeyError::new("buckets", p)));
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
        Ok(OperatorImpl::Map(Arc::new(ImageTransform::new(self.clone(), ctx.job.seed)?)))
    }
}

/// One transformed image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transformed {
    /// The crop, CHW.
    pub pixels: Vec<u8>,
    /// Width and height of the crop (the bucket's, or the `resolution` square).
    pub size: (u32, u32),
    /// Height and width of the image before resizing (after orientation).
    pub original_size: [i64; 2],
    /// Top and left of the crop in the resized image.
    pub crop_top_left: [i64; 2],
}

/// The `image_transform` map.
#[derive(Debug)]
pub struct ImageTransform {
    config: ImageTransformConfig,
    buckets: Option<Buckets>,
    seed: u64,
}

impl ImageTransform {
    /// A transform with these settings; `seed` drives random crops and flips.
    pub fn new(config: ImageTransformConfig, seed: u64) -> Result<Self, OpError> {
        let buckets = match &config.buckets {
            Some(spec) => Some(Buckets::resolve(spec).map_err(|p| OpError::msg(format!("buckets: {}", p.join("; "))))?),
            None => None,
        };
        Ok(ImageTransform { config, buckets, seed })
    }

    /// The size an image of `width x height` is cropped to.
    pub fn target_size(&self, width: u32, height: u32) -> (u32, u32) {
        match &self.buckets {
            Some(buckets) => buckets.nearest(width, height),
            None => (self.config.resolution, self.config.resolution),
        }
    }

    /// Transforms one encoded image; `key` seeds its random crop and flip.
    pub fn apply(&self, bytes: &[u8], key: i64) -> Result<Transformed, crate::pixels::Rejected> {
        let crop = self.crop(bytes, key)?;
        let mut pixels = vec![0u8; crop.hwc.len()];
        crop.write_chw(&mut pixels);
        Ok(Transformed {
            pixels,
            size: crop.size,
            original_size: crop.original_size,
            crop_top_left: crop.crop_top_left,
        })
    }

    /// Decodes, resizes and crops one image, leaving it interleaved: the batch's rows are
    /// written CHW straight into the batch's column (`Crop::write_chw`).
    fn crop(&self, bytes: &[u8], key: i64) -> Result<Crop, crate::pixels::Rejected> {
        let c = &self.config;
        let options = DecodeOptions {
            exif_transpose: c.exif_transpose,
            max_pixels: c.max_pixels,
            max_aspect_ratio: c.max_aspect_ratio,
            // The short side a decode may shrink to: the smallest a bucket asks for.
            dct_target: c.dct_scaling.then(|| match &self.buckets {
                Some(b) => b.sizes().iter().map(|&(w, h)| w.max(h)).max().unwrap_or(c.resolution),
                None => c.resolution,
            }),
        };
        let image = decode(bytes, &options)?;
        let (w, h) = image.original;
        let (bw, bh) = self.target_size(w, h);
        let (rw, rh) = cover_size(w, h, bw, bh);
        let (left, top) = match c.crop {
            CropMode::Center => (center_offset(rw, bw), center_offset(rh, bh)),
            CropMode::Random => {
                let pick = |size: u32, crop: u32, salt| {
                    ((unit_random(self.seed, key, salt) * f64::from(size - crop + 1)) as u32).min(size - crop)
                };
                (pick(rw, bw, 1), pick(rh, bh, 2))
            }
        };
        let filter = match c.filter {
            FilterName::Bilinear => Filter::Bilinear,
            FilterName::Bicubic => Filter::Bicubic,
            FilterName::Lanczos => Filter::Lanczos,
        };
        let plan = CropPlan { resized: (rw, rh), offset: (left, top), size: (bw, bh) };
        let hwc = resize_crop(&image, &plan, filter);
        let flip = c.hflip_prob > 0.0 && unit_random(self.seed, key, 3) < c.hflip_prob;
        Ok(Crop {
            hwc,
            flip,
            size: (bw, bh),
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

/// One image cropped to its size, still interleaved RGB.
struct Crop {
    hwc: Vec<u8>,
    /// Mirrored left to right when written.
    flip: bool,
    size: (u32, u32),
    original_size: [i64; 2],
    crop_top_left: [i64; 2],
}

impl Crop {
    /// Writes the crop as planar channels into `chw` (`3 x height x width`), mirrored when
    /// `flip`.
    fn write_chw(&self, chw: &mut [u8]) {
        let (width, height) = (self.size.0 as usize, self.size.1 as usize);
        let plane = width * height;
        debug_assert_eq!(chw.len(), 3 * plane);
        let (red, rest) = chw.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for (y, source) in self.hwc.chunks_exact(3 * width).take(height).enumerate() {
            let row = y * width..(y + 1) * width;
            let (r, g, b) = (&mut red[row.clone()], &mut green[row.clone()], &mut blue[row]);
            for (x, rgb) in source.chunks_exact(3).enumerate() {
                let x = if self.flip { width - 1 - x } else { x };
                (r[x], g[x], b[x]) = (rgb[0], rgb[1], rgb[2]);
            }
        }
    }
}

impl Map for ImageTransform {
    /// One batch: the rows of the square crop, or of the one bucket they all went to.
    fn map(&self, batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        let mut groups = self.map_groups(batch, ctx)?;
        match groups.len() {
            0 => Ok(Batch::new()),
            1 => Ok(groups.remove(0)),
            n => Err(OpError::msg(format!("the rows went to {n} buckets: one batch per bucket comes from map_groups"))),
        }
    }

    /// One batch per bucket the rows went to (in bucket order, rows in their input order).
    fn map_groups(&self, mut batch: Batch, ctx: &mut OpContext) -> Result<Vec<Batch>, OpError> {
        let images = batch.bytes("image")?;
        let keys: Vec<i64> = match batch.i64s("key") {
            Ok(k) => k.to_vec(),
            Err(_) => (0..images.len() as i64).collect(),
        };
        // The rows of one batch decode in parallel on the pool this map runs on, so decoding
        // uses every pool thread however few batches are in flight.
        let results = per_row(images.len(), |row| self.crop(&images[row], keys[row]));
        let mut kept = Vec::with_capacity(results.len());
        for (row, result) in results.into_iter().enumerate() {
            match result {
                Ok(t) => kept.push(Some(t)),
                Err(rejected) => {
                    kept.push(None);
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
        batch.remove("image");
        if batch.columns().next().is_none() {
            return Ok(Vec::new());
        }
        let mut sizes: Vec<(u32, u32)> = kept.iter().flatten().map(|t| t.size).collect();
        sizes.sort_unstable_by_key(|&(w, h)| self.buckets.as_ref().map_or(0, |b| b.position(w, h)));
        sizes.dedup();
        let mut out = Vec::with_capacity(sizes.len());
        for (i, &(w, h)) in sizes.iter().enumerate() {
            let in_group: Vec<bool> = kept.iter().map(|t| t.as_ref().is_some_and(|t| t.size == (w, h))).collect();
            let mut group = if i + 1 == sizes.len() { std::mem::take(&mut batch) } else { batch.clone() };
            group.retain_rows(&in_group);
            let rows: Vec<&Crop> = kept.iter().flatten().filter(|t| t.size == (w, h)).collect();
            // Each row is written CHW straight into the column, in parallel, with no copy between.
            let row_len = 3 * h as usize * w as usize;
            let mut pixels = vec![0u8; rows.len() * row_len];
            pixels.par_chunks_mut(row_len.max(1)).zip(&rows).for_each(|(chw, crop)| crop.write_chw(chw));
            let original = rows.iter().flat_map(|t| t.original_size).collect();
            let offsets = rows.iter().flat_map(|t| t.crop_top_left).collect();
            group.insert("pixels", Column::U8Tensor { shape: vec![3, h as usize, w as usize], data: pixels })?;
            group.insert("original_size", Column::I64Tensor { shape: vec![2], data: original })?;
            group.insert("crop_top_left", Column::I64Tensor { shape: vec![2], data: offsets })?;
            out.push(group);
        }
        Ok(out)
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
        let t =
            ImageTransform::new(ImageTransformConfig { resolution: 16, ..ImageTransformConfig::default() }, 0).unwrap();
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
        let plain = ImageTransform::new(base.clone(), 0).unwrap().apply(&png(8, 8), 5).unwrap();
        let flipped = ImageTransform::new(ImageTransformConfig { hflip_prob: 1.0, ..base.clone() }, 0)
            .unwrap()
            .apply(&png(8, 8), 5)
            .unwrap();
        for y in 0..8 {
            for x in 0..8 {
                assert_eq!(plain.pixels[y * 8 + x], flipped.pixels[y * 8 + 7 - x]);
            }
        }
        let random = ImageTransform::new(ImageTransformConfig { crop: CropMode::Random, ..base }, 0).unwrap();
        let lefts: std::collections::BTreeSet<i64> =
            (0..50).map(|k| random.apply(&png(30, 8), k).unwrap().crop_top_left[1]).collect();
        assert!(lefts.len() > 5 && *lefts.last().unwrap() <= 22, "{lefts:?}");
    }

    #[test]
    fn bucketed_rows_come_out_one_batch_per_bucket_cropped_to_their_aspect() {
        let config = ImageTransformConfig {
            buckets: Some(BucketSpec::List(vec![[16, 16], [24, 8], [8, 24]])),
            ..ImageTransformConfig::default()
        };
        let t = ImageTransform::new(config, 0).unwrap();
        let sizes = [(90, 30), (20, 20), (30, 90), (100, 35), (40, 41)];
        let batch = Batch::new()
            .with("key", Column::I64((0..5).collect()))
            .unwrap()
            .with("image", Column::Bytes(sizes.iter().map(|&(w, h)| ByteBuf::from(png(w, h))).collect()))
            .unwrap();
        let groups = t.map_groups(batch, &mut OpContext::detached("transform")).unwrap();
        let got: Vec<(Vec<usize>, Vec<i64>)> = groups
            .iter()
            .map(|b| {
                let Column::U8Tensor { shape, .. } = b.column("pixels").unwrap() else { panic!() };
                (shape.clone(), b.i64s("key").unwrap().to_vec())
            })
            .collect();
        // Buckets in aspect order (tall, square, wide), rows in their input order.
        assert_eq!(got, [(vec![3, 24, 8], vec![2]), (vec![3, 16, 16], vec![1, 4]), (vec![3, 8, 24], vec![0, 3])]);
        // Each row's pixels in its batch are what `apply` gives for it alone.
        let Column::U8Tensor { data, .. } = groups[2].column("pixels").unwrap() else { panic!() };
        let alone: Vec<u8> =
            [0, 3].iter().flat_map(|&k| t.apply(&png(sizes[k].0, sizes[k].1), k as i64).unwrap().pixels).collect();
        assert_eq!(data, &alone);
        let Column::I64Tensor { data, .. } = groups[0].column("crop_top_left").unwrap() else { panic!() };
        assert_eq!(data, &[0, 0], "30x90 resizes to 8x24 exactly");
        let Column::I64Tensor { data, .. } = groups[1].column("crop_top_left").unwrap() else { panic!() };
        assert_eq!(data, &[0, 0, 0, 0], "40x41 resizes to 16x16 (16.4 truncated)");
        // Rows of one bucket: `map` gives their batch; of several, it says to use map_groups.
        let one = Batch::new()
            .with("key", Column::I64(vec![0]))
            .unwrap()
            .with("image", Column::Bytes(vec![ByteBuf::from(png(50, 50))]))
            .unwrap();
        assert_eq!(t.map(one, &mut OpContext::detached("t")).unwrap().rows(), 1);
        let two = Batch::new()
            .with("key", Column::I64(vec![0, 1]))
            .unwrap()
            .with("image", Column::Bytes(vec![ByteBuf::from(png(50, 50)), ByteBuf::from(png(90, 30))]))
            .unwrap();
        assert!(t.map(two, &mut OpContext::detached("t")).is_err());
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

        let t =
            ImageTransform::new(ImageTransformConfig { resolution: 16, ..ImageTransformConfig::default() }, 0).unwrap();
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
