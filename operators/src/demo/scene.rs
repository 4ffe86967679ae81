//! Procedural scenes: a background and a few coloured shapes inside the central square (what a
//! center crop keeps), and a caption that names them.

use crate::rng::Rng;

/// A named colour.
pub type Colour = (&'static str, [u8; 3]);

/// Colours shapes and backgrounds are drawn in.
pub const COLOURS: [Colour; 13] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 220, 40]),
    ("cyan", [40, 210, 220]),
    ("magenta", [210, 40, 200]),
    ("orange", [245, 140, 30]),
    ("purple", [120, 50, 170]),
    ("pink", [245, 160, 190]),
    ("brown", [130, 80, 40]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
    ("grey", [128, 128, 128]),
];

/// Kinds of shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeKind {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// A wider-than-tall rectangle.
    Rectangle,
    /// An upward triangle.
    Triangle,
    /// A five-pointed star.
    Star,
    /// A ring.
    Ring,
    /// A thick diagonal line.
    Line,
}

impl ShapeKind {
    const ALL: [ShapeKind; 7] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Rectangle,
        ShapeKind::Triangle,
        ShapeKind::Star,
        ShapeKind::Ring,
        ShapeKind::Line,
    ];

    /// The word in captions.
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Rectangle => "rectangle",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Ring => "ring",
            ShapeKind::Line => "line",
        }
    }
}

/// One shape: its kind, colour, centre and radius in pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// Kind.
    pub kind: ShapeKind,
    /// Colour.
    pub colour: Colour,
    /// Centre, in pixels.
    pub centre: (f64, f64),
    /// Half the size, in pixels.
    pub radius: f64,
    /// Large or small, relative to the image.
    pub large: bool,
}

/// The background.
#[derive(Clone, Debug, PartialEq)]
pub enum Background {
    /// One colour.
    Solid(Colour),
    /// From the first colour at the top to the second at the bottom.
    Gradient(Colour, Colour),
    /// One colour with per-pixel noise.
    Noisy(Colour),
}

/// How varied the scenes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SceneStyle {
    /// 1-3 shapes, large or small, on a solid, gradient or noisy background.
    #[default]
    Varied,
    /// One large shape on a solid background: captions a tiny model can learn from in minutes
    /// ("a large red circle in the center on a blue background").
    Simple,
}

/// A scene: image size, background and shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Background.
    pub background: Background,
    /// Shapes, drawn in order.
    pub shapes: Vec<Shape>,
    /// Seed of the background noise.
    pub noise_seed: u64,
}

impl Scene {
    /// A random varied scene of 256-800 px sides with aspect ratio 0.5-2.0.
    pub fn random(rng: &mut Rng) -> Scene {
        Scene::random_in(rng, SceneStyle::Varied)
    }

    /// A random scene of `style`, 256-800 px sides with aspect ratio 0.5-2.0.
    pub fn random_in(rng: &mut Rng, style: SceneStyle) -> Scene {
        let simple = style == SceneStyle::Simple;
        let aspect = (rng.range(0.5f64.ln(), 2.0f64.ln())).exp();
        let (width, height) = loop {
            let w = rng.int(256, 800);
            let h = (f64::from(w) / aspect).round() as u32;
            if (256..=800).contains(&h) {
                break (w, h);
            }
        };
        let background = match if simple { 0 } else { rng.int(0, 2) } {
            0 => Background::Solid(*rng.pick(&COLOURS)),
            1 => Background::Gradient(*rng.pick(&COLOURS), *rng.pick(&COLOURS)),
            _ => Background::Noisy(*rng.pick(&COLOURS)),
        };
        let background_colours: Vec<&str> = match &background {
            Background::Solid(c) | Background::Noisy(c) => vec![c.0],
            Background::Gradient(a, b) => vec![a.0, b.0],
        };
        let short = f64::from(width.min(height));
        let shapes = (0..if simple { 1 } else { rng.int(1, 3) })
            .map(|_| {
                let large = simple || rng.unit() < 0.5;
                let radius = short * if large { rng.range(0.18, 0.3) } else { rng.range(0.07, 0.14) };
                // Shapes stand out: never the background's colour.
                let colour = loop {
                    let c = *rng.pick(&COLOURS);
                    if !background_colours.contains(&c.0) {
                        break c;
                    }
                };
                // Inside the central square, which is what a center crop keeps, so the caption
                // describes the training image.
                let (x0, y0) = (f64::from(width) - short, f64::from(height) - short);
                let centre =
                    (x0 / 2.0 + rng.range(radius, short - radius), y0 / 2.0 + rng.range(radius, short - radius));
                Shape { kind: *rng.pick(&ShapeKind::ALL), colour, centre, radius, large }
            })
            .collect();
        Scene { width, height, background, shapes, noise_seed: rng.next_u64() }
    }

    /// "a large red circle at the top left and a small blue star in the center on a green to
    /// black gradient background".
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .shapes
            .iter()
            .map(|s| {
                let size = if s.large { "large" } else { "small" };
                format!("a {size} {} {} {}", s.colour.0, s.kind.name(), self.place(s.centre))
            })
            .collect();
        let shapes = match parts.as_slice() {
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
            [] => "nothing".into(),
        };
        let background = match &self.background {
            Background::Solid(c) => format!("a {} background", c.0),
            Background::Gradient(a, b) if a.0 == b.0 => format!("a {} background", a.0),
            Background::Gradient(a, b) => format!("a {} to {} gradient background", a.0, b.0),
            Background::Noisy(c) => format!("a noisy {} background", c.0),
        };
        format!("{shapes} on {background}")
    }

    /// Where `(x, y)` is within the central square.
    fn place(&self, (x, y): (f64, f64)) -> &'static str {
        let short = f64::from(self.width.min(self.height));
        let (x, y) = (x - (f64::from(self.width) - short) / 2.0, y - (f64::from(self.height) - short) / 2.0);
        let col = (3.0 * x / short).max(0.0) as usize;
        let row = (3.0 * y / short).max(0.0) as usize;
        const PLACES: [[&str; 3]; 3] = [
            ["at the top left", "at the top", "at the top right"],
            ["on the left", "in the center", "on the right"],
            ["at the bottom left", "at the bottom", "at the bottom right"],
        ];
        PLACES[row.min(2)][col.min(2)]
    }
}
