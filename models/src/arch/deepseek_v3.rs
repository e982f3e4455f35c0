//! DeepSeek-V3 (and Kimi-K2, same architecture): multi-head latent attention, the first
//! `first_k_dense_replace` layers dense, then MoE with shared experts and a sigmoid router with
//! a score-correction bias. Checkpoints may be fp8 with 128×128 block scales.

use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::blocks::{self, ExpertsConfig, elements, heads, path};
use crate::common::DecoderBase;
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::*;

#[derive(Debug, Deserialize)]
struct DeepseekV3Config {
    #[serde(flatten)]
    base: DecoderBase,
    intermediate_size: Width,
    moe_intermediate_size: Width,
    num_attention_heads: Count,
    q_lora_rank: Option<Width>,
    kv_lora_rank: Width,
    qk_nope_head_dim: Count,
    qk_rope_head_dim: Count,
    v_head_dim: Count,
    n_routed_experts: Count,
    #[serde(default)]
    n_shared_experts: Option<u32>,
    num_experts_per_tok: Count,
    #[serde(default)]
    first_k_dense_replace: u32,
    #[serde(default = "one")]
    moe_layer_freq: Count,
    #[serde(default)]
    quantization_config: Option<QuantizationConfig>,
    #[serde(default)]
    num_nextn_predict_layers: u32,
}

#[derive(Debug, Deserialize)]
struct QuantizationConfig {
    quant_method: String,
    #[serde(default)]
    weight_block_size: Option<Vec<u32>>,
}

fn one() -> Count {
    Count::new(1).expect("1 is a valid count")
}

fn weight_format(cfg: &ConfigFile, q: &Option<QuantizationConfig>) -> Result<WeightFormat, ModelError> {
    let Some(q) = q else { return Ok(WeightFormat::Plain) };
    match (q.quant_method.as_str(), q.weight_block_size.as_deref()) {
        ("fp8", Some([a, b])) if a == b && *a > 0 => Ok(WeightFormat::Fp8Block { block: *a }),
        ("fp8", other) => Err(ModelError::field(
            &cfg.path,
            "quantization_config.weight_block_size",
            format!("expected two equal non-zero block sizes, found {other:?}"),
        )),
        (method, _) => Err(ModelError::field(
            &cfg.path,
            "quantization_config.quant_method",
            format!("unsupported quantisation `{method}` (supported: fp8)"),
        )),
    }
}

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    let c: DeepseekV3Config = cfg.parse(None)?;
    let format = weight_format(cfg, &c.quantization_config)?;
    let shared_experts = crate::dims::at_most(&cfg.path, "n_shared_experts", c.n_shared_experts.unwrap_or(0), 64)?;
    let mtp_layers = crate::dims::at_most(&cfg.path, "num_nextn_predict_layers", c.num_nextn_predict_layers, crate::dims::MAX_COUNT)?;
    let hidden = c.base.hidden_size.get();
    let num_layers = c.base.layers(&cfg.path, "")?;
    let layers = (0..num_layers)
        .map(|i| {
            let prefix = format!("model.layers.{i}");
            let moe = i >= c.first_k_dense_replace && i % c.moe_layer_freq.get() == 0;
            blocks::pre_norm_layer(
                &prefix,
                hidden,
                MixerSpec::Mla(mla(&c, &path(&prefix, "self_attn"), format)),
                if moe { moe_ffn(&c, shared_experts, &path(&prefix, "mlp"), format) } else { dense_ffn(&c, &path(&prefix, "mlp"), format) },
            )
        })
        .collect();
    // Rotary embedding covers the qk_rope_head_dim part of each query/key head.
    let mut spec = crate::arch::llama::standard_model(cfg, &c.base, layers, c.qk_rope_head_dim.get())?;
    let mscale = yarn_softmax_mscale(spec.rope.as_ref());
    for layer in &mut spec.layers {
        if let Some(MixerSpec::Mla(m)) = &mut layer.mixer {
            m.softmax_scale *= mscale * mscale;
        }
    }
    // Multi-token-prediction layers sit after the decoder and are not served.
    let mtp = num_layers;
    spec.ignored_weight_prefixes = (mtp..mtp + mtp_layers).map(|i| format!("model.layers.{i}.")).collect();
    Ok(spec)
}

/// DeepSeek's yarn attention factor `0.1 · mscale_all_dim · ln(factor) + 1` (1 without yarn,
/// without `mscale_all_dim`, or for factor ≤ 1); the softmax scale takes it squared.
fn yarn_softmax_mscale(rope: Option<&lorac_plan::Rope>) -> f64 {
    match rope.map(|r| &r.scaling) {
        Some(lorac_plan::RopeScaling::Yarn { factor, mscale_all_dim, .. }) if *mscale_all_dim != 0.0 && *factor > 1.0 => {
            0.1 * mscale_all_dim * factor.ln() + 1.0
        }
        _ => 1.0,
    }
}

