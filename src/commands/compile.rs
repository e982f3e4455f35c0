use std::path::PathBuf;

use clap::ValueEnum;
use lorac_compiler::{CompileOptions, compile, options::nonzero};
use lorac_plan::{DType, MoeLoraMode};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, optionally *.safetensors) or a config.json file.
    model: PathBuf,
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1)]
    tp: u32,
    /// Expert-parallel groups (must divide --tp).
    #[arg(long, default_value_t = 1)]
    ep: u32,
    /// Largest adapter rank the pool holds; smaller adapters are padded.
    #[arg(long, default_value_t = 16)]
    max_lora_rank: u32,
    /// Adapter slots in the pool (distinct adapters in one batch).
    #[arg(long, default_value_t = 8)]
    max_loras: u32,
    /// PEFT module names (q_proj ...), fused names (qkv_proj ...), `all` or `all-linear`.
    #[arg(long, num_args = 1.., value_delimiter = ',', default_value = "all-linear")]
    lora_target_modules: Vec<String>,
    /// Routed-expert LoRA layout.
    #[arg(long, value_enum, default_value_t = MoeLora::PerExpert)]
    moe_lora: MoeLora,
    #[arg(long, default_value_t = 8192)]
    max_batch_tokens: u32,
    #[arg(long, default_value_t = 256)]
    max_seqs: u32,
    /// Tokens the KV cache holds across all sequences (default: max seqs × 4096).
    #[arg(long)]
    kv_cache_tokens: Option<u64>,
    /// Tokens per KV-cache page.
    #[arg(long, default_value_t = 16)]
    kv_page_size: u32,
    /// Weight and activation dtype (default: the config's dtype / torch_dtype); the runtime
    /// converts the checkpoint's float weights when it loads them. Not for fp8 checkpoints.
    #[arg(long, value_enum)]
    dtype: Option<FloatDType>,
    /// Adapter pool dtype (default: the model's compute dtype, bf16 for fp8 checkpoints).
    #[arg(long, value_enum)]
    lora_dtype: Option<FloatDType>,
    /// Where to write the plan.
    #[arg(short, long, default_value = "plan.bin")]
    output: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum MoeLora {
    PerExpert,
    SharedOuter,
}

#[derive(Clone, Copy, ValueEnum)]
enum FloatDType {
    F32,
    Bf16,
    F16,
}

impl FloatDType {
    fn dtype(self) -> DType {
        match self {
            FloatDType::F32 => DType::F32,
            FloatDType::Bf16 => DType::BF16,
            FloatDType::F16 => DType::F16,
        }
    }
}

pub fn options(args: &Args) -> Result<CompileOptions, lorac_compiler::CompileError> {
    let max_seqs = nonzero("--max-seqs", args.max_seqs)?;
    Ok(CompileOptions {
        tp: nonzero("--tp", args.tp)?,
        ep: nonzero("--ep", args.ep)?,
        max_lora_rank: nonzero("--max-lora-rank", args.max_lora_rank)?,
        max_loras: nonzero("--max-loras", args.max_loras)?,
        targets: args.lora_target_modules.clone(),
        moe_lora: match args.moe_lora {
            MoeLora::PerExpert => MoeLoraMode::PerExpert,
            MoeLora::SharedOuter => MoeLoraMode::SharedOuter,
        },
        max_batch_tokens: nonzero("--max-batch-tokens", args.max_batch_tokens)?,
        max_seqs,
        kv_cache_tokens: args.kv_cache_tokens.unwrap_or(u64::from(max_seqs.get()) * 4096),
        kv_page_size: nonzero("--kv-page-size", args.kv_page_size)?,
        dtype: args.dtype.map(FloatDType::dtype),
        lora_dtype: args.lora_dtype.map(FloatDType::dtype),
    })
}

pub fn run(args: Args) -> Result<(), String> {
    let opts = options(&args).map_err(|e| e.to_string())?;
    let plan = compile(&args.model, &opts).map_err(|e| e.to_string())?;
    let bytes = lorac_plan::encode(&plan);
    std::fs::write(&args.output, &bytes).map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
    let rank0 = &plan.ranks[0];
    println!(
        "wrote {} ({} bytes): {} layers, tp {}, {} LoRA buffers and {:.1} MiB total per rank, {} kernels",
        args.output.display(),
        bytes.len(),
        plan.model.num_layers,
        plan.parallel.tp,
        rank0.lora_buffers.len(),
        rank0.memory.total as f64 / (1u64 << 20) as f64,
        plan.kernels.len()
    );
    Ok(())
}
