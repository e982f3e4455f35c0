//! The passes, in pipeline order: sharding, LoRA insertion, kernel selection, memory planning.

pub mod kernels;
pub mod lora;
pub mod memory;
pub mod shard;
