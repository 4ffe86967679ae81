//! Model configs as diffusers and transformers write them (`config.json`), checked against
//! what this implementation supports, plus the built-in presets.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ConfigProblem, ModelError, Result};

/// A config field that is one number for every block or one per block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value everywhere.
    One(usize),
    /// One value per block.
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i.min(v.len() - 1)],
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            PerBlock::One(_) => None,
            PerBlock::Each(v) => Some(v.len()),
        }
    }

    fn values(&self) -> &[usize] {
        match self {
            PerBlock::One(v) => std::slice::from_ref(v),
            PerBlock::Each(v) => v,
        }
    }
}

/// `unet/config.json` of a `UNet2DConditionModel` (the SD1 and SD2 families).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// `[cos, sin]` order of the timestep embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f32,
    /// Down blocks: `CrossAttnDownBlock2D` or `DownBlock2D`.
    pub down_block_types: Vec<String>,
    /// Up blocks: `CrossAttnUpBlock2D` or `UpBlock2D`.
    pub up_block_types: Vec<String>,
    /// Mid block: `UNetMidBlock2DCrossAttn`.
    #[serde(default = "mid_block")]
    pub mid_block_type: Option<String>,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Padding of the downsampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Scale of the mid block's residuals.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Activation: `silu`.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Epsilon of the ResNet GroupNorms.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
    /// Transformer layers per attention block.
    #[serde(default = "per_block_one")]
    pub transformer_layers_per_block: PerBlock,
    /// The NUMBER of attention heads per block (a historical naming quirk of diffusers), unless
    /// `num_attention_heads` is set.
    #[serde(default = "per_block_eight")]
    pub attention_head_dim: PerBlock,
    /// Heads per block, when set.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Linear (SD2) rather than 1x1-conv (SD1) projections into and out of the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Nominal latent size (informational).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Must be false.
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    /// Must be false.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Must be null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Must be `default`.
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    /// Must be `positional`.
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Must be 3.
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Must be 3.
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn norm_eps() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn per_block_one() -> PerBlock {
    PerBlock::One(1)
}
fn per_block_eight() -> PerBlock {
    PerBlock::One(8)
}

/// Every problem of one config file, gathered so that all are reported at once.
struct Problems<'a> {
    origin: &'a Path,
    found: Vec<ConfigProblem>,
}

impl<'a> Problems<'a> {
    fn new(origin: &'a Path) -> Self {
        Problems { origin, found: Vec::new() }
    }

    /// Records a problem with `field` unless `ok`.
    fn unless(&mut self, ok: bool, field: &str, value: impl std::fmt::Display, supported: &str) {
        if !ok {
            self.found.push(ConfigProblem {
                field: field.into(),
                value: value.to_string(),
                supported: supported.into(),
            });
        }
    }

    /// Records each of `fields` that is zero.
    fn positive(&mut self, fields: &[(&str, usize)]) {
        for &(field, value) in fields {
            self.unless(value > 0, field, value, "a positive number");
        }
    }

    fn finish(self) -> Result<()> {
        if self.found.is_empty() {
            return Ok(());
        }
        Err(ModelError::Config { origin: self.origin.to_path_buf(), problems: self.found })
    }
}

