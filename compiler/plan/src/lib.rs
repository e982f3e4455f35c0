//! Types stored in `plan.bin` and shared by the lorac compiler and runtime.
//!
//! This crate stays small (serde, postcard, sha2, thiserror) so the runtime can read plans
//! without linking the compiler, and the compiler can write them without linking cubecl.

pub mod constants;
pub mod dtype;
pub mod format;
pub mod lora;
pub mod plan;

pub use constants::{NormConstants, Rope, RopeScaling};
pub use dtype::DType;
pub use format::{FORMAT_VERSION, PlanFormatError, decode, encode, fingerprint};
pub use lora::{ExpertDims, LayoutError, LoraLayout, LoraSlice};
pub use plan::*;
