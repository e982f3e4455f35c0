//! MoE LoRA for prefill-sized batches: the (token, expert) pairs grouped by (slot, expert).
//!
//! [`crate::moe`] gives each pair its own cubes, which read the pair's A rows (and B columns)
//! again for every pair: right for decode, where few pairs share an expert, but at prefill
//! (T = 1024, top-8, 64 experts, 8 adapters: about 16 pairs per (slot, expert)) it re-reads
//! every adapter matrix about 16 times. Here the pairs are sorted by (slot, expert) and the
//! dense segmented shrink and expand run over them, tensor-core kernels included, on the pool
//! seen as `S·E` dense slots: `[S, E, c·R, in]` is `[S·E, c·R, in]`, and (slot `s`, expert
//! `e`) is dense slot `s·E + e` (`e` = 0 on a shared-outer side, whose expert dim is 1).
//!
//! * shrink: pairs grouped by (slot, A's expert); a pair reads x row `pair / topk` (gate_up: the
//!   token's hidden state) or `pair` (down: the pair's activated intermediate);
//! * expand into per-pair rows (gate_up; down where the engine applies the router weights when
//!   it combines the experts' outputs): pairs grouped by (slot, B's expert);
//! * router-weighted expand (down): a token's pairs use different experts and sum into one y
//!   row, which the dense expand (one cube per segment tile) cannot do without atomics, so that
//!   expand stays [`crate::moe::launch_moe_expand`].
//!
//! The grouping is built on the host from the router's choices, as the dense batch metadata is;
//! nothing here allocates on the device at launch.

use std::num::NonZeroU32;

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT, Segments};
use crate::buffer::DeviceBuffer;
use crate::error::{LoraError, Result};
use crate::expand::{ExpandCols, ExpandKernel, launch_expand_cols};
use crate::moe::{MoeInput, MoeOutput, NO_EXPERT};
use crate::pool::AdapterPool;
use crate::shrink::{ShrinkKernel, ShrinkRows, launch_shrink_rows};

/// One side's grouping: the dense view of the pool (slots `S·E`), the pairs in segments of
/// that view, and each dense slot's rank and scale (its adapter's).
#[derive(Debug, Clone)]
struct GroupedSide {
    view: LoraLayout,
    segs: DeviceSegments,
    ranks: DeviceBuffer<u32>,
    scales: DeviceBuffer<f32>,
}

impl GroupedSide {
    #[allow(clippy::too_many_arguments)]
    fn new<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        token_slots: &[u32],
        topk: u32,
        expert_ids: &[u32],
        expert_dim: u32,
    ) -> Result<Self> {
        let dense_slots = layout.slots().checked_mul(expert_dim).and_then(NonZeroU32::new);
        let dense_slots = dense_slots.ok_or_else(|| LoraError::Layout(format!("{} slots × {expert_dim} experts", layout.slots())))?;
        let max_rank = NonZeroU32::new(layout.max_rank()).ok_or_else(|| LoraError::Layout("max rank 0".into()))?;
        let view = LoraLayout::new(dense_slots, max_rank, layout.in_features(), layout.groups(), layout.slices().to_vec(), None)
            .map_err(|e| LoraError::Layout(format!("dense view of the expert layout: {e}")))?;
        let pair_slots: Vec<Option<u32>> = expert_ids
            .iter()
            .enumerate()
            .map(|(pair, &expert)| {
                let slot = token_slots[pair / topk as usize];
                let dense_expert = if expert_dim == 1 { 0 } else { expert };
                (slot != NO_SLOT && expert != NO_EXPERT).then(|| slot * expert_dim + dense_expert)
            })
            .collect();
        let segs = Segments::from_token_slots(&pair_slots, dense_slots.get())?;
        Ok(GroupedSide {
            view,
            segs: segs.upload(client),
            ranks: DeviceBuffer::upload(client, &per_expert(pool.ranks(), expert_dim)),
            scales: DeviceBuffer::upload(client, &per_expert(pool.scales(), expert_dim)),
        })
    }
}

/// A per-slot value repeated for each of the slot's `expert_dim` dense slots.
fn per_expert<T: Copy>(per_slot: &[T], expert_dim: u32) -> Vec<T> {
    per_slot.iter().flat_map(|&v| std::iter::repeat_n(v, expert_dim as usize)).collect()
}

