//! `CLIPTextModel` (transformers): token + position embeddings, pre-LayerNorm transformer
//! layers with causal self-attention, final LayerNorm.

use candle_core::{Device, Tensor};

use super::config::ClipTextConfig;
use super::error::Result;
use super::nn::{causal_attention, causal_mask, gelu, quick_gelu, LayerNorm, Linear};
use super::weights::{Init, Weights};

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The text encoder.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model from `weights` (`text_model.*` names).
    pub fn new(config: &ClipTextConfig, weights: &Weights) -> Result<ClipTextModel> {
        let c = config;
        // transformers 4 writes `text_model.*` names, transformers 5 drops the prefix.
        let prefixed = weights.is_random() || weights.contains("text_model.embeddings.token_embedding.weight");
        let root = weights.at(if prefixed { "text_model" } else { "" });
        let emb = root.at("embeddings");
        let token_embedding =
            emb.at("token_embedding").get("weight", &[c.vocab_size, c.hidden_size], Init::Normal(0.02))?;
        let position_embedding = emb.at("position_embedding").get(
            "weight",
            &[c.max_position_embeddings, c.hidden_size],
            Init::Normal(0.01),
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = root.at("encoder.layers").at(i);
                let h = c.hidden_size;
                Ok(Layer {
                    norm1: LayerNorm::new(&l.at("layer_norm1"), h, c.layer_norm_eps)?,
                    q: Linear::new(&l.at("self_attn.q_proj"), h, h, true)?,
                    k: Linear::new(&l.at("self_attn.k_proj"), h, h, true)?,
                    v: Linear::new(&l.at("self_attn.v_proj"), h, h, true)?,
                    out: Linear::new(&l.at("self_attn.out_proj"), h, h, true)?,
                    norm2: LayerNorm::new(&l.at("layer_norm2"), h, c.layer_norm_eps)?,
                    fc1: Linear::new(&l.at("mlp.fc1"), h, c.intermediate_size, true)?,
                    fc2: Linear::new(&l.at("mlp.fc2"), c.intermediate_size, h, true)?,
                })
            })
            .collect::<Result<_>>()?;
        let final_norm = LayerNorm::new(&root.at("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?;
        Ok(ClipTextModel {
            config: c.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            device: weights.device().clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Embeddings for `ids` [B, N]: the last hidden state after the final LayerNorm, or with
    /// `penultimate`, the second-to-last layer's output with the final LayerNorm applied
    /// (CLIP skip 1). Returns every hidden state too when `all` (for debugging).
    pub fn forward(&self, ids: &Tensor, penultimate: bool) -> Result<Tensor> {
        Ok(self.hidden_states(ids, penultimate)?.0)
    }

    /// As [`ClipTextModel::forward`], plus the hidden states before each layer and after the last.
    pub fn hidden_states(&self, ids: &Tensor, penultimate: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, n) = ids.dims2()?;
        let tokens = self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, n, ()))?;
        let positions = self.position_embedding.narrow(0, 0, n)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(n, &self.device)?;
        let heads = self.config.num_attention_heads;
        let mut states = vec![x.clone()];
        for layer in &self.layers {
            let h = layer.norm1.forward(&x)?;
            let (q, k, v) = (layer.q.forward(&h)?, layer.k.forward(&h)?, layer.v.forward(&h)?);
            let a = causal_attention(&q, &k, &v, heads, &mask)?;
            x = (x + layer.out.forward(&a)?)?;
            let h = layer.fc1.forward(&layer.norm2.forward(&x)?)?;
            let h = if self.config.hidden_act == "gelu" { gelu(&h)? } else { quick_gelu(&h)? };
            x = (x + layer.fc2.forward(&h)?)?;
            states.push(x.clone());
        }
        let chosen = if penultimate && states.len() >= 2 { &states[states.len() - 2] } else { &x };
        Ok((self.final_norm.forward(chosen)?, states))
    }
}
