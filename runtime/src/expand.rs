//! Segmented expand: `y[t, slice i] += scale[slot] · a[t, group(i)·R .. +rank] · B[slot, slice i, :rank]ᵀ`.
//!
//! Grid: x = column blocks of a slice, y = slice (slices have unequal widths, so cubes past a
//! narrow slice's end exit at once), z = segment × token split. A cube first stages its
//! block's B rows (`threads · NY` rows, contiguous in the pool) in shared memory with
//! coalesced loads, all issued at once, then its token tiles' rank-r intermediates; every
//! thread owns `NY` consecutive output columns and does one read-modify-write of y per token,
//! so y is touched exactly once (the prefill expand is bound by that pass over y).
//!
//! At decode the kernel is a read of B: the earlier version had each thread read its own rows
//! in rank order, one dependent round of loads per rank vector, which left the kernel waiting
//! on memory latency (H100: 0.4–1.2 TB/s, runtime/BENCHMARKS.md).

use cubecl::ir::DeviceProperties;
use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT};
use crate::buffer::DeviceBuffer;
use crate::config::{ExpandConfig, multiprocessors, vector_size};
use crate::cuda_graph::grid_dependency_point;
use crate::error::{LoraError, Result};
use crate::expand_mma::{MmaExpandConfig, expand_mma_kernel};
use crate::expand_mma_pipelined::{A_VECTOR, expand_mma_pipelined_kernel};
use crate::pool::AdapterPool;
use crate::shrink_mma::LaunchMode;

/// Where one expand cube and thread work: the cube's slice (grid y) and segment, the
/// segment's adapter, and the thread's `ny` output columns. Cubes past their slice's end or on
/// a segment without an adapter (no slot, or rank 0) exit here; that decision is uniform over
/// the cube, so no thread is left waiting at a barrier. Shared by [`expand_kernel`] and the
/// fused decode kernel.
#[derive(CubeType)]
pub(crate) struct ExpandBlock {
    /// The A group (block of the intermediate) the slice reads.
    pub group: usize,
    /// The segment's range in `token_perm`.
    pub start: usize,
    pub end: usize,
    pub slot: usize,
    pub rank: usize,
    pub scale: f32,
    pub tid: usize,
    /// Whether the thread's columns lie inside the slice.
    pub active: bool,
    /// Index (in rank vectors) of the thread's first B row.
    pub b_row0: usize,
    /// Index (in rank vectors) of the cube's first B row, and the slice's columns from the
    /// cube's first on (more than the block holds, except in the slice's last block).
    pub block_b0: usize,
    pub cols_left: usize,
    /// Rank vectors covering `rank`.
    pub rank_vecs: usize,
    /// y's row length and the thread's first column, in output vectors.
    pub y_vecs: usize,
    pub y_col: usize,
}

/// The [`ExpandBlock`] of segment `seg` for this cube and thread; `ny` output columns per
/// thread, B read in vectors of `nb` along the rank, `rank_vecs_max` of them per row.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_block(
    seg: usize,
    slice_info: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    out_features: usize,
    #[comptime] threads: usize,
    #[comptime] ny: usize,
    #[comptime] nb: usize,
    #[comptime] rank_vecs_max: usize,
) -> ExpandBlock {
    let slice = CUBE_POS_Y as usize;
    let offset = slice_info[slice * 3] as usize;
    let width = slice_info[slice * 3 + 1] as usize;
    let group = slice_info[slice * 3 + 2] as usize;
    let block0 = CUBE_POS_X as usize * threads * ny;
    let slot = weight_indices[seg];
    if block0 >= width || slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    if rank == 0 {
        terminate!();
    }
    let start = seg_indptr[seg] as usize;
    let end = seg_indptr[seg + 1] as usize;
    let scale = scales[slot as usize];
    let tid = UNIT_POS as usize;
    let col = block0 + tid * ny;
    let active = col < width;
    let block_b0 = (slot as usize * out_features + offset + block0) * rank_vecs_max;
    let b_row0 = block_b0 + tid * ny * rank_vecs_max;
    let cols_left = width - block0;
    let rank_vecs = rank.div_ceil(nb);
    let y_vecs = out_features / ny;
    let y_col = (offset + col) / ny;
    ExpandBlock { group, start, end, slot: slot as usize, rank, scale, tid, active, b_row0, block_b0, cols_left, rank_vecs, y_vecs, y_col }
}

