//! Errors of the plan executor. Every refusal names the file, tensor, plan entry, sequence or
//! slot at fault; nothing on caller input panics.

use std::path::PathBuf;

use lorac_adapters::AdapterError;
use lorac_plan::PlanFormatError;

use crate::error::LoraError;
use crate::ops::OpError;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{} is not a readable safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },

    #[error("model weights: tensor `{name}` is in no safetensors file of {}", dir.display())]
    MissingTensor { name: String, dir: PathBuf },

    #[error("model weights: tensor `{name}` has shape {actual:?} but the plan needs {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },

    #[error("model weights: tensor `{name}` is stored as {dtype}, which the executor does not read")]
    TensorDtype { name: String, dtype: String },

    #[error("config.json of the model directory does not match the plan: {0}")]
    Config(#[from] PlanFormatError),

    #[error("the executor does not support {0}")]
    Unsupported(String),

    #[error("the plan is inconsistent: {0}")]
    Plan(String),

    #[error(transparent)]
    Adapter(#[from] AdapterError),

    #[error("{what}: {source}")]
    Op { what: String, source: OpError },

    #[error("{what}: {source}")]
    Lora { what: String, source: LoraError },

    #[error("batch refused: {0}")]
    Batch(String),
}

pub type ExecResult<T> = std::result::Result<T, ExecutorError>;

/// Attaches the step / layer / module to an op or LoRA kernel error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> ExecResult<T>;
}

impl<T> Context<T> for std::result::Result<T, OpError> {
    fn ctx(self, what: impl FnOnce() -> String) -> ExecResult<T> {
        self.map_err(|source| ExecutorError::Op { what: what(), source })
    }
}

impl<T> Context<T> for std::result::Result<T, LoraError> {
    fn ctx(self, what: impl FnOnce() -> String) -> ExecResult<T> {
        self.map_err(|source| ExecutorError::Lora { what: what(), source })
    }
}
