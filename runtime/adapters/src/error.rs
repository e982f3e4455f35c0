//! Every way an adapter (or a pool operation) can be refused. Each variant names the file,
//! tensor, field or slot at fault so the message alone tells the user what to fix.

use std::path::PathBuf;

fn join(items: &[String]) -> String {
    items.join(", ")
}

/// The PEFT module name at the end of a module path.
fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn shape(dims: &[u64]) -> String {
    format!("[{}]", dims.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot read {}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },

    #[error("{} is not valid JSON: {message}", file.display())]
    ConfigSyntax { file: PathBuf, message: String },

    #[error("{}: field `{field}`: {message}", file.display())]
    ConfigField { file: PathBuf, field: String, message: String },

    #[error("{}: `{field}` {setting}: lorac does not support {what}", file.display())]
    Unsupported { file: PathBuf, field: &'static str, setting: String, what: &'static str },

    #[error("{} is not a readable safetensors file (truncated or corrupted?): {message}", file.display())]
    Unreadable { file: PathBuf, message: String },

    #[error("{}: tensor `{tensor}`: {reason}", file.display())]
    UnexpectedTensor { file: PathBuf, tensor: String, reason: String },

    #[error(
        "{}: tensor `{tensor}` targets module `{module}` ({}), which is outside the plan; the plan's LoRA targets are: {} (recompile the plan with this module among --lora-target-modules)",
        file.display(), leaf(module), join(plan_targets)
    )]
    OutsidePlan { file: PathBuf, tensor: String, module: String, plan_targets: Vec<String> },

    #[error(
        "{}: tensor `{tensor}` targets module `{module}`, which the base model does not have (the plan holds {} LoRA at: {}); is the adapter for another base model?",
        file.display(), leaf(module), join(plan_paths)
    )]
    UnknownModule { file: PathBuf, tensor: String, module: String, plan_paths: Vec<String> },

    #[error("{}: tensor `{missing}` is missing (its pair `{present}` is present)", file.display())]
    MissingTensor { file: PathBuf, missing: String, present: String },

    #[error("{}: tensor `{tensor}` has shape {}, expected {} ({why})", file.display(), shape(found), shape(expected))]
    ShapeMismatch { file: PathBuf, tensor: String, expected: Vec<u64>, found: Vec<u64>, why: String },

    #[error("{}: module `{module}` has LoRA rank {rank}, above the plan's max rank {max_rank} (recompile with --max-lora-rank {rank} or more)", file.display())]
    RankTooLarge { file: PathBuf, module: String, rank: u32, max_rank: u32 },

    #[error("{}: module `{module}` has LoRA rank {found} in its tensors but {config} in adapter_config.json ({field})", file.display())]
    RankMismatch { file: PathBuf, module: String, found: u32, config: u32, field: String },

    #[error("{}: tensor `{tensor}` has dtype {dtype}; adapter tensors must be F32, F16 or BF16", file.display())]
    Dtype { file: PathBuf, tensor: String, dtype: String },

    #[error("{}: tensor `{tensor}` contains NaN or infinite values", file.display())]
    NonFinite { file: PathBuf, tensor: String },

    #[error(
        "{}: module `{module}`: the plan stores one LoRA {side} shared by all experts (--moe-lora shared-outer) but the adapter's per-expert {side} tensors differ (expert {first} vs expert {other}); recompile the plan with --moe-lora per-expert",
        file.display()
    )]
    SharedOuter { file: PathBuf, module: String, side: &'static str, first: u32, other: u32 },

    #[error("{}: no LoRA tensors (expected `base_model.model.<module>.lora_A.weight` / `lora_B.weight`)", file.display())]
    Empty { file: PathBuf },

    #[error("the plan's adapter pool dtype {0} is not supported by the host pool (f32, bf16 or f16)")]
    PoolDtype(lorac_plan::DType),

    #[error("the plan is inconsistent: {0}")]
    PlanInconsistent(String),

    #[error("slot {slot} does not exist (the pool has {slots} slots, --max-loras)")]
    SlotOutOfRange { slot: usize, slots: usize },

    #[error("slot {slot} already holds adapter `{name}`; unload it first")]
    SlotOccupied { slot: usize, name: String },

    #[error("an adapter named `{name}` is already loaded (slot {slot})")]
    AlreadyLoaded { name: String, slot: usize },

    #[error("adapter `{name}` was validated against another plan than this pool's")]
    PlanMismatch { name: String },
}
