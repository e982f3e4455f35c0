//! What the user asks of a compilation.

use std::num::NonZeroU32;

use lorac_plan::{DType, MoeLoraMode};

use crate::error::CompileError;

#[derive(Debug, Clone)]
pub struct CompileOptions {
    pub tp: NonZeroU32,
    pub ep: NonZeroU32,
    pub max_lora_rank: NonZeroU32,
    pub max_loras: NonZeroU32,
    /// PEFT module names, fused names, `all` or `all-linear`.
    pub targets: Vec<String>,
    pub moe_lora: MoeLoraMode,
    pub max_batch_tokens: NonZeroU32,
    pub max_seqs: NonZeroU32,
    /// Tokens the KV cache holds across all sequences; a multiple of `kv_page_size`.
    pub kv_cache_tokens: u64,
    /// Tokens per KV-cache page.
    pub kv_page_size: NonZeroU32,
    /// Weight and activation dtype (the KV cache's too), overriding the config's `dtype` /
    /// `torch_dtype`: the runtime converts the checkpoint's float tensors when it uploads them.
    /// None keeps the config's. Only float dtypes (f32, bf16, f16) of float checkpoints.
    pub dtype: Option<DType>,
    /// Adapter pool dtype; the model's compute dtype (`DType::activation`) when None.
    pub lora_dtype: Option<DType>,
}

impl CompileOptions {
    /// Defaults for everything but the parallelism and LoRA shape.
    pub fn new(tp: u32, max_lora_rank: u32, max_loras: u32, targets: &[&str]) -> Result<Self, CompileError> {
        Ok(CompileOptions {
            tp: nonzero("--tp", tp)?,
            ep: NonZeroU32::MIN,
            max_lora_rank: nonzero("--max-lora-rank", max_lora_rank)?,
            max_loras: nonzero("--max-loras", max_loras)?,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            moe_lora: MoeLoraMode::PerExpert,
            max_batch_tokens: NonZeroU32::new(8192).expect("non-zero"),
            max_seqs: NonZeroU32::new(256).expect("non-zero"),
            kv_cache_tokens: 256 * 4096,
            kv_page_size: NonZeroU32::new(16).expect("non-zero"),
            dtype: None,
            lora_dtype: None,
        })
    }
}

impl CompileOptions {
    /// Upper bounds that keep every size the compiler computes inside its integer types.
    pub fn validate(&self) -> Result<(), CompileError> {
        let limits: [(&'static str, u64, u64); 8] = [
            ("--tp", self.tp.get().into(), 1 << 12),
            ("--ep", self.ep.get().into(), 1 << 12),
            ("--max-lora-rank", self.max_lora_rank.get().into(), 1 << 12),
            ("--max-loras", self.max_loras.get().into(), 1 << 12),
            ("--max-batch-tokens", self.max_batch_tokens.get().into(), 1 << 24),
            ("--max-seqs", self.max_seqs.get().into(), 1 << 20),
            ("--kv-cache-tokens", self.kv_cache_tokens, 1 << 40),
            ("--kv-page-size", self.kv_page_size.get().into(), 1 << 12),
        ];
        if let Some((option, value, max)) = limits.iter().find(|(_, value, max)| value > max) {
            return Err(CompileError::Option { option, message: format!("{value} exceeds the largest supported value ({max})") });
        }
        let page = u64::from(self.kv_page_size.get());
        if self.kv_cache_tokens == 0 || self.kv_cache_tokens % page != 0 {
            return Err(CompileError::Option {
                option: "--kv-cache-tokens",
                message: format!("{} is not a positive multiple of the KV page size ({page} tokens, --kv-page-size)", self.kv_cache_tokens),
            });
        }
        if let Some(dtype) = self.dtype
            && !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        {
            return Err(CompileError::Option {
                option: "--dtype",
                message: format!("{dtype} is not a float dtype (expected f32, bf16 or f16)"),
            });
        }
        Ok(())
    }

    /// The dtype weights and activations run in: `--dtype` over the config's. A config that
    /// declares fp8 weights keeps it (they are not converted); fp8 linears of a quantised
    /// checkpoint (`quantization_config`) keep their format whatever the model dtype.
    pub fn model_dtype(&self, checkpoint: DType) -> Result<DType, CompileError> {
        match self.dtype {
            None => Ok(checkpoint),
            Some(dtype) if dtype == checkpoint => Ok(checkpoint),
            Some(dtype) if checkpoint == DType::F8E4M3 => Err(CompileError::Option {
                option: "--dtype",
                message: format!("the checkpoint stores {checkpoint} (block-quantised) weights, which are not converted to {dtype}"),
            }),
            Some(dtype) => Ok(dtype),
        }
    }
}

/// Turns a user-given count into a non-zero one, naming the option when it is 0.
pub fn nonzero(option: &'static str, value: u32) -> Result<NonZeroU32, CompileError> {
    NonZeroU32::new(value).ok_or(CompileError::Option { option, message: "must be at least 1 (got 0)".into() })
}
