//! Builders for the blocks architectures share: frontends describe *which* blocks a layer has
//! and under which checkpoint names; these functions know how each block's linears shard.

use crate::spec::*;

/// `prefix.name`
pub fn path(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
}

/// Attention heads: split across ranks, never replicated.
pub fn heads(count: u32, head_dim: u32, field: &'static str) -> ShardUnit {
    ShardUnit::Heads { count, head_dim, field, replicate_when_short: false }
}

/// KV heads (and Mamba groups): when tp exceeds them, each rank holds one copy.
pub fn replicable_heads(count: u32, head_dim: u32, field: &'static str) -> ShardUnit {
    ShardUnit::Heads { count, head_dim, field, replicate_when_short: true }
}

pub fn elements(width: u32, field: &'static str) -> ShardUnit {
    ShardUnit::Elements { width, field }
}

fn linear(
    fused_name: &'static str,
    kind: LinearKind,
    parallel: ParallelStyle,
    in_shard: ShardUnit,
    modules: Vec<HfModule>,
    format: WeightFormat,
) -> LinearSpec {
    LinearSpec { fused_name, kind, in_features: in_shard.full_width(), in_shard, modules, parallel, experts: None, bias: false, format }
}

/// Output split across ranks, slice by slice.
pub fn column(fused_name: &'static str, input: ShardUnit, modules: Vec<HfModule>, format: WeightFormat) -> LinearSpec {
    linear(fused_name, LinearKind::Dense, ParallelStyle::Column, input, modules, format)
}

/// Input split across ranks by `input`; the output (one slice, `out`) is all-reduced.
pub fn row(
    fused_name: &'static str,
    input: ShardUnit,
    module: &str,
    module_path: String,
    out: ShardUnit,
    format: WeightFormat,
) -> LinearSpec {
    let modules = vec![HfModule::single(module, module_path, out)];
    linear(fused_name, LinearKind::Dense, ParallelStyle::Row, input, modules, format)
}

/// The whole layer on every rank.
pub fn replicated(fused_name: &'static str, input: ShardUnit, modules: Vec<HfModule>, format: WeightFormat) -> LinearSpec {
    linear(fused_name, LinearKind::Dense, ParallelStyle::Replicated, input, modules, format)
}

pub fn with_bias(mut spec: LinearSpec, bias: bool) -> LinearSpec {
    spec.bias = bias;
    spec
}

/// Grouped-query attention, as Llama, Qwen3, Qwen3-Next/3.5 full-attention layers and
/// Nemotron-H attention layers have it.
pub struct GqaConfig {
    pub hidden: ShardUnit,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// q_proj emits `[q, gate]` per head (Qwen3-Next / Qwen3.5 `attn_output_gate`).
    pub output_gate: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    pub bias: bool,
    pub heads_field: &'static str,
    pub kv_heads_field: &'static str,
}

pub fn gqa_attention(c: &GqaConfig, prefix: &str, format: WeightFormat) -> AttentionSpec {
    let q_head_width = if c.output_gate { 2 * c.head_dim } else { c.head_dim };
    let q = heads(c.num_heads, q_head_width, c.heads_field);
    let kv = replicable_heads(c.num_kv_heads, c.head_dim, c.kv_heads_field);
    let qkv = with_bias(
        column(
            "qkv_proj",
            c.hidden.clone(),
            vec![
                HfModule::single("q_proj", path(prefix, "q_proj"), q),
                HfModule::single("k_proj", path(prefix, "k_proj"), kv.clone()),
                HfModule::single("v_proj", path(prefix, "v_proj"), kv),
            ],
            format,
        ),
        c.bias,
    );
    let o = row("o_proj", heads(c.num_heads, c.head_dim, c.heads_field), "o_proj", path(prefix, "o_proj"), c.hidden.clone(), format);
    let params = if c.qk_norm {
        vec![
            ParamSpec::replicated(path(prefix, "q_norm.weight"), vec![c.head_dim]),
            ParamSpec::replicated(path(prefix, "k_norm.weight"), vec![c.head_dim]),
        ]
    } else {
        Vec::new()
    };
    AttentionSpec {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        output_gate: c.output_gate,
        qk_norm: c.qk_norm,
        softmax_scale: 1.0 / f64::from(c.head_dim).sqrt(),
        qkv,
        o,
        params,
    }
}

/// Names of a dense MLP's modules: gated MLPs use gate/up/down, non-gated ones up/down.
pub struct MlpNames {
    pub fused_up: &'static str,
    pub down: &'static str,
}

pub const DENSE_MLP: MlpNames = MlpNames { fused_up: "gate_up_proj", down: "down_proj" };
pub const DENSE_MLP_NON_GATED: MlpNames = MlpNames { fused_up: "up_proj", down: "down_proj" };

