//! Decoding image bytes to 8-bit RGB, the way PIL's `Image.open(...).convert("RGB")` does:
//! grayscale is copied to R=G=B, alpha is dropped without compositing, palettes are expanded,
//! 16-bit samples keep their high byte, CMYK/YCCK JPEGs are converted, and the EXIF orientation
//! is applied. Large JPEGs can be decoded at 1/2, 1/4 or 1/8 scale straight from the DCT.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// Why an image was rejected; the string is the reason the profile counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Short stable reason (`decode_failed`, `too_many_pixels`, ...).
    pub reason: &'static str,
    /// Detail for the log.
    pub detail: String,
}

impl Rejected {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Rejected { reason, detail: detail.into() }
    }
}

/// Decoding settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Apply the EXIF orientation (PIL's `exif_transpose`).
    pub exif_transpose: bool,
    /// Reject images with more pixels than this, read from the header before decoding.
    pub max_pixels: u64,
    /// Reject images whose long side is more than this many times the short one, read from the
    /// header before decoding (a 1 x 16,777,216 strip is under any pixel limit, yet costs seconds
    /// to decode and resize into a crop of almost nothing).
    pub max_aspect_ratio: f64,
    /// For JPEGs whose short side is at least twice this, decode at a reduced DCT scale that
    /// keeps the short side at or above it. `None` decodes at full size.
    pub dct_target: Option<u32>,
}

/// A decoded RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB bytes.
    pub data: Vec<u8>,
    /// Width and height of the full-size image (after orientation), before any DCT scaling.
    pub original: (u32, u32),
}

/// Decodes `bytes` to RGB.
pub fn decode(bytes: &[u8], options: &DecodeOptions) -> Result<Rgb, Rejected> {
    if bytes.is_empty() {
        return Err(Rejected::new("empty_image", "zero bytes"));
    }
    let format = image::guess_format(bytes).map_err(|_| Rejected::new("not_an_image", "unknown format"))?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) {
        return Err(Rejected::new("unsupported_format", format!("{format:?}")));
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder = reader.into_decoder().map_err(|e| Rejected::new("decode_failed", e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Rejected::new("decode_failed", format!("{w}x{h} image")));
    }
    if u64::from(w) * u64::from(h) > options.max_pixels {
        return Err(Rejected::new("too_many_pixels", format!("{w}x{h} is over {} pixels", options.max_pixels)));
    }
    let aspect = f64::from(w.max(h)) / f64::from(w.min(h));
    if aspect > options.max_aspect_ratio {
        return Err(Rejected::new(
            "extreme_aspect_ratio",
            format!("{w}x{h} has an aspect ratio of {aspect:.1}, over {}", options.max_aspect_ratio),
        ));
    }
    let orientation = if options.exif_transpose { decoder.orientation().ok() } else { None };
    let swaps = orientation.is_some_and(swaps_axes);
    let original = if swaps { (h, w) } else { (w, h) };
    if format == ImageFormat::Jpeg {
        if let Some(target) = options.dct_target {
            let factor = dct_factor(w.min(h), target);
            if factor > 1 {
                if let Some(rgb) = decode_jpeg_scaled(bytes, w, h, factor, orientation, original)? {
                    return Ok(rgb);
                }
            }
        }
    }
    let image = DynamicImage::from_decoder(decoder).map_err(|e| Rejected::new("decode_failed", e.to_string()))?;
    let mut rgb = to_rgb8(image);
    if let Some(o) = orientation {
        let mut dynamic = DynamicImage::ImageRgb8(rgb);
        dynamic.apply_orientation(o);
        rgb = dynamic.into_rgb8();
    }
    Ok(Rgb { width: rgb.width(), height: rgb.height(), data: rgb.into_raw(), original })
}

/// The largest of 1, 2, 4, 8 that keeps `short / factor` at or above `target`.
pub fn dct_factor(short: u32, target: u32) -> u32 {
    [8, 4, 2].into_iter().find(|&f| short / f >= target.max(1)).unwrap_or(1)
}

fn swaps_axes(o: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation::*;
    matches!(o, Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH)
}

/// PIL's conversion to 8-bit RGB: alpha dropped (no compositing), gray copied to every
/// channel, 16-bit samples reduced to their high byte.
fn to_rgb8(image: DynamicImage) -> image::RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => {
            let rgb16 = image.into_rgb16();
            let (w, h) = rgb16.dimensions();
            let data = rgb16.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
            image::RgbImage::from_raw(w, h, data).expect("same size")
        }
        other => other.into_rgb8(),
    }
}