/// Loads the thread's y vectors for each token `i` of the tile starting at `p0` in the segment
/// (their indices into `y_at`, their values into `y_old`), every load issued before any is
/// used: [`store_tile_to_y`] writes y afterwards, and a load placed after a store to y would
/// wait for it (y is not `restrict`), one memory round trip per token.
#[cube]
pub(crate) fn load_tile_of_y<F: Float, NY: Size>(
    y: &Array<Vector<F, NY>>,
    token_perm: &Array<u32>,
    blk: &ExpandBlock,
    p0: usize,
    y_at: &mut Array<usize>,
    y_old: &mut Array<Vector<F, NY>>,
    #[comptime] tokens: usize,
) {
    #[unroll]
    for i in 0..tokens {
        if p0 + i < blk.end {
            let yi = token_perm[p0 + i] as usize * blk.y_vecs + blk.y_col;
            y_at[i] = yi;
            y_old[i] = y[yi];
        }
    }
}

/// Writes `y_old + scale · acc[i, ..ny]` (in f32) to the thread's y vectors loaded by
/// [`load_tile_of_y`]: one read-modify-write of y per token.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_tile_to_y<F: Float, NY: Size>(
    y: &mut Array<Vector<F, NY>>,
    acc: &Array<f32>,
    blk: &ExpandBlock,
    p0: usize,
    y_at: &Array<usize>,
    y_old: &Array<Vector<F, NY>>,
    #[comptime] tokens: usize,
    #[comptime] ny: usize,
) {
    #[unroll]
    for i in 0..tokens {
        if p0 + i < blk.end {
            let mut yv = Vector::<f32, NY>::cast_from(y_old[i]);
            #[unroll]
            for v in 0..ny {
                yv[v] += blk.scale * acc[i * ny + v];
            }
            let yi = y_at[i];
            y[yi] = Vector::<F, NY>::cast_from(yv);
        }
    }
}