/// SwiGLU (`gate_proj`, `up_proj`, `down_proj`) or relu² (`up_proj`, `down_proj`) MLP.
pub fn dense_mlp(
    hidden: ShardUnit,
    intermediate: u32,
    intermediate_field: &'static str,
    activation: Activation,
    prefix: &str,
    format: WeightFormat,
) -> DenseMlpSpec {
    let names = if activation.is_gated() { DENSE_MLP } else { DENSE_MLP_NON_GATED };
    let inter = elements(intermediate, intermediate_field);
    let mut modules = Vec::new();
    if activation.is_gated() {
        modules.push(HfModule::single("gate_proj", path(prefix, "gate_proj"), inter.clone()));
    }
    modules.push(HfModule::single("up_proj", path(prefix, "up_proj"), inter.clone()));
    DenseMlpSpec {
        intermediate,
        activation,
        up: column(names.fused_up, hidden.clone(), modules, format),
        down: row(names.down, inter, "down_proj", path(prefix, "down_proj"), hidden, format),
    }
}

/// Routed experts: `{experts_prefix}.{expert}.gate_proj` etc., stored one tensor per expert.
/// `input` is the width tokens enter the experts with (hidden, or the latent size).
pub struct ExpertsConfig<'a> {
    pub input: ShardUnit,
    pub num_experts: u32,
    pub experts_field: &'static str,
    pub intermediate: u32,
    pub intermediate_field: &'static str,
    pub activation: Activation,
    pub experts_prefix: &'a str,
    pub format: WeightFormat,
}

pub fn routed_experts(c: &ExpertsConfig) -> (LinearSpec, LinearSpec) {
    let expert = |name: &str| format!("{}.{{expert}}.{name}", c.experts_prefix);
    let inter = elements(c.intermediate, c.intermediate_field);
    let mut modules = Vec::new();
    if c.activation.is_gated() {
        modules.push(HfModule::single("gate_proj", expert("gate_proj"), inter.clone()));
    }
    modules.push(HfModule::single("up_proj", expert("up_proj"), inter.clone()));
    let experts = Some(ExpertSpec { count: c.num_experts, field: c.experts_field });
    let up = LinearSpec { kind: LinearKind::RoutedExperts, experts, ..column("gate_up_proj_moe", c.input.clone(), modules, c.format) };
    let down = LinearSpec {
        kind: LinearKind::RoutedExperts,
        experts,
        ..row("down_proj_moe", inter, "down_proj", expert("down_proj"), c.input.clone(), c.format)
    };
    (up, down)
}

/// An MoE block: routed experts plus the optional shared expert, latent projections and the
/// router's parameters.
pub fn moe(
    experts: &ExpertsConfig,
    top_k: u32,
    shared: Option<DenseMlpSpec>,
    latent: Option<LatentSpec>,
    params: Vec<ParamSpec>,
) -> MoeSpec {
    let (experts_up, experts_down) = routed_experts(experts);
    MoeSpec {
        num_experts: experts.num_experts,
        top_k,
        intermediate: experts.intermediate,
        activation: experts.activation,
        experts_up,
        experts_down,
        shared,
        latent,
        params,
    }
}

/// A sigmoid router's parameters: its weight and the score-correction bias (kept in f32)
/// that DeepSeek-V3 style `noaux_tc` top-k selection adds.
pub fn sigmoid_router_params(prefix: &str, experts: u32, hidden: u32) -> Vec<ParamSpec> {
    vec![
        ParamSpec::replicated(path(prefix, "gate.weight"), vec![experts, hidden]),
        ParamSpec::replicated(path(prefix, "gate.e_score_correction_bias"), vec![experts]).with_dtype(lorac_plan::DType::F32),
    ]
}

/// Token embedding, split over the vocabulary. As a LoRA target its input is the vocabulary.
pub fn embedding(vocab: u32, hidden: u32, module_path: String) -> LinearSpec {
    let modules = vec![HfModule::single("embed_tokens", module_path, elements(hidden, "hidden_size"))];
    let spec =
        linear("embed_tokens", LinearKind::Embedding, ParallelStyle::Vocab, elements(vocab, "vocab_size"), modules, WeightFormat::Plain);
    LinearSpec { ..spec }
}

/// Output projection, split over the vocabulary.
pub fn lm_head(vocab: u32, hidden: u32, module_path: String) -> LinearSpec {
    let modules = vec![HfModule::single("lm_head", module_path, elements(vocab, "vocab_size"))];
    linear("lm_head", LinearKind::LmHead, ParallelStyle::Vocab, elements(hidden, "hidden_size"), modules, WeightFormat::Plain)
}

/// A layer with a mixer and an FFN behind the standard pre-norms `input_layernorm` and
/// `post_attention_layernorm`.
pub fn pre_norm_layer(prefix: &str, hidden: u32, mixer: MixerSpec, ffn: FfnSpec) -> LayerSpec {
    LayerSpec {
        mixer: Some(mixer),
        ffn: Some(ffn),
        mixer_norm: Some(ParamSpec::replicated(path(prefix, "input_layernorm.weight"), vec![hidden])),
        ffn_norm: Some(ParamSpec::replicated(path(prefix, "post_attention_layernorm.weight"), vec![hidden])),
    }
}