impl UNetConfig {
    /// Heads of the attention blocks at level `i`.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// Checks every value this implementation relies on (what it divides by, indexes with or
    /// matches on), reporting every problem at once.
    pub fn check(&self, origin: &Path) -> Result<()> {
        let mut p = Problems::new(origin);
        let n = self.block_out_channels.len();
        p.unless(n > 0, "block_out_channels", "[]", "at least one level");
        p.unless(
            self.block_out_channels.iter().all(|&c| c > 0),
            "block_out_channels",
            format!("{:?}", self.block_out_channels),
            "positive channel counts",
        );
        for (field, types) in [("down_block_types", &self.down_block_types), ("up_block_types", &self.up_block_types)] {
            p.unless(types.len() == n, field, format!("{types:?}"), "one block per entry of block_out_channels");
        }
        for t in &self.down_block_types {
            p.unless(
                t == "CrossAttnDownBlock2D" || t == "DownBlock2D",
                "down_block_types",
                t,
                "CrossAttnDownBlock2D, DownBlock2D",
            );
        }
        for t in &self.up_block_types {
            p.unless(
                t == "CrossAttnUpBlock2D" || t == "UpBlock2D",
                "up_block_types",
                t,
                "CrossAttnUpBlock2D, UpBlock2D",
            );
        }
        p.unless(
            self.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            format!("{:?}", self.mid_block_type),
            "UNetMidBlock2DCrossAttn",
        );
        p.unless(self.act_fn == "silu", "act_fn", &self.act_fn, "silu");
        p.unless(
            matches!(self.only_cross_attention, serde_json::Value::Null | serde_json::Value::Bool(false)),
            "only_cross_attention",
            &self.only_cross_attention,
            "false",
        );
        p.unless(!self.dual_cross_attention, "dual_cross_attention", "true", "false");
        p.unless(self.class_embed_type.is_none(), "class_embed_type", format!("{:?}", self.class_embed_type), "null");
        p.unless(
            self.addition_embed_type.is_none(),
            "addition_embed_type",
            format!("{:?}", self.addition_embed_type),
            "null",
        );
        p.unless(self.encoder_hid_dim.is_none(), "encoder_hid_dim", format!("{:?}", self.encoder_hid_dim), "null");
        p.unless(
            self.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "default",
        );
        p.unless(
            self.time_embedding_type == "positional",
            "time_embedding_type",
            &self.time_embedding_type,
            "positional",
        );
        p.unless(self.conv_in_kernel == 3, "conv_in_kernel", self.conv_in_kernel, "3");
        p.unless(self.conv_out_kernel == 3, "conv_out_kernel", self.conv_out_kernel, "3");
        p.positive(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("cross_attention_dim", self.cross_attention_dim),
            ("norm_num_groups", self.norm_num_groups),
        ]);
        p.unless(self.norm_eps > 0.0, "norm_eps", self.norm_eps, "a positive number");
        let mut per_block_ok = true;
        for (field, value) in [
            ("attention_head_dim", Some(&self.attention_head_dim)),
            ("num_attention_heads", self.num_attention_heads.as_ref()),
            ("transformer_layers_per_block", Some(&self.transformer_layers_per_block)),
        ] {
            let Some(value) = value else { continue };
            let ok = value.len().is_none_or(|len| len == n) && value.values().iter().all(|&v| v > 0);
            per_block_ok &= ok;
            p.unless(ok, field, format!("{value:?}"), "one positive value, or one per entry of block_out_channels");
        }
        if per_block_ok && self.norm_num_groups > 0 {
            for (i, &c) in self.block_out_channels.iter().enumerate() {
                p.unless(
                    c % self.norm_num_groups == 0,
                    "norm_num_groups",
                    self.norm_num_groups,
                    &format!("a divisor of every entry of block_out_channels ({c} at level {i})"),
                );
                p.unless(
                    c % self.heads(i) == 0,
                    if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" },
                    self.heads(i),
                    &format!("heads that divide the level's channels ({c} at level {i})"),
                );
            }
        }
        p.finish()
    }

    /// The built-in sizes: `tiny` (like the test fixtures), `sd2-base` and `sd1`.
    pub fn preset(name: &str) -> Option<UNetConfig> {
        let mut config = UNetConfig::sd2_base();
        match name {
            "sd2-base" => {}
            "sd1" => {
                config.attention_head_dim = PerBlock::One(8);
                config.cross_attention_dim = 768;
                config.use_linear_projection = false;
            }
            "tiny" => {
                config.block_out_channels = vec![32, 64];
                config.attention_head_dim = PerBlock::Each(vec![2, 4]);
                config.cross_attention_dim = 32;
                config.layers_per_block = 1;
                config.norm_num_groups = 16;
                config.down_block_types = strings(&["CrossAttnDownBlock2D", "DownBlock2D"]);
                config.up_block_types = strings(&["UpBlock2D", "CrossAttnUpBlock2D"]);
                config.sample_size = Some(8);
            }
            _ => return None,
        }
        Some(config)
    }

    /// Stable Diffusion 2 base (512 px, 64x64 latents, OpenCLIP ViT-H text features).
    fn sd2_base() -> UNetConfig {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            mid_block_type: mid_block(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: silu(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1024,
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            num_attention_heads: None,
            use_linear_projection: true,
            sample_size: Some(64),
            only_cross_attention: serde_json::Value::Bool(false),
            dual_cross_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            encoder_hid_dim: None,
            resnet_time_scale_shift: default_str(),
            time_embedding_type: positional(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (decoder levels have one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this (0.18215 for SD).
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// Activation: `silu`.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Whether `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Encoder blocks: `DownEncoderBlock2D` (checked when given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down_block_types: Vec<String>,
    /// Decoder blocks: `UpDecoderBlock2D` (checked when given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub up_block_types: Vec<String>,
}

fn sd_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Checks every value this implementation relies on.
    pub fn check(&self, origin: &Path) -> Result<()> {
        let mut p = Problems::new(origin);
        p.unless(self.act_fn == "silu", "act_fn", &self.act_fn, "silu");
        let channels = &self.block_out_channels;
        p.unless(
            !channels.is_empty() && channels.iter().all(|&c| c > 0),
            "block_out_channels",
            format!("{channels:?}"),
            "at least one level, positive channel counts",
        );
        p.positive(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ]);
        for (field, types, supported) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            p.unless(
                types.is_empty() || types.len() == channels.len(),
                field,
                format!("{types:?}"),
                "one block per entry of block_out_channels",
            );
            for t in types {
                p.unless(t == supported, field, t, supported);
            }
        }
        p.unless(
            self.scaling_factor.is_finite() && self.scaling_factor > 0.0,
            "scaling_factor",
            self.scaling_factor,
            "a positive number",
        );
        if self.norm_num_groups > 0 {
            for (i, &c) in channels.iter().enumerate() {
                p.unless(
                    c % self.norm_num_groups == 0,
                    "norm_num_groups",
                    self.norm_num_groups,
                    &format!("a divisor of every entry of block_out_channels ({c} at level {i})"),
                );
            }
        }
        p.finish()
    }

    /// The built-in sizes: `tiny` (like the test fixtures) and `sd2-base` / `sd1` (the SD VAE).
    pub fn preset(name: &str) -> Option<VaeConfig> {
        let (channels, layers, groups) = match name {
            "tiny" => (vec![32, 32, 64, 64], 1, 16),
            "sd2-base" | "sd1" => (vec![128, 256, 512, 512], 2, 32),
            _ => return None,
        };
        Some(VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: channels,
            layers_per_block: layers,
            latent_channels: 4,
            norm_num_groups: groups,
            scaling_factor: sd_scaling(),
            act_fn: silu(),
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            down_block_types: Vec::new(),
            up_block_types: Vec::new(),
        })
    }
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    /// `gelu` (exact) or `quick_gelu`.
    #[serde(default = "quick_gelu_name")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "norm_eps")]
    pub layer_norm_eps: f64,
}

