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
//!   row, which the dense expand (one cube per segment tile) cannot do without atomics; the
//!   grouped expand writes per-pair rows of a [`PairScratch`] instead, and
//!   [`crate::moe_combine`] sums each token's rows with its router weights (and clears them).
//!
//! Two ways to build the grouping: [`MoeGroups::new`] sorts on the host from the router's
//! choices (one segment per group; for tests, benchmarks and engines that hold the choices on
//! the host), and [`MoeGroups::on_device`] with [`MoeGroups::regroup`] sorts on the GPU from the
//! router's device output into buffers sized once for the largest batch, each group cut into
//! fixed chunks so the grid depends on the batch size alone: no host copy of the router's
//! choices, no synchronisation and no allocation per batch.

use std::num::NonZeroU32;

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT, Segments};
use crate::buffer::DeviceBuffer;
use crate::error::{LoraError, Result};
use crate::expand::{ExpandCols, ExpandKernel, launch_expand_cols};
use crate::moe::{MoeInput, MoeOutput, MoeRouting, NO_EXPERT, check_expert_ids, expert_dims};
use crate::moe_combine::{PairScratch, launch_moe_combine};
use crate::pool::AdapterPool;
use crate::shrink::{ShrinkKernel, ShrinkRows, launch_shrink_rows};

/// One side's grouping: the dense view of the pool (slots `S·E`), the pairs in segments of
/// that view, and each dense slot's rank and scale (its adapter's).
#[derive(Debug, Clone)]
struct GroupedSide {
    view: LoraLayout,
    /// 1 on a shared-outer side, else the local experts.
    expert_dim: u32,
    segs: DeviceSegments,
    ranks: DeviceBuffer<u32>,
    scales: DeviceBuffer<f32>,
    /// Full-size buffers [`MoeGroups::regroup`] fills (`segs` views their prefixes).
    device: Option<SideBuffers>,
}

/// One side's grouping buffers for the largest batch, and the grouping kernel's scratch.
#[derive(Debug, Clone)]
struct SideBuffers {
    seg_indptr: DeviceBuffer<u32>,
    weight_indices: DeviceBuffer<u32>,
    token_perm: DeviceBuffer<u32>,
    pair_slots: DeviceBuffer<u32>,
    /// Per dense slot: its pairs, then the scatter's running cursor.
    counts: DeviceBuffer<u32>,
    /// Per dense slot: the position of its first pair.
    starts: DeviceBuffer<u32>,
}

