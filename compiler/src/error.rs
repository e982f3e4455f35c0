use std::path::PathBuf;

use lorac_models::ModelError;

/// Why a compilation failed. Every variant names what the user can change: the config field,
/// the command-line option, the module or the file.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{option}: {message}")]
    Option { option: &'static str, message: String },
    #[error("cannot split {module} across tp {tp}: config field `{field}` = {message}")]
    Indivisible { module: String, field: String, tp: u32, message: String },
    #[error("unknown LoRA target module `{target}`; valid targets for this {model_type} model: {}", valid.join(", "))]
    UnknownTarget { target: String, model_type: String, valid: Vec<String> },
    #[error("LoRA layout of {module}: {source}")]
    Layout { module: String, source: lorac_plan::LayoutError },
    #[error("cannot read {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("the checkpoint does not match config.json ({total} problem(s)):\n  {}", problems.join("\n  "))]
    WeightMismatch { total: usize, problems: Vec<String> },
    #[error("internal error: the graph is invalid after the {pass} pass: {message}")]
    Verify { pass: &'static str, message: String },
}

impl CompileError {
    /// Config fields of nested decoders (Qwen3.5's `text_config`) are named in full.
    pub fn in_config_section(self, prefix: &str) -> Self {
        match self {
            CompileError::Indivisible { module, field, tp, message } => {
                CompileError::Indivisible { module, field: format!("{prefix}{field}"), tp, message }
            }
            other => other,
        }
    }
}
