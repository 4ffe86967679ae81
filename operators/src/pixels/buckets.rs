//! Aspect-ratio buckets: the output sizes an image may be cropped to, and the one nearest its
//! aspect ratio. Training on buckets instead of one square keeps the sides of wide and tall
//! images (kohya sd-scripts, OneTrainer and SDXL train this way).

use serde::{Deserialize, Serialize};

/// The VAE's downsampling factor: every bucket side is a multiple of it so latents are whole.
pub const LATENT_FACTOR: u32 = 8;

/// `buckets = { area = A, step = S, min = ..., max = ... }`: every `width x height` with both
/// sides multiples of `step` within `[min, max]` and the largest height that keeps the area at
/// most `area` for its width.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketGrid {
    /// Pixels per bucket (65536 for 256 x 256); each bucket's area is within one `step` row
    /// of it: `area - width * step < width * height <= area`.
    pub area: u32,
    /// Both sides are multiples of this (64 by default, as kohya's; at least 8).
    #[serde(default = "default_step")]
    pub step: u32,
    /// The shortest side allowed (default: half the square side, rounded to `step`).
    #[serde(default)]
    pub min: Option<u32>,
    /// The longest side allowed (default: twice the square side).
    #[serde(default)]
    pub max: Option<u32>,
}

fn default_step() -> u32 {
    64
}

/// The `buckets` key of `image_transform`: a grid or an explicit `[[w, h], ...]` list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BucketSpec {
    /// Equal-area buckets.
    Grid(BucketGrid),
    /// Explicit `[width, height]` sizes.
    List(Vec<[u32; 2]>),
}

/// The resolved buckets, `(width, height)`, sorted by aspect ratio (width / height).
///
/// ```
/// use latentflow_operators::pixels::buckets::{BucketGrid, BucketSpec, Buckets};
/// let grid = BucketSpec::Grid(BucketGrid { area: 64 * 64, step: 16, min: Some(32), max: Some(128) });
/// let buckets = Buckets::resolve(&grid).unwrap();
/// assert_eq!(buckets.sizes()[0], (32, 128), "the tallest first");
/// assert!(buckets.sizes().contains(&(64, 64)));
/// // A 2:1 landscape photo goes to the bucket whose aspect is nearest 2 (80 / 48 = 1.67).
/// assert_eq!(buckets.nearest(2000, 1000), (80, 48));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buckets {
    sizes: Vec<(u32, u32)>,
}

