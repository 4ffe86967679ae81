//! Deterministic procedural captioned images: coloured shapes on varied backgrounds, 256-800 px,
//! aspect 0.5-2.0, as JPEG, with a caption that names what is drawn. Row `key` under job seed
//! `seed` is always the same image.

mod parquet;
mod render;
mod scene;

use crate::rng::Rng;
pub use parquet::{img2dataset_schema, write_demo_parquet, ROWS_PER_GROUP};
pub use render::{encode_jpeg, render};
pub use scene::{Background, Scene, SceneStyle, Shape, ShapeKind, COLOURS};

/// One demo row.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoImage {
    /// The caption.
    pub caption: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// JPEG bytes.
    pub jpeg: Vec<u8>,
}

/// The demo row `key` of seed `seed`, as a JPEG of `quality`.
///
/// ```
/// let a = latentflow_operators::demo::demo_image(0, 7, 90);
/// assert_eq!(a, latentflow_operators::demo::demo_image(0, 7, 90));
/// assert!(a.caption.contains(" on a "));
/// ```
pub fn demo_image(seed: u64, key: u64, quality: u8) -> DemoImage {
    demo_image_in(seed, key, quality, SceneStyle::Varied)
}

/// The demo row `key` of seed `seed` in `style`, as a JPEG of `quality`.
///
/// ```
/// use latentflow_operators::demo::{demo_image_in, SceneStyle};
/// let simple = demo_image_in(0, 7, 90, SceneStyle::Simple);
/// assert!(simple.caption.starts_with("a large ") && !simple.caption.contains(" and "));
/// ```
pub fn demo_image_in(seed: u64, key: u64, quality: u8, style: SceneStyle) -> DemoImage {
    let scene = Scene::random_in(&mut Rng::new(seed, key), style);
    let rgb = render(&scene);
    DemoImage {
        caption: scene.caption(),
        width: scene.width,
        height: scene.height,
        jpeg: encode_jpeg(&rgb, scene.width, scene.height, quality),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_scenes_have_one_large_shape_on_a_solid_background() {
        let mut backgrounds = std::collections::BTreeSet::new();
        for key in 0..200 {
            let scene = Scene::random_in(&mut Rng::new(3, key), SceneStyle::Simple);
            assert!(matches!(scene.background, Background::Solid(_)), "{:?}", scene.background);
            assert!(matches!(scene.shapes.as_slice(), [one] if one.large), "{:?}", scene.shapes);
            let caption = scene.caption();
            assert!(!caption.contains(" and ") && !caption.contains("gradient") && !caption.contains("noisy"));
            backgrounds.insert(caption.rsplit(" on a ").next().unwrap().to_string());
        }
        assert_eq!(backgrounds.len(), COLOURS.len(), "every colour is some background: {backgrounds:?}");
    }

    #[test]
    fn sizes_and_aspects_stay_in_range_and_captions_name_the_shapes() {
        for key in 0..200 {
            let scene = Scene::random(&mut Rng::new(3, key));
            assert!((256..=800).contains(&scene.width) && (256..=800).contains(&scene.height));
            let aspect = f64::from(scene.width) / f64::from(scene.height);
            assert!((0.49..=2.01).contains(&aspect), "{aspect}");
            let caption = scene.caption();
            for shape in &scene.shapes {
                assert!(caption.contains(shape.kind.name()) && caption.contains(shape.colour.0), "{caption}");
            }
        }
    }

    #[test]
    fn the_shape_colour_is_in_the_picture() {
        let scene = Scene::random(&mut Rng::new(1, 1));
        let rgb = render(&scene);
        let shape = &scene.shapes[0];
        let (x, y) = (shape.centre.0 as usize, shape.centre.1 as usize);
        let at = (y * scene.width as usize + x) * 3;
        // Rings and lines may miss their centre; everything else covers it.
        if !matches!(shape.kind, ShapeKind::Ring | ShapeKind::Line) {
            let covered = scene.shapes.iter().rev().find(|s| {
                let (dx, dy) = (x as f64 - s.centre.0, y as f64 - s.centre.1);
                dx.abs() < s.radius * 0.3 && dy.abs() < s.radius * 0.3
            });
            assert_eq!(&rgb[at..at + 3], &covered.unwrap().colour.1);
        }
    }

    #[test]
    fn jpegs_decode_to_the_scene_size() {
        let row = demo_image(0, 42, 90);
        let decoded = image::load_from_memory(&row.jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (row.width, row.height));
    }
}
