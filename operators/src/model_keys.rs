//! What every model-backed operator shares: the `model` / `path` / `preset` keys that say where
//! its weights come from, the device its worker owns, and moving tensor columns to and from
//! candle tensors.

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_engine::{Column, KeyError, OpContext, OpError};

use crate::device_column::device_column;
use crate::models::config::PRESETS;
use crate::models::load::ModelSource;

/// Checks the three keys: at least one of them, and a known preset.
///
/// ```
/// use latentflow_operators::model_keys::check_source;
/// assert!(check_source(None, None, Some("tiny")).is_empty());
/// assert_eq!(check_source(None, None, None)[0].key, "model");
/// assert_eq!(check_source(None, None, Some("huge"))[0].key, "preset");
/// ```
pub fn check_source(model: Option<&Path>, path: Option<&Path>, preset: Option<&str>) -> Vec<KeyError> {
    check_source_among(model, path, preset, &PRESETS)
}

/// [`check_source`] for a part whose presets are `known` (the VAE's include `pixels`).
pub fn check_source_among(
    model: Option<&Path>,
    path: Option<&Path>,
    preset: Option<&str>,
    known: &[&str],
) -> Vec<KeyError> {
    let mut errors = Vec::new();
    if model.is_none() && path.is_none() && preset.is_none() {
        errors.push(KeyError::new(
            "model",
            "say where the weights come from: `model` (a diffusers pipeline folder), `path` (the part's own \
             folder) or `preset`",
        ));
    }
    if let Some(p) = preset.filter(|p| !known.contains(p)) {
        errors.push(KeyError::new("preset", format!("unknown preset `{p}`; use one of {}", known.join(", "))));
    }
    errors
}

/// Checks the `config.json` the keys lead to for `part` (`unet`, `vae`, `text_encoder`): every
/// value the model code divides by or indexes with, each problem naming the file and field.
/// `path` is the part's own folder, set with the key `path_key`.
pub fn check_config(
    model: Option<&Path>,
    (path_key, path): (&str, Option<&Path>),
    preset: Option<&str>,
    part: &str,
) -> Vec<KeyError> {
    let Some(ModelSource::Folder(dir)) = ModelSource::resolve(model, path, preset, part) else {
        return Vec::new();
    };
    let key = if path.is_some() { path_key } else { "model" };
    match crate::models::load::check_part_config(&dir, part) {
        Ok(()) => Vec::new(),
        Err(crate::models::ModelError::Config { origin, problems }) => {
            problems.iter().map(|p| KeyError::new(key, format!("{}: {p}", origin.display()))).collect()
        }
        Err(other) => vec![KeyError::new(key, other.to_string())],
    }
}

/// The model source the keys name for `part` (`vae`, `text_encoder`, `unet`).
pub fn source(
    model: Option<&Path>,
    path: Option<&Path>,
    preset: Option<&str>,
    part: &str,
) -> Result<ModelSource, OpError> {
    ModelSource::resolve(model, path, preset, part)
        .ok_or_else(|| OpError::msg(format!("no weights for the {part}: set `model`, `path` or `preset`")))
}

/// The candle device of the worker this instance runs on (`cpu` when it owns none).
pub fn device(ctx: &OpContext) -> Result<Device, OpError> {
    let name = ctx.worker().device.as_deref().unwrap_or("cpu");
    match name.strip_prefix("cuda:") {
        None => Ok(Device::Cpu),
        Some(n) => {
            let ordinal: usize = n.parse().map_err(|_| OpError::msg(format!("bad device `{name}`")))?;
            Device::new_cuda(ordinal).map_err(|e| OpError::msg(format!("device `{name}`: {e}")))
        }
    }
}

/// The dtype an encoder computes in on `device`: bf16 on GPUs unless `precision` says f32, and
/// always f32 on the CPU (whose fused ops are f32).
///
/// ```
/// use candle_core::{DType, Device};
/// use latentflow_operators::model_keys::encoder_dtype;
/// use latentflow_operators::training::Precision;
/// assert_eq!(encoder_dtype(None, &Device::Cpu), DType::F32);
/// assert_eq!(encoder_dtype(Some(Precision::Bf16), &Device::Cpu), DType::F32);
/// ```
pub fn encoder_dtype(precision: Option<crate::training::Precision>, device: &Device) -> candle_core::DType {
    use crate::training::Precision;
    match (precision, device.is_cuda()) {
        (Some(Precision::F32), _) | (_, false) => candle_core::DType::F32,
        (Some(Precision::Bf16) | None, true) => candle_core::DType::BF16,
    }
}

/// What the encoders' `precision` key says, for their key lists.
pub const PRECISION_KEY: (&str, &str) = (
    "precision",
    "\"bf16\" (the default on GPUs: bf16 weights and tensor cores) or \"f32\"; the CPU always computes in f32",
);

