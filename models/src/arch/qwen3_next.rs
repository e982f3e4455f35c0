//! Qwen3-Next: Gated DeltaNet ("linear_attention") layers interleaved with gated full
//! attention, MoE FFN with one shared expert behind a sigmoid gate. Qwen3.5 reuses these
//! pieces with split GDN projections and its decoder nested under `text_config`.

use std::path::Path;

use lorac_plan::DType;
use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::blocks::{self, ExpertsConfig, GqaConfig, elements, heads, path};
use crate::common::{self, DecoderBase};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::*;

/// The decoder fields Qwen3-Next and Qwen3.5 share.
#[derive(Debug, Deserialize)]
pub struct HybridConfig {
    #[serde(flatten)]
    pub base: DecoderBase,
    pub num_attention_heads: Count,
    pub num_key_value_heads: Count,
    pub head_dim: Option<Count>,
    #[serde(default = "yes")]
    pub attn_output_gate: bool,
    pub linear_conv_kernel_dim: Count,
    pub linear_key_head_dim: Count,
    pub linear_num_key_heads: Count,
    pub linear_num_value_heads: Count,
    pub linear_value_head_dim: Count,
    pub layer_types: Option<Vec<String>>,
    pub full_attention_interval: Option<Count>,
    pub intermediate_size: Option<Width>,
    pub num_experts: Option<Count>,
    pub num_experts_per_tok: Option<Count>,
    pub moe_intermediate_size: Option<Width>,
    pub shared_expert_intermediate_size: Option<u32>,
    #[serde(default = "one")]
    pub decoder_sparse_step: Count,
    #[serde(default)]
    pub mlp_only_layers: Vec<u32>,
    #[serde(default)]
    pub mamba_ssm_dtype: Option<String>,
}

fn yes() -> bool {
    true
}
fn one() -> Count {
    Count::new(1).expect("1 is a valid count")
}

/// How a checkpoint stores the GDN input projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GdnProjections {
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, rows grouped per key head
    /// (`[q, k, v, z]` of one key-head group, then the next), so tensor parallelism takes a
    /// contiguous run of key-head groups and each is one slice.
    InterleavedPerKeyHead,
    /// Qwen3.5: `in_proj_qkv` (q | k | v contiguous), `in_proj_z`, `in_proj_b`, `in_proj_a`;
    /// fused as engines do into `in_proj_qkvz` (2 modules, 4 slices) and `in_proj_ba`.
    Split,
}

/// Everything that differs between the two families besides the config fields.
pub struct HybridFamily {
    pub nested: Option<&'static str>,
    pub weight_prefix: &'static str,
    pub gdn: GdnProjections,
    pub ignored_weight_prefixes: &'static [&'static str],
}

pub const QWEN3_NEXT: HybridFamily =
    HybridFamily { nested: None, weight_prefix: "model", gdn: GdnProjections::InterleavedPerKeyHead, ignored_weight_prefixes: &["mtp."] };

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    build_hybrid(cfg, &QWEN3_NEXT)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LayerType {
    Full,
    Linear,
}

fn layer_types(path: &Path, c: &HybridConfig, field_prefix: &str) -> Result<Vec<LayerType>, ModelError> {
    let layers = c.base.layers(path, field_prefix)?;
    match (&c.layer_types, c.full_attention_interval) {
        (Some(types), _) => {
            common::check_layer_count(path, &format!("{field_prefix}layer_types"), types.len(), layers)?;
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "linear_attention" => Ok(LayerType::Linear),
                    other => Err(ModelError::field(
                        path,
                        format!("{field_prefix}layer_types[{i}]"),
                        format!("unknown layer type `{other}` (expected full_attention or linear_attention)"),
                    )),
                })
                .collect()
        }
        (None, Some(interval)) => {
            Ok((0..layers).map(|i| if (i + 1) % interval.get() == 0 { LayerType::Full } else { LayerType::Linear }).collect())
        }
        (None, None) => {
            Err(ModelError::field(path, format!("{field_prefix}layer_types"), "missing (and no full_attention_interval either)"))
        }
    }
}

fn require<T>(path: &Path, field: String, value: Option<T>, get: fn(T) -> u32) -> Result<u32, ModelError> {
    value.map(get).ok_or_else(|| ModelError::field(path, field, "missing"))
}

