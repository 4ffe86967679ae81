//! Loading model folders: f16 / bf16 weights, old attention names, and the errors a user sees
//! for a missing folder, a missing or mis-shaped tensor and an unsupported config value.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use latentflow_operators::models::load::{load_unet, load_vae, ModelSource};
use latentflow_tests::{fixture, golden_tensors, max_abs_diff};

/// A copy of a fixture part folder with its tensors passed through `edit`.
fn edited_copy(part: &str, dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> ModelSource {
    let source = fixture(&format!("tiny-sd/{part}"));
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(source.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    ModelSource::Folder(dir.to_path_buf())
}

fn unet_error(source: &ModelSource) -> String {
    load_unet(source, &Device::Cpu, false, 0).err().expect("loading must fail").to_string()
}

#[test]
fn half_precision_weights_load_as_f32_masters() {
    let g = golden_tensors();
    let t: Vec<f32> = g["timesteps"].to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    for (dtype, atol) in [(DType::F16, 5e-3), (DType::BF16, 5e-2)] {
        let dir = tempfile::tempdir().unwrap();
        let source = edited_copy("unet", dir.path(), |tensors| {
            for t in tensors.values_mut() {
                *t = t.to_dtype(dtype).unwrap();
            }
        });
        let (unet, weights) = load_unet(&source, &Device::Cpu, true, 0).unwrap();
        assert!(weights.vars().values().all(|v| v.dtype() == DType::F32));
        let out = unet.forward(&g["noisy"], &t, &g["text_embeds"]).unwrap();
        let diff = max_abs_diff(&out, &g["unet_out"]);
        println!("{dtype:?} weights: unet_out max abs diff {diff:.2e}");
        assert!(diff > 0.0 && diff < atol, "{dtype:?}: {diff}");
    }
}

#[test]
fn old_vae_attention_names_are_accepted() {
    let g = golden_tensors();
    let dir = tempfile::tempdir().unwrap();
    let source = edited_copy("vae", dir.path(), |tensors| {
        let renamed: HashMap<String, Tensor> = tensors
            .drain()
            .map(|(name, t)| {
                let old = name
                    .replace(".to_q.", ".query.")
                    .replace(".to_k.", ".key.")
                    .replace(".to_v.", ".value.")
                    .replace(".to_out.0.", ".proj_attn.");
                // Old checkpoints store the projections as 1x1 convolutions.
                let t = if old != name && t.rank() == 2 { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t };
                (old, t)
            })
            .collect();
        assert!(renamed.keys().any(|k| k.contains(".query.")));
        *tensors = renamed;
    });
    let vae = load_vae(&source, &Device::Cpu, 0).unwrap();
    let mean = vae.encode(&g["pixels"]).unwrap().mean;
    assert!(max_abs_diff(&mean, &g["vae_mean"]) <= 2e-5);
}

#[test]
fn loading_errors_name_the_file_the_tensor_and_both_shapes() {
    let err = unet_error(&ModelSource::Folder("no/such/unet".into()));
    assert!(err.contains("no/such/unet"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let source = edited_copy("unet", dir.path(), |tensors| {
        tensors.remove("conv_out.bias");
    });
    let err = unet_error(&source);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("missing tensor `conv_out.bias`"),
        "{err}"
    );
    assert!(err.contains("[4]"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let source = edited_copy("unet", dir.path(), |tensors| {
        tensors.insert("conv_in.weight".into(), Tensor::zeros((32, 4, 5, 5), DType::F32, &Device::Cpu).unwrap());
    });
    let err = unet_error(&source);
    assert!(err.contains("`conv_in.weight` has shape [32, 4, 5, 5], the config needs [32, 4, 3, 3]"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let source = edited_copy("unet", dir.path(), |_| {});
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let config = config.replace("\"CrossAttnUpBlock2D\"", "\"AttnUpBlock2D\"");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = unet_error(&source);
    assert!(err.contains("config.json") && err.contains("`up_block_types` = AttnUpBlock2D is not supported"), "{err}");
}
