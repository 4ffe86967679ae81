//! Rasterising a [`Scene`] to RGB and encoding it as JPEG.

use std::f64::consts::PI;

use super::scene::{Background, Scene, Shape, ShapeKind};
use crate::rng::Rng;

/// The scene as row-major RGB bytes.
pub fn render(scene: &Scene) -> Vec<u8> {
    let (w, h) = (scene.width as usize, scene.height as usize);
    let mut pixels = vec![0u8; w * h * 3];
    let mut noise = Rng::new(scene.noise_seed, 0);
    for y in 0..h {
        for x in 0..w {
            let colour = match &scene.background {
                Background::Solid(c) => c.1,
                Background::Gradient(a, b) => {
                    let t = y as f64 / (h - 1).max(1) as f64;
                    [0, 1, 2].map(|i| (f64::from(a.1[i]) * (1.0 - t) + f64::from(b.1[i]) * t).round() as u8)
                }
                Background::Noisy(c) => {
                    let n = (noise.next_u64() % 25) as i32 - 12;
                    c.1.map(|v| (i32::from(v) + n).clamp(0, 255) as u8)
                }
            };
            pixels[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&colour);
        }
    }
    for shape in &scene.shapes {
        draw(&mut pixels, w, h, shape);
    }
    pixels
}

fn draw(pixels: &mut [u8], w: usize, h: usize, shape: &Shape) {
    let (cx, cy) = shape.centre;
    let r = shape.radius;
    let (x0, x1) = (((cx - r).floor().max(0.0)) as usize, ((cx + r).ceil() as usize).min(w));
    let (y0, y1) = (((cy - r).floor().max(0.0)) as usize, ((cy + r).ceil() as usize).min(h));
    let star = star_polygon(cx, cy, r);
    for y in y0..y1 {
        for x in x0..x1 {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let (dx, dy) = (px - cx, py - cy);
            let inside = match shape.kind {
                ShapeKind::Circle => dx * dx + dy * dy <= r * r,
                ShapeKind::Square => dx.abs() <= r * 0.8 && dy.abs() <= r * 0.8,
                ShapeKind::Rectangle => dx.abs() <= r && dy.abs() <= r * 0.5,
                ShapeKind::Triangle => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
                ShapeKind::Star => inside_polygon(&star, px, py),
                ShapeKind::Ring => {
                    let d2 = dx * dx + dy * dy;
                    d2 <= r * r && d2 >= (r * 0.6) * (r * 0.6)
                }
                ShapeKind::Line => (dx - dy).abs() <= r * 0.15 && dx.abs() <= r * 0.9,
            };
            if inside {
                pixels[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&shape.colour.1);
            }
        }
    }
}

fn star_polygon(cx: f64, cy: f64, r: f64) -> Vec<(f64, f64)> {
    (0..10)
        .map(|i| {
            let radius = if i % 2 == 0 { r } else { r * 0.45 };
            let angle = -PI / 2.0 + f64::from(i) * PI / 5.0;
            (cx + radius * angle.cos(), cy + radius * angle.sin())
        })
        .collect()
}

/// Even-odd rule.
fn inside_polygon(points: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let ((xi, yi), (xj, yj)) = (points[i], points[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// RGB bytes as a baseline JPEG of `quality` (1-100).
pub fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100));
    let (w, h) =
        (u16::try_from(width).expect("demo sides fit u16"), u16::try_from(height).expect("demo sides fit u16"));
    encoder.encode(rgb, w, h, jpeg_encoder::ColorType::Rgb).expect("encoding RGB into memory cannot fail");
    out
}
