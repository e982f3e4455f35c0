//! Static memory planning.
//!
//! Reads: program order, every value's rows, per-rank width and dtype, the attention and
//! state-space ops, `--max-batch-tokens`, `--max-seqs` and the KV cache budget.
//! Guarantees: every value has an offset in one activation arena such that no two values
//! whose lifetimes overlap share bytes (values updated in place share their base's storage);
//! KV and recurrent-state caches are sized per rank. Placement is the greedy-by-size scheme
//! of TFLite Micro and TVM's StaticPlanBlockMemory: largest first, at the lowest offset that
//! does not collide with a placed buffer alive at the same time.

use std::collections::HashMap;

use lorac_plan::DType;

use crate::error::CompileError;
use crate::ir::*;
use crate::passes::kernels::{heads_per_rank, max_rows};

/// Offsets are aligned for vectorised access.
pub const ALIGN: u64 = 256;

pub struct MemoryOptions {
    pub tp: u32,
    pub max_batch_tokens: u32,
    pub max_seqs: u32,
    pub kv_cache_tokens: u64,
    pub cache_dtype: DType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationPlan {
    /// Per value: (bytes, arena offset).
    pub placement: Vec<(u64, u64)>,
    pub arena_bytes: u64,
}

fn storage_root(g: &Graph, mut v: ValueId) -> ValueId {
    while let Some(base) = g.values[v].alias_of {
        v = base;
    }
    v
}

pub fn value_bytes(g: &Graph, v: ValueId, o: &MemoryOptions) -> u64 {
    let value = &g.values[v];
    max_rows(value.rows, o.max_batch_tokens, o.max_seqs) * u64::from(g.rank_width(v)) * value.dtype.size_bytes()
}

pub fn plan_activations(g: &Graph, o: &MemoryOptions) -> ActivationPlan {
    let last = g.order.len().saturating_sub(1);
    // Lifetime of each storage: from its first write to its last read.
    let mut life: HashMap<ValueId, (usize, usize, u64)> = HashMap::new();
    let mut touch = |root: ValueId, at: usize, bytes: u64| {
        let entry = life.entry(root).or_insert((at, at, 0));
        entry.0 = entry.0.min(at);
        entry.1 = entry.1.max(at);
        entry.2 = entry.2.max(bytes);
    };
    for (position, (_, node)) in g.nodes_in_order().enumerate() {
        for &v in node.inputs.iter().chain(&node.outputs) {
            touch(storage_root(g, v), position, value_bytes(g, v, o));
        }
    }
    // Values nobody reads (the sampled tokens) are results: they live to the end.
    let consumed: std::collections::HashSet<ValueId> = g.nodes_in_order().flat_map(|(_, n)| n.inputs.iter().copied()).collect();
    for (id, value) in g.values.iter() {
        if value.producer.is_some() && !consumed.contains(&id) {
            touch(storage_root(g, id), last, value_bytes(g, id, o));
        }
    }
    let mut storages: Vec<(ValueId, usize, usize, u64)> =
        life.into_iter().map(|(v, (s, e, b))| (v, s, e, b.next_multiple_of(ALIGN))).collect();
    storages.sort_by(|a, b| b.3.cmp(&a.3).then(a.1.cmp(&b.1)).then(a.0.cmp(&b.0)));
    let mut placed: Vec<(usize, usize, u64, u64)> = Vec::new();
    let mut offsets: HashMap<ValueId, u64> = HashMap::new();
    let mut arena = 0;
    for (root, start, end, size) in storages {
        let mut busy: Vec<(u64, u64)> = placed.iter().filter(|p| p.0 <= end && start <= p.1).map(|p| (p.2, p.2 + p.3)).collect();
        busy.sort_unstable();
        let mut offset = 0;
        for (lo, hi) in busy {
            if offset + size <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        placed.push((start, end, offset, size));
        offsets.insert(root, offset);
        arena = arena.max(offset + size);
    }
    let placement = g
        .values
        .iter()
        .map(|(v, _)| {
            let root = storage_root(g, v);
            match offsets.get(&root) {
                Some(offset) => (value_bytes(g, v, o), *offset),
                None => (0, 0),
            }
        })
        .collect();
    ActivationPlan { placement, arena_bytes: arena }
}

/// Per-rank KV cache: K and V for each attention layer's local KV heads; MLA caches its
/// compressed latent and rope key, which every rank holds whole.
pub fn kv_cache_bytes(g: &Graph, o: &MemoryOptions) -> Result<u64, CompileError> {
    let size = o.cache_dtype.size_bytes();
    let mut total = 0;
    for (_, node) in g.nodes_in_order() {
        total += match node.op {
            Op::Attention { kv_heads, head_dim, .. } => 2 * u64::from(heads_per_rank(kv_heads, o.tp, true)?) * u64::from(head_dim) * size,
            Op::Mla { kv_lora_rank, qk_rope_head_dim, .. } => u64::from(kv_lora_rank + qk_rope_head_dim) * size,
            _ => 0,
        } * o.kv_cache_tokens;
    }
    Ok(total)
}

/// Per-rank recurrent state for each sequence: the causal-conv window and the SSM / delta-rule
/// state of the local heads.
pub fn state_cache_bytes(g: &Graph, o: &MemoryOptions) -> Result<u64, CompileError> {
    let conv_size = o.cache_dtype.size_bytes();
    let mut per_seq = 0;
    for (_, node) in g.nodes_in_order() {
        per_seq += match node.op {
            Op::GatedDeltaNet { k_heads, v_heads, k_head_dim, v_head_dim, conv_kernel, state_dtype } => {
                let (k, v) = (u64::from(heads_per_rank(k_heads, o.tp, false)?), u64::from(heads_per_rank(v_heads, o.tp, false)?));
                let conv_channels = 2 * k * u64::from(k_head_dim) + v * u64::from(v_head_dim);
                conv_channels * u64::from(conv_kernel - 1) * conv_size
                    + v * u64::from(k_head_dim) * u64::from(v_head_dim) * state_dtype.size_bytes()
            }
            Op::Mamba2 { heads, head_dim, groups, state_size, conv_kernel, state_dtype } => {
                let h = u64::from(heads_per_rank(heads, o.tp, false)?);
                let gr = u64::from(heads_per_rank(groups, o.tp, true)?);
                let conv_channels = h * u64::from(head_dim) + 2 * gr * u64::from(state_size);
                conv_channels * u64::from(conv_kernel - 1) * conv_size
                    + h * u64::from(head_dim) * u64::from(state_size) * state_dtype.size_bytes()
            }
            _ => 0,
        };
    }
    Ok(per_seq * u64::from(o.max_seqs))
}
