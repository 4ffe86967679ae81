//! The frozen parts of a diffusers pipeline folder, written beside a trained UNet so that
//! `StableDiffusionPipeline.from_pretrained(folder)` loads it as diffusers' own training script
//! leaves it: `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and `model_index.json`.
//! Parts that came from folders are linked (or copied) from them; a preset's weights are written
//! out as the job initialised them, and the bundled vocabulary as a CLIP tokenizer folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::schedule::SchedulerConfig;
use latentflow_models::caption_words::{CaptionWords, WORDS_CLASS, WORDS_PRESET};
use latentflow_models::clip::Vocab;
use latentflow_models::config::{ClipTextConfig, VaeConfig};
use latentflow_models::error::{ModelError, Result};
use latentflow_models::load::ModelSource;
use latentflow_models::pixel_patches::{PixelPatches, PIXELS_CLASS, PIXELS_PRESET};
use latentflow_models::weights::Weights;
use latentflow_models::{AutoencoderKl, ClipTextModel};

/// Where each frozen part comes from.
#[derive(Clone, Debug)]
pub struct FrozenParts {
    /// The VAE: a folder or a preset.
    pub vae: ModelSource,
    /// The text encoder: a folder or a preset.
    pub text_encoder: ModelSource,
    /// A tokenizer folder; `None`: the bundled vocabulary (SD2's padding, `!`).
    pub tokenizer: Option<PathBuf>,
    /// A scheduler folder; `None`: `schedule` written as a `DDPMScheduler`.
    pub scheduler: Option<PathBuf>,
    /// The schedule the run trained with.
    pub schedule: SchedulerConfig,
    /// The seed presets were initialised from.
    pub seed: u64,
}

impl FrozenParts {
    /// Every part from `preset` (initialised from `seed`), the bundled vocabulary and SD's
    /// default schedule.
    pub fn of_preset(preset: &str, seed: u64) -> FrozenParts {
        FrozenParts {
            vae: ModelSource::Preset(preset.into()),
            text_encoder: ModelSource::Preset(preset.into()),
            tokenizer: None,
            scheduler: None,
            schedule: SchedulerConfig::default(),
            seed,
        }
    }
}

const DIFFUSERS_VERSION: &str = "0.42.1";

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::File { path: path.to_path_buf(), message: e.to_string() }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Writes the frozen parts and `model_index.json` into `dir` (which holds, or will hold, `unet/`).
pub fn write_frozen_parts(dir: &Path, parts: &FrozenParts) -> Result<()> {
    let pixels = match &parts.vae {
        ModelSource::Preset(name) => name == PIXELS_PRESET,
        ModelSource::Folder(from) => PixelPatches::is_in(from),
    };
    // The demo's fixed autoencoder is latentflow's own: the folder names it, and diffusers
    // cannot load it (the README says so).
    let words = match &parts.text_encoder {
        ModelSource::Preset(name) => name == WORDS_PRESET,
        ModelSource::Folder(from) => CaptionWords::is_in(from),
    };
    let text_class = if words { json!(["latentflow", WORDS_CLASS]) } else { json!(["transformers", "CLIPTextModel"]) };
    let vae_class = if pixels { json!(["latentflow", PIXELS_CLASS]) } else { json!(["diffusers", "AutoencoderKL"]) };
    match &parts.vae {
        ModelSource::Folder(from) => link_files(from, &dir.join("vae"))?,
        ModelSource::Preset(name) => write_preset_vae(&dir.join("vae"), name, parts.seed)?,
    }
    match &parts.text_encoder {
        ModelSource::Folder(from) => link_files(from, &dir.join("text_encoder"))?,
        ModelSource::Preset(name) => write_preset_text_encoder(&dir.join("text_encoder"), name, parts.seed)?,
    }
    match &parts.tokenizer {
        Some(from) => link_files(from, &dir.join("tokenizer"))?,
        None => write_bundled_tokenizer(&dir.join("tokenizer"))?,
    }
    match &parts.scheduler {
        Some(from) => link_files(from, &dir.join("scheduler"))?,
        None => write_scheduler(&dir.join("scheduler"), &parts.schedule)?,
    }
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": text_class,
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": vae_class,
        }),
    )
}

