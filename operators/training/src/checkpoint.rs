//! Checkpoints in the diffusers layout: `checkpoint-STEP/unet/{config.json,
//! diffusion_pytorch_model.safetensors}` (loadable by `UNet2DConditionModel.from_pretrained`),
//! `unet_ema/` when EMA is on, `optimizer.safetensors` and `state.json` (step, random stream,
//! data position). Each is written into a temporary folder (`.checkpoint-STEP.partial-PID`),
//! fsynced file by file and renamed into place, so a kill or a power cut at any moment never
//! leaves a half-written `checkpoint-STEP`; only the newest `keep_last` are kept (an old one is
//! renamed away before it is deleted), and [`remove_stale`] sweeps what killed runs left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::adamw::AdamW;
use super::ema::Ema;
use super::options::TrainingOptions;
use super::schedule::NoiseSchedule;
use super::trainer::{Trainer, TrainerState};
use crate::durable;
use latentflow_models::config::UNetConfig;
use latentflow_models::error::{ModelError, Result};
use latentflow_models::load::{load_unet, ModelSource};
use latentflow_models::rng::Rng;

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The training random stream's state.
    pub rng: u64,
    /// Where the input stream stood (its sources' positions), for an exact resume.
    pub data_position: serde_json::Value,
    /// The options the run had (informational; a resume uses the current ones).
    pub options: TrainingOptions,
    /// The loss of the last step.
    pub loss: Option<f64>,
    /// The rows that had reached the trainer and waited for their step (resolution buckets
    /// not yet full): their keys, shapes and order; their values are in `waiting.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<serde_json::Value>,
}

/// Rows waiting for their step, saved with a checkpoint: `index` (their keys, shapes and
/// order, as the trainer keeps them) and `tensors`, their values by name.
#[derive(Clone, Debug, Default)]
pub struct WaitingRows {
    /// What the trainer needs to put them back in order.
    pub index: serde_json::Value,
    /// The rows' tensors.
    pub tensors: HashMap<String, Tensor>,
}

const STATE: &str = "state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const WAITING: &str = "waiting.safetensors";

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::File { path: path.to_path_buf(), message: e.to_string() }
}

/// Writes a UNet folder (`config.json` with diffusers' class name, f32 safetensors).
pub fn write_unet(dir: &Path, config: &UNetConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut json = serde_json::to_value(config).map_err(|e| ModelError::Input(e.to_string()))?;
    if let serde_json::Value::Object(map) = &mut json {
        map.insert("_class_name".into(), "UNet2DConditionModel".into());
        map.insert("_diffusers_version".into(), "0.42.1".into());
    }
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(io(&path))?;
    save_tensors(&dir.join(WEIGHTS), tensors)
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let on_cpu: HashMap<String, Tensor> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&on_cpu, path)
        .map_err(|e| ModelError::File { path: path.to_path_buf(), message: e.to_string() })
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| ModelError::File {
        path: path.to_path_buf(),
        message: format!("not a readable checkpoint file: {e}"),
    })
}

/// The step a `checkpoint-STEP` folder name stands for.
fn step_of(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}

/// The checkpoints under `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>> {
    if !run_dir.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .map_err(io(run_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(STATE).is_file())
        .filter_map(|p| step_of(&p).map(|s| (s, p)))
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The newest checkpoint under `run_dir`, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop())
}

/// Saves `trainer` as `run_dir/checkpoint-STEP` and prunes all but the newest `keep_last`
/// (0 keeps all). Must be called between optimizer steps.
pub fn save(
    run_dir: &Path,
    trainer: &Trainer,
    data_position: serde_json::Value,
    loss: Option<f64>,
    keep_last: usize,
) -> Result<PathBuf> {
    save_with_waiting(run_dir, trainer, data_position, loss, keep_last, None)
}

