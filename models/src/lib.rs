//! Hugging Face config.json frontends. Each architecture family reads its config into a typed
//! [`spec::ModelSpec`]; nothing downstream looks at `model_type` again.

pub mod arch;
pub mod blocks;
mod common;
pub mod config;
pub mod dims;
pub mod error;
pub mod registry;
pub mod rope;
pub mod spec;

pub use config::ConfigFile;
pub use error::ModelError;
pub use registry::{describe, load, supported_model_types};
pub use spec::ModelSpec;
