//! Resizing and cropping in one step with SIMD convolution (`fast_image_resize`).
//!
//! The resizer computes only the crop: each output pixel is the same antialiased weighted sum of
//! source pixels that "resize the whole image, then crop" would give (filter support clipped at
//! the image edges, not at the crop), so it equals the reference's result while doing a fraction
//! of the work on wide images.

use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::Rgb;

/// Resampling filter (Pillow's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter, antialiased (Pillow `BILINEAR`; the reference).
    Bilinear,
    /// Catmull-Rom cubic, a = -0.5 (Pillow `BICUBIC`).
    Bicubic,
    /// Lanczos, 3 lobes (Pillow `LANCZOS`).
    Lanczos,
}

/// A crop of the resized image: the resized size (as if the whole image were resized) and the
/// window to keep, all in resized pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropPlan {
    /// Size of the whole resized image.
    pub resized: (u32, u32),
    /// Left and top of the window.
    pub offset: (u32, u32),
    /// Width and height of the window.
    pub size: (u32, u32),
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// The window `plan` of `image` resized, as row-major RGB bytes.
///
/// `image` may be smaller than its original size (decoded at a reduced DCT scale); the plan is
/// in terms of the original size and scaled to the decoded one.
pub fn resize_crop(image: &Rgb, plan: &CropPlan, filter: Filter) -> Vec<u8> {
    let (rw, rh) = plan.resized;
    let (left, top) = plan.offset;
    let (cw, ch) = plan.size;
    if (image.width, image.height) == (rw, rh) {
        // Already the resized size: the reference leaves the image untouched, so just crop.
        let mut out = Vec::with_capacity((cw * ch * 3) as usize);
        for y in top..top + ch {
            let start = ((y * image.width + left) * 3) as usize;
            out.extend_from_slice(&image.data[start..start + (cw * 3) as usize]);
        }
        return out;
    }
    let sx = f64::from(image.width) / f64::from(rw);
    let sy = f64::from(image.height) / f64::from(rh);
    let (filter, support) = match filter {
        Filter::Bilinear => (FilterType::Bilinear, 1.0),
        Filter::Bicubic => (FilterType::CatmullRom, 2.0),
        Filter::Lanczos => (FilterType::Lanczos3, 3.0),
    };
    // Two passes in Pillow's order, horizontal then vertical, each rounded and clamped to u8
    // (`fast_image_resize` alone runs u8 images vertical-first, which moves bicubic results
    // by several levels). The horizontal pass covers only the rows the vertical filter reads.
    let (top_src, height_src) = (f64::from(top) * sy, f64::from(ch) * sy);
    let reach = support * sy.max(1.0) + 1.0;
    let y0 = ((top_src - reach).floor().max(0.0)) as u32;
    let y1 = ((top_src + height_src + reach).ceil() as u32).min(image.height);
    let row_bytes = (image.width * 3) as usize;
    let rows = &image.data[y0 as usize * row_bytes..y1 as usize * row_bytes];
    let src = ImageRef::new(image.width, y1 - y0, rows, PixelType::U8x3).expect("buffer matches size");
    let mut wide = Image::new(cw, y1 - y0, PixelType::U8x3);
    let horizontal = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)).crop(
        f64::from(left) * sx,
        0.0,
        f64::from(cw) * sx,
        f64::from(y1 - y0),
    );
    let mut dst = Image::new(cw, ch, PixelType::U8x3);
    let vertical = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)).crop(
        0.0,
        top_src - f64::from(y0),
        f64::from(cw),
        height_src,
    );
    RESIZER.with(|r| {
        let mut r = r.borrow_mut();
        r.resize(&src, &mut wide, &horizontal).expect("valid horizontal crop");
        r.resize(&wide, &mut dst, &vertical).expect("valid vertical crop");
    });
    dst.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Rgb {
        let data =
            (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 128])).collect();
        Rgb { width: w, height: h, data, original: (w, h) }
    }

    #[test]
    fn cropping_while_resizing_equals_resizing_then_cropping() {
        let image = gradient(300, 200);
        let full =
            resize_crop(&image, &CropPlan { resized: (96, 64), offset: (0, 0), size: (96, 64) }, Filter::Bilinear);
        let window =
            resize_crop(&image, &CropPlan { resized: (96, 64), offset: (16, 0), size: (64, 64) }, Filter::Bilinear);
        for y in 0..64usize {
            let a = &full[(y * 96 + 16) * 3..(y * 96 + 80) * 3];
            let b = &window[y * 64 * 3..(y + 1) * 64 * 3];
            let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            assert!(worst <= 1, "row {y}: {worst}");
        }
    }

    #[test]
    fn an_image_of_the_resized_size_is_only_cropped() {
        let image = gradient(80, 64);
        let out = resize_crop(&image, &CropPlan { resized: (80, 64), offset: (8, 0), size: (64, 64) }, Filter::Bicubic);
        assert_eq!(&out[..3], &image.data[8 * 3..9 * 3]);
    }
}