/// Adds `scale · acc[i, ..ny]` into y at the thread's columns for each token `i` of the tile
/// starting at `p0` in the segment: [`load_tile_of_y`], then [`store_tile_to_y`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_tile_to_y<F: Float, NY: Size>(
    y: &mut Array<Vector<F, NY>>,
    token_perm: &Array<u32>,
    acc: &Array<f32>,
    blk: &ExpandBlock,
    p0: usize,
    #[comptime] tokens: usize,
    #[comptime] ny: usize,
) {
    let mut y_at = Array::<usize>::new(tokens);
    let mut y_old = Array::<Vector<F, NY>>::new(tokens);
    load_tile_of_y::<F, NY>(y, token_perm, blk, p0, &mut y_at, &mut y_old, tokens);
    store_tile_to_y::<F, NY>(y, acc, blk, p0, &y_at, &y_old, tokens, ny);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_kernel<F: Float, NY: Size, NB: Size>(
    a: &Array<f32>,
    b_pool: &Array<Vector<F, NB>>,
    y: &mut Array<Vector<F, NY>>,
    slice_info: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    out_features: u32,
    #[comptime] cfg: ExpandConfig,
    #[comptime] grid_dependency: bool,
    #[comptime] y_before_wait: bool,
) {
    let tokens = comptime!(cfg.tokens_per_tile as usize);
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let splits = comptime!(cfg.token_splits as usize);
    // NY's and NB's widths as comptime values, usable in unrolled loop bounds.
    let ny = comptime!(cfg.out_vector as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let rank_vecs_max = comptime!(max_rank / nb);
    let rs = comptime!(cfg.b_row_stride() as usize);

    let a_splits = comptime!(cfg.a_splits as usize);
    let a_copy = a.len() / a_splits;
    let seg = CUBE_POS_Z as usize / splits;
    let split = CUBE_POS_Z as usize % splits;
    let blk =
        expand_block(seg, slice_info, seg_indptr, weight_indices, ranks, scales, out_features as usize, threads, ny, nb, rank_vecs_max);

    let mut y_at = Array::<usize>::new(tokens);
    let mut y_old = Array::<Vector<F, NY>>::new(tokens);
    let mut p0 = blk.start + split * tokens;
    // Whether the current tile's y is already in registers: the first tile's, read before B
    // (the two chains of loads overlap) where the kernel before this one does not write y
    // (see `YWrittenBy`).
    let mut y_loaded = false;
    if comptime!(grid_dependency && y_before_wait) {
        y_loaded = blk.active;
        if y_loaded {
            load_tile_of_y::<F, NY>(y, token_perm, &blk, p0, &mut y_at, &mut y_old, tokens);
        }
    }

    // The block's B rows, once per cube: consecutive threads read consecutive vectors, and
    // every load is issued before the first is needed. Column `c` of the block is thread
    // `c / ny`'s `(c % ny)`-th: it lands in row `(c % ny) · threads + c / ny`, so the threads
    // of a warp read rows `rs` vectors apart (an odd stride: distinct banks) below.
    let mut b_tile = SharedMemory::<Vector<F, NB>>::new(comptime!(threads * ny * rs));
    #[unroll]
    for k in 0..comptime!(ny * rank_vecs_max) {
        let idx = k * threads + blk.tid;
        let c = idx / rank_vecs_max;
        let jv = idx % rank_vecs_max;
        if c < blk.cols_left && jv < blk.rank_vecs {
            b_tile[((c % ny) * threads + c / ny) * rs + jv] = b_pool[blk.block_b0 + idx];
        }
    }
    // The intermediate and y may be the previous kernels' outputs; B and the batch metadata
    // read above are not (without `grid_dependency` the metadata may be: a programmatic launch
    // then waits at the start). Under a programmatic launch B streams in while those finish.
    grid_dependency_point(grid_dependency, true);

    // The tile's intermediate as rank vectors: one shared-memory read feeds NB FMAs.
    let mut a_tile = SharedMemory::<Vector<f32, NB>>::new(comptime!(tokens * rank_vecs_max));
    let mut acc = Array::<f32>::new(comptime!(tokens * ny));

    while p0 < blk.end {
        // Entries past the rank (and past the segment) are staged as zeros so the vectorised
        // loop below may run over the padding columns of the last B vector.
        let mut idx = blk.tid;
        while idx < tokens * rank_vecs_max {
            let i = idx / rank_vecs_max;
            let jv = idx % rank_vecs_max;
            let p = p0 + i;
            let mut v = Vector::<f32, NB>::new(0.0f32);
            if p < blk.end {
                let row = token_perm[p] as usize * c_r + blk.group * max_rank;
                #[unroll]
                for l in 0..nb {
                    let j = jv * nb + l;
                    if j < blk.rank {
                        // The sum of the shrink's partial copies (one without K splits).
                        #[unroll]
                        for s in 0..a_splits {
                            v[l] += a[s * a_copy + row + j];
                        }
                    }
                }
            }
            a_tile[idx] = v;
            idx += threads;
        }
        // Publishes the intermediate tile (and, the first time, the B rows).
        sync_cube();
        if blk.active {
            // y's loads go out before the multiply, which hides their latency.
            if !y_loaded {
                load_tile_of_y::<F, NY>(y, token_perm, &blk, p0, &mut y_at, &mut y_old, tokens);
            }
            y_loaded = false;
            #[unroll]
            for i in 0..comptime!(tokens * ny) {
                acc[i] = 0.0f32;
            }
            for jv in 0..blk.rank_vecs {
                #[unroll]
                for v in 0..ny {
                    let bv = Vector::<f32, NB>::cast_from(b_tile[(v * threads + blk.tid) * rs + jv]);
                    #[unroll]
                    for i in 0..tokens {
                        let prod = a_tile[i * rank_vecs_max + jv] * bv;
                        let mut s = 0.0f32;
                        #[unroll]
                        for l in 0..nb {
                            s += prod[l];
                        }
                        acc[i * ny + v] += s;
                    }
                }
            }
            store_tile_to_y::<F, NY>(y, &acc, &blk, p0, &y_at, &y_old, tokens, ny);
        }
        sync_cube();
        p0 += splits * tokens;
    }
}

/// Which expand kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpandKernel {
    /// CUDA-core kernel: any dtype, any shape; best for segments of a few tokens.
    Scalar(ExpandConfig),
    /// Tensor-core kernel, chosen for segments of 8 tokens or more. `token_splits` cubes
    /// share each segment's token tiles (each loops over its share); 0 chooses a split that
    /// fills the GPU.
    Mma { config: MmaExpandConfig, token_splits: u32 },
}

impl ExpandKernel {
    /// The tensor-core kernel where it applies and the batch fills the GPU with 16-token
    /// tiles, or its longest segment has [`crate::expand_mma::DECODE_MIN_SEGMENT`] tokens
    /// (the register-staged decode tile, [`MmaExpandConfig::for_decode`]); else the scalar one.
    pub fn choose<R: Runtime, F: Float>(client: &ComputeClient<R>, layout: &LoraLayout, num_segments: usize, max_segment_len: u32) -> Self {
        Self::choose_summing::<R, F>(client, layout, num_segments, max_segment_len, 1)
    }

    /// [`Self::choose`] for an intermediate of `copies` copies of partial sums (a shrink with
    /// that many K splits, [`crate::shrink::ShrinkKernel::intermediate_copies`]): the kernel
    /// adds them up as it stages them (for prefill above rank 32, on 16-token tiles:
    /// [`MmaExpandConfig::batch_summing`]). The scalar kernel where the tensor-core tile's
    /// staged copies would not fit.
    pub fn choose_summing<R: Runtime, F: Float>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        copies: u32,
    ) -> Self {
        Self::choose_summing_for::<R, F>(client, layout, num_segments, max_segment_len, copies, LaunchMode::Plain)
    }

    /// [`Self::choose_summing`] for a pair launched as `launch` says (a caller capturing CUDA
    /// graphs with programmatic launch: [`MmaExpandConfig::for_decode_launch`]; its shrink
    /// from [`crate::shrink::ShrinkKernel::choose_within_for`]).
    pub fn choose_summing_for<R: Runtime, F: Float>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        copies: u32,
        launch: LaunchMode,
    ) -> Self {
        let props = client.properties();
        let tile = match MmaExpandConfig::for_batch::<F>(props, layout, num_segments, max_segment_len) {
            Some(tile) => tile.batch_summing::<F>(props, layout, copies),
            None => MmaExpandConfig::for_decode_launch::<F>(props, layout, num_segments, max_segment_len, launch)
                .and_then(|c| c.summing::<F>(props, copies)),
        };
        match tile {
            Some(config) => ExpandKernel::Mma { config, token_splits: 0 },
            None => ExpandKernel::Scalar(ExpandConfig::new(client, layout, size_of::<F>(), num_segments, max_segment_len).summing(copies)),
        }
    }

    /// Copies of the intermediate the kernel adds up.
    pub fn intermediate_copies(&self) -> u32 {
        match self {
            ExpandKernel::Scalar(cfg) => cfg.a_splits,
            ExpandKernel::Mma { config, .. } => config.a_splits,
        }
    }
}

