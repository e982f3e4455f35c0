//! The one table mapping a config's `model_type` to its frontend. Adding an architecture adds
//! a file under `arch/` and a line here.

use std::path::Path;

use crate::arch;
use crate::config::ConfigFile;
use crate::error::ModelError;
use crate::spec::ModelSpec;

type Frontend = fn(&ConfigFile) -> Result<ModelSpec, ModelError>;

const FRONTENDS: &[(&str, Frontend)] = &[
    ("llama", arch::llama::build),
    ("qwen3", arch::qwen3::build),
    ("qwen3_moe", arch::qwen3_moe::build),
    ("deepseek_v3", arch::deepseek_v3::build),
    ("kimi_k2", arch::deepseek_v3::build),
    ("qwen3_next", arch::qwen3_next::build),
    ("qwen3_5", arch::qwen3_5::build),
    ("qwen3_5_moe", arch::qwen3_5::build),
    ("nemotron_h", arch::nemotron_h::build),
];

pub fn supported_model_types() -> Vec<&'static str> {
    FRONTENDS.iter().map(|(name, _)| *name).collect()
}

/// Builds the architecture description of a parsed config.
pub fn describe(cfg: &ConfigFile) -> Result<ModelSpec, ModelError> {
    let model_type = cfg.model_type()?;
    let frontend = FRONTENDS.iter().find(|(name, _)| *name == model_type).map(|(_, f)| *f).ok_or_else(|| ModelError::UnknownModelType {
        path: cfg.path.clone(),
        found: model_type.to_string(),
        supported: supported_model_types(),
    })?;
    frontend(cfg)
}

/// Reads `<dir>/config.json` (or a config file given directly) and describes it.
pub fn load(path: &Path) -> Result<(ConfigFile, ModelSpec), ModelError> {
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let cfg = ConfigFile::read(&file)?;
    let spec = describe(&cfg)?;
    Ok((cfg, spec))
}
