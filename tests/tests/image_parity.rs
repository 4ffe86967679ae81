//! `image_transform` against the reference preprocessing (PIL `convert("RGB")`, torchvision
//! resize with antialiasing, center crop, `to_tensor` + `normalize`) on the fixture images.

use latentflow_gpu_kernels::ops::normalize::normalize_u8_chw;
use latentflow_operators::image_transform::{FilterName, ImageTransform, ImageTransformConfig};
use latentflow_tests::{fixture, golden, golden_f32};

const IMAGES: [&str; 4] =
    ["astronaut_96x72.png", "chelsea_60x110.png", "camera_gray_50x81.png", "coffee_rgba_200x140.png"];

/// Max and mean absolute difference (in u8 levels) between our crops and the golden NHWC crops.
fn compare(filter: FilterName, golden_name: &str) -> (u8, f64) {
    let config = ImageTransformConfig { resolution: 64, filter, dct_scaling: false, ..ImageTransformConfig::default() };
    let transform = ImageTransform::new(config, 0).unwrap();
    let (shape, expected) = golden(golden_name);
    assert_eq!(shape, [4, 64, 64, 3]);
    let (mut worst, mut total) = (0u8, 0u64);
    for (i, name) in IMAGES.iter().enumerate() {
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        let out = transform.apply(&bytes, i as i64).unwrap();
        for y in 0..64 {
            for x in 0..64 {
                for c in 0..3 {
                    let ours = out.pixels[c * 4096 + y * 64 + x];
                    let theirs = expected[((i * 64 + y) * 64 + x) * 3 + c];
                    worst = worst.max(ours.abs_diff(theirs));
                    total += u64::from(ours.abs_diff(theirs));
                }
            }
        }
    }
    (worst, total as f64 / expected.len() as f64)
}

#[test]
fn bilinear_crops_match_pillow_within_the_tolerance() {
    let (worst, mean) = compare(FilterName::Bilinear, "pixels_u8");
    println!("bilinear vs Pillow: max {worst}/255, mean {mean:.4}/255");
    // The issue allows max 2, mean 0.5 levels; we are nearly exact, so guard that.
    assert!(worst <= 1 && mean <= 0.01, "max {worst}, mean {mean}");
}

#[test]
fn bicubic_crops_match_pillow_within_the_tolerance() {
    let (worst, mean) = compare(FilterName::Bicubic, "pixels_bicubic_u8");
    println!("bicubic vs Pillow: max {worst}/255, mean {mean:.4}/255");
    // The issue allows max 2, mean 0.5 levels; we are nearly exact, so guard that.
    assert!(worst <= 1 && mean <= 0.01, "max {worst}, mean {mean}");
}

#[test]
fn normalising_the_golden_crops_gives_the_golden_tensor_bit_for_bit() {
    let (_, crops) = golden("pixels_u8");
    let (shape, expected) = golden_f32("pixels");
    assert_eq!(shape, [4, 3, 64, 64]);
    // NHWC -> NCHW, then the device-side normalisation.
    let mut chw = vec![0u8; crops.len()];
    for i in 0..4 {
        for y in 0..64 {
            for x in 0..64 {
                for c in 0..3 {
                    chw[((i * 3 + c) * 64 + y) * 64 + x] = crops[((i * 64 + y) * 64 + x) * 3 + c];
                }
            }
        }
    }
    let ours = normalize_u8_chw(&chw, [4, 3, 64, 64], &[]).unwrap();
    assert!(ours.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn crop_offsets_and_original_sizes_follow_the_reference() {
    let transform =
        ImageTransform::new(ImageTransformConfig { resolution: 64, ..ImageTransformConfig::default() }, 0).unwrap();
    let expected = [([72, 96], [0, 10]), ([110, 60], [26, 0]), ([81, 50], [20, 0]), ([140, 200], [0, 14])];
    for (name, (size, offset)) in IMAGES.iter().zip(expected) {
        let out = transform.apply(&std::fs::read(fixture(&format!("images/{name}"))).unwrap(), 0).unwrap();
        assert_eq!((out.original_size, out.crop_top_left), (size, offset), "{name}");
    }
}
