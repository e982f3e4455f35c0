//! Nemotron-H and Nemotron 3: each layer is one block — Mamba2 (`M`), attention (`*`),
//! relu² MLP (`-`) or non-gated MoE (`E`, optionally in a latent space) — given either as the
//! `hybrid_override_pattern` string or the `layers_block_type` list.

use lorac_plan::DType;
use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::blocks::{self, ExpertsConfig, GqaConfig, elements, heads, path, replicable_heads};
use crate::common::{self, DecoderBase};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::*;

#[derive(Debug, Deserialize)]
struct NemotronHConfig {
    #[serde(flatten)]
    base: DecoderBase,
    hybrid_override_pattern: Option<String>,
    layers_block_type: Option<Vec<String>>,
    num_attention_heads: Count,
    num_key_value_heads: Count,
    head_dim: Option<Count>,
    attention_head_dim: Option<Count>,
    #[serde(default)]
    attention_bias: bool,
    intermediate_size: Width,
    mamba_num_heads: Count,
    mamba_head_dim: Count,
    n_groups: Count,
    ssm_state_size: Count,
    conv_kernel: Count,
    #[serde(default = "yes")]
    use_conv_bias: bool,
    #[serde(default)]
    mamba_ssm_cache_dtype: Option<String>,
    n_routed_experts: Option<Count>,
    num_experts_per_tok: Option<Count>,
    moe_intermediate_size: Option<Width>,
    #[serde(default)]
    moe_shared_expert_intermediate_size: Option<u32>,
    #[serde(default)]
    n_shared_experts: Option<u32>,
    moe_latent_size: Option<Width>,
    #[serde(default)]
    num_nextn_predict_layers: u32,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Mamba,
    Attention,
    Mlp,
    Moe,
}

