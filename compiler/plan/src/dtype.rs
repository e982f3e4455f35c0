//! Storage dtypes of weights, adapters, activations and caches.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// 8-bit float weights (DeepSeek-V3 block-quantised checkpoints).
    F8E4M3,
    /// Token ids and expert indices.
    I32,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// Parses Hugging Face's `torch_dtype` / `dtype` spelling.
    pub fn from_hf(name: &str) -> Option<DType> {
        match name {
            "float32" | "fp32" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "fp16" | "half" => Some(DType::F16),
            "float8_e4m3fn" | "e4m3" => Some(DType::F8E4M3),
            _ => None,
        }
    }

    /// The dtype activations, caches and adapters use next to weights stored in this one:
    /// fp8 checkpoints compute in bf16.
    pub fn activation(self) -> DType {
        match self {
            DType::F8E4M3 | DType::I32 => DType::BF16,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::I32 => "i32",
        }
    }

    /// The dtype code safetensors headers use.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
            DType::I32 => "I32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
