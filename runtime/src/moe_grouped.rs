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
//! [`MoePath::choose`] picks between this and the per-pair kernels from the batch's tokens per
//! slot, the routing and the rank (thresholds measured on an H100).
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
use crate::expand::{ExpandCols, ExpandKernel, YWrittenBy, launch_expand_cols};
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
    /// The grouping kernel's shape (where its counts live).
    align: AlignConfig,
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
            align: AlignConfig::new(chunk, dense_slots),
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
            written_by_kernels: true,
        };
        Ok(GroupedSide { device: Some(buffers), ..Self::view(client, layout, pool, expert_dim, segs)? })
    }

    /// The dense expand over this grouping's segments into `y` (`[pairs, out]`).
    fn launch_expand<R: Runtime, F: Float + CubeElement>(
        &self,
        client: &ComputeClient<R>,
        pool: &AdapterPool<F>,
        a: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<F>,
        kernel: Option<ExpandKernel>,
    ) -> Result<()> {
        let cols = ExpandCols { b_pool: &pool.b, slice_table: &pool.slice_table, ranks: &self.ranks, scales: &self.scales };
        launch_expand_cols(client, &self.view, cols, &self.segs, a, y, kernel, YWrittenBy::PreviousKernel)
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
            written_by_kernels: true,
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
                buffers.align,
            );
        }
        self.segs = segs;
        Ok(())
    }
}

/// Threads of the one cube that groups a batch on the device.
pub(crate) const ALIGN_THREADS: u32 = 512;

/// Most (slot, expert) groups whose counts the grouping kernel keeps in shared memory (32 KiB);
/// more go to global memory, where each atomic is a round trip to L2.
pub(crate) const MAX_SHARED_COUNTS: u32 = 8192;

/// The grouping kernel's compile-time shape: its threads, the pairs per segment, and the size of
/// its shared-memory counts (0: counts in global memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AlignConfig {
    pub threads: u32,
    pub chunk: u32,
    pub shared_counts: u32,
}

impl AlignConfig {
    pub(crate) fn new(chunk: u32, dense_slots: u32) -> Self {
        let shared_counts = if dense_slots <= MAX_SHARED_COUNTS { dense_slots.max(1) } else { 0 };
        AlignConfig { threads: ALIGN_THREADS, chunk, shared_counts }
    }
}

