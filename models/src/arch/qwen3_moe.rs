//! Qwen3-MoE: Qwen3 attention; MoE FFN on every `decoder_sparse_step`-th layer except
//! `mlp_only_layers`, experts stored one tensor each, no shared expert.

use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::arch::llama::{self, LlamaConfig};
use crate::blocks::{self, ExpertsConfig};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::*;

#[derive(Debug, Deserialize)]
struct Qwen3MoeConfig {
    #[serde(flatten)]
    dense: LlamaConfig,
    /// transformers 5 writes `num_local_experts`.
    #[serde(alias = "num_local_experts")]
    num_experts: Count,
    num_experts_per_tok: Count,
    moe_intermediate_size: Width,
    #[serde(default = "one")]
    decoder_sparse_step: Count,
    #[serde(default)]
    mlp_only_layers: Vec<u32>,
}

fn one() -> Count {
    Count::new(1).expect("1 is a valid count")
}

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    let c: Qwen3MoeConfig = cfg.parse(None)?;
    let hidden = c.dense.base.hidden_size.get();
    let format = WeightFormat::Plain;
    let attention = llama::attention_config(cfg, &c.dense, true)?;
    let layers = (0..c.dense.base.layers(&cfg.path, "")?)
        .map(|i| {
            let prefix = format!("model.layers.{i}");
            let mlp = blocks::path(&prefix, "mlp");
            let sparse = !c.mlp_only_layers.contains(&i) && (i + 1) % c.decoder_sparse_step.get() == 0;
            let ffn = if sparse {
                let routed = ExpertsConfig {
                    input: blocks::elements(hidden, "hidden_size"),
                    num_experts: c.num_experts.get(),
                    experts_field: "num_experts",
                    intermediate: c.moe_intermediate_size.get(),
                    intermediate_field: "moe_intermediate_size",
                    activation: Activation::SwiGlu,
                    experts_prefix: &blocks::path(&mlp, "experts"),
                    format,
                };
                FfnSpec::Moe(blocks::moe(
                    &routed,
                    c.num_experts_per_tok.get(),
                    None,
                    None,
                    vec![ParamSpec::replicated(blocks::path(&mlp, "gate.weight"), vec![c.num_experts.get(), hidden])],
                ))
            } else {
                let h = blocks::elements(hidden, "hidden_size");
                FfnSpec::Dense(blocks::dense_mlp(h, c.dense.intermediate_size.get(), "intermediate_size", Activation::SwiGlu, &mlp, format))
            };
            blocks::pre_norm_layer(
                &prefix,
                hidden,
                MixerSpec::Attention(blocks::gqa_attention(&attention, &blocks::path(&prefix, "self_attn"), format)),
                ffn,
            )
        })
        .collect();
    llama::standard_model(cfg, &c.dense.base, layers, attention.head_dim)
}
