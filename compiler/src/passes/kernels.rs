//! Kernel selection.
//!
//! Reads: every node's op and the per-rank widths of its values, the linears' shards and the
//! LoRA layouts.
//! Guarantees: every node that computes something has a [`KernelSpec`] whose fields are the
//! kernel's compile-time specialisation (per-rank widths, heads, slice widths, rank, tiles);
//! equal specs are the same compiled kernel, so the plan's kernel table lists each once.

use lorac_models::spec::{Activation, LinearKind, WeightFormat};
use lorac_plan::{ActivationKind, DType, KernelSpec, LoraKernel, Rows, Tile};

use crate::error::CompileError;
use crate::ir::*;

pub struct KernelOptions {
    pub tp: u32,
    pub max_batch_tokens: u32,
    pub max_seqs: u32,
    pub weight_dtype: DType,
    pub lora_dtype: DType,
}

/// Rows of the prefill grid one LoRA launch covers per chunk: long segments are cut into
/// chunks of this many tokens so one grid shape serves any mix of prefill and decode.
pub const LORA_CHUNK_TOKENS: u32 = 64;

pub fn max_rows(rows: Rows, max_batch_tokens: u32, max_seqs: u32) -> u64 {
    match rows {
        Rows::Tokens => u64::from(max_batch_tokens),
        Rows::Seqs => u64::from(max_seqs),
        Rows::RoutedTokens { top_k } => u64::from(max_batch_tokens) * u64::from(top_k),
    }
}

/// Largest power-of-two tile (up to `max`) that divides `dim`, so no tile is ragged.
fn tile_dividing(dim: u32, max: u32) -> u32 {
    let mut t = max;
    while t > 1 && !dim.is_multiple_of(t) {
        t /= 2;
    }
    t
}

fn gemm_tile(m_max: u64, n: u32, k: u32) -> Tile {
    let m = if m_max >= 128 { 128 } else { (m_max as u32).next_power_of_two().max(16) };
    Tile { m, n: tile_dividing(n, 128), k: tile_dividing(k, 64) }
}

/// Per-rank count of a head-sharded dimension, by the sharding pass's rule.
pub fn heads_per_rank(count: u32, tp: u32, replicate: bool) -> Result<u32, CompileError> {
    if count.is_multiple_of(tp) {
        Ok(count / tp)
    } else if replicate && tp.is_multiple_of(count) {
        Ok(1)
    } else {
        // The sharding pass refuses such splits with a message naming the field; reaching
        // this is a compiler bug.
        Err(CompileError::Verify { pass: "kernels", message: format!("{count} heads do not split over tp {tp}") })
    }
}

pub fn run(g: &mut Graph, o: &KernelOptions) -> Result<(), CompileError> {
    let order = g.order.clone();
    for node in order {
        let kernel = select(g, &g.dag[node], o)?;
        g.dag[node].kernel = kernel;
    }
    Ok(())
}

