//! Any bytes through the decode + resize + crop path: a row is transformed or rejected with a
//! reason, never a panic. Run: `cd operators && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_transform`.
#![no_main]

use latentflow_operators::image_transform::{CropMode, ImageTransform, ImageTransformConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the settings, so the fuzzer explores them too.
    let (knobs, bytes) = data.split_first().map_or((0, data), |(k, rest)| (*k, rest));
    let config = ImageTransformConfig {
        resolution: [8, 17, 64][usize::from(knobs % 3)],
        crop: if knobs & 4 != 0 { CropMode::Random } else { CropMode::Center },
        hflip_prob: if knobs & 8 != 0 { 1.0 } else { 0.0 },
        dct_scaling: knobs & 16 != 0,
        max_pixels: 4_000_000,
        ..ImageTransformConfig::default()
    };
    let transform = ImageTransform::new(config.clone(), 0).expect("no buckets");
    if let Ok(out) = transform.apply(bytes, 1) {
        let side = config.resolution as usize;
        assert_eq!(out.pixels.len(), 3 * side * side);
    }
});