fn block_layout(cfg: &ConfigFile, c: &NemotronHConfig) -> Result<Vec<Block>, ModelError> {
    let blocks: Vec<Block> = match (&c.hybrid_override_pattern, &c.layers_block_type) {
        (Some(pattern), _) => pattern
            .chars()
            .enumerate()
            .map(|(i, ch)| match ch {
                'M' => Ok(Block::Mamba),
                '*' => Ok(Block::Attention),
                '-' => Ok(Block::Mlp),
                'E' => Ok(Block::Moe),
                other => Err(ModelError::field(
                    &cfg.path,
                    "hybrid_override_pattern",
                    format!("unknown block `{other}` at position {i} (expected M mamba, * attention, - mlp, E moe)"),
                )),
            })
            .collect::<Result<_, _>>()?,
        (None, Some(list)) => list
            .iter()
            .enumerate()
            .map(|(i, name)| match name.as_str() {
                // transformers 5 writes linear_attention / full_attention for mamba / attention.
                "mamba" | "linear_attention" => Ok(Block::Mamba),
                "attention" | "full_attention" => Ok(Block::Attention),
                "mlp" => Ok(Block::Mlp),
                "moe" => Ok(Block::Moe),
                other => Err(ModelError::field(
                    &cfg.path,
                    format!("layers_block_type[{i}]"),
                    format!("unknown block `{other}` (expected mamba, attention, mlp, moe, linear_attention or full_attention)"),
                )),
            })
            .collect::<Result<_, _>>()?,
        (None, None) => return Err(ModelError::field(&cfg.path, "hybrid_override_pattern", "missing (and no layers_block_type either)")),
    };
    let field = if c.hybrid_override_pattern.is_some() { "hybrid_override_pattern" } else { "layers_block_type" };
    if let Some(declared) = c.base.declared_layers() {
        common::check_layer_count(&cfg.path, field, blocks.len(), declared)?;
    }
    Ok(blocks)
}

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    let c: NemotronHConfig = cfg.parse(None)?;
    let hidden = c.base.hidden_size.get();
    let heads_n = c.num_attention_heads.get();
    common::check_gqa(&cfg.path, heads_n, c.num_key_value_heads.get(), "")?;
    let head_dim = common::head_dim(&cfg.path, c.head_dim.or(c.attention_head_dim), hidden, heads_n)?;
    let state_dtype = match &c.mamba_ssm_cache_dtype {
        Some(name) => DType::from_hf(name)
            .ok_or_else(|| ModelError::field(&cfg.path, "mamba_ssm_cache_dtype", format!("unsupported dtype `{name}`")))?,
        None => c.base.weight_dtype(&cfg.path)?,
    };
    let attention = GqaConfig {
        hidden: elements(hidden, "hidden_size"),
        num_heads: heads_n,
        num_kv_heads: c.num_key_value_heads.get(),
        head_dim,
        output_gate: false,
        qk_norm: false,
        bias: c.attention_bias,
        heads_field: "num_attention_heads",
        kv_heads_field: "num_key_value_heads",
    };
    let format = WeightFormat::Plain;
    let layers = block_layout(cfg, &c)?
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            let prefix = format!("backbone.layers.{i}");
            let mixer_path = path(&prefix, "mixer");
            let (mixer, ffn) = match block {
                Block::Mamba => (Some(MixerSpec::Mamba2(mamba2(&c, &mixer_path, state_dtype))), None),
                Block::Attention => (Some(MixerSpec::Attention(blocks::gqa_attention(&attention, &mixer_path, format))), None),
                Block::Mlp => {
                    let mlp = blocks::dense_mlp(
                        elements(hidden, "hidden_size"),
                        c.intermediate_size.get(),
                        "intermediate_size",
                        Activation::Relu2,
                        &mixer_path,
                        format,
                    );
                    (None, Some(FfnSpec::Dense(mlp)))
                }
                Block::Moe => (None, Some(FfnSpec::Moe(moe(cfg, &c, &mixer_path)?))),
            };
            // One norm per layer, in front of whichever block the layer has.
            let norm = Some(ParamSpec::replicated(path(&prefix, "norm.weight"), vec![hidden]));
            let (mixer_norm, ffn_norm) = if mixer.is_some() { (norm, None) } else { (None, norm) };
            Ok(LayerSpec { mixer, ffn, mixer_norm, ffn_norm })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let outline = common::Outline {
        nested: None,
        embedding: "backbone.embeddings",
        final_norm: "backbone.norm_f.weight",
        ignored_weight_prefixes: if c.num_nextn_predict_layers > 0 { vec!["mtp.".into()] } else { Vec::new() },
        norm_unit_offset: false,
        // Nemotron-H attention layers use no positional embedding: Mamba layers carry order.
        rope_dim: None,
    };
    common::assemble(cfg, &c.base, layers, outline)
}

fn mamba2(c: &NemotronHConfig, prefix: &str, state_dtype: DType) -> Mamba2Spec {
    let hidden = elements(c.base.hidden_size.get(), "hidden_size");
    let (nh, hd) = (c.mamba_num_heads.get(), c.mamba_head_dim.get());
    let (groups, state) = (c.n_groups.get(), c.ssm_state_size.get());
    let kernel = c.conv_kernel.get();
    let mamba_heads = |d: u32| heads(nh, d, "mamba_num_heads");
    // B and C are per group; like KV heads, groups are replicated when tp exceeds them.
    let group_states = replicable_heads(groups, state, "n_groups");
    let in_proj = blocks::column(
        "in_proj",
        hidden.clone(),
        vec![HfModule::new(
            "in_proj",
            path(prefix, "in_proj"),
            vec![
                SliceSpec::new("z", mamba_heads(hd)),
                SliceSpec::new("x", mamba_heads(hd)),
                SliceSpec::new("B", group_states.clone()),
                SliceSpec::new("C", group_states.clone()),
                SliceSpec::new("dt", mamba_heads(1)),
            ],
        )],
        WeightFormat::Plain,
    );
    let conv_dim = nh * hd + 2 * groups * state;
    let conv_parts = vec![mamba_heads(hd), group_states.clone(), group_states];
    let mut params = vec![ParamSpec::split(path(prefix, "conv1d.weight"), vec![conv_dim, 1, kernel], 0, conv_parts.clone())];
    if c.use_conv_bias {
        params.push(ParamSpec::split(path(prefix, "conv1d.bias"), vec![conv_dim], 0, conv_parts));
    }
    for name in ["dt_bias", "A_log", "D"] {
        params.push(ParamSpec::split(path(prefix, name), vec![nh], 0, vec![mamba_heads(1)]));
    }
    params.push(ParamSpec::split(path(prefix, "norm.weight"), vec![nh * hd], 0, vec![mamba_heads(hd)]));
    Mamba2Spec {
        num_heads: nh,
        head_dim: hd,
        n_groups: groups,
        state_size: state,
        conv_kernel: kernel,
        state_dtype,
        in_proj,
        out_proj: blocks::row("out_proj", mamba_heads(hd), "out_proj", path(prefix, "out_proj"), hidden, WeightFormat::Plain),
        params,
    }
}