impl Buckets {
    /// The sizes `spec` names, or every problem with it.
    pub fn resolve(spec: &BucketSpec) -> Result<Buckets, Vec<String>> {
        let mut problems = Vec::new();
        let mut sizes = match spec {
            BucketSpec::List(list) => list.iter().map(|&[w, h]| (w, h)).collect::<Vec<_>>(),
            BucketSpec::Grid(grid) => grid_sizes(grid, &mut problems),
        };
        for &(w, h) in &sizes {
            if w % LATENT_FACTOR != 0 || h % LATENT_FACTOR != 0 || w == 0 || h == 0 || w > 8192 || h > 8192 {
                problems.push(format!(
                    "bucket {w}x{h}: sides must be positive multiples of {LATENT_FACTOR} up to 8192 (the latents are 1/8 of them)"
                ));
            }
        }
        if sizes.is_empty() && problems.is_empty() {
            problems.push("no bucket: the list is empty, or no size fits the grid's min and max".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        sizes.sort_by(|a, b| aspect(a.0, a.1).total_cmp(&aspect(b.0, b.1)).then(a.cmp(b)));
        sizes.dedup();
        Ok(Buckets { sizes })
    }

    /// The sizes, sorted by aspect ratio.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The place of `width x height` in [`Buckets::sizes`] (past the end when it is none).
    pub fn position(&self, width: u32, height: u32) -> usize {
        self.sizes.iter().position(|&s| s == (width, height)).unwrap_or(self.sizes.len())
    }

    /// The bucket whose aspect ratio is nearest `width / height` (in log scale, so 2:1 and 1:2
    /// are equally far from square); ties go to the larger area, then the first.
    pub fn nearest(&self, width: u32, height: u32) -> (u32, u32) {
        let target = aspect(width.max(1), height.max(1)).ln();
        let distance = |&(w, h): &(u32, u32)| (aspect(w, h).ln() - target).abs();
        let mut best = self.sizes[0];
        for size in &self.sizes[1..] {
            let (d, b) = (distance(size), distance(&best));
            if d < b - 1e-12 || ((d - b).abs() <= 1e-12 && size.0 * size.1 > best.0 * best.1) {
                best = *size;
            }
        }
        best
    }
}

fn aspect(w: u32, h: u32) -> f64 {
    f64::from(w) / f64::from(h)
}

fn grid_sizes(grid: &BucketGrid, problems: &mut Vec<String>) -> Vec<(u32, u32)> {
    let step = grid.step;
    if step < LATENT_FACTOR || step % LATENT_FACTOR != 0 {
        problems.push(format!("step = {step} must be a multiple of {LATENT_FACTOR}"));
        return Vec::new();
    }
    if grid.area < step * step {
        problems.push(format!("area = {} must be at least step^2 = {}", grid.area, step * step));
        return Vec::new();
    }
    let side = f64::from(grid.area).sqrt();
    let round = |x: f64| ((x / f64::from(step)).round() as u32).max(1) * step;
    let min = grid.min.unwrap_or_else(|| round(side / 2.0));
    let max = grid.max.unwrap_or_else(|| round(side * 2.0));
    if min > max {
        problems.push(format!("min = {min} is above max = {max}"));
        return Vec::new();
    }
    let mut sizes = Vec::new();
    let mut width = min.div_ceil(step) * step;
    while width <= max {
        let height = grid.area / width / step * step;
        if height >= min && height <= max && height > 0 {
            sizes.push((width, height));
        }
        width += step;
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_buckets_keep_the_area_within_one_step_and_the_sides_in_range() {
        let grid = BucketGrid { area: 256 * 256, step: 64, min: Some(128), max: Some(512) };
        let buckets = Buckets::resolve(&BucketSpec::Grid(grid.clone())).unwrap();
        assert!(buckets.sizes().len() >= 5, "{:?}", buckets.sizes());
        for &(w, h) in buckets.sizes() {
            assert!(w % 64 == 0 && h % 64 == 0 && (128..=512).contains(&w) && (128..=512).contains(&h));
            assert!(w * h <= grid.area && grid.area - w * h < w * 64, "{w}x{h}");
        }
        assert!(buckets.sizes().contains(&(256, 256)));
        let aspects: Vec<f64> = buckets.sizes().iter().map(|&(w, h)| aspect(w, h)).collect();
        assert!(aspects.windows(2).all(|a| a[0] <= a[1]), "sorted by aspect");
    }

    #[test]
    fn each_image_goes_to_the_nearest_aspect() {
        let list = BucketSpec::List(vec![[64, 64], [96, 48], [48, 96], [80, 56]]);
        let buckets = Buckets::resolve(&list).unwrap();
        assert_eq!(buckets.nearest(500, 500), (64, 64));
        assert_eq!(buckets.nearest(1000, 480), (96, 48));
        assert_eq!(buckets.nearest(300, 700), (48, 96));
        assert_eq!(buckets.nearest(140, 100), (80, 56), "1.4 is nearest 80/56 = 1.43");
        // Brute force: no bucket is nearer in log aspect than the one chosen.
        for w in (10..400).step_by(7) {
            for h in (10..400).step_by(11) {
                let (bw, bh) = buckets.nearest(w, h);
                let d = |a: f64| (a.ln() - aspect(w, h).ln()).abs();
                assert!(buckets.sizes().iter().all(|&(x, y)| d(aspect(x, y)) >= d(aspect(bw, bh)) - 1e-12));
            }
        }
    }

    #[test]
    fn bad_specs_name_every_problem() {
        let list = BucketSpec::List(vec![[60, 64], [64, 0]]);
        assert_eq!(Buckets::resolve(&list).unwrap_err().len(), 2);
        let grid = BucketSpec::Grid(BucketGrid { area: 100, step: 12, min: None, max: None });
        assert!(Buckets::resolve(&grid).unwrap_err()[0].contains("step = 12"));
        let grid = BucketSpec::Grid(BucketGrid { area: 4096, step: 8, min: Some(512), max: Some(64) });
        assert!(Buckets::resolve(&grid).unwrap_err()[0].contains("min = 512"));
        let parsed: BucketSpec = toml::from_str::<toml::Table>("b = { area = 65536, step = 64 }")
            .unwrap()
            .remove("b")
            .unwrap()
            .try_into()
            .unwrap();
        assert!(matches!(parsed, BucketSpec::Grid(BucketGrid { area: 65536, step: 64, .. })));
    }
}
