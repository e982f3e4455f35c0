//! Qwen3: Llama's layout plus per-head RMSNorm on q and k.

use crate::arch::llama::{self, DenseFamily};
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::ModelSpec;

pub fn build(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    llama::build_dense(cfg, &DenseFamily { qk_norm: true })
}
