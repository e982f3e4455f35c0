use std::path::PathBuf;

/// Everything that can be wrong with a model directory's config.json. Each variant names the
/// file and, where there is one, the field, so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON at line {line}, column {column}: {message}")]
    Json { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    #[error("{path}: unsupported model_type `{found}`; supported: {}", supported.join(", "))]
    UnknownModelType { path: PathBuf, found: String, supported: Vec<&'static str> },
}

impl ModelError {
    pub fn field(path: &std::path::Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Field { path: path.to_path_buf(), field: field.into(), message: message.into() }
    }
}