impl GroupedSide {
    /// The dense view of `layout` with `expert_dim` dense slots per slot and each dense slot's
    /// rank and scale, over the batch segments `segs`.
    fn view<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        expert_dim: u32,
        segs: DeviceSegments,
    ) -> Result<Self> {
        let dense_slots = layout.slots().checked_mul(expert_dim).and_then(NonZeroU32::new);
        let dense_slots = dense_slots.ok_or_else(|| LoraError::Layout(format!("{} slots × {expert_dim} experts", layout.slots())))?;
        let max_rank = NonZeroU32::new(layout.max_rank()).ok_or_else(|| LoraError::Layout("max rank 0".into()))?;
        let view = LoraLayout::new(dense_slots, max_rank, layout.in_features(), layout.groups(), layout.slices().to_vec(), None)
            .map_err(|e| LoraError::Layout(format!("dense view of the expert layout: {e}")))?;
        Ok(GroupedSide {
            view,
            expert_dim,
            segs,
            ranks: DeviceBuffer::upload(client, &per_expert(pool.ranks(), expert_dim)),
            scales: DeviceBuffer::upload(client, &per_expert(pool.scales(), expert_dim)),
            device: None,
        })
    }

    /// Grouped on the host: one segment per nonempty (slot, expert).
    #[allow(clippy::too_many_arguments)]
    fn on_host<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        token_slots: &[u32],
        topk: u32,
        expert_ids: &[u32],
        expert_dim: u32,
    ) -> Result<Self> {
        let pair_slots: Vec<Option<u32>> = expert_ids
            .iter()
            .enumerate()
            .map(|(pair, &expert)| {
                let slot = token_slots[pair / topk as usize];
                let dense_expert = if expert_dim == 1 { 0 } else { expert };
                (slot != NO_SLOT && expert != NO_EXPERT).then(|| slot * expert_dim + dense_expert)
            })
            .collect();
        let segs = Segments::from_token_slots(&pair_slots, layout.slots().saturating_mul(expert_dim))?;
        Self::view(client, layout, pool, expert_dim, segs.upload(client))
    }

    /// Buffers for up to `max_pairs` pairs in `chunk`-pair segments, grouped on the device.
    fn on_device<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        expert_dim: u32,
        max_pairs: u32,
        chunk: u32,
    ) -> Result<Self> {
        let dense_slots = layout.slots().saturating_mul(expert_dim);
        let capacity = Segments::chunk_capacity(max_pairs, dense_slots, chunk);
        let buffers = SideBuffers {
            seg_indptr: DeviceBuffer::empty(client, capacity + 1),
            weight_indices: DeviceBuffer::empty(client, capacity),
            token_perm: DeviceBuffer::empty(client, max_pairs as usize),
            pair_slots: DeviceBuffer::empty(client, max_pairs as usize),
            counts: DeviceBuffer::empty(client, dense_slots as usize),
            starts: DeviceBuffer::empty(client, dense_slots as usize),
        };
        // No batch yet: no segments.
        let segs = DeviceSegments {
            tokens: 0,
            slots: dense_slots,
            num_segments: 0,
            max_segment_len: chunk,
            seg_indptr: buffers.seg_indptr.clone(),
            weight_indices: buffers.weight_indices.clone(),
            token_perm: buffers.token_perm.clone(),
            token_slots: buffers.pair_slots.clone(),
        };
        Ok(GroupedSide { device: Some(buffers), ..Self::view(client, layout, pool, expert_dim, segs)? })
    }

    fn read_segments<R: Runtime>(&self, client: &ComputeClient<R>) -> Result<Segments> {
        let segs = &self.segs;
        let seg_indptr = segs.seg_indptr.read(client);
        let mut token_perm = segs.token_perm.read(client);
        // Past the last segment the permutation holds nothing of this batch.
        token_perm.truncate(seg_indptr.last().map_or(0, |&end| end as usize));
        Segments::new(segs.tokens, seg_indptr, segs.weight_indices.read(client), token_perm, segs.slots)
    }

    /// Sorts the batch's pairs by dense slot on the device into `chunk`-pair segments.
    fn regroup<R: Runtime>(&mut self, client: &ComputeClient<R>, token_slots: &DeviceBuffer<u32>, routing: &MoeRouting) -> Result<()> {
        let Some(buffers) = &self.device else {
            return Err(LoraError::Layout("MoE groups built on the host: build them with MoeGroups::on_device to regroup".into()));
        };
        let chunk = self.segs.max_segment_len;
        let (pairs, dense_slots) = (routing.pairs() as u32, self.view.slots());
        let capacity = Segments::chunk_capacity(pairs, dense_slots, chunk);
        let segs = DeviceSegments {
            tokens: pairs,
            slots: dense_slots,
            num_segments: capacity,
            max_segment_len: chunk,
            seg_indptr: buffers.seg_indptr.prefix(capacity + 1)?,
            weight_indices: buffers.weight_indices.prefix(capacity)?,
            token_perm: buffers.token_perm.prefix(pairs as usize)?,
            token_slots: buffers.pair_slots.prefix(pairs as usize)?,
        };
        // Safety: the views above hold every index the kernel writes (at most `capacity`
        // segments and `pairs` pairs, checked by `prefix` against the buffers sized for the
        // largest batch); dense slots come from slots below the layout's (checked in
        // `MoeGroups::regroup`) and experts below `experts` (checked by `MoeRouting::new`).
        unsafe {
            moe_align_kernel::launch_unchecked::<R>(
                client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(ALIGN_THREADS),
                routing.expert_ids().arg(1),
                token_slots.arg(1),
                buffers.counts.arg(1),
                buffers.starts.arg(1),
                segs.seg_indptr.arg(1),
                segs.weight_indices.arg(1),
                segs.token_perm.arg(1),
                segs.token_slots.arg(1),
                pairs,
                routing.topk(),
                self.expert_dim,
                dense_slots,
                capacity as u32,
                AlignConfig { threads: ALIGN_THREADS, chunk },
            );
        }
        self.segs = segs;
        Ok(())
    }
}

/// Threads of the one cube that groups a batch on the device.
pub(crate) const ALIGN_THREADS: u32 = 256;

/// The grouping kernel's compile-time shape: its threads and the pairs per segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AlignConfig {
    pub threads: u32,
    pub chunk: u32,
}