/// Counting sort of the pairs by dense slot in one cube, then the chunked segments:
/// 1. count each dense slot's pairs (atomics, in shared memory where the dense slots fit; a pair
///    without an adapter or a local expert is `NO_SLOT` in `pair_slots` and counted nowhere);
/// 2. prefix sums of pairs and chunks over the dense slots (each thread a contiguous block,
///    then a parallel scan across the blocks);
/// 3. each dense slot's chunks as segments, the rest of the capacity as empty segments;
/// 4. each pair scattered to its slot's next position (atomic cursors: the order inside a
///    group is not fixed, but every output row depends on its own pair alone).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_align_kernel(
    expert_ids: &Array<u32>,
    token_slots: &Array<u32>,
    global_counts: &mut Array<Atomic<u32>>,
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
    let shared = comptime!(cfg.shared_counts > 0);
    // Per dense slot: its pairs, then the scatter's running cursor.
    let shared_counts = SharedMemory::<Atomic<u32>>::new(comptime!(cfg.shared_counts.max(1) as usize));
    let tid = UNIT_POS;
    let mut d = tid;
    while d < dense_slots {
        if shared {
            shared_counts[d as usize].store(0u32);
        } else {
            global_counts[d as usize].store(0u32);
        }
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
            if shared {
                shared_counts[key as usize].fetch_add(1u32);
            } else {
                global_counts[key as usize].fetch_add(1u32);
            }
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
    let mut block_pairs = SharedMemory::<u32>::new(comptime!(threads as usize));
    let mut block_chunks = SharedMemory::<u32>::new(comptime!(threads as usize));
    let mut n_pairs = 0u32;
    let mut n_chunks = 0u32;
    for d in lo..hi {
        let n = if shared { shared_counts[d as usize].load() } else { global_counts[d as usize].load() };
        starts[d as usize] = n;
        n_pairs += n;
        n_chunks += n.div_ceil(chunk);
    }
    block_pairs[tid as usize] = n_pairs;
    block_chunks[tid as usize] = n_chunks;
    sync_cube();
    // Inclusive prefix sums over the blocks (Hillis–Steele: log2(threads) steps).
    let mut offset = 1u32;
    while offset < threads {
        let mut before_pairs = 0u32;
        let mut before_chunks = 0u32;
        if tid >= offset {
            before_pairs = block_pairs[(tid - offset) as usize];
            before_chunks = block_chunks[(tid - offset) as usize];
        }
        sync_cube();
        block_pairs[tid as usize] += before_pairs;
        block_chunks[tid as usize] += before_chunks;
        sync_cube();
        offset *= 2u32;
    }
    let total_pairs = block_pairs[(threads - 1) as usize];
    let total_chunks = block_chunks[(threads - 1) as usize];
    let mut pos = block_pairs[tid as usize] - n_pairs;
    let mut seg = block_chunks[tid as usize] - n_chunks;
    // `starts` held the counts; it becomes each dense slot's first position, and the counts
    // become the scatter's cursors (each thread rewrites only its own block).
    for d in lo..hi {
        let n = starts[d as usize];
        let chunks = n.div_ceil(chunk);
        starts[d as usize] = pos;
        if shared {
            shared_counts[d as usize].store(pos);
        } else {
            global_counts[d as usize].store(pos);
        }
        for j in 0..chunks {
            seg_indptr[(seg + j) as usize] = pos + j * chunk;
            weight_indices[(seg + j) as usize] = d;
        }
        pos += n;
        seg += chunks;
    }
    let mut s = total_chunks + tid;
    while s < capacity {
        seg_indptr[s as usize] = total_pairs;
        weight_indices[s as usize] = NO_SLOT;
        s += threads;
    }
    if tid == 0 {
        seg_indptr[capacity as usize] = total_pairs;
    }
    sync_cube();
    let mut p = tid;
    while p < pairs {
        let key = pair_slots[p as usize];
        if key != NO_SLOT {
            let at = if shared { shared_counts[key as usize].fetch_add(1u32) } else { global_counts[key as usize].fetch_add(1u32) };
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

/// Which MoE LoRA kernels a batch runs: one set of cubes per (token, expert) pair
/// ([`crate::moe`]) or the pairs grouped by (slot, expert) ([`MoeGroups`], grouped on the
/// device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoePath {
    Pairs,
    Grouped,
}

// Smallest `rank × pairs per (slot, expert) group` at which grouping pays, measured on an
// H100 (runs 28–31: 64 experts, top-8, 8 adapters, ranks 16 and 64, device grouping against
// the per-pair kernels). Rank 16 at T = 128 (36) ran faster on pairs and at T = 1024 (256)
// grouped, for both outputs.

/// Per-pair output: 64 (rank 64, T = 8) ran faster on pairs, 77 (rank 64, T = 32) grouped.
const MIN_GROUPED_REUSE_PER_PAIR: f64 = 72.0;
/// Router-weighted output, which adds the combine's pass over the pair scratch: 77 (rank 64,
/// T = 32) ran faster on pairs, 145 (rank 64, T = 128) grouped.
const MIN_GROUPED_REUSE_ROUTER_WEIGHTED: f64 = 100.0;

impl MoePath {
    /// The path for a batch with `tokens_per_slot[s]` tokens on adapter slot `s` (of rank
    /// `rank`), each routed to `topk` of `experts` local experts. The per-pair kernels re-read
    /// a pair's adapter rows for every pair, the grouped ones once per group at the price of
    /// a grouping launch, segment tiles and (router-weighted) a combine; so the choice follows
    /// the expected pairs per (slot, expert) group times the rank. A slot's `n` tokens reach
    /// about `E·(1 − (1 − topk/E)^n)` distinct experts (uniform routing).
    pub fn choose(tokens_per_slot: &[u32], topk: u32, experts: u32, rank: u32, output: MoeOutput) -> MoePath {
        if experts == 0 || topk == 0 {
            return MoePath::Pairs;
        }
        let (e, chosen) = (f64::from(experts), f64::from(topk.min(experts)));
        let (mut pairs, mut groups) = (0.0, 0.0);
        for &n in tokens_per_slot.iter().filter(|&&n| n > 0) {
            pairs += f64::from(n) * chosen;
            groups += e * (1.0 - (1.0 - chosen / e).powi(n.min(i32::MAX as u32) as i32));
        }
        if groups == 0.0 {
            return MoePath::Pairs;
        }
        let threshold = match output {
            MoeOutput::PerPair => MIN_GROUPED_REUSE_PER_PAIR,
            MoeOutput::RouterWeighted => MIN_GROUPED_REUSE_ROUTER_WEIGHTED,
        };
        if f64::from(rank) * pairs / groups >= threshold { MoePath::Grouped } else { MoePath::Pairs }
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
    groups.expand_side().launch_expand(client, pool, a, y, kernel)
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
    // y is checked before the expand writes the scratch: a combine that failed after it would
    // leave the scratch unclear for the next batch.
    y.check_len("y", routing.tokens() as usize * layout.out_features() as usize)?;
    let mut rows = scratch.rows(routing.pairs(), layout.out_features() as usize)?;
    side.launch_expand(client, pool, a, &mut rows, kernel)?;
    launch_moe_combine(client, routing, &segs.token_slots, &mut rows, y, layout.out_features())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubecl::wgpu::WgpuRuntime;

    /// The choice reproduces the faster path of the MoE cases timed on the H100 where the two
    /// differ by more than 10% (runs 28–31; 64 experts, top-8, tokens round-robin over the
    /// adapters; `Grouped` is the device grouping), with one miss it leaves out: rank-64
    /// router-weighted at T = 8 ran 15% faster grouped (42 against 50 µs, run 30), while at
    /// T = 32 pairs ran 1.7× faster; one threshold cannot follow that, and it picks pairs.
    #[test]
    fn path_choice_follows_the_h100_timings() {
        use MoeOutput::{PerPair, RouterWeighted};
        use MoePath::{Grouped, Pairs};
        let batch = |tokens: u32, adapters: u32| -> Vec<u32> {
            (0..8).map(|s| if s < adapters { tokens / adapters + u32::from(s < tokens % adapters) } else { 0 }).collect()
        };
        // (tokens, adapters, rank, output, faster path)
        let measured = [
            (1, 1, 16, PerPair, Pairs),
            (1, 1, 64, PerPair, Pairs),
            (8, 8, 16, PerPair, Pairs),
            (8, 8, 64, PerPair, Pairs),
            (32, 8, 16, PerPair, Pairs),
            (128, 8, 16, PerPair, Pairs),
            (128, 8, 64, PerPair, Grouped),
            (1024, 8, 16, PerPair, Grouped),
            (1024, 8, 64, PerPair, Grouped),
            (1, 1, 16, RouterWeighted, Pairs),
            (8, 8, 16, RouterWeighted, Pairs),
            (32, 8, 64, RouterWeighted, Pairs),
            (128, 8, 16, RouterWeighted, Pairs),
            (128, 8, 64, RouterWeighted, Grouped),
            (1024, 8, 16, RouterWeighted, Grouped),
            (1024, 8, 64, RouterWeighted, Grouped),
        ];
        for (tokens, adapters, rank, output, faster) in measured {
            let chosen = MoePath::choose(&batch(tokens, adapters), 8, 64, rank, output);
            assert_eq!(chosen, faster, "T={tokens} adapters={adapters} R={rank} {output:?}");
        }
        assert_eq!(MoePath::choose(&[0; 8], 8, 64, 64, PerPair), Pairs, "no tokens with an adapter");
        assert_eq!(MoePath::choose(&[4096], 0, 64, 64, PerPair), Pairs, "no experts chosen");
    }

    /// The grouping kernel with its counts in global memory (for more groups than shared memory
    /// holds) finds the same groups as with its counts in shared memory, on a small batch.
    #[test]
    fn global_and_shared_counts_group_alike() {
        let client = WgpuRuntime::client(&Default::default());
        let nz = |v: u32| NonZeroU32::new(v).unwrap();
        let (slots, experts, topk, tokens) = (3u32, 5u32, 2u32, 23u32);
        let dims = Some(lorac_plan::ExpertDims { a: nz(experts), b: nz(experts) });
        let slice = lorac_plan::LoraSlice { name: "up".into(), width: 8, group: 0 };
        let layout = LoraLayout::new(nz(slots), nz(4), 16, 1, vec![slice], dims).unwrap();
        let pool = AdapterPool::new(
            &layout,
            DeviceBuffer::<f32>::empty(&client, layout.a_elements() as usize),
            DeviceBuffer::<f32>::empty(&client, layout.b_elements() as usize),
            &[4, 2, 4],
            &[1.0; 3],
            &client,
        )
        .unwrap();
        let token_slots: Vec<Option<u32>> = (0..tokens).map(|t| (t % 4 != 3).then_some(t % slots)).collect();
        let ids: Vec<u32> = (0..tokens * topk).map(|p| if p % 7 == 0 { NO_EXPERT } else { (p * 3 + p / 5) % experts }).collect();
        let segs = Segments::from_token_slots(&token_slots, slots).unwrap();
        let routing = MoeRouting::new(&client, tokens, topk, experts, &ids, &vec![1.0; ids.len()]).unwrap();
        let device_segs = segs.upload(&client);
        let grouped = |shared: bool| {
            let mut groups =
                MoeGroups::on_device(&client, &layout, &pool, tokens, topk, experts, 4, MoeInput::PerToken, MoeOutput::PerPair).unwrap();
            let align = &mut groups.shrink.device.as_mut().unwrap().align;
            assert_eq!(align.shared_counts, slots * experts, "{slots}×{experts} groups fit in shared memory");
            if !shared {
                align.shared_counts = 0;
            }
            groups.regroup(&client, &device_segs, &routing).unwrap();
            let segs = groups.read_segments(&client).unwrap().remove(0);
            // (dense slot, pairs) per segment, pairs sorted: the order inside a group is free.
            let mut found: Vec<(u32, Vec<u32>)> = (0..segs.num_segments())
                .filter(|&s| segs.weight_indices()[s] != NO_SLOT)
                .map(|s| {
                    let (lo, hi) = (segs.seg_indptr()[s] as usize, segs.seg_indptr()[s + 1] as usize);
                    let mut pairs = segs.token_perm()[lo..hi].to_vec();
                    pairs.sort();
                    (segs.weight_indices()[s], pairs)
                })
                .collect();
            found.sort();
            found
        };
        let shared = grouped(true);
        let expected_pairs = (0..tokens * topk).filter(|&p| token_slots[(p / topk) as usize].is_some() && ids[p as usize] != NO_EXPERT);
        assert_eq!(shared.iter().map(|(_, pairs)| pairs.len()).sum::<usize>(), expected_pairs.count());
        assert!(shared.iter().all(|(_, pairs)| !pairs.is_empty() && pairs.len() <= 4));
        assert_eq!(grouped(false), shared);

        // Segments the grouping kernel wrote: the dense kernels over them have no grid
        // dependency point (a programmatic launch waits before they read anything).
        let mut groups =
            MoeGroups::on_device(&client, &layout, &pool, tokens, topk, experts, 4, MoeInput::PerToken, MoeOutput::PerPair).unwrap();
        groups.regroup(&client, &device_segs, &routing).unwrap();
        let pairs = (tokens * topk) as usize;
        let x = DeviceBuffer::<f32>::empty(&client, tokens as usize * layout.in_features() as usize);
        let mut a = DeviceBuffer::<f32>::empty(&client, pairs * layout.intermediate_width() as usize);
        let mut y = DeviceBuffer::<f32>::empty(&client, pairs * layout.out_features() as usize);
        let (done, launches) = crate::cuda_graph::record_launches(&crate::cuda_source::h100_properties(), |rec| {
            launch_moe_grouped_shrink(rec, &layout, &pool, &groups, &x, &mut a, None)?;
            launch_moe_grouped_expand(rec, &layout, &pool, &groups, &a, &mut y, None)
        })
        .unwrap();
        done.unwrap();
        let names: Vec<&str> = launches.iter().map(|l| l.kernel.name()).collect();
        assert!(names.len() == 2 && names[0].contains("shrink_kernel") && names[1].contains("expand_kernel"), "{names:?}");
        for launch in &launches {
            let source = crate::cuda_graph::lower_recorded(launch, 90).unwrap().source;
            assert!(!source.contains(crate::cuda_graph::GRID_DEPENDENCY_POINT), "{}: a grid dependency point", launch.kernel.name());
        }
    }
}