/// [`save`], with the rows that wait for their step.
pub fn save_with_waiting(
    run_dir: &Path,
    trainer: &Trainer,
    data_position: serde_json::Value,
    loss: Option<f64>,
    keep_last: usize,
    waiting: Option<&WaitingRows>,
) -> Result<PathBuf> {
    if trainer.pending_micro_batches() != 0 {
        return Err(ModelError::Input("a checkpoint must be taken between optimizer steps".into()));
    }
    let step = trainer.step();
    let target = write_folder(run_dir, &format!("checkpoint-{step}"), |temp| {
        let config = trainer.unet().config();
        write_unet(&temp.join("unet"), config, &trainer.detached_weights())?;
        if let Some(ema) = trainer.ema() {
            let averaged = ema.tensors().iter().map(|(n, t)| (n.clone(), t.clone())).collect();
            write_unet(&temp.join("unet_ema"), config, &averaged)?;
        }
        save_tensors(&temp.join(OPTIMIZER), &trainer.optimizer().state_tensors())?;
        let options = trainer.options().clone();
        if let Some(rows) = waiting {
            save_tensors(&temp.join(WAITING), &rows.tensors)?;
        }
        let waiting = waiting.map(|w| w.index.clone());
        let state = CheckpointState { step, rng: trainer.rng_state(), data_position, options, loss, waiting };
        let path = temp.join(STATE);
        let text = serde_json::to_string_pretty(&state).map_err(|e| ModelError::Input(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(io(&path))
    })?;
    if keep_last > 0 {
        let all = list(run_dir)?;
        for old in &all[..all.len().saturating_sub(keep_last)] {
            discard(run_dir, old)?;
        }
    }
    Ok(target)
}

/// Deletes a checkpoint (or final) folder, first renaming it out of [`list`]'s sight: a kill in the middle
/// of the deletion never leaves a `checkpoint-STEP` with some of its files gone.
fn discard(run_dir: &Path, checkpoint: &Path) -> Result<()> {
    let name = checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let doomed = run_dir.join(format!(".{name}.deleting-{}", std::process::id()));
    durable::rename(checkpoint, &doomed).map_err(io(checkpoint))?;
    std::fs::remove_dir_all(&doomed).map_err(io(&doomed))
}

/// True for what a killed checkpoint (or final model) write or deletion leaves behind.
fn is_stale(name: &str) -> bool {
    (name.starts_with(".checkpoint-") || name.starts_with(".final."))
        && (name.contains(".partial-") || name.contains(".deleting-"))
}

/// Writes the final UNet as `run_dir/final/unet/` the same way as a checkpoint: complete or
/// not at all, replacing an earlier run's.
pub fn write_final_unet(run_dir: &Path, config: &UNetConfig, tensors: &HashMap<String, Tensor>) -> Result<PathBuf> {
    let target = write_folder(run_dir, "final", |temp| write_unet(&temp.join("unet"), config, tensors))?;
    Ok(target.join("unet"))
}

/// Writes `run_dir/final/` as a complete diffusers pipeline folder, whole or not at all:
/// `unet/` (`tensors`: the EMA's weights when EMA is on), `unet_raw/` (the raw weights, when
/// they differ) and the frozen parts. Returns the folder.
pub fn write_final_pipeline(
    run_dir: &Path,
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
    raw: Option<&HashMap<String, Tensor>>,
    parts: &super::pipeline_folder::FrozenParts,
) -> Result<PathBuf> {
    write_folder(run_dir, "final", |temp| {
        write_unet(&temp.join("unet"), config, tensors)?;
        if let Some(raw) = raw {
            write_unet(&temp.join("unet_raw"), config, raw)?;
        }
        super::pipeline_folder::write_frozen_parts(temp, parts)
    })
}

/// Writes `run_dir/name` whole or not at all: `fill` writes into a fresh `.name.partial-PID`,
/// which is fsynced and renamed over any earlier `name`.
fn write_folder(run_dir: &Path, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let temp = run_dir.join(format!(".{name}.partial-{}", std::process::id()));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(io(&temp))?;
    }
    std::fs::create_dir_all(&temp).map_err(io(&temp))?;
    fill(&temp)?;
    durable::sync_tree(&temp).map_err(io(&temp))?;
    let target = run_dir.join(name);
    if target.exists() {
        discard(run_dir, &target)?;
    }
    durable::rename(&temp, &target).map_err(io(&target))?;
    Ok(target)
}

/// Removes the half-written and half-deleted checkpoint folders killed runs left in `run_dir`;
/// returns how many. Run it before the run writes checkpoints of its own.
pub fn remove_stale(run_dir: &Path) -> Result<usize> {
    durable::remove_stale(run_dir, is_stale).map_err(io(run_dir))
}

/// Reads a checkpoint's `state.json`.
pub fn read_state(checkpoint: &Path) -> Result<CheckpointState> {
    let path = checkpoint.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| ModelError::File { path, message: e.to_string() })
}

/// The rows a checkpoint saved as waiting for their step, if any, on `device`.
pub fn read_waiting(checkpoint: &Path, device: &Device) -> Result<Option<WaitingRows>> {
    let Some(index) = read_state(checkpoint)?.waiting else { return Ok(None) };
    let tensors = load_tensors(&checkpoint.join(WAITING), device)?;
    Ok(Some(WaitingRows { index, tensors }))
}

/// The checkpoint `path` names: a checkpoint folder, or a run folder's newest checkpoint.
pub fn checkpoint_in(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.ok_or_else(|| ModelError::File {
        path: path.to_path_buf(),
        message: "neither a checkpoint folder (state.json) nor a run folder with checkpoint-N folders".into(),
    })
}

/// The optimizer a checkpoint saved (moments and step), with the hyperparameters of `options`.
pub fn read_optimizer(checkpoint: &Path, options: &TrainingOptions, device: &Device) -> Result<AdamW> {
    let state = read_state(checkpoint)?;
    AdamW::restore(options.adamw(), state.step, load_tensors(&checkpoint.join(OPTIMIZER), device)?)
}

/// A trainer continuing from `checkpoint` with (possibly changed) `options`, and its state.
pub fn resume(
    checkpoint: &Path,
    schedule: NoiseSchedule,
    options: TrainingOptions,
    device: &Device,
) -> Result<(Trainer, CheckpointState)> {
    let state = read_state(checkpoint)?;
    let (unet, weights) = load_unet(&ModelSource::Folder(checkpoint.join("unet")), device, true, 0)?;
    let moments = load_tensors(&checkpoint.join(OPTIMIZER), device)?;
    let optimizer = AdamW::restore(options.adamw(), state.step, moments)?;
    let ema_dir = checkpoint.join("unet_ema");
    let ema = match options.ema_decay {
        Some(decay) if ema_dir.is_dir() => {
            Some(Ema::restore(decay, options.ema_start_step, load_tensors(&ema_dir.join(WEIGHTS), device)?))
        }
        // EMA switched on at resume: it starts from the current weights.
        Some(decay) => Some(Ema::new(&weights.vars(), decay, options.ema_start_step)?),
        None => None,
    };
    let trainer_state = TrainerState { optimizer, ema, rng: Rng::from_state(state.rng) };
    Ok((Trainer::resume(unet, &weights, schedule, options, trainer_state)?, state))
}
