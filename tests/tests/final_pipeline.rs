//! `final/` is a diffusers pipeline folder: the frozen parts written from presets are what the
//! reference's libraries read. When `python3` has `transformers`, its `CLIPTokenizer` reads the
//! written tokenizer and gives our ids; with `diffusers` and `torch` too,
//! `StableDiffusionPipeline.from_pretrained` loads the whole folder (beside a trained UNet) and
//! generates an image.

use std::collections::BTreeMap;
use std::process::Command;

use latentflow_operators::clip::{Cleanup, ClipTokenizer, Vocab};
use latentflow_operators::training::pipeline_folder::{write_frozen_parts, FrozenParts};

fn python_has(modules: &str) -> bool {
    Command::new("python3").args(["-c", &format!("import {modules}")]).output().is_ok_and(|o| o.status.success())
}

const CAPTION: &str = "a large red circle in the center on a blue background";

#[test]
fn the_written_parts_are_what_transformers_and_diffusers_read() {
    let dir = tempfile::tempdir().unwrap();
    let parts = FrozenParts::of_preset("tiny", 0);
    write_frozen_parts(dir.path(), &parts).unwrap();
    // The UNet a run trains sits beside them: the fixture's stands in.
    let unet = latentflow_tests::fixture("tiny-sd/unet");
    std::fs::create_dir_all(dir.path().join("unet")).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(unet.join(file), dir.path().join("unet").join(file)).unwrap();
    }
    for file in ["model_index.json", "vae/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"] {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    // The fixture's parts were written by diffusers and transformers for the same tiny sizes:
    // the same tensor names (transformers 5 drops the `text_model.` prefix SD2's files have,
    // and reads both) and shapes.
    let shapes = |path: std::path::PathBuf, strip: &str| -> BTreeMap<String, Vec<usize>> {
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        tensors.into_iter().map(|(n, t)| (n.trim_start_matches(strip).to_string(), t.dims().to_vec())).collect()
    };
    let fixture = latentflow_tests::fixture("tiny-sd");
    for (file, strip) in
        [("vae/diffusion_pytorch_model.safetensors", ""), ("text_encoder/model.safetensors", "text_model.")]
    {
        assert_eq!(shapes(dir.path().join(file), strip), shapes(fixture.join(file), strip), "{file}");
    }
    if !python_has("transformers") {
        eprintln!("skipped: python3 has no transformers (pip install transformers to run this check)");
        return;
    }
    let ours = ClipTokenizer::new(Vocab::bundled().unwrap(), Cleanup::OpenAi).unwrap().encode(CAPTION);
    let script = format!(
        "import sys, transformers\n\
         t = transformers.CLIPTokenizer.from_pretrained(sys.argv[1] + '/tokenizer')\n\
         print(t('{CAPTION}').input_ids)"
    );
    let out = Command::new("python3").args(["-c", &script, dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Theirs with the start and end tokens around the text's.
    let ids = std::iter::once(49406).chain(ours).chain([49407]).map(|i: u32| i.to_string()).collect::<Vec<_>>();
    let ours = format!("[{}]", ids.join(", "));
    assert_eq!(theirs, ours, "transformers' CLIPTokenizer on the written tokenizer");
    if !python_has("torch, diffusers") {
        eprintln!("skipped: python3 has no torch + diffusers (the from_pretrained check)");
        return;
    }
    let script = "import sys, diffusers\n\
                  p = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1])\n\
                  image = p('a red circle', num_inference_steps=2, height=64, width=64, output_type='np').images[0]\n\
                  print(image.shape)";
    let out = Command::new("python3").args(["-c", script, dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "(64, 64, 3)");
}