/// Most cubes per multiprocessor in a tensor-core expand's grid for which a pair's expand
/// reads y before its grid dependency point (see [`YWrittenBy`]).
const Y_EARLY_MMA_CUBES_PER_SM: u32 = 8;

/// Which kernel last wrote the expand's `y` before it, as a programmatic dependent launch
/// (`cuda_graph`) sees it. Each kernel there waits for the one before it and only then lets
/// the next one launch, so when the expand starts, every kernel before the one just before it
/// has finished and its writes are visible: y written earlier may be read before the wait,
/// with B. Under a plain launch both mean the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum YWrittenBy {
    /// Possibly the kernel launched just before the expand: y is read after the wait.
    #[default]
    PreviousKernel,
    /// An earlier kernel, never the one just before (in a shrink/expand pair that is the
    /// shrink, which writes only the intermediate): the tensor-core expand of a grid of at
    /// most [`Y_EARLY_MMA_CUBES_PER_SM`] cubes per multiprocessor, and the CUDA-core one after
    /// a split-K shrink, read their first token tile's y before the wait.
    EarlierKernel,
}

/// Launches the segmented expand, accumulating into `y` (`[tokens, out_features]`) in place.
/// `a` is the shrink's intermediate, `[tokens, groups·R]`, or the `[copies, tokens, groups·R]`
/// partial sums of a shrink with K splits: without an explicit kernel, the chosen one adds up
/// as many copies as `a` holds ([`ExpandKernel::choose_summing`]); an explicit one reads
/// [`ExpandKernel::intermediate_copies`].
pub fn launch_expand<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
) -> Result<()> {
    launch_expand_after(client, layout, pool, segs, a, y, kernel, YWrittenBy::PreviousKernel)
}

