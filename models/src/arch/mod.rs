//! One file per architecture family.

pub mod deepseek_v3;
pub mod llama;
pub mod nemotron_h;
pub mod qwen3;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod qwen3_next;