pub fn build_hybrid(cfg: &ConfigFile, family: &HybridFamily) -> Result<ModelSpec, ModelError> {
    let c: HybridConfig = cfg.parse(family.nested)?;
    let field_prefix = family.nested.map(|n| format!("{n}.")).unwrap_or_default();
    let f = |name: &str| format!("{field_prefix}{name}");
    let hidden = c.base.hidden_size.get();
    let heads_n = c.num_attention_heads.get();
    let kv_heads = c.num_key_value_heads.get();
    common::check_gqa(&cfg.path, heads_n, kv_heads, &field_prefix)?;
    let (nk, nv) = (c.linear_num_key_heads.get(), c.linear_num_value_heads.get());
    if nv % nk != 0 {
        return Err(ModelError::field(
            &cfg.path,
            f("linear_num_value_heads"),
            format!("{nv} is not a multiple of linear_num_key_heads {nk}"),
        ));
    }
    let state_dtype = match &c.mamba_ssm_dtype {
        Some(name) => {
            DType::from_hf(name).ok_or_else(|| ModelError::field(&cfg.path, f("mamba_ssm_dtype"), format!("unsupported dtype `{name}`")))?
        }
        None => DType::F32,
    };
    let attention = GqaConfig {
        hidden: elements(hidden, "hidden_size"),
        num_heads: heads_n,
        num_kv_heads: kv_heads,
        head_dim: common::head_dim(&cfg.path, c.head_dim, hidden, heads_n)?,
        output_gate: c.attn_output_gate,
        qk_norm: true,
        bias: false,
        heads_field: "num_attention_heads",
        kv_heads_field: "num_key_value_heads",
    };
    let moe = match c.num_experts {
        Some(experts) => Some(MoeFields {
            experts: experts.get(),
            top_k: require(&cfg.path, f("num_experts_per_tok"), c.num_experts_per_tok, Count::get)?,
            intermediate: require(&cfg.path, f("moe_intermediate_size"), c.moe_intermediate_size, Width::get)?,
            shared_intermediate: crate::dims::at_most(
                &cfg.path,
                &f("shared_expert_intermediate_size"),
                c.shared_expert_intermediate_size.unwrap_or(0),
                crate::dims::MAX_WIDTH,
            )?,
        }),
        None => None,
    };
    let types = layer_types(&cfg.path, &c, &field_prefix)?;
    let format = WeightFormat::Plain;
    let mut layers = Vec::with_capacity(types.len());
    for (i, ty) in types.iter().enumerate() {
        let prefix = format!("{}.layers.{i}", family.weight_prefix);
        let mixer = match ty {
            LayerType::Full => MixerSpec::Attention(blocks::gqa_attention(&attention, &path(&prefix, "self_attn"), format)),
            LayerType::Linear => MixerSpec::GatedDeltaNet(gated_delta_net(&c, family.gdn, &path(&prefix, "linear_attn"), state_dtype)),
        };
        let mlp = path(&prefix, "mlp");
        let sparse = !c.mlp_only_layers.contains(&(i as u32)) && (i as u32 + 1).is_multiple_of(c.decoder_sparse_step.get());
        let ffn = match (&moe, sparse) {
            (Some(m), true) => FfnSpec::Moe(moe_ffn(hidden, m, &mlp, format)),
            _ => {
                let inter = require(&cfg.path, f("intermediate_size"), c.intermediate_size, Width::get)?;
                FfnSpec::Dense(blocks::dense_mlp(
                    elements(hidden, "hidden_size"),
                    inter,
                    "intermediate_size",
                    Activation::SwiGlu,
                    &mlp,
                    format,
                ))
            }
        };
        layers.push(blocks::pre_norm_layer(&prefix, hidden, mixer, ffn));
    }
    let (embedding, final_norm) = (format!("{}.embed_tokens", family.weight_prefix), format!("{}.norm.weight", family.weight_prefix));
    let outline = common::Outline {
        nested: family.nested,
        embedding: &embedding,
        final_norm: &final_norm,
        ignored_weight_prefixes: family.ignored_weight_prefixes.iter().map(|p| p.to_string()).collect(),
        norm_unit_offset: true,
        rope_dim: Some(attention.head_dim),
    };
    common::assemble(cfg, &c.base, layers, outline)
}

struct MoeFields {
    experts: u32,
    top_k: u32,
    intermediate: u32,
    shared_intermediate: u32,
}