fn mla(c: &DeepseekV3Config, prefix: &str, format: WeightFormat) -> MlaSpec {
    let hidden = elements(c.base.hidden_size.get(), "hidden_size");
    let n_heads = c.num_attention_heads.get();
    let kv_lora = c.kv_lora_rank.get();
    let rope = c.qk_rope_head_dim.get();
    let qk_head = c.qk_nope_head_dim.get() + rope;
    let v_head = c.v_head_dim.get();
    let kv_a = HfModule::single("kv_a_proj_with_mqa", path(prefix, "kv_a_proj_with_mqa"), elements(kv_lora + rope, "kv_lora_rank"));
    let mut params = vec![ParamSpec::replicated(path(prefix, "kv_a_layernorm.weight"), vec![kv_lora])];
    let q_heads = heads(n_heads, qk_head, "num_attention_heads");
    let (qkv_a, q_b) = match c.q_lora_rank {
        Some(q_lora) => {
            let q_lora = q_lora.get();
            params.push(ParamSpec::replicated(path(prefix, "q_a_layernorm.weight"), vec![q_lora]));
            let q_a = HfModule::single("q_a_proj", path(prefix, "q_a_proj"), elements(q_lora, "q_lora_rank"));
            (
                blocks::replicated("fused_qkv_a_proj_with_mqa", hidden.clone(), vec![q_a, kv_a], format),
                blocks::column(
                    "q_b_proj",
                    elements(q_lora, "q_lora_rank"),
                    vec![HfModule::single("q_b_proj", path(prefix, "q_b_proj"), q_heads)],
                    format,
                ),
            )
        }
        None => (
            blocks::replicated("kv_a_proj_with_mqa", hidden.clone(), vec![kv_a], format),
            blocks::column("q_proj", hidden.clone(), vec![HfModule::single("q_proj", path(prefix, "q_proj"), q_heads)], format),
        ),
    };
    let kv_b_heads = heads(n_heads, c.qk_nope_head_dim.get() + v_head, "num_attention_heads");
    MlaSpec {
        num_heads: n_heads,
        q_lora_rank: c.q_lora_rank.map(Width::get),
        kv_lora_rank: kv_lora,
        qk_nope_head_dim: c.qk_nope_head_dim.get(),
        qk_rope_head_dim: rope,
        v_head_dim: v_head,
        softmax_scale: 1.0 / f64::from(qk_head).sqrt(),
        qkv_a,
        q_b,
        kv_b: blocks::column(
            "kv_b_proj",
            elements(kv_lora, "kv_lora_rank"),
            vec![HfModule::single("kv_b_proj", path(prefix, "kv_b_proj"), kv_b_heads)],
            format,
        ),
        o: blocks::row("o_proj", heads(n_heads, v_head, "num_attention_heads"), "o_proj", path(prefix, "o_proj"), hidden, format),
        params,
    }
}

fn dense_ffn(c: &DeepseekV3Config, prefix: &str, format: WeightFormat) -> FfnSpec {
    let hidden = elements(c.base.hidden_size.get(), "hidden_size");
    FfnSpec::Dense(blocks::dense_mlp(hidden, c.intermediate_size.get(), "intermediate_size", Activation::SwiGlu, prefix, format))
}

fn moe_ffn(c: &DeepseekV3Config, shared_experts: u32, prefix: &str, format: WeightFormat) -> FfnSpec {
    let hidden = c.base.hidden_size.get();
    let experts = c.n_routed_experts.get();
    let routed = ExpertsConfig {
        input: elements(hidden, "hidden_size"),
        num_experts: experts,
        experts_field: "n_routed_experts",
        intermediate: c.moe_intermediate_size.get(),
        intermediate_field: "moe_intermediate_size",
        activation: Activation::SwiGlu,
        experts_prefix: &path(prefix, "experts"),
        format,
    };
    // At most 64 shared experts of at most 2^20 each: the product fits in u32.
    let shared = (shared_experts > 0).then(|| {
        let width = shared_experts * c.moe_intermediate_size.get();
        blocks::dense_mlp(
            elements(hidden, "hidden_size"),
            width,
            "moe_intermediate_size",
            Activation::SwiGlu,
            &path(prefix, "shared_experts"),
            format,
        )
    });
    // The router always carries its score-correction bias (used by noaux_tc top-k).
    let params = blocks::sigmoid_router_params(prefix, experts, hidden);
    FfnSpec::Moe(blocks::moe(&routed, c.num_experts_per_tok.get(), shared, None, params))
}