/// A batch's (token, expert) pairs grouped by (slot, expert) for one MoE LoRA module.
#[derive(Debug, Clone)]
pub struct MoeGroups {
    layout: LoraLayout,
    topk: u32,
    input: MoeInput,
    shrink: GroupedSide,
    /// `None` for a router-weighted output (see the module doc).
    expand: Option<GroupedSide>,
}

impl MoeGroups {
    /// Groups the pairs of `segs`' tokens (`pair = t·topk + k`, `expert_ids[pair]` a local
    /// expert or [`NO_EXPERT`]) for `pool`, whose ranks and scales it copies: build it again after
    /// an adapter load. `input` and `output` are the module's (gate_up: per token, per pair;
    /// down: per pair, router-weighted).
    #[allow(clippy::too_many_arguments)]
    pub fn new<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        segs: &Segments,
        topk: u32,
        experts: u32,
        expert_ids: &[u32],
        input: MoeInput,
        output: MoeOutput,
    ) -> Result<Self> {
        pool.check_layout(layout)?;
        let dims = layout.experts().ok_or_else(|| LoraError::Layout("MoE LoRA needs an expert layout".into()))?;
        let (dim_a, dim_b) = (dims.a.get(), dims.b.get());
        for dim in [dim_a, dim_b] {
            if dim != 1 && dim != experts {
                return Err(LoraError::Layout(format!("expert dim {dim} is neither 1 (shared) nor the {experts} local experts")));
            }
        }
        if topk == 0 {
            return Err(LoraError::Layout("MoE routing with topk 0".into()));
        }
        let pairs = segs.tokens() as usize * topk as usize;
        if expert_ids.len() != pairs {
            return Err(LoraError::BufferSize { name: "expert_ids", expected: pairs, actual: expert_ids.len() });
        }
        if let Some(&expert) = expert_ids.iter().find(|&&e| e != NO_EXPERT && e >= experts) {
            return Err(LoraError::ExpertOutOfRange { expert, experts });
        }
        let token_slots = segs.token_slots();
        let side = |dim| GroupedSide::new(client, layout, pool, &token_slots, topk, expert_ids, dim);
        let expand = match output {
            MoeOutput::PerPair => Some(side(dim_b)?),
            MoeOutput::RouterWeighted => None,
        };
        Ok(MoeGroups { layout: layout.clone(), topk, input, shrink: side(dim_a)?, expand })
    }

    /// (Slot, expert) groups of the shrink and their longest run of pairs: what the kernel
    /// choice reads.
    pub fn shrink_segments(&self) -> (usize, u32) {
        (self.shrink.segs.num_segments, self.shrink.segs.max_segment_len)
    }

    fn check(&self, layout: &LoraLayout) -> Result<()> {
        if &self.layout != layout {
            return Err(LoraError::Layout("the MoE groups were built for a different LoraLayout".into()));
        }
        Ok(())
    }
}

/// Grouped MoE shrink into `out` (`[tokens·topk, c·R]`, rows `j < rank` of each pair with an
/// adapter and a local expert written); `x` as [`MoeGroups::new`]'s `input` says. `kernel`:
/// `None` chooses for the groups' sizes.
pub fn launch_moe_grouped_shrink<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    groups: &MoeGroups,
    x: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<f32>,
    kernel: Option<ShrinkKernel>,
) -> Result<()> {
    pool.check_layout(layout)?;
    groups.check(layout)?;
    let side = &groups.shrink;
    let x_row_divisor = match groups.input {
        MoeInput::PerToken => groups.topk,
        MoeInput::PerPair => 1,
    };
    let rows = ShrinkRows { a_pool: &pool.a, ranks: &side.ranks, x_row_divisor };
    launch_shrink_rows(client, &side.view, rows, &side.segs, x, out, kernel)
}

/// Grouped MoE expand into per-pair rows of `y` (`[tokens·topk, out]`). A router-weighted
/// output is an error: it goes through [`crate::moe::launch_moe_expand`].
pub fn launch_moe_grouped_expand<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    groups: &MoeGroups,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
) -> Result<()> {
    pool.check_layout(layout)?;
    groups.check(layout)?;
    let side = groups
        .expand
        .as_ref()
        .ok_or_else(|| LoraError::Layout("a router-weighted MoE expand sums a token's experts: use launch_moe_expand".into()))?;
    let cols = ExpandCols { b_pool: &pool.b, slice_table: &pool.slice_table, ranks: &side.ranks, scales: &side.scales };
    launch_expand_cols(client, &side.view, cols, &side.segs, a, y, kernel)
}