/// Counting sort of the pairs by dense slot in one cube, then the chunked segments:
/// 1. count each dense slot's pairs (atomics; a pair without an adapter or a local expert is
///    `NO_SLOT` in `pair_slots` and counted nowhere);
/// 2. prefix sums of pairs and chunks over the dense slots (each thread a contiguous block,
///    then one thread across the blocks);
/// 3. each dense slot's chunks as segments, the rest of the capacity as empty segments;
/// 4. each pair scattered to its slot's next position (atomic cursors: the order inside a
///    group is not fixed, but every output row depends on its own pair alone).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_align_kernel(
    expert_ids: &Array<u32>,
    token_slots: &Array<u32>,
    counts: &mut Array<Atomic<u32>>,
    starts: &mut Array<u32>,
    seg_indptr: &mut Array<u32>,
    weight_indices: &mut Array<u32>,
    token_perm: &mut Array<u32>,
    pair_slots: &mut Array<u32>,
    pairs: u32,
    topk: u32,
    expert_dim: u32,
    dense_slots: u32,
    capacity: u32,
    #[comptime] cfg: AlignConfig,
) {
    let threads = comptime!(cfg.threads);
    let chunk = comptime!(cfg.chunk);
    let tid = UNIT_POS;
    let mut d = tid;
    while d < dense_slots {
        counts[d as usize].store(0u32);
        d += threads;
    }
    sync_cube();
    let mut p = tid;
    while p < pairs {
        let slot = token_slots[(p / topk) as usize];
        let expert = expert_ids[p as usize];
        let mut dense_expert = expert;
        if expert_dim == 1 {
            dense_expert = 0u32;
        }
        // (Wraps for a pair without a slot; replaced just below.)
        let mut key = slot * expert_dim + dense_expert;
        if slot != NO_SLOT && expert != NO_EXPERT {
            counts[key as usize].fetch_add(1u32);
        } else {
            key = NO_SLOT;
        }
        pair_slots[p as usize] = key;
        p += threads;
    }
    sync_cube();
    // Each thread's contiguous block of dense slots: its pairs and chunks.
    let per = dense_slots.div_ceil(threads);
    let lo = min(tid * per, dense_slots);
    let hi = min(lo + per, dense_slots);
    let mut block_pairs = SharedMemory::<u32>::new(comptime!(threads as usize + 1));
    let mut block_chunks = SharedMemory::<u32>::new(comptime!(threads as usize + 1));
    let mut n_pairs = 0u32;
    let mut n_chunks = 0u32;
    for d in lo..hi {
        let n = counts[d as usize].load();
        n_pairs += n;
        n_chunks += n.div_ceil(chunk);
    }
    block_pairs[tid as usize] = n_pairs;
    block_chunks[tid as usize] = n_chunks;
    sync_cube();
    if tid == 0 {
        // Exclusive prefix sums over the blocks; entry `threads` holds the totals.
        let mut pairs_before = 0u32;
        let mut chunks_before = 0u32;
        for b in 0..threads {
            let np = block_pairs[b as usize];
            let nc = block_chunks[b as usize];
            block_pairs[b as usize] = pairs_before;
            block_chunks[b as usize] = chunks_before;
            pairs_before += np;
            chunks_before += nc;
        }
        block_pairs[threads as usize] = pairs_before;
        block_chunks[threads as usize] = chunks_before;
    }
    sync_cube();
    let mut pos = block_pairs[tid as usize];
    let mut seg = block_chunks[tid as usize];
    for d in lo..hi {
        let n = counts[d as usize].load();
        let chunks = n.div_ceil(chunk);
        starts[d as usize] = pos;
        for j in 0..chunks {
            seg_indptr[(seg + j) as usize] = pos + j * chunk;
            weight_indices[(seg + j) as usize] = d;
        }
        pos += n;
        seg += chunks;
    }
    let total_pairs = block_pairs[threads as usize];
    let mut s = block_chunks[threads as usize] + tid;
    while s < capacity {
        seg_indptr[s as usize] = total_pairs;
        weight_indices[s as usize] = NO_SLOT;
        s += threads;
    }
    if tid == 0 {
        seg_indptr[capacity as usize] = total_pairs;
    }
    // Every count is read before any becomes a cursor.
    sync_cube();
    for d in lo..hi {
        counts[d as usize].store(starts[d as usize]);
    }
    sync_cube();
    let mut p = tid;
    while p < pairs {
        let key = pair_slots[p as usize];
        if key != NO_SLOT {
            let at = counts[key as usize].fetch_add(1u32);
            token_perm[at as usize] = p;
        }
        p += threads;
    }
}

