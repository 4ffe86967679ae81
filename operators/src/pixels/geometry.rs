//! Where the crop lands: the reference's resize sizes and crop offsets, exactly.

/// Size after resizing the short side to `resolution`: the long side is
/// `int(resolution * long / short)` (truncated), as torchvision computes it.
///
/// ```
/// use latentflow_operators::pixels::geometry::resized_size;
/// assert_eq!(resized_size(96, 72, 64), (85, 64));
/// assert_eq!(resized_size(50, 81, 64), (64, 103));
/// assert_eq!(resized_size(1, u32::MAX, 8192), (8192, u32::MAX), "saturates, never wraps");
/// ```
pub fn resized_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let long = |l: u32, s: u32| {
        let exact = (u64::from(resolution) * u64::from(l)) / u64::from(s.max(1));
        u32::try_from(exact).unwrap_or(u32::MAX)
    };
    if width <= height {
        (resolution, long(height, width))
    } else {
        (long(width, height), resolution)
    }
}

/// The size to resize `width x height` to so that it just covers a `crop_w x crop_h` crop:
/// the side that constrains becomes the crop's, the other is truncated as torchvision does
/// (for a square crop, the short side becomes the resolution).
///
/// ```
/// use latentflow_operators::pixels::geometry::cover_size;
/// assert_eq!(cover_size(96, 72, 64, 64), (85, 64));
/// assert_eq!(cover_size(200, 100, 96, 48), (96, 48));
/// assert_eq!(cover_size(100, 100, 96, 48), (96, 96));
/// ```
pub fn cover_size(width: u32, height: u32, crop_w: u32, crop_h: u32) -> (u32, u32) {
    let (w, h, cw, ch) = (u64::from(width.max(1)), u64::from(height.max(1)), u64::from(crop_w), u64::from(crop_h));
    let clamp = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
    if cw * h >= ch * w {
        (crop_w, clamp((h * cw / w).max(ch))) // the width constrains
    } else {
        (clamp((w * ch / h).max(cw)), crop_h)
    }
}

/// Center-crop offset: `int(round((size - crop) / 2))` with Python's round-half-to-even.
///
/// ```
/// use latentflow_operators::pixels::geometry::center_offset;
/// assert_eq!(center_offset(85, 64), 10); // 10.5 -> 10
/// assert_eq!(center_offset(103, 64), 20); // 19.5 -> 20
/// ```
pub fn center_offset(size: u32, crop: u32) -> u32 {
    let twice = size.saturating_sub(crop); // (size - crop) / 2 = twice / 2
    let (half, odd) = (twice / 2, twice % 2 == 1);
    if odd && half % 2 == 1 {
        half + 1 // x.5 rounds to the even neighbour
    } else {
        half
    }
}

/// A deterministic random number in `[0, 1)` for (`seed`, `key`, `salt`): random crops and
/// flips give the same result for the same row on every run and worker count.
pub fn unit_random(seed: u64, key: i64, salt: u64) -> f64 {
    let mut z = seed ^ (key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_images_crop_where_the_reference_does() {
        // (width, height) -> resized, crop (left, top), from the fixtures' README.
        let cases = [
            ((96, 72), (85, 64), (10, 0)),
            ((60, 110), (64, 117), (0, 26)),
            ((50, 81), (64, 103), (0, 20)),
            ((200, 140), (91, 64), (14, 0)),
        ];
        for ((w, h), resized, (left, top)) in cases {
            let (rw, rh) = resized_size(w, h, 64);
            assert_eq!((rw, rh), resized);
            assert_eq!((center_offset(rw, 64), center_offset(rh, 64)), (left, top));
        }
    }

    #[test]
    fn random_numbers_are_uniform_enough_and_deterministic() {
        let xs: Vec<f64> = (0..1000).map(|k| unit_random(7, k, 1)).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert_eq!(unit_random(7, 3, 1), unit_random(7, 3, 1));
        assert_ne!(unit_random(7, 3, 1), unit_random(8, 3, 1));
    }
}