fn select(g: &Graph, node: &Node, o: &KernelOptions) -> Result<Option<KernelSpec>, CompileError> {
    let out_width = |i: usize| g.rank_width(node.outputs[i]);
    let tp = o.tp;
    let per_rank = |count: &u32, replicate: bool| heads_per_rank(*count, tp, replicate);
    let sharded = |id: &LinearId| {
        g.linears[*id].shard.as_ref().ok_or(CompileError::Verify { pass: "kernels", message: "linear without shard".into() })
    };
    Ok(Some(match &node.op {
        Op::TokenIds => return Ok(None),
        Op::Embedding(id) => {
            let shard = sharded(id)?;
            KernelSpec::EmbeddingGather { rows: shard.in_features, width: shard.out_features(), dtype: o.weight_dtype }
        }
        Op::Linear(id) => {
            let linear = &g.linears[*id];
            let shard = sharded(id)?;
            let dtype = match linear.spec.format {
                WeightFormat::Fp8Block { .. } => DType::F8E4M3,
                WeightFormat::Plain => o.weight_dtype,
            };
            let (n, k) = (shard.out_features(), shard.in_features);
            let m_max = max_rows(g.values[node.inputs[0]].rows, o.max_batch_tokens, o.max_seqs);
            match (linear.spec.kind, &shard.experts, linear.top_k) {
                (LinearKind::RoutedExperts, Some((experts, _)), Some(top_k)) => {
                    let tile = gemm_tile(u64::from(o.max_batch_tokens) * u64::from(top_k) / u64::from(*experts).max(1), n, k);
                    KernelSpec::GroupedGemm { experts: *experts, top_k, n, k, dtype, tile }
                }
                _ => KernelSpec::Gemm { m_max: m_max as u32, n, k, dtype, tile: gemm_tile(m_max, n, k) },
            }
        }
        Op::RmsNorm { width } => KernelSpec::RmsNorm { width: *width },
        Op::Attention { heads, kv_heads, head_dim, output_gate, qk_norm } => KernelSpec::Attention {
            q_heads: per_rank(heads, false)?,
            kv_heads: per_rank(kv_heads, true)?,
            head_dim: *head_dim,
            output_gate: *output_gate,
            qk_norm: *qk_norm,
        },
        Op::MlaLatentNorm { q_lora_rank, kv_lora_rank, qk_rope_head_dim } => {
            KernelSpec::MlaLatentNorm { q_lora_rank: *q_lora_rank, kv_lora_rank: *kv_lora_rank, qk_rope_head_dim: *qk_rope_head_dim }
        }
        Op::Mla { heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim } => KernelSpec::MlaAttention {
            heads: per_rank(heads, false)?,
            kv_lora_rank: *kv_lora_rank,
            qk_nope_head_dim: *qk_nope_head_dim,
            qk_rope_head_dim: *qk_rope_head_dim,
            v_head_dim: *v_head_dim,
        },
        Op::GatedDeltaNet { k_heads, v_heads, k_head_dim, v_head_dim, conv_kernel, .. } => KernelSpec::GatedDeltaNet {
            k_heads: per_rank(k_heads, false)?,
            v_heads: per_rank(v_heads, false)?,
            k_head_dim: *k_head_dim,
            v_head_dim: *v_head_dim,
            conv_kernel: *conv_kernel,
        },
        Op::Mamba2 { heads, head_dim, groups, state_size, conv_kernel, .. } => KernelSpec::Mamba2Scan {
            heads: per_rank(heads, false)?,
            head_dim: *head_dim,
            groups: per_rank(groups, true)?,
            state_size: *state_size,
            conv_kernel: *conv_kernel,
        },
        Op::Activation(a) => KernelSpec::Activation {
            kind: match a {
                Activation::SwiGlu => ActivationKind::SwiGlu,
                Activation::Relu2 => ActivationKind::Relu2,
            },
            width: out_width(0),
        },
        Op::Router { experts, top_k } => KernelSpec::Router { experts: *experts, top_k: *top_k },
        Op::MoeCombine { top_k } => KernelSpec::MoeCombine { top_k: *top_k, width: out_width(0) },
        Op::Add => KernelSpec::Add { width: out_width(0) },
        Op::AllReduce => KernelSpec::AllReduce { width: out_width(0) },
        Op::GatherLast => KernelSpec::GatherRows { width: out_width(0) },
        Op::Sample => KernelSpec::Sample { vocab_per_rank: g.rank_width(node.inputs[0]) },
        Op::LoraShrink(l) | Op::LoraExpand(l) => {
            let module = &g.loras[*l];
            let linear = &g.linears[module.linear];
            let layout = &module.layout;
            let shrink = matches!(node.op, Op::LoraShrink(_));
            let spec = LoraKernel {
                groups: layout.groups(),
                slice_widths: layout.slices().iter().map(|s| s.width).collect(),
                slice_groups: layout.slices().iter().map(|s| s.group).collect(),
                max_rank: layout.max_rank(),
                in_features: layout.in_features(),
                experts: layout.experts().map(|e| (e.a.get(), e.b.get())),
                top_k: linear.top_k,
                dtype: o.lora_dtype,
                chunk_tokens: LORA_CHUNK_TOKENS,
                tile_k: if shrink { tile_dividing(layout.in_features(), 128) } else { tile_dividing(layout.max_rank(), 16) },
            };
            match (shrink, linear.spec.kind) {
                (true, LinearKind::Embedding) => KernelSpec::LoraEmbeddingShrink(spec),
                (true, LinearKind::RoutedExperts) => KernelSpec::MoeLoraShrink(spec),
                (false, LinearKind::RoutedExperts) => KernelSpec::MoeLoraExpand(spec),
                (true, _) => KernelSpec::LoraShrink(spec),
                (false, _) => KernelSpec::LoraExpand(spec),
            }
        }
    }))
}