/// [`launch_expand`] for the expand of a shrink/expand pair, launched right after its shrink:
/// y was last written before the shrink ([`YWrittenBy::EarlierKernel`]).
pub fn launch_pair_expand<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
) -> Result<()> {
    launch_expand_after(client, layout, pool, segs, a, y, kernel, YWrittenBy::EarlierKernel)
}

/// [`launch_expand`] with y last written by `y_written_by`.
#[allow(clippy::too_many_arguments)]
fn launch_expand_after<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
    y_written_by: YWrittenBy,
) -> Result<()> {
    pool.check_layout(layout)?;
    if layout.experts().is_some() {
        return Err(LoraError::Layout("expert layouts go through the MoE kernels".into()));
    }
    let cols = ExpandCols { b_pool: &pool.b, slice_table: &pool.slice_table, ranks: &pool.ranks, scales: &pool.scales };
    launch_expand_cols(client, layout, cols, segs, a, y, kernel, y_written_by)
}

/// What the segmented expand reads besides the batch: B as `[slots, out, R]` of `layout`,
/// its slice table, and `ranks[slot]`, `scales[slot]`. The MoE grouped path passes a pool
/// viewed per (slot, expert).
#[derive(Clone, Copy)]
pub(crate) struct ExpandCols<'a, F> {
    pub b_pool: &'a DeviceBuffer<F>,
    pub slice_table: &'a DeviceBuffer<u32>,
    pub ranks: &'a DeviceBuffer<u32>,
    pub scales: &'a DeviceBuffer<f32>,
}

