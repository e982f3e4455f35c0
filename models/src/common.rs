//! Config fields and checks several frontends share.

use std::path::Path;

use lorac_plan::DType;
use serde::Deserialize;

use crate::dims::{Count, Width};

use crate::blocks;
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::{LayerSpec, ModelSpec, ParamSpec};

/// Fields every decoder config has, under their Hugging Face names.
#[derive(Debug, Deserialize)]
pub struct DecoderBase {
    pub hidden_size: Width,
    /// Required everywhere but Nemotron-H, whose transformers 5 configs derive it from the
    /// layer layout; read it through [`DecoderBase::layers`].
    num_hidden_layers: Option<Count>,
    pub vocab_size: Width,
    /// Absent in some nested decoder configs; see [`DecoderBase::tied`].
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub max_position_embeddings: Option<u32>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
}

impl DecoderBase {
    /// Whether lm_head reuses the embedding: the decoder's own field, else the top-level one
    /// (Qwen3.5 writes it only at the top level for some sizes), else false.
    pub fn tied(&self, cfg: &crate::ConfigFile) -> bool {
        self.tie_word_embeddings.or_else(|| cfg.root.get("tie_word_embeddings").and_then(serde_json::Value::as_bool)).unwrap_or(false)
    }

    pub fn layers(&self, path: &Path, field_prefix: &str) -> Result<u32, ModelError> {
        self.num_hidden_layers.map(Count::get).ok_or_else(|| ModelError::field(path, format!("{field_prefix}num_hidden_layers"), "missing"))
    }

    pub fn declared_layers(&self) -> Option<u32> {
        self.num_hidden_layers.map(Count::get)
    }

    /// The checkpoint dtype (`dtype` in new configs, `torch_dtype` in older ones); bf16 when absent.
    pub fn weight_dtype(&self, path: &Path) -> Result<DType, ModelError> {
        let (field, name) = match (&self.dtype, &self.torch_dtype) {
            (Some(d), _) => ("dtype", d),
            (None, Some(d)) => ("torch_dtype", d),
            (None, None) => return Ok(DType::BF16),
        };
        DType::from_hf(name)
            .ok_or_else(|| ModelError::field(path, field, format!("unsupported dtype `{name}` (expected float32, bfloat16 or float16)")))
    }
}

/// `head_dim` when given, else hidden_size / num_attention_heads (which must divide).
pub fn head_dim(path: &Path, explicit: Option<Count>, hidden: u32, heads: u32) -> Result<u32, ModelError> {
    match explicit {
        Some(d) => Ok(d.get()),
        None if hidden.is_multiple_of(heads) => Ok(hidden / heads),
        None => Err(ModelError::field(
            path,
            "head_dim",
            format!("missing, and hidden_size {hidden} is not divisible by num_attention_heads {heads}"),
        )),
    }
}

/// GQA needs the query heads to be a multiple of the KV heads.
pub fn check_gqa(path: &Path, heads: u32, kv_heads: u32, prefix: &str) -> Result<(), ModelError> {
    if !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::field(
            path,
            format!("{prefix}num_key_value_heads"),
            format!("{kv_heads} does not divide num_attention_heads {heads}"),
        ));
    }
    Ok(())
}

/// A per-layer list (`layer_types`, `layers_block_type`) must have one entry per layer.
pub fn check_layer_count(path: &Path, field: &str, found: usize, layers: u32) -> Result<(), ModelError> {
    if found != layers as usize {
        return Err(ModelError::field(path, field, format!("has {found} entries but num_hidden_layers is {layers}")));
    }
    Ok(())
}

/// What differs between families around their decoder layers.
pub struct Outline<'a> {
    /// Where the decoder's fields sit in config.json (`Some("text_config")` for Qwen3.5).
    pub nested: Option<&'a str>,
    /// Checkpoint path of the embedding module and of the final norm's weight.
    pub embedding: &'a str,
    pub final_norm: &'a str,
    pub ignored_weight_prefixes: Vec<String>,
    /// RMSNorm multiplies by `1 + w` (Qwen3-Next, Qwen3.5).
    pub norm_unit_offset: bool,
    /// Per-head width the rotary embedding covers (before a partial factor); None when the
    /// attention has no rotary embedding.
    pub rope_dim: Option<u32>,
}

/// The model around its layers: embedding, final norm, lm_head and the numeric constants.
pub fn assemble(cfg: &ConfigFile, base: &DecoderBase, layers: Vec<LayerSpec>, outline: Outline) -> Result<ModelSpec, ModelError> {
    let hidden = base.hidden_size.get();
    let vocab = base.vocab_size.get();
    Ok(ModelSpec {
        model_type: cfg.model_type()?.to_string(),
        hidden_size: hidden,
        vocab_size: vocab,
        dtype: base.weight_dtype(&cfg.path)?,
        embedding: blocks::embedding(vocab, hidden, outline.embedding.to_string()),
        layers,
        final_norm: ParamSpec::replicated(outline.final_norm.to_string(), vec![hidden]),
        lm_head: blocks::lm_head(vocab, hidden, "lm_head".into()),
        tie_word_embeddings: base.tied(cfg),
        ignored_weight_prefixes: outline.ignored_weight_prefixes,
        config_section: outline.nested.map(|n| format!("{n}.")).unwrap_or_default(),
        norm: crate::rope::norm(cfg, outline.nested, outline.norm_unit_offset)?,
        rope: outline.rope_dim.map(|dim| crate::rope::rope(cfg, outline.nested, dim)).transpose()?,
        max_position_embeddings: base.max_position_embeddings,
    })
}