/// Hard-links (or, across file systems, copies) the files of `from` into `to`.
fn link_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let path = entry.map_err(io(from))?.path();
        if !path.is_file() {
            continue;
        }
        let target = to.join(path.file_name().expect("a file name"));
        if std::fs::hard_link(&path, &target).is_err() {
            std::fs::copy(&path, &target).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn save(path: &Path, tensors: HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| ModelError::File { path: path.to_path_buf(), message: e.to_string() })
}

/// Every weight a model built from `weights` asked for, initialised from the seed as the job's
/// own instance was (a weight depends only on its name and the seed).
fn created(weights: &Weights) -> HashMap<String, Tensor> {
    weights.vars().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect()
}

fn write_preset_vae(dir: &Path, preset: &str, seed: u64) -> Result<()> {
    if preset == PIXELS_PRESET {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        return write_json(&dir.join("config.json"), &PixelPatches::config_json());
    }
    let config = VaeConfig::preset(preset).ok_or_else(|| ModelError::Input(format!("no VAE preset `{preset}`")))?;
    let weights = Weights::random(seed, &Device::Cpu, true);
    AutoencoderKl::new(&config, &weights)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut json = serde_json::to_value(&config).map_err(|e| ModelError::Input(e.to_string()))?;
    let levels = config.block_out_channels.len();
    json["_class_name"] = json!("AutoencoderKL");
    json["_diffusers_version"] = json!(DIFFUSERS_VERSION);
    json["down_block_types"] = json!(vec!["DownEncoderBlock2D"; levels]);
    json["up_block_types"] = json!(vec!["UpDecoderBlock2D"; levels]);
    write_json(&dir.join("config.json"), &json)?;
    save(&dir.join("diffusion_pytorch_model.safetensors"), created(&weights))
}

fn write_preset_text_encoder(dir: &Path, preset: &str, seed: u64) -> Result<()> {
    if preset == WORDS_PRESET {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        return write_json(&dir.join("config.json"), &CaptionWords::config_json());
    }
    let config = ClipTextConfig::preset(preset)
        .ok_or_else(|| ModelError::Input(format!("no text encoder preset `{preset}`")))?;
    let weights = Weights::random(seed, &Device::Cpu, true);
    ClipTextModel::new(&config, &weights)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut json = serde_json::to_value(&config).map_err(|e| ModelError::Input(e.to_string()))?;
    json["architectures"] = json!(["CLIPTextModel"]);
    json["model_type"] = json!("clip_text_model");
    json["bos_token_id"] = json!(49406);
    json["eos_token_id"] = json!(49407);
    json["pad_token_id"] = json!(0);
    json["projection_dim"] = json["hidden_size"].clone();
    write_json(&dir.join("config.json"), &json)?;
    save(&dir.join("model.safetensors"), created(&weights))
}

/// The bundled vocabulary as a Hugging Face CLIP tokenizer folder, padding with `!` as SD2's.
fn write_bundled_tokenizer(dir: &Path) -> Result<()> {
    let vocab = Vocab::bundled().map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut ids: Vec<(&String, &u32)> = vocab.ids.iter().collect();
    ids.sort_by_key(|(_, id)| **id);
    let map: serde_json::Map<String, Value> = ids.into_iter().map(|(t, id)| (t.clone(), json!(id))).collect();
    write_json(&dir.join("vocab.json"), &Value::Object(map))?;
    let mut merges = String::from("#version: 0.2\n");
    for (a, b) in &vocab.merges {
        merges.push_str(&format!("{a} {b}\n"));
    }
    let path = dir.join("merges.txt");
    std::fs::write(&path, merges).map_err(io(&path))?;
    let specials = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "!",
        "unk_token": "<|endoftext|>",
    });
    write_json(&dir.join("special_tokens_map.json"), &specials)?;
    let mut config = specials;
    config["tokenizer_class"] = json!("CLIPTokenizer");
    config["model_max_length"] = json!(vocab.config.model_max_length);
    config["do_lower_case"] = json!(true);
    config["add_prefix_space"] = json!(false);
    config["clean_up_tokenization_spaces"] = json!(true);
    config["errors"] = json!("replace");
    write_json(&dir.join("tokenizer_config.json"), &config)
}