/// A's and B's expert dims ([`expert_dims`]) for a routing with `topk` > 0.
fn grouped_expert_dims(layout: &LoraLayout, experts: u32, topk: u32) -> Result<(u32, u32)> {
    if topk == 0 {
        return Err(LoraError::Layout("MoE routing with topk 0".into()));
    }
    expert_dims(layout, experts)
}

impl ExpandGrouping {
    /// The expand's grouping, building its own (`own`) only where B's expert dim differs from A's.
    fn new(dim_a: u32, dim_b: u32, own: impl FnOnce() -> Result<GroupedSide>) -> Result<Self> {
        Ok(if dim_a == dim_b { ExpandGrouping::Shrink } else { ExpandGrouping::Own(Box::new(own()?)) })
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
    experts: u32,
    /// Largest batch (tokens) the groups hold.
    max_tokens: u32,
    input: MoeInput,
    output: MoeOutput,
    shrink: GroupedSide,
    expand: ExpandGrouping,
}

/// How the expand's pairs are grouped.
#[derive(Debug, Clone)]
enum ExpandGrouping {
    /// A and B have the same expert dim: the shrink's grouping serves the expand.
    Shrink,
    /// By B's expert dim, which differs from A's (one side shared-outer).
    Own(Box<GroupedSide>),
}

impl MoeGroups {
    /// Groups the pairs of `segs`' tokens (`pair = t·topk + k`, `expert_ids[pair]` a local
    /// expert or [`NO_EXPERT`]) for `pool`, whose ranks and scales it copies (see
    /// [`Self::refresh_adapters`]). `input` and `output` are the module's (gate_up: per token, per pair;
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
        let (dim_a, dim_b) = grouped_expert_dims(layout, experts, topk)?;
        check_expert_ids(expert_ids, segs.tokens() as usize * topk as usize, experts)?;
        let token_slots = segs.token_slots();
        let side = |dim| GroupedSide::on_host(client, layout, pool, &token_slots, topk, expert_ids, dim);
        let expand = ExpandGrouping::new(dim_a, dim_b, || side(dim_b))?;
        Ok(MoeGroups { layout: layout.clone(), topk, experts, max_tokens: segs.tokens(), input, output, shrink: side(dim_a)?, expand })
    }

