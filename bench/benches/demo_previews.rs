//! Does the README's main job visibly learn? Runs `online` on the embedded defaults (the fixed
//! `pixels` autoencoder, so a preview's colours are readable) and then, from what it left in
//! `final/` alone (UNet, text encoder, tokenizer, VAE, scheduler), samples probe prompts in the
//! demo captions' own style, "a large C circle in the center on a B background", as the previews
//! do (DDIM, the job's guidance, the same noise stream). For each it measures the mean colour of
//! the centre (the middle ninth) and of the border (the outer band), names the nearest demo
//! colour, and counts how often the centre is nearest the shape's colour and the border nearest
//! the background's. Chance is 1 in 13 for each.
//!
//! `LATENTFLOW_DEMO_RUN=runs/online` probes an existing run instead of training one.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use latentflow_engine::{run, RunOptions};
use latentflow_operators::demo::COLOURS;
use latentflow_operators::models::load::{load_unet, load_vae, ModelSource};
use latentflow_operators::models::TextEncoder;
use latentflow_operators::rng::Rng;
use latentflow_operators::tokenize::TokenizeConfig;
use latentflow_operators::training::sampling::Ddim;
use latentflow_operators::training::NoiseSchedule;
use latentflow_pipelines::{online, Settings};

/// (shape colour, background colour) of the probes: the README's prompt first.
const PROBES: [(&str, &str); 8] = [
    ("red", "blue"),
    ("yellow", "green"),
    ("white", "black"),
    ("blue", "yellow"),
    ("green", "red"),
    ("black", "white"),
    ("magenta", "cyan"),
    ("orange", "purple"),
];

fn nearest(rgb: [f64; 3]) -> &'static str {
    let distance = |c: &[u8; 3]| (0..3).map(|i| (rgb[i] - f64::from(c[i])).powi(2)).sum::<f64>();
    COLOURS.iter().min_by(|a, b| distance(&a.1).total_cmp(&distance(&b.1))).expect("colours").0
}

/// Mean RGB (0-255) of the centre ninth and of the outer sixth on every side of image `[3, h, w]`
/// in [-1, 1].
fn centre_and_border(image: &Tensor) -> ([f64; 3], [f64; 3]) {
    let (_, h, w) = image.dims3().expect("an image");
    let data = image.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("pixels");
    let (mut centre, mut border, mut n_centre, mut n_border) = ([0.0; 3], [0.0; 3], 0.0, 0.0);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (((x as f64 + 0.5) / w as f64 - 0.5).abs(), ((y as f64 + 0.5) / h as f64 - 0.5).abs());
            let value = |c: usize| ((f64::from(data[c * h * w + y * w + x]) + 1.0) * 127.5).clamp(0.0, 255.0);
            if dx < 1.0 / 6.0 && dy < 1.0 / 6.0 {
                (0..3).for_each(|c| centre[c] += value(c));
                n_centre += 1.0;
            } else if dx > 1.0 / 3.0 || dy > 1.0 / 3.0 {
                (0..3).for_each(|c| border[c] += value(c));
                n_border += 1.0;
            }
        }
    }
    (centre.map(|v| v / n_centre), border.map(|v| v / n_border))
}

fn probe(run_dir: &Path, settings: &Settings) {
    let device = Device::Cpu;
    let pipeline = run_dir.join("final");
    let part = |name: &str| ModelSource::Folder(pipeline.join(name));
    let (unet, _) = load_unet(&part("unet"), &device, false, 0).expect("final/unet");
    let encoder = TextEncoder::load(&part("text_encoder"), &device, 0).expect("final/text_encoder");
    let vae = load_vae(&part("vae"), &device, 0).expect("final/vae");
    let (tokenizer, padding, length) =
        TokenizeConfig { model: Some(pipeline.clone()), ..Default::default() }.build().expect("final/tokenizer");
    let prompts: Vec<String> = PROBES
        .iter()
        .map(|(shape, back)| format!("a large {shape} circle in the center on a {back} background"))
        .collect();
    let texts: Vec<&str> = std::iter::once("").chain(prompts.iter().map(String::as_str)).collect();
    let ids: Vec<i64> = texts.iter().flat_map(|t| tokenizer.input_ids(t, padding, length).0).collect();
    let ids = Tensor::from_vec(ids, (texts.len(), length), &device).expect("ids");
    let embeddings = encoder.forward(&ids, false).expect("text embeddings");
    let (uncond, context) = (embeddings.narrow(0, 0, 1).unwrap(), embeddings.narrow(0, 1, prompts.len()).unwrap());

    let train = settings.train();
    let schedule = NoiseSchedule::from_folder(&pipeline.join("scheduler")).expect("final/scheduler");
    let ddim = Ddim::new(&schedule, train.sample_steps);
    let side = settings.resolution as usize / 8;
    let mut rng = Rng::new(0, 0x0073_616d_706c_6573);
    let latents = ddim.sample(&unet, &context, &uncond, train.guidance_scale, (4, side, side), &mut rng).expect("ddim");
    let images = vae.decode(&(latents / vae.scaling_factor()).unwrap()).expect("decode");

    let (mut centres, mut borders) = (0, 0);
    println!(
        "demo_previews: guidance {}, {} DDIM steps, {side}x{side} latents",
        train.guidance_scale, train.sample_steps
    );
    for (i, (shape, back)) in PROBES.iter().enumerate() {
        let (centre, border) = centre_and_border(&images.get(i).unwrap());
        let (c, b) = (nearest(centre), nearest(border));
        centres += usize::from(c == *shape);
        borders += usize::from(b == *back);
        let rgb = |v: [f64; 3]| format!("[{:3.0}, {:3.0}, {:3.0}]", v[0], v[1], v[2]);
        println!("demo_previews: {shape:>7} on {back:<7} centre {} ~ {c:<7} border {} ~ {b}", rgb(centre), rgb(border));
    }
    let n = PROBES.len();
    println!("demo_previews: centre nearest the shape's colour {centres}/{n}, border nearest the background's {borders}/{n} (chance 1/13 each)");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; there is nothing to list.
    }
    let settings = Settings::default();
    let (run_dir, _keep) = match std::env::var("LATENTFLOW_DEMO_RUN") {
        Ok(dir) => (PathBuf::from(dir), None),
        Err(_) => {
            let temp = tempfile::tempdir().expect("temp dir");
            let mut plan = online::plan(&settings).expect("the online plan");
            plan.job.output_dir = Some(temp.path().join("online"));
            let report = run(&plan, &RunOptions::default()).expect("the main job runs");
            println!("demo_previews: the main job trained in {:.0} s", report.profile.wall_seconds);
            (temp.path().join("online"), Some(temp))
        }
    };
    probe(&run_dir, &settings);
}