fn write_scheduler(dir: &Path, schedule: &SchedulerConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut json = serde_json::to_value(schedule).map_err(|e| ModelError::Input(e.to_string()))?;
    json["_class_name"] = json!("DDPMScheduler");
    json["_diffusers_version"] = json!(DIFFUSERS_VERSION);
    write_json(&dir.join("scheduler_config.json"), &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentflow_models::clip::{Cleanup, ClipTokenizer};
    use latentflow_models::load::{load_text_encoder, load_vae};

    #[test]
    fn preset_parts_load_back_as_the_job_built_them() {
        let dir = tempfile::tempdir().unwrap();
        let parts = FrozenParts::of_preset("tiny", 7);
        write_frozen_parts(dir.path(), &parts).unwrap();
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &Device::Cpu).unwrap();
        let decode = |source: &ModelSource| load_vae(source, &Device::Cpu, 7).unwrap().decode(&latents).unwrap();
        let (preset, written) = (decode(&parts.vae), decode(&ModelSource::Folder(dir.path().join("vae"))));
        let diff = (preset - written).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "the written VAE is the preset the job used");
        load_text_encoder(&ModelSource::Folder(dir.path().join("text_encoder")), &Device::Cpu, 0).unwrap();
        let ours = ClipTokenizer::new(Vocab::bundled().unwrap(), Cleanup::OpenAi).unwrap();
        let folder = ClipTokenizer::new(Vocab::from_folder(&dir.path().join("tokenizer")).unwrap(), Cleanup::OpenAi);
        let text = "a large red circle in the center on a blue background";
        assert_eq!(folder.unwrap().encode(text), ours.encode(text));
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("model_index.json")).unwrap()).unwrap();
        assert_eq!(index["vae"], json!(["diffusers", "AutoencoderKL"]));
        assert!(dir.path().join("scheduler/scheduler_config.json").is_file());
    }

    #[test]
    fn the_demos_fixed_encoders_are_written_as_configs_that_load_back_as_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let parts = FrozenParts {
            vae: ModelSource::Preset(PIXELS_PRESET.into()),
            text_encoder: ModelSource::Preset(WORDS_PRESET.into()),
            ..FrozenParts::of_preset("tiny", 7)
        };
        write_frozen_parts(dir.path(), &parts).unwrap();
        let vae = load_vae(&ModelSource::Folder(dir.path().join("vae")), &Device::Cpu, 0).unwrap();
        assert!(matches!(vae, latentflow_models::Autoencoder::Pixels(_)));
        assert!(!dir.path().join("vae/diffusion_pytorch_model.safetensors").exists(), "it has no weights");
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("model_index.json")).unwrap()).unwrap();
        assert_eq!(index["vae"], json!(["latentflow", PIXELS_CLASS]));
        assert_eq!(index["text_encoder"], json!(["latentflow", WORDS_CLASS]));
        let text = latentflow_models::TextEncoder::load(
            &ModelSource::Folder(dir.path().join("text_encoder")),
            &Device::Cpu,
            0,
        );
        assert!(matches!(text.unwrap(), latentflow_models::TextEncoder::Words(_)));
        // A second phase that takes `final/vae` as its folder links the same config.
        let again = tempfile::tempdir().unwrap();
        let linked = FrozenParts { vae: ModelSource::Folder(dir.path().join("vae")), ..parts };
        write_frozen_parts(again.path(), &linked).unwrap();
        assert!(PixelPatches::is_in(&again.path().join("vae")));
    }
}
