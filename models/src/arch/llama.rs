//! Llama (and every config with Llama's layout): GQA attention + SwiGLU MLP.

use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::blocks::{self, GqaConfig};
use crate::common::{self, DecoderBase};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::*;

#[derive(Debug, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub base: DecoderBase,
    pub intermediate_size: Width,
    pub num_attention_heads: Count,
    pub num_key_value_heads: Option<Count>,
    pub head_dim: Option<Count>,
    #[serde(default)]
    pub attention_bias: bool,
}

/// Options that distinguish Llama-shaped families (Qwen3 adds per-head q/k norms).
pub struct DenseFamily {
    pub qk_norm: bool,
}

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    build_dense(cfg, &DenseFamily { qk_norm: false })
}

pub fn build_dense(cfg: &ConfigFile, family: &DenseFamily) -> Result<ModelSpec, ModelError> {
    let c: LlamaConfig = cfg.parse(None)?;
    let hidden = c.base.hidden_size.get();
    let format = WeightFormat::Plain;
    let attention = attention_config(cfg, &c, family.qk_norm)?;
    let layers = (0..c.base.layers(&cfg.path, "")?)
        .map(|i| {
            let prefix = format!("model.layers.{i}");
            blocks::pre_norm_layer(
                &prefix,
                hidden,
                MixerSpec::Attention(blocks::gqa_attention(&attention, &blocks::path(&prefix, "self_attn"), format)),
                FfnSpec::Dense(blocks::dense_mlp(
                    blocks::elements(hidden, "hidden_size"),
                    c.intermediate_size.get(),
                    "intermediate_size",
                    Activation::SwiGlu,
                    &blocks::path(&prefix, "mlp"),
                    format,
                )),
            )
        })
        .collect();
    standard_model(cfg, &c.base, layers, attention.head_dim)
}

pub fn attention_config(cfg: &ConfigFile, c: &LlamaConfig, qk_norm: bool) -> Result<GqaConfig, ModelError> {
    let hidden = c.base.hidden_size.get();
    let heads = c.num_attention_heads.get();
    let kv_heads = c.num_key_value_heads.map_or(heads, Count::get);
    common::check_gqa(&cfg.path, heads, kv_heads, "")?;
    Ok(GqaConfig {
        hidden: blocks::elements(hidden, "hidden_size"),
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: common::head_dim(&cfg.path, c.head_dim, hidden, heads)?,
        output_gate: false,
        qk_norm,
        bias: c.attention_bias,
        heads_field: "num_attention_heads",
        kv_heads_field: "num_key_value_heads",
    })
}

/// Embedding, final norm and lm_head under the `model.` / `lm_head` names most families use.
/// `rope_dim` is the per-head width the rotary embedding covers before any partial factor.
pub fn standard_model(cfg: &ConfigFile, base: &DecoderBase, layers: Vec<LayerSpec>, rope_dim: u32) -> Result<ModelSpec, ModelError> {
    let outline = common::Outline {
        nested: None,
        embedding: "model.embed_tokens",
        final_norm: "model.norm.weight",
        ignored_weight_prefixes: Vec::new(),
        norm_unit_offset: false,
        rope_dim: Some(rope_dim),
    };
    common::assemble(cfg, base, layers, outline)
}
