//! Types stored in `plan.bin` and shared by the lorac compiler and runtime.
//!
//! This crate stays small (serde, postcard, thiserror) so the runtime can read plans without
//! linking the compiler, and the compiler can write them without linking cubecl.

pub mod dtype;
pub mod lora;

pub use dtype::DType;
pub use lora::{ExpertDims, LayoutError, LoraLayout, LoraSlice};