fn moe_ffn(hidden: u32, m: &MoeFields, prefix: &str, format: WeightFormat) -> MoeSpec {
    let routed = ExpertsConfig {
        input: elements(hidden, "hidden_size"),
        num_experts: m.experts,
        experts_field: "num_experts",
        intermediate: m.intermediate,
        intermediate_field: "moe_intermediate_size",
        activation: Activation::SwiGlu,
        experts_prefix: &path(prefix, "experts"),
        format,
    };
    let mut params = vec![ParamSpec::replicated(path(prefix, "gate.weight"), vec![m.experts, hidden])];
    let shared = (m.shared_intermediate > 0).then(|| {
        params.push(ParamSpec::replicated(path(prefix, "shared_expert_gate.weight"), vec![1, hidden]));
        blocks::dense_mlp(
            elements(hidden, "hidden_size"),
            m.shared_intermediate,
            "shared_expert_intermediate_size",
            Activation::SwiGlu,
            &path(prefix, "shared_expert"),
            format,
        )
    });
    blocks::moe(&routed, m.top_k, shared, None, params)
}

fn gated_delta_net(c: &HybridConfig, projections: GdnProjections, prefix: &str, state_dtype: DType) -> GatedDeltaNetSpec {
    let hidden = elements(c.base.hidden_size.get(), "hidden_size");
    let (nk, nv) = (c.linear_num_key_heads.get(), c.linear_num_value_heads.get());
    let (dk, dv) = (c.linear_key_head_dim.get(), c.linear_value_head_dim.get());
    let v_per_k = nv / nk;
    let format = WeightFormat::Plain;
    let key_heads = |d: u32| heads(nk, d, "linear_num_key_heads");
    let value_heads = |d: u32| heads(nv, d, "linear_num_value_heads");
    let (in_qkvz, in_ba) = match projections {
        GdnProjections::InterleavedPerKeyHead => (
            blocks::column(
                "in_proj_qkvz",
                hidden.clone(),
                vec![HfModule::single("in_proj_qkvz", path(prefix, "in_proj_qkvz"), key_heads(2 * dk + 2 * dv * v_per_k))],
                format,
            ),
            blocks::column(
                "in_proj_ba",
                hidden.clone(),
                vec![HfModule::single("in_proj_ba", path(prefix, "in_proj_ba"), key_heads(2 * v_per_k))],
                format,
            ),
        ),
        GdnProjections::Split => (
            blocks::column(
                "in_proj_qkvz",
                hidden.clone(),
                vec![
                    HfModule::new(
                        "in_proj_qkv",
                        path(prefix, "in_proj_qkv"),
                        vec![SliceSpec::new("q", key_heads(dk)), SliceSpec::new("k", key_heads(dk)), SliceSpec::new("v", value_heads(dv))],
                    ),
                    HfModule::new("in_proj_z", path(prefix, "in_proj_z"), vec![SliceSpec::new("z", value_heads(dv))]),
                ],
                format,
            ),
            blocks::column(
                "in_proj_ba",
                hidden.clone(),
                vec![
                    HfModule::single("in_proj_b", path(prefix, "in_proj_b"), value_heads(1)),
                    HfModule::single("in_proj_a", path(prefix, "in_proj_a"), value_heads(1)),
                ],
                format,
            ),
        ),
    };
    let conv_dim = 2 * nk * dk + nv * dv;
    // The conv runs over q|k|v channels; each rank holds its heads' channels of all three.
    let conv_channels = vec![key_heads(dk), key_heads(dk), value_heads(dv)];
    let kernel = c.linear_conv_kernel_dim.get();
    GatedDeltaNetSpec {
        num_k_heads: nk,
        num_v_heads: nv,
        k_head_dim: dk,
        v_head_dim: dv,
        conv_kernel: kernel,
        state_dtype,
        in_qkvz,
        in_ba,
        out: blocks::row("out_proj", value_heads(dv), "out_proj", path(prefix, "out_proj"), hidden, format),
        params: vec![
            ParamSpec::split(path(prefix, "conv1d.weight"), vec![conv_dim, 1, kernel], 0, conv_channels),
            ParamSpec::split(path(prefix, "dt_bias"), vec![nv], 0, vec![value_heads(1)]),
            ParamSpec::split(path(prefix, "A_log"), vec![nv], 0, vec![value_heads(1)]),
            ParamSpec::replicated(path(prefix, "norm.weight"), vec![dv]),
        ],
    }
}