fn moe(cfg: &ConfigFile, c: &NemotronHConfig, prefix: &str) -> Result<MoeSpec, ModelError> {
    let missing = |field: &str| ModelError::field(&cfg.path, field, "missing (the layout has MoE layers)");
    let experts = c.n_routed_experts.ok_or_else(|| missing("n_routed_experts"))?.get();
    let top_k = c.num_experts_per_tok.ok_or_else(|| missing("num_experts_per_tok"))?.get();
    let intermediate = c.moe_intermediate_size.ok_or_else(|| missing("moe_intermediate_size"))?.get();
    let hidden = c.base.hidden_size.get();
    let format = WeightFormat::Plain;
    // Latent MoE: tokens enter the experts through fc1_latent_proj and leave through fc2.
    let latent = c.moe_latent_size.map(|size| {
        let size = size.get();
        LatentSpec {
            size,
            fc1: blocks::replicated(
                "fc1_latent_proj",
                elements(hidden, "hidden_size"),
                vec![HfModule::single("fc1_latent_proj", path(prefix, "fc1_latent_proj"), elements(size, "moe_latent_size"))],
                format,
            ),
            fc2: blocks::replicated(
                "fc2_latent_proj",
                elements(size, "moe_latent_size"),
                vec![HfModule::single("fc2_latent_proj", path(prefix, "fc2_latent_proj"), elements(hidden, "hidden_size"))],
                format,
            ),
        }
    });
    let expert_input = match &latent {
        Some(l) => elements(l.size, "moe_latent_size"),
        None => elements(hidden, "hidden_size"),
    };
    let routed = ExpertsConfig {
        input: expert_input,
        num_experts: experts,
        experts_field: "n_routed_experts",
        intermediate,
        intermediate_field: "moe_intermediate_size",
        activation: Activation::Relu2,
        experts_prefix: &path(prefix, "experts"),
        format,
    };
    // moe_shared_expert_intermediate_size is the shared expert's whole width.
    let shared_width = crate::dims::at_most(
        &cfg.path,
        "moe_shared_expert_intermediate_size",
        c.moe_shared_expert_intermediate_size.unwrap_or(0),
        crate::dims::MAX_WIDTH,
    )?;
    let shared_intermediate = if c.n_shared_experts == Some(0) { 0 } else { shared_width };
    let shared = (shared_intermediate > 0).then(|| {
        blocks::dense_mlp(
            elements(hidden, "hidden_size"),
            shared_intermediate,
            "moe_shared_expert_intermediate_size",
            Activation::Relu2,
            &path(prefix, "shared_experts"),
            format,
        )
    });
    let params = blocks::sigmoid_router_params(prefix, experts, hidden);
    Ok(blocks::moe(&routed, top_k, shared, latent, params))
}
