//! The compiled plan: everything the runtime needs, with every shape and offset decided.

use serde::{Deserialize, Serialize};

use crate::{DType, LoraLayout};

/// Typed index of a kernel in [`Plan::kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KernelId(pub u32);

/// Typed index of a value (activation tensor) in [`Plan::values`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub source: Source,
    pub model: ModelSummary,
    pub parallel: Parallel,
    pub lora: LoraSettings,
    pub limits: Limits,
    /// Every distinct kernel specialisation, compiled once by the runtime at start-up.
    pub kernels: Vec<KernelSpec>,
    /// Execution order; identical on every rank (all ranks hold equally shaped shards).
    pub nodes: Vec<PlanNode>,
    pub values: Vec<PlanValue>,
    pub ranks: Vec<RankPlan>,
}

/// What the plan was compiled from, so `serve` can refuse a mismatched model directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub model_dir: String,
    /// SHA-256 of config.json's bytes.
    pub config_sha256: [u8; 32],
    pub compiler_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub model_type: String,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub vocab_size: u32,
    pub dtype: DType,
    pub tie_word_embeddings: bool,
    pub norm: crate::NormConstants,
    pub rope: Option<crate::Rope>,
    pub max_position_embeddings: Option<u32>,
    /// QKᵀ scale of every softmax-attention layer (MLA: with yarn's mscale²); None when the
    /// model has no softmax attention.
    pub softmax_scale: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parallel {
    pub tp: u32,
    pub ep: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoeLoraMode {
    /// Every local expert has its own A and B.
    PerExpert,
    /// One A shared by all experts on gate_up's input side, one B on down's output side.
    SharedOuter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub max_rank: u32,
    pub max_loras: u32,
    /// The targets as the user gave them.
    pub requested: Vec<String>,
    /// The HF module names that ended up targeted, sorted.
    pub targets: Vec<String>,
    pub moe_lora: MoeLoraMode,
    pub dtype: DType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_batch_tokens: u32,
    pub max_seqs: u32,
    /// A multiple of `kv_page_size`.
    pub kv_cache_tokens: u64,
    /// Tokens per page of the paged KV cache.
    pub kv_page_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParallelKind {
    Column,
    Row,
    Replicated,
    Vocab,
}

impl ParallelKind {
    pub fn name(self) -> &'static str {
        match self {
            ParallelKind::Column => "column",
            ParallelKind::Row => "row",
            ParallelKind::Replicated => "replicated",
            ParallelKind::Vocab => "vocab",
        }
    }
}

/// How many rows an activation has at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rows {
    /// One per batch token (`max_batch_tokens`).
    Tokens,
    /// One per sequence (`max_seqs`): the last positions that reach lm_head.
    Seqs,
    /// One per (token, chosen expert): `max_batch_tokens × top_k`.
    RoutedTokens { top_k: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanValue {
    pub name: String,
    pub rows: Rows,
    /// Per-rank width.
    pub width: u32,
    pub dtype: DType,
    pub bytes: u64,
    /// Offset in the activation arena (values that alias an in-place update share it).
    pub arena_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanNode {
    pub label: String,
    pub layer: Option<u32>,
    pub kernel: Option<KernelId>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// For LoRA nodes: the index into each rank's `lora_buffers`.
    pub lora_buffer: Option<u32>,
    /// For linear, embedding and LoRA nodes: what the linear layer (the one a LoRA node
    /// adapts) computes, so the runtime knows its projections without reading labels.
    pub role: Option<LinearRole>,
    /// Checkpoint tensors the node reads (full names; routed experts hold `{expert}`). A
    /// linear lists `{module}.weight` per packed module in row order (then its biases or
    /// scales, where it has them); a tied lm_head lists the embedding's table. A norm lists its
    /// weight; attention with `qk_norm` lists q_norm's weight, then k_norm's.
    pub weights: Vec<String>,
}

/// The part a linear layer plays in its block, set by lowering from where the typed model
/// description holds it (never from module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearRole {
    /// Token embedding table (a lookup).
    Embedding,
    /// Output projection to the vocabulary.
    LmHead,
    /// GQA attention's fused q|k|v (q with its output gate where the model has one).
    AttentionQkv,
    /// Attention's output projection.
    AttentionOut,
    /// MLA's fused (q_a|)kv_a latent projection.
    MlaLatent,
    /// MLA's query projection (from the q latent, or the hidden state without one).
    MlaQuery,
    /// MLA's kv_b projection out of the kv latent.
    MlaKv,
    /// MLA's output projection.
    MlaOut,
    /// Gated DeltaNet's fused q|k|v|z input projection.
    DeltaNetQkvz,
    /// Gated DeltaNet's b|a input projection.
    DeltaNetBa,
    /// Gated DeltaNet's output projection.
    DeltaNetOut,
    /// Mamba2's fused z|x|B|C|dt input projection.
    Mamba2In,
    /// Mamba2's output projection.
    Mamba2Out,
    /// A dense MLP's gate|up (gated activation) or up projection.
    MlpUp,
    /// A dense MLP's down projection.
    MlpDown,
    /// The shared expert's gate|up or up projection (an MoE block's dense MLP).
    SharedExpertUp,
    /// The shared expert's down projection.
    SharedExpertDown,
    /// Routed experts' gate|up or up projections.
    ExpertsUp,
    /// Routed experts' down projections.
    ExpertsDown,
    /// Latent MoE: hidden → latent before the experts.
    LatentIn,
    /// Latent MoE: latent → hidden after the experts.
    LatentOut,
}

/// One compiled kernel specialisation. Every field is a compile-time parameter of the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KernelSpec {
    /// Dense GEMM `[m ≤ m_max, k] × [k, n]`.
    Gemm {
        m_max: u32,
        n: u32,
        k: u32,
        dtype: DType,
        tile: Tile,
    },
    /// Routed experts' grouped GEMM.
    GroupedGemm {
        experts: u32,
        top_k: u32,
        n: u32,
        k: u32,
        dtype: DType,
        tile: Tile,
    },
    EmbeddingGather {
        rows: u32,
        width: u32,
        dtype: DType,
    },
    /// Picks each sequence's last position before the final norm and lm_head.
    GatherRows {
        width: u32,
    },
    /// MLA's q_a/kv_a layernorms and the split of the fused latent.
    MlaLatentNorm {
        q_lora_rank: u32,
        kv_lora_rank: u32,
        qk_rope_head_dim: u32,
    },
    RmsNorm {
        width: u32,
    },
    Activation {
        kind: ActivationKind,
        width: u32,
    },
    Attention {
        q_heads: u32,
        kv_heads: u32,
        head_dim: u32,
        output_gate: bool,
        qk_norm: bool,
    },
    MlaAttention {
        heads: u32,
        kv_lora_rank: u32,
        qk_nope_head_dim: u32,
        qk_rope_head_dim: u32,
        v_head_dim: u32,
    },
    GatedDeltaNet {
        k_heads: u32,
        v_heads: u32,
        k_head_dim: u32,
        v_head_dim: u32,
        conv_kernel: u32,
    },
    Mamba2Scan {
        heads: u32,
        head_dim: u32,
        groups: u32,
        state_size: u32,
        conv_kernel: u32,
    },
    Router {
        experts: u32,
        top_k: u32,
    },
    MoeCombine {
        top_k: u32,
        width: u32,
    },
    Add {
        width: u32,
    },
    AllReduce {
        width: u32,
    },
    Sample {
        vocab_per_rank: u32,
    },
    LoraShrink(LoraKernel),
    LoraExpand(LoraKernel),
    LoraEmbeddingShrink(LoraKernel),
    MoeLoraShrink(LoraKernel),
    MoeLoraExpand(LoraKernel),
}

impl KernelSpec {
    /// The kernel family, without its specialisation.
    pub fn family(&self) -> &'static str {
        match self {
            KernelSpec::Gemm { .. } => "gemm",
            KernelSpec::GroupedGemm { .. } => "grouped_gemm",
            KernelSpec::EmbeddingGather { .. } => "embedding_gather",
            KernelSpec::GatherRows { .. } => "gather_rows",
            KernelSpec::MlaLatentNorm { .. } => "mla_latent_norm",
            KernelSpec::RmsNorm { .. } => "rms_norm",
            KernelSpec::Activation { .. } => "activation",
            KernelSpec::Attention { .. } => "attention",
            KernelSpec::MlaAttention { .. } => "mla_attention",
            KernelSpec::GatedDeltaNet { .. } => "gated_delta_net",
            KernelSpec::Mamba2Scan { .. } => "mamba2_scan",
            KernelSpec::Router { .. } => "router",
            KernelSpec::MoeCombine { .. } => "moe_combine",
            KernelSpec::Add { .. } => "add",
            KernelSpec::AllReduce { .. } => "all_reduce",
            KernelSpec::Sample { .. } => "sample",
            KernelSpec::LoraShrink(_) => "lora_shrink",
            KernelSpec::LoraExpand(_) => "lora_expand",
            KernelSpec::LoraEmbeddingShrink(_) => "lora_embedding_shrink",
            KernelSpec::MoeLoraShrink(_) => "moe_lora_shrink",
            KernelSpec::MoeLoraExpand(_) => "moe_lora_expand",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActivationKind {
    SwiGlu,
    Relu2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tile {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// Compile-time parameters of a LoRA kernel: the packing (groups, slice widths), the rank and
/// the tile along the reduced dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoraKernel {
    pub groups: u32,
    pub slice_widths: Vec<u32>,
    pub slice_groups: Vec<u32>,
    pub max_rank: u32,
    pub in_features: u32,
    /// Experts on A's and B's side (routed experts only).
    pub experts: Option<(u32, u32)>,
    pub top_k: Option<u32>,
    pub dtype: DType,
    /// Rows per chunk of the chunked (prefill) grid: one launch shape serves any batch.
    pub chunk_tokens: u32,
    /// Reduction tile (input features for shrink, rank for expand).
    pub tile_k: u32,
}

/// One rank's share: its LoRA buffers and its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    pub rank: u32,
    pub lora_buffers: Vec<LoraBuffer>,
    pub memory: Memory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraBuffer {
    /// None for embed_tokens and lm_head.
    pub layer: Option<u32>,
    pub module: String,
    pub parallel: ParallelKind,
    pub layout: LoraLayout,
    /// For each slice, the rows of the full (unsharded) weight this rank takes.
    pub slice_rows: Vec<(u32, u32)>,
    /// The columns of the full input this rank takes (row-parallel and vocab-parallel input).
    pub input_cols: (u32, u32),
    /// The experts this rank holds (routed experts).
    pub experts: Option<(u32, u32)>,
    /// The HF module names (PEFT targets) packed in, in group order.
    pub hf_modules: Vec<String>,
    /// Their checkpoint paths (`model.layers.3.self_attn.q_proj`), in group order; routed
    /// experts hold `{expert}` where the expert index goes. PEFT adapter tensors are named
    /// `base_model.model.<path>.lora_A.weight`.
    pub hf_paths: Vec<String>,
    /// Byte offsets of A and B inside this rank's adapter pool.
    pub a_offset: u64,
    pub b_offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    pub weights: u64,
    pub lora_pool: u64,
    pub activations: u64,
    pub kv_cache: u64,
    pub state_cache: u64,
    pub total: u64,
}