fn decode_jpeg_scaled(
    bytes: &[u8],
    w: u32,
    h: u32,
    factor: u32,
    orientation: Option<image::metadata::Orientation>,
    original: (u32, u32),
) -> Result<Option<Rgb>, Rejected> {
    let failed = |e: jpeg_decoder::Error| Rejected::new("decode_failed", e.to_string());
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    let requested = |n: u32| u16::try_from(n.div_ceil(factor)).unwrap_or(u16::MAX);
    decoder.scale(requested(w), requested(h)).map_err(failed)?;
    // CMYK/YCCK files take the full-size path, whose colour conversion handles Adobe's variants.
    if decoder.info().is_some_and(|i| i.pixel_format == jpeg_decoder::PixelFormat::CMYK32) {
        return Ok(None);
    }
    let pixels = decoder.decode().map_err(failed)?;
    let info = decoder.info().ok_or_else(|| Rejected::new("decode_failed", "no frame"))?;
    let (sw, sh) = (u32::from(info.width), u32::from(info.height));
    let data: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::L16 => pixels.chunks_exact(2).flat_map(|v| [v[0], v[0], v[0]]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => return Ok(None),
    };
    if data.len() != (sw * sh * 3) as usize {
        return Err(Rejected::new("decode_failed", "truncated scaled decode"));
    }
    let mut rgb = image::RgbImage::from_raw(sw, sh, data).expect("size checked");
    if let Some(o) = orientation {
        let mut dynamic = DynamicImage::ImageRgb8(rgb);
        dynamic.apply_orientation(o);
        rgb = dynamic.into_rgb8();
    }
    Ok(Some(Rgb { width: rgb.width(), height: rgb.height(), data: rgb.into_raw(), original }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> DecodeOptions {
        DecodeOptions { exif_transpose: true, max_pixels: 100_000_000, max_aspect_ratio: 20.0, dct_target: None }
    }

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn bad_bytes_are_rejected_with_a_reason() {
        assert_eq!(decode(b"", &options()).unwrap_err().reason, "empty_image");
        assert_eq!(decode(b"hello world, not an image", &options()).unwrap_err().reason, "not_an_image");
        let mut truncated = png(DynamicImage::new_rgb8(32, 32));
        truncated.truncate(truncated.len() / 2);
        assert_eq!(decode(&truncated, &options()).unwrap_err().reason, "decode_failed");
    }

    #[test]
    fn headers_over_the_pixel_limit_are_rejected_before_decoding() {
        let bytes = png(DynamicImage::new_rgb8(100, 100));
        let small = DecodeOptions { max_pixels: 9_999, ..options() };
        let err = decode(&bytes, &small).unwrap_err();
        assert_eq!((err.reason, err.detail.as_str()), ("too_many_pixels", "100x100 is over 9999 pixels"));
    }

    #[test]
    fn extreme_aspect_ratios_are_rejected_before_decoding() {
        // 16.8 MP, under the pixel limit: rejected from the header alone.
        let strip = png(DynamicImage::new_luma8(1, 16_777_216));
        let began = std::time::Instant::now();
        let err = decode(&strip, &options()).unwrap_err();
        assert_eq!(err.reason, "extreme_aspect_ratio");
        assert_eq!(err.detail, "1x16777216 has an aspect ratio of 16777216.0, over 20");
        assert!(began.elapsed() < std::time::Duration::from_secs(2), "the header alone decides");
        let wide = png(DynamicImage::new_rgb8(200, 10));
        assert!(decode(&wide, &options()).is_ok(), "20:1 is within the default");
        assert_eq!(
            decode(&wide, &DecodeOptions { max_aspect_ratio: 19.9, ..options() }).unwrap_err().reason,
            "extreme_aspect_ratio"
        );
    }

    #[test]
    fn alpha_is_dropped_and_gray_is_copied() {
        let rgba = image::RgbaImage::from_pixel(2, 1, image::Rgba([10, 20, 30, 0]));
        let out = decode(&png(DynamicImage::ImageRgba8(rgba)), &options()).unwrap();
        assert_eq!(out.data, [10, 20, 30, 10, 20, 30]);
        let gray = image::GrayImage::from_pixel(1, 1, image::Luma([77]));
        assert_eq!(decode(&png(DynamicImage::ImageLuma8(gray)), &options()).unwrap().data, [77, 77, 77]);
        let gray16 = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(1, 1, image::Luma([0x1234]));
        assert_eq!(decode(&png(DynamicImage::ImageLuma16(gray16)), &options()).unwrap().data, [0x12, 0x12, 0x12]);
    }

    #[test]
    fn dct_factor_keeps_the_short_side_at_the_target() {
        assert_eq!(dct_factor(600, 256), 2);
        assert_eq!(dct_factor(2048, 256), 8);
        assert_eq!(dct_factor(500, 256), 1);
        assert_eq!(dct_factor(1024, 256), 4);
    }
}