/// [`launch_expand`] on explicit B, ranks and scales (`layout` has no expert dims).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_expand_cols<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    cols: ExpandCols<'_, F>,
    segs: &DeviceSegments,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    kernel: Option<ExpandKernel>,
    y_written_by: YWrittenBy,
) -> Result<()> {
    segs.check_slots(layout)?;
    cols.b_pool.check_len("B", layout.b_elements() as usize)?;
    cols.ranks.check_len("ranks", layout.slots() as usize)?;
    cols.scales.check_len("scales", layout.slots() as usize)?;
    let tokens = segs.tokens as usize;
    let width = layout.intermediate_width() as usize;
    let kernel = kernel.unwrap_or_else(|| {
        // An intermediate of several whole copies holds a split-K shrink's partial sums.
        let copies = a.len().checked_div(tokens * width).filter(|c| *c > 1 && c * tokens * width == a.len()).unwrap_or(1);
        ExpandKernel::choose_summing::<R, F>(client, layout, segs.num_segments, segs.max_segment_len, copies as u32)
    });
    match kernel {
        ExpandKernel::Scalar(cfg) => check_expand_config(client.properties(), layout, &cfg, size_of::<F>())?,
        ExpandKernel::Mma { config, .. } => {
            if !config.fits::<F>(client.properties(), layout) {
                return Err(LoraError::Layout(format!("tensor-core expand config {config:?} does not fit the layout or device")));
            }
        }
    }
    a.check_len("a (expand input)", kernel.intermediate_copies() as usize * tokens * width)?;
    y.check_len("y", tokens * layout.out_features() as usize)?;
    if segs.num_segments == 0 || tokens == 0 {
        return Ok(());
    }
    let widest = layout.slices().iter().map(|s| s.width).max().unwrap_or(1);
    let slices = layout.slices().len() as u32;
    // Segments a kernel wrote are read only after the wait, and so is everything after them.
    let grid_dependency = !segs.written_by_kernels;
    let y_after_earlier_kernel = y_written_by == YWrittenBy::EarlierKernel;
    match kernel {
        ExpandKernel::Scalar(cfg) => {
            // Only after a split-K shrink. H100, pairs under programmatic launch
            // (runtime/BENCHMARKS.md, runs 84–86): after the CUDA-core shrink, which finishes
            // soon after its wait, the expand's longer prologue made rank-16 pairs at T = 32
            // 7–9% slower (qkv, gate_up); after the longer split-K shrink, up to 8% faster
            // (one timing in 18, gate_up R=64, 1% slower).
            let y_before_wait = y_after_earlier_kernel && cfg.a_splits > 1;
            let (ny, nb) = (cfg.out_vector as usize, cfg.rank_vector as usize);
            unsafe {
                expand_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(widest.div_ceil(cfg.threads * cfg.out_vector), slices, segs.num_segments as u32 * cfg.token_splits),
                    CubeDim::new_1d(cfg.threads),
                    ny,
                    nb,
                    a.arg(1),
                    cols.b_pool.arg(nb),
                    y.arg(ny),
                    cols.slice_table.arg(1),
                    segs.seg_indptr.arg(1),
                    segs.weight_indices.arg(1),
                    segs.token_perm.arg(1),
                    cols.ranks.arg(1),
                    cols.scales.arg(1),
                    layout.out_features(),
                    cfg,
                    grid_dependency,
                    y_before_wait,
                );
            }
        }
        ExpandKernel::Mma { config, token_splits } => {
            let segments = segs.num_segments as u32;
            // Each cube loops over its share of a segment's tiles, prefetching the next one.
            let splits = config.token_splits(client.properties(), layout, segs.num_segments, segs.max_segment_len, token_splits);
            let (ny, nb) = (config.out_vector as usize, config.rank_vector as usize);
            let grid = (widest.div_ceil(config.block_columns()), slices, segments * splits);
            // Only the cubes resident at the wait gain, and about four of these fit a
            // multiprocessor (H100: 256 threads of 56 registers). H100, pairs at T = 128 under
            // PDL (runtime/BENCHMARKS.md, runs 83–86): grids of up to six cubes per
            // multiprocessor took 1–11% less (MLA R=64: 192 cubes, −9 to −11%); gate_up's
            // 1792 (14 per multiprocessor, more than three waves) up to 10% more.
            let cubes = grid.0 * grid.1 * grid.2;
            let y_before_wait = y_after_earlier_kernel && cubes <= Y_EARLY_MMA_CUBES_PER_SM * multiprocessors(client.properties());
            let cube_count = CubeCount::Static(grid.0, grid.1, grid.2);
            let cube_dim = CubeDim::new_2d(32, config.warps());
            // Two kernels (cubecl generates a launch function per kernel), one argument list.
            if config.stages == 1 {
                unsafe {
                    expand_mma_kernel::launch_unchecked::<F, R>(
                        client,
                        cube_count,
                        cube_dim,
                        ny,
                        nb,
                        a.arg(1),
                        cols.b_pool.arg(nb),
                        y.arg(ny),
                        cols.slice_table.arg(1),
                        segs.seg_indptr.arg(1),
                        segs.weight_indices.arg(1),
                        segs.token_perm.arg(1),
                        cols.ranks.arg(1),
                        cols.scales.arg(1),
                        layout.out_features(),
                        splits,
                        config,
                        grid_dependency,
                        y_before_wait,
                    );
                }
            } else {
                unsafe {
                    expand_mma_pipelined_kernel::launch_unchecked::<F, R>(
                        client,
                        cube_count,
                        cube_dim,
                        ny,
                        nb,
                        A_VECTOR,
                        a.arg(A_VECTOR),
                        cols.b_pool.arg(nb),
                        y.arg(ny),
                        cols.slice_table.arg(1),
                        segs.seg_indptr.arg(1),
                        segs.weight_indices.arg(1),
                        segs.token_perm.arg(1),
                        cols.ranks.arg(1),
                        cols.scales.arg(1),
                        layout.out_features(),
                        splits,
                        config,
                    );
                }
            }
        }
    }
    Ok(())
}

