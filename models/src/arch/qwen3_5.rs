//! Qwen3.5 (dense and MoE): Qwen3-Next's hybrid with split GDN projections
//! (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`), the decoder config nested under
//! `text_config` and the decoder weights under `model.language_model`.

use crate::arch::qwen3_next::{self, GdnProjections, HybridFamily};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::ModelSpec;

const QWEN3_5: HybridFamily = HybridFamily {
    nested: Some("text_config"),
    weight_prefix: "model.language_model",
    gdn: GdnProjections::Split,
    ignored_weight_prefixes: &["model.visual.", "mtp."],
};

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    qwen3_next::build_hybrid(cfg, &QWEN3_5)
}