fn seventy_seven() -> usize {
    77
}
fn quick_gelu_name() -> String {
    "quick_gelu".into()
}

impl ClipTextConfig {
    /// Checks every value this implementation relies on.
    pub fn check(&self, origin: &Path) -> Result<()> {
        let mut p = Problems::new(origin);
        p.unless(
            self.hidden_act == "gelu" || self.hidden_act == "quick_gelu",
            "hidden_act",
            &self.hidden_act,
            "gelu, quick_gelu",
        );
        p.positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ]);
        // Token ids index the vocabulary and positions the position table: 77 tokens a caption.
        p.unless(
            self.max_position_embeddings >= 77,
            "max_position_embeddings",
            self.max_position_embeddings,
            "at least 77",
        );
        p.unless(
            self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            &format!("a divisor of hidden_size ({})", self.hidden_size),
        );
        p.unless(self.layer_norm_eps > 0.0, "layer_norm_eps", self.layer_norm_eps, "a positive number");
        p.finish()
    }

    /// The built-in sizes: `tiny` (like the test fixtures), `sd2-base` (OpenCLIP ViT-H/14 text
    /// tower as SD2 uses it: 23 layers, 1024 wide) and `sd1` (CLIP ViT-L/14: 12 layers, 768).
    pub fn preset(name: &str) -> Option<ClipTextConfig> {
        let (hidden, mlp, layers, heads, act) = match name {
            "tiny" => (32, 64, 2, 4, "gelu"),
            "sd2-base" => (1024, 4096, 23, 16, "gelu"),
            "sd1" => (768, 3072, 12, 12, "quick_gelu"),
            _ => return None,
        };
        Some(ClipTextConfig {
            vocab_size: 49408,
            hidden_size: hidden,
            intermediate_size: mlp,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            max_position_embeddings: 77,
            hidden_act: act.into(),
            layer_norm_eps: 1e-5,
        })
    }
}

/// Reads and parses `dir/config.json`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<(T, PathBuf)> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
    let config = serde_json::from_str(&text)
        .map_err(|e| ModelError::File { path: path.clone(), message: format!("not a valid config: {e}") })?;
    Ok((config, path))
}

/// Whether `dir/config.json` names `class` as its `_class_name` (latentflow's fixed demo parts).
pub fn names_class(dir: &Path, class: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|config| config["_class_name"].as_str() == Some(class))
}

/// The preset names every model accepts.
pub const PRESETS: [&str; 3] = ["tiny", "sd2-base", "sd1"];

/// The presets a text encoder accepts: every model's, and the fixed demo `words`.
pub const TEXT_PRESETS: [&str; 4] = ["tiny", "sd2-base", "sd1", super::caption_words::WORDS_PRESET];

/// The presets an image autoencoder accepts: every model's, and the fixed demo `pixels`.
pub const VAE_PRESETS: [&str; 4] = ["tiny", "sd2-base", "sd1", super::pixel_patches::PIXELS_PRESET];