    /// Groups sized once for batches of up to `max_tokens` tokens and filled on the device by
    /// [`Self::regroup`]: each (slot, expert) group is cut into segments of at most `chunk`
    /// pairs, so the launch grid depends on the batch size alone. Like [`Self::new`], it copies
    /// the pool's ranks and scales (see [`Self::refresh_adapters`]).
    #[allow(clippy::too_many_arguments)]
    pub fn on_device<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        max_tokens: u32,
        topk: u32,
        experts: u32,
        chunk: u32,
        input: MoeInput,
        output: MoeOutput,
    ) -> Result<Self> {
        pool.check_layout(layout)?;
        let (dim_a, dim_b) = grouped_expert_dims(layout, experts, topk)?;
        if chunk == 0 {
            return Err(LoraError::BadIndptr("chunk size must be positive"));
        }
        let max_pairs = max_tokens.checked_mul(topk).ok_or_else(|| LoraError::Layout(format!("{max_tokens} tokens × top-{topk}")))?;
        let side = |dim| GroupedSide::on_device(client, layout, pool, dim, max_pairs, chunk);
        let expand = ExpandGrouping::new(dim_a, dim_b, || side(dim_b))?;
        Ok(MoeGroups { layout: layout.clone(), topk, experts, max_tokens, input, output, shrink: side(dim_a)?, expand })
    }

    /// Groups this batch's pairs on the device (one single-cube launch per distinct grouping;
    /// no host copy of the router's choices): `segs` gives each token's slot, `routing` its
    /// experts.
    pub fn regroup<R: Runtime>(&mut self, client: &ComputeClient<R>, segs: &DeviceSegments, routing: &MoeRouting) -> Result<()> {
        if routing.topk() != self.topk || routing.experts() != self.experts {
            let (topk, experts) = (routing.topk(), routing.experts());
            return Err(LoraError::Layout(format!(
                "routing of top-{topk} over {experts} experts for groups of top-{} over {}",
                self.topk, self.experts
            )));
        }
        if routing.tokens() != segs.tokens() || segs.tokens() > self.max_tokens {
            return Err(LoraError::Layout(format!(
                "a batch of {} tokens with routing for {} (groups sized for {})",
                segs.tokens(),
                routing.tokens(),
                self.max_tokens
            )));
        }
        segs.check_slots(&self.layout)?;
        self.shrink.regroup(client, &segs.token_slots, routing)?;
        if let ExpandGrouping::Own(expand) = &mut self.expand {
            expand.regroup(client, &segs.token_slots, routing)?;
        }
        Ok(())
    }

    /// Rewrites each dense slot's rank and scale from `pool` in place, after an adapter load
    /// or unload (the groups keep their own copy, one entry per (slot, expert)).
    pub fn refresh_adapters<R: Runtime, F: CubeElement>(&mut self, client: &ComputeClient<R>, pool: &AdapterPool<F>) -> Result<()> {
        pool.check_layout(&self.layout)?;
        for side in self.sides() {
            side.ranks.write_at(client, 0, &per_expert(pool.ranks(), side.expert_dim))?;
            side.scales.write_at(client, 0, &per_expert(pool.scales(), side.expert_dim))?;
        }
        Ok(())
    }

    /// The segments of the shrink's grouping, then of the expand's own (where it has one), read
    /// back and validated (every pair at most once, every dense slot in range): for tests and
    /// debugging.
    pub fn read_segments<R: Runtime>(&self, client: &ComputeClient<R>) -> Result<Vec<Segments>> {
        self.sides().map(|side| side.read_segments(client)).collect()
    }

    /// The expand's grouping.
    fn expand_side(&self) -> &GroupedSide {
        match &self.expand {
            ExpandGrouping::Shrink => &self.shrink,
            ExpandGrouping::Own(side) => side,
        }
    }

    /// The distinct groupings: the shrink's, and the expand's where it has its own.
    fn sides(&self) -> impl Iterator<Item = &GroupedSide> {
        let own = match &self.expand {
            ExpandGrouping::Own(side) => Some(side.as_ref()),
            ExpandGrouping::Shrink => None,
        };
        std::iter::once(&self.shrink).chain(own)
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

/// Grouped MoE expand into per-pair rows of `y` (`[tokens·topk, out]`). Groups built for a
/// router-weighted output are an error: they go through [`launch_moe_grouped_expand_weighted`].
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
    if groups.output != MoeOutput::PerPair {
        return Err(LoraError::Layout("router-weighted MoE groups: use launch_moe_grouped_expand_weighted".into()));
    }
    let side = groups.expand_side();
    let cols = ExpandCols { b_pool: &pool.b, slice_table: &pool.slice_table, ranks: &side.ranks, scales: &side.scales };
    launch_expand_cols(client, &side.view, cols, &side.segs, a, y, kernel)
}

/// Grouped router-weighted MoE expand (down) into `y` (`[tokens, out]`):
/// `y[t] += Σ_k w[t,k] · scale · a[t·topk + k] · B[slot, e_k]ᵀ`. The dense expand writes each
/// pair's delta into `scratch`, then [`crate::moe_combine`] sums a token's pairs with the
/// router's weights and clears those scratch rows. `segs` and `routing` are the batch the
/// groups were built (or regrouped) for.
#[allow(clippy::too_many_arguments)]
pub fn launch_moe_grouped_expand_weighted<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    groups: &MoeGroups,
    segs: &DeviceSegments,
    routing: &MoeRouting,
    a: &DeviceBuffer<f32>,
    scratch: &mut PairScratch<F>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
) -> Result<()> {
    pool.check_layout(layout)?;
    groups.check(layout)?;
    if groups.output != MoeOutput::RouterWeighted {
        return Err(LoraError::Layout("per-pair MoE groups: use launch_moe_grouped_expand".into()));
    }
    let side = groups.expand_side();
    if routing.topk() != groups.topk || routing.tokens() != segs.tokens() || routing.pairs() != side.segs.tokens as usize {
        return Err(LoraError::Layout(format!(
            "a batch of {} tokens, routing for {} tokens top-{}, groups holding {} pairs of top-{}",
            segs.tokens(),
            routing.tokens(),
            routing.topk(),
            side.segs.tokens,
            groups.topk
        )));
    }
    segs.check_slots(layout)?;
    y.check_len("y", routing.tokens() as usize * layout.out_features() as usize)?;
    let mut rows = scratch.rows(routing.pairs(), layout.out_features() as usize)?;
    let cols = ExpandCols { b_pool: &pool.b, slice_table: &pool.slice_table, ranks: &side.ranks, scales: &side.scales };
    launch_expand_cols(client, &side.view, cols, &side.segs, a, &mut rows, kernel)?;
    launch_moe_combine(client, routing, &segs.token_slots, &mut rows, y, layout.out_features())
}