/// Why `job.devices` entry `name` cannot be used by this build on this machine, if it cannot:
/// a `cuda:N` device needs a build with the `cuda` feature, an NVIDIA driver and GPU `N`.
///
/// ```
/// use latentflow_operators::model_keys::device_problem;
/// assert!(device_problem("cpu").is_none());
/// # #[cfg(not(feature = "cuda"))]
/// assert!(device_problem("cuda:0").unwrap().contains("built without CUDA"));
/// ```
pub fn device_problem(name: &str) -> Option<String> {
    let ordinal: usize = name.strip_prefix("cuda:")?.parse().ok()?;
    #[cfg(feature = "cuda")]
    {
        match latentflow_gpu_kernels::kernel::gpu_count() {
            Ok(0) | Err(_) => Some("no NVIDIA GPU (or no driver) on this machine; use \"cpu\"".into()),
            Ok(n) if ordinal >= n => {
                Some(format!("this machine has {n} GPU{}: cuda:0 to cuda:{}", if n == 1 { "" } else { "s" }, n - 1))
            }
            Ok(_) => None,
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Some(
            "this latentflow was built without CUDA; build it with `cargo build --release --features cuda` (see the \
             README's GPU section) or use \"cpu\""
                .into(),
        )
    }
}

/// A model (or tensor) error as an operator error, kept typed: callers can downcast it.
pub fn op_error(e: impl Into<crate::models::ModelError>) -> OpError {
    OpError::wrap(e.into())
}

/// A tensor column as a `[rows, ...shape]` tensor on `device` (u8 and i64 keep their type).
///
/// The column is the caller's (stages remove it from their batch), so on the CPU its values
/// become the tensor's storage without a copy; on a GPU they are copied to the device once.
///
/// ```
/// use candle_core::Device;
/// use latentflow_engine::Column;
/// use latentflow_operators::model_keys::column_tensor;
///
/// let pixels = Column::U8Tensor { shape: vec![3, 2, 2], data: vec![7; 24] };
/// let tensor = column_tensor(pixels, "pixels", &Device::Cpu).unwrap();
/// assert_eq!(tensor.dims(), [2, 3, 2, 2]);
/// ```
pub fn column_tensor(column: Column, name: &str, device: &Device) -> Result<Tensor, OpError> {
    let rows = column.len();
    let tensor = match column {
        Column::U8Tensor { shape, data } => Tensor::from_vec(data, dims(rows, &shape), device),
        Column::F32Tensor { shape, data } => Tensor::from_vec(data, dims(rows, &shape), device),
        Column::I64Tensor { shape, data } => Tensor::from_vec(data, dims(rows, &shape), device),
        Column::F32Device { shape, values } => match crate::device_column::rows_tensor(&values) {
            Some(tensor) => tensor.reshape(dims(rows, &shape)).and_then(|t| t.to_device(device)),
            None => {
                let data = values.to_host().map_err(|e| OpError::msg(format!("`{name}`: {e}")))?;
                Tensor::from_vec(data, dims(rows, &shape), device)
            }
        },
        other => return Err(OpError::msg(format!("`{name}` is a {} column, not a tensor", other.column_type()))),
    };
    tensor.map_err(op_error)
}

fn dims(rows: usize, shape: &[usize]) -> Vec<usize> {
    std::iter::once(rows).chain(shape.iter().copied()).collect()
}

/// Runs `forward` on `rows` rows in chunks of at most `batch_size` (`forward(start, n)`) and
/// returns the outputs as one f32 column kept on their device ([`device_column`]), or
/// `empty_shape` with no rows when there are none.
pub fn in_chunks(
    rows: usize,
    batch_size: usize,
    empty_shape: Vec<usize>,
    mut forward: impl FnMut(usize, usize) -> Result<Tensor, OpError>,
) -> Result<Column, OpError> {
    let mut chunks = Vec::new();
    for start in (0..rows).step_by(batch_size.max(1)) {
        chunks.push(forward(start, batch_size.min(rows - start))?);
    }
    if chunks.is_empty() {
        return Ok(Column::F32Tensor { shape: empty_shape, data: Vec::new() });
    }
    device_column(&Tensor::cat(&chunks, 0).map_err(op_error)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_values_are_all_named_with_their_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let unet = dir.path().join("unet");
        std::fs::create_dir(&unet).unwrap();
        let mut config = serde_json::to_value(crate::models::config::UNetConfig::preset("tiny").unwrap()).unwrap();
        config["norm_num_groups"] = 0.into();
        config["attention_head_dim"] = serde_json::json!([]);
        config["down_block_types"][0] = "AttnDownBlock2D".into();
        std::fs::write(unet.join("config.json"), config.to_string()).unwrap();
        let errors = check_config(Some(dir.path()), ("path", None), None, "unet");
        let text: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.key, e.message)).collect();
        assert_eq!(errors.len(), 3, "{text:#?}");
        assert!(text.iter().all(|t| t.starts_with("model: ") && t.contains("unet/config.json")), "{text:#?}");
        for field in ["`norm_num_groups` = 0", "`attention_head_dim`", "`down_block_types` = AttnDownBlock2D"] {
            assert!(text.iter().any(|t| t.contains(field)), "{field}: {text:#?}");
        }
        // A part folder not written yet (a later phase's input) passes until it exists.
        assert!(check_config(None, ("path", Some(&dir.path().join("later"))), None, "unet").is_empty());
    }

    #[test]
    fn tensor_columns_round_trip() {
        let column = Column::F32Tensor { shape: vec![2, 2], data: (0..8).map(|v| v as f32).collect() };
        let t = column_tensor(column.clone(), "x", &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [2, 2, 2]);
        let on_device = device_column(&t).unwrap();
        assert_eq!(on_device.clone().into_host().unwrap(), column);
        let back = column_tensor(on_device, "x", &Device::Cpu).unwrap();
        assert_eq!(back.to_vec3::<f32>().unwrap(), t.to_vec3::<f32>().unwrap());
        let err = column_tensor(Column::I64(vec![1]), "key", &Device::Cpu).unwrap_err();
        assert_eq!(err.to_string(), "`key` is a i64 column, not a tensor");
    }
}
