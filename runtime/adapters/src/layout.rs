//! What the loader and the host pool take from a plan: every rank's LoRA buffers plus the
//! facts derived from them once (full HF widths, which buffer is an embedding, expert counts).
//! An adapter keeps the layout it was validated against and the pool refuses one whose layout
//! differs from its own, so a [`crate::LoadedAdapter`] can only land in the plan it was checked
//! for.

use lorac_plan::{DType, KernelSpec, LoraBuffer, MoeLoraMode, Plan};

use crate::error::AdapterError;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolLayout {
    pub dtype: DType,
    pub max_rank: u32,
    pub slots: u32,
    pub moe_lora: MoeLoraMode,
    /// The plan's LoRA targets (HF module names), for error messages.
    pub targets: Vec<String>,
    /// Per rank: its LoRA buffers (index-aligned across ranks) and its pool size in bytes.
    pub ranks: Vec<(Vec<LoraBuffer>, u64)>,
    /// Per buffer (rank independent):
    pub info: Vec<BufferInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BufferInfo {
    /// Fed by `lora_embedding_A/B` (a gather of A's columns) rather than `lora_A/B`.
    pub embedding: bool,
    /// Input width of the full, unsharded HF weight.
    pub full_in: u32,
    /// Per slice: its full width and its first row inside its HF module's weight.
    pub slice_full: Vec<u32>,
    pub slice_module_offset: Vec<u32>,
    /// Per group (HF module): its full output width (rows of `lora_B`).
    pub group_out: Vec<u32>,
    /// Routed experts: the model's expert count.
    pub total_experts: Option<u32>,
}

fn inconsistent(message: String) -> AdapterError {
    AdapterError::PlanInconsistent(message)
}

impl PoolLayout {
    pub fn of(plan: &Plan) -> Result<PoolLayout, AdapterError> {
        let dtype = plan.lora.dtype;
        let first = plan.ranks.first().ok_or_else(|| inconsistent("the plan has no ranks".into()))?;
        let count = first.lora_buffers.len();
        for r in &plan.ranks {
            if r.lora_buffers.len() != count {
                return Err(inconsistent(format!("rank {} has {} LoRA buffers, rank 0 has {count}", r.rank, r.lora_buffers.len())));
            }
            for (i, (b, b0)) in r.lora_buffers.iter().zip(&first.lora_buffers).enumerate() {
                if (b.layer, &b.module, &b.layout, &b.hf_paths, &b.hf_modules)
                    != (b0.layer, &b0.module, &b0.layout, &b0.hf_paths, &b0.hf_modules)
                {
                    return Err(inconsistent(format!("LoRA buffer {i} differs between rank 0 and rank {}", r.rank)));
                }
                check_buffer(i, r.rank, b, dtype, r.memory.lora_pool, plan.lora.max_loras)?;
            }
        }
        let embedding_buffers: Vec<u32> = plan
            .nodes
            .iter()
            .filter_map(|n| match (n.lora_buffer, n.kernel.and_then(|k| plan.kernels.get(k.0 as usize))) {
                (Some(buffer), Some(KernelSpec::LoraEmbeddingShrink(_))) => Some(buffer),
                _ => None,
            })
            .collect();
        let info = (0..count)
            .map(|i| {
                let per_rank: Vec<&LoraBuffer> = plan.ranks.iter().map(|r| &r.lora_buffers[i]).collect();
                let b0 = per_rank[0];
                let slices = b0.layout.slices();
                let slice_full: Vec<u32> =
                    (0..slices.len()).map(|s| per_rank.iter().map(|b| b.slice_rows[s].1).max().unwrap_or(0)).collect();
                let mut slice_module_offset = vec![0; slices.len()];
                let mut group_out = vec![0u32; b0.layout.groups() as usize];
                for (s, slice) in slices.iter().enumerate() {
                    slice_module_offset[s] = group_out[slice.group as usize];
                    group_out[slice.group as usize] += slice_full[s];
                }
                let total_experts = per_rank.iter().filter_map(|b| b.experts.map(|e| e.1)).max();
                BufferInfo {
                    embedding: embedding_buffers.contains(&(i as u32)),
                    full_in: per_rank.iter().map(|b| b.input_cols.1).max().unwrap_or(0),
                    slice_full,
                    slice_module_offset,
                    group_out,
                    total_experts,
                }
            })
            .collect();
        Ok(PoolLayout {
            dtype,
            max_rank: plan.lora.max_rank,
            slots: plan.lora.max_loras,
            moe_lora: plan.lora.moe_lora,
            targets: plan.lora.targets.clone(),
            ranks: plan.ranks.iter().map(|r| (r.lora_buffers.clone(), r.memory.lora_pool)).collect(),
            info,
        })
    }

    /// Whether the routed-expert buffer `buffer` stores one A (`a_side`) or one B shared by
    /// the rank's several experts (shared-outer MoE LoRA).
    pub fn shared(&self, buffer: usize, a_side: bool) -> bool {
        let b = &self.ranks[0].0[buffer];
        match (b.layout.experts(), b.experts) {
            (Some(dims), Some((e0, e1))) => {
                let stored = if a_side { dims.a.get() } else { dims.b.get() };
                stored == 1 && e1 - e0 > 1
            }
            _ => false,
        }
    }
}

fn check_buffer(i: usize, rank: u32, b: &LoraBuffer, dtype: DType, pool: u64, slots: u32) -> Result<(), AdapterError> {
    let l = &b.layout;
    let what = |m: &str| inconsistent(format!("rank {rank} LoRA buffer {i} ({}): {m}", b.module));
    if l.slots() != slots {
        return Err(what(&format!("{} slots but --max-loras is {slots}", l.slots())));
    }
    if b.slice_rows.len() != l.slices().len() {
        return Err(what("slice_rows does not have one range per slice"));
    }
    for ((lo, hi), s) in b.slice_rows.iter().zip(l.slices()) {
        if lo > hi || hi - lo > s.width {
            return Err(what(&format!("slice {} takes rows {lo}..{hi}, wider than its {} rows", s.name, s.width)));
        }
    }
    let (c0, c1) = b.input_cols;
    if c0 > c1 || c1 - c0 > l.in_features() {
        return Err(what(&format!("input_cols {c0}..{c1} wider than in_features {}", l.in_features())));
    }
    if b.hf_paths.len() != l.groups() as usize || b.hf_modules.len() != l.groups() as usize {
        return Err(what("hf_paths / hf_modules do not have one entry per group"));
    }
    match (l.experts(), b.experts) {
        (None, None) => {}
        (Some(dims), Some((e0, e1))) => {
            let local = e1.saturating_sub(e0);
            for stored in [dims.a.get(), dims.b.get()] {
                if stored != local && stored != 1 {
                    return Err(what(&format!("stores {stored} experts but the rank holds experts {e0}..{e1}")));
                }
            }
            if !b.hf_paths.iter().all(|p| p.matches("{expert}").count() == 1) {
                return Err(what("routed-expert paths must hold one `{expert}`"));
            }
        }
        _ => return Err(what("expert range and layout disagree")),
    }
    let size = dtype.size_bytes();
    for (offset, elements) in [(b.a_offset, l.a_elements()), (b.b_offset, l.b_elements())] {
        let end = elements.checked_mul(size).and_then(|bytes| bytes.checked_add(offset));
        if end.is_none_or(|end| end > pool) {
            return Err(what(&format!("ends past the {pool}-byte adapter pool")));
        }
    }
    Ok(())
}