/// Output vector width (divides every slice width), B vector width (divides R) and the number
/// of column blocks needed by the widest slice.
pub(crate) fn expand_geometry<R: Runtime>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    elem: usize,
    threads: u32,
) -> (usize, usize, u32) {
    let widths: Vec<u32> = layout.slices().iter().map(|s| s.width).collect();
    let ny = vector_size(client.properties(), elem, &widths).min(4);
    let nb = vector_size(client.properties(), elem, &[layout.max_rank()]);
    let widest = widths.iter().copied().max().unwrap_or(1);
    (ny, nb, widest.div_ceil(threads * ny as u32))
}

/// Whether a CUDA-core expand config fits the layout and, for `elem_size`-byte storage, the
/// device's shared memory.
fn check_expand_config(device: &DeviceProperties, layout: &LoraLayout, cfg: &ExpandConfig, elem_size: usize) -> Result<()> {
    let ok = cfg.groups == layout.groups()
        && cfg.max_rank == layout.max_rank()
        && cfg.out_vector > 0
        && layout.slices().iter().all(|s| s.width % cfg.out_vector == 0)
        && cfg.rank_vector > 0
        && cfg.max_rank % cfg.rank_vector == 0
        && cfg.tokens_per_tile > 0
        && cfg.token_splits > 0
        && cfg.a_splits > 0
        && cfg.threads > 0;
    if !ok {
        return Err(LoraError::Layout(format!("expand config {cfg:?} does not fit the layout")));
    }
    let (needed, max_shared) = (cfg.shared_bytes(elem_size) as usize, device.hardware.max_shared_memory_size);
    if needed > max_shared {
        return Err(LoraError::Layout(format!("expand config {cfg:?} needs {needed} bytes of shared memory, the device has {max_shared}")));
    }
    Ok(())
}

/// Plain f64 reference, accumulating into `y`.
pub fn reference_expand(
    layout: &LoraLayout,
    ranks: &[u32],
    scales: &[f32],
    segs: &crate::batch::Segments,
    a: &[f64],
    b_pool: &[f64],
    y: &mut [f64],
) {
    let (big_r, c, out) = (layout.max_rank() as usize, layout.groups() as usize, layout.out_features() as usize);
    for s in 0..segs.num_segments() {
        let slot = segs.weight_indices()[s];
        if slot == NO_SLOT {
            continue;
        }
        let (rank, scale) = (ranks[slot as usize] as usize, scales[slot as usize] as f64);
        for p in segs.seg_indptr()[s]..segs.seg_indptr()[s + 1] {
            let t = segs.token_perm()[p as usize] as usize;
            for (slice, off) in layout.slices().iter().zip(layout.slice_offsets()) {
                let g = slice.group as usize;
                for n in off as usize..(off + slice.width) as usize {
                    let b_row = &b_pool[(slot as usize * out + n) * big_r..][..rank];
                    let a_row = &a[t * c * big_r + g * big_r..][..rank];
                    y[t * out + n] += scale * a_row.iter().zip(b_row).map(|(u, v)| u * v).sum::<f64>();
                }
            }
        }
    }
}
