//! Segmented shrink: `a[t, g·R + j] = x[t, :] · A[slot(t), g·R + j, :]` for `j < rank(slot)`.
//!
//! One cube owns `rows_per_cube` rows of one slot's A and walks the tokens of one segment in
//! tiles, so each A row is read once per tile and every token of the tile reuses it. K is split
//! across the cube's threads (enough loads in flight to saturate HBM at decode) and the partial
//! sums are tree-reduced in shared memory. Rows `j ≥ rank` are never loaded and never written.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT};
use crate::buffer::DeviceBuffer;
use crate::config::ShrinkConfig;
use crate::cuda_graph::grid_dependency_point;
use crate::error::{LoraError, Result};
use crate::pool::AdapterPool;
use crate::shrink_mma::{LaunchMode, MmaShrinkConfig, shrink_mma_kernel};
use crate::shrink_mma_pipelined::shrink_mma_pipelined_kernel;

/// Dot products of `rows` consecutive A rows (starting at vector index `a_base`, row stride
/// `k_vecs`) with `tokens` x rows (vector offsets `x_off`), reduced over the cube's threads.
/// On return `partials[v · result_stride(threads, plane)]` holds the full sum of value
/// `v = r·tokens + i` (row `r`, token `i`).
///
/// With `grid_dependency`, the first A loads go out before a
/// [`GRID_DEPENDENCY_POINT`](crate::cuda_graph::GRID_DEPENDENCY_POINT) and x is read after it:
/// under a programmatic launch the A rows stream in while the kernel before this one finishes.
/// Only a call with `first_call` passes the point (once per thread, before it returns); the
/// caller must have read only adapter weights and batch metadata before that call, and
/// written nothing to global memory.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn cube_dot_rows<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_off: &Array<usize>,
    a_pool: &Array<Vector<F, N>>,
    a_base: usize,
    k_vecs: usize,
    partials: &mut SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] tokens: usize,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
    #[comptime] grid_dependency: bool,
    first_call: bool,
) {
    let tid = UNIT_POS as usize;
    let values = comptime!(rows * tokens);
    // Scalar accumulators: rows·tokens of them stay in registers even for prefill tiles.
    let mut acc = Array::<f32>::new(values);
    #[unroll]
    for v in 0..values {
        acc[v] = 0.0f32;
    }
    if comptime!(values <= PAIRED_STEP_VALUES) {
        // Two K steps per pass, every load of both issued before the first FMA: with about
        // two steps per thread (`shrink_threads`) a decode cube has all its x and A loads in
        // flight at once, instead of two dependent rounds of memory latency. The second step
        // past the end reloads the first (in bounds) and is not summed.
        let mut xs = Array::<Vector<F, N>>::new(comptime!(2 * tokens));
        let mut avs = Array::<Vector<F, N>>::new(comptime!(2 * rows));
        let mut k = tid;
        while k < k_vecs {
            let k2 = k + threads;
            let second = k2 < k_vecs;
            let k2 = select(second, k2, k);
            #[unroll]
            for r in 0..rows {
                avs[r] = a_pool[a_base + r * k_vecs + k];
                avs[rows + r] = a_pool[a_base + r * k_vecs + k2];
            }
            // x may be the previous kernel's output; A is not. At decode (two K steps per
            // thread) this first pass loads the thread's whole share of A.
            grid_dependency_point(grid_dependency, first_call && k == tid);
            #[unroll]
            for i in 0..tokens {
                xs[i] = x[x_off[i] + k];
                xs[tokens + i] = x[x_off[i] + k2];
            }
            accumulate_step::<F, N>(&mut acc, &xs, &avs, 0usize, rows, tokens);
            if second {
                accumulate_step::<F, N>(&mut acc, &xs, &avs, 1usize, rows, tokens);
            }
            k += comptime!(2 * threads);
        }
    } else {
        grid_dependency_point(grid_dependency, first_call);
        let mut xs = Array::<Vector<f32, N>>::new(tokens);
        let mut k = tid;
        while k < k_vecs {
            #[unroll]
            for i in 0..tokens {
                xs[i] = Vector::<f32, N>::cast_from(x[x_off[i] + k]);
            }
            #[unroll]
            for r in 0..rows {
                let av = Vector::<f32, N>::cast_from(a_pool[a_base + r * k_vecs + k]);
                #[unroll]
                for i in 0..tokens {
                    let prod = av * xs[i];
                    let mut s = 0.0f32;
                    #[unroll]
                    for l in 0..N::value() {
                        s += prod[l];
                    }
                    acc[r * tokens + i] = acc[r * tokens + i] + s;
                }
            }
            k += threads;
        }
    }
    // Threads that had no K step above.
    grid_dependency_point(comptime!(grid_dependency && values <= PAIRED_STEP_VALUES), first_call && tid >= k_vecs);
    if comptime!(plane > 0) {
        // Warp shuffles inside each plane, then one shared-memory pass across planes.
        let planes = comptime!(threads / plane);
        let lane = tid % plane;
        let pid = tid / plane;
        #[unroll]
        for v in 0..values {
            let s = plane_sum(acc[v]);
            if lane == 0 {
                partials[v * planes + pid] = s;
            }
        }
        sync_cube();
        let mut v = tid;
        while v < values {
            let mut s = 0.0f32;
            #[unroll]
            for p in 0..planes {
                s += partials[v * planes + p];
            }
            partials[v * planes] = s;
            v += threads;
        }
        sync_cube();
    } else {
        #[unroll]
        for v in 0..values {
            partials[v * threads + tid] = acc[v];
        }
        sync_cube();
        let mut stride = (threads / 2).runtime();
        while stride > 0 {
            if tid < stride {
                #[unroll]
                for v in 0..values {
                    partials[v * threads + tid] = partials[v * threads + tid] + partials[v * threads + tid + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
    }
}

/// Most sums (rows × tokens) for which [`cube_dot_rows`] holds two K steps' loads in registers
/// at once. H100 (run 35): 4 × 1 and 4 × 2 tiles ran 7–21% faster paired, 4 × 4 (qkv R=64,
/// T=32) 35% slower.
const PAIRED_STEP_VALUES: usize = 8;

/// Adds K step `half` (0 or 1) of the staged loads `xs` (`[2, tokens]`) and `avs`
/// (`[2, rows]`) into `acc[r · tokens + i]`.
#[cube]
fn accumulate_step<F: Float, N: Size>(
    acc: &mut Array<f32>,
    xs: &Array<Vector<F, N>>,
    avs: &Array<Vector<F, N>>,
    #[comptime] half: usize,
    #[comptime] rows: usize,
    #[comptime] tokens: usize,
) {
    #[unroll]
    for r in 0..rows {
        let av = Vector::<f32, N>::cast_from(avs[half * rows + r]);
        #[unroll]
        for i in 0..tokens {
            let prod = av * Vector::<f32, N>::cast_from(xs[half * tokens + i]);
            let mut s = 0.0f32;
            #[unroll]
            for l in 0..N::value() {
                s += prod[l];
            }
            acc[r * tokens + i] += s;
        }
    }
}

/// Distance between consecutive results in `partials` after [`cube_dot_rows`].
pub(crate) fn result_stride(threads: u32, plane: u32) -> usize {
    threads.checked_div(plane).unwrap_or(threads) as usize
}

#[cube(launch_unchecked)]
fn shrink_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<Vector<F, N>>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    out: &mut Array<f32>,
    k_vecs: u32,
    x_row_divisor: u32,
    #[comptime] cfg: ShrinkConfig,
    #[comptime] grid_dependency: bool,
) {
    let rows = comptime!(cfg.rows_per_cube as usize);
    let tokens = comptime!(cfg.tokens_per_tile as usize);
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let splits = comptime!(cfg.token_splits as usize);

    let seg = CUBE_POS_Y as usize;
    let slot = weight_indices[seg];
    if slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let row0 = CUBE_POS_X as usize * rows;
    let j0 = row0 % max_rank;
    // Padding rows of a low-rank adapter: nothing to read, nothing to write.
    if j0 >= rank {
        terminate!();
    }
    let k_vecs = k_vecs as usize;
    let start = seg_indptr[seg] as usize;
    let end = seg_indptr[seg + 1] as usize;
    let a_base = (slot as usize * c_r + row0) * k_vecs;
    let plane = comptime!(cfg.plane_size as usize);
    let stride = comptime!(result_stride(cfg.threads, cfg.plane_size));
    let mut partials = SharedMemory::<f32>::new(comptime!(rows * tokens * result_stride(cfg.threads, cfg.plane_size)));
    let mut x_off = Array::<usize>::new(tokens);

    let first_p0 = start + CUBE_POS_Z as usize * tokens;
    let mut p0 = first_p0;
    while p0 < end {
        // Tail tokens of a tile repeat the last valid row: loads stay in bounds, sums are dropped.
        #[unroll]
        for i in 0..tokens {
            let p = min(p0 + i, end - 1);
            x_off[i] = (token_perm[p] / x_row_divisor) as usize * k_vecs;
        }
        cube_dot_rows::<F, N>(
            x,
            &x_off,
            a_pool,
            a_base,
            k_vecs,
            &mut partials,
            rows,
            tokens,
            threads,
            plane,
            grid_dependency,
            p0 == first_p0,
        );
        // A tile may hold more sums than the cube has threads.
        let mut v = UNIT_POS as usize;
        while v < rows * tokens {
            let r = v / tokens;
            let i = v % tokens;
            if p0 + i < end && j0 + r < rank {
                let t = token_perm[p0 + i] as usize;
                out[t * c_r + row0 + r] = partials[v * stride];
            }
            v += threads;
        }
        sync_cube();
        p0 += splits * tokens;
    }
}

/// Which shrink kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShrinkKernel {
    /// CUDA-core kernel: any dtype, any shape; best for decode.
    Scalar(ShrinkConfig),
    /// Tensor-core kernel for long segments. `tiles_per_segment` (token tiles of
    /// `config.tile_tokens()`) fixes the grid (chunked launches); 0 sizes it from the batch's
    /// longest segment.
    Mma { config: MmaShrinkConfig, tiles_per_segment: u32 },
}

impl ShrinkKernel {
    /// The tensor-core kernel where it applies and the batch fills the GPU, else the scalar one;
    /// never K splits (it writes one copy of the intermediate).
    pub fn choose<R: Runtime, F: Float>(client: &ComputeClient<R>, layout: &LoraLayout, num_segments: usize, max_segment_len: u32) -> Self {
        Self::choose_within::<R, F>(client, layout, num_segments, max_segment_len, 1)
    }

    /// [`Self::choose`] for a caller whose intermediate can hold up to `max_copies` copies:
    /// the wide prefill tile of at most that many K splits where
    /// [`MmaShrinkConfig::wide_split_for`] applies; with room for
    /// [`crate::shrink_mma::SPLIT_K_COPIES`], the tensor-core kernel with K splits where
    /// [`MmaShrinkConfig::split_k_for`] applies. Size the intermediate by
    /// [`Self::intermediate_copies`]; the default expand reads every copy.
    pub fn choose_within<R: Runtime, F: Float>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        max_copies: u32,
    ) -> Self {
        Self::choose_within_for::<R, F>(client, layout, num_segments, max_segment_len, max_copies, LaunchMode::Plain)
    }

    /// [`Self::choose_within`] for a pair launched as `launch` says (a caller capturing CUDA
    /// graphs with programmatic launch: [`MmaShrinkConfig::split_k_for_launch`]).
    pub fn choose_within_for<R: Runtime, F: Float>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        max_copies: u32,
        launch: LaunchMode,
    ) -> Self {
        let props = client.properties();
        let split = || {
            MmaShrinkConfig::split_k_for_launch::<F>(props, layout, num_segments, max_segment_len, launch)
                .filter(|c| c.k_splits <= max_copies)
        };
        let batch = MmaShrinkConfig::for_batch::<F>(props, layout, num_segments, max_segment_len);
        let wide = batch.and_then(|blocked| blocked.wide_split_for::<F>(props, layout, num_segments, max_segment_len, max_copies));
        match wide.or(batch).or_else(split) {
            Some(config) => ShrinkKernel::Mma { config, tiles_per_segment: 0 },
            None => ShrinkKernel::Scalar(ShrinkConfig::new(client, layout, size_of::<F>(), num_segments, max_segment_len)),
        }
    }

    /// [`Self::choose_within`] for a batch of `tokens` tokens whose intermediate buffer has
    /// `room` floats: as many copies as it holds of `[tokens, groups·R]`.
    pub fn choose_for_room<R: Runtime, F: Float>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        tokens: u32,
        room: usize,
    ) -> Self {
        let per_copy = tokens as usize * layout.intermediate_width() as usize;
        let copies = room.checked_div(per_copy).unwrap_or(1).min(u32::MAX as usize) as u32;
        Self::choose_within::<R, F>(client, layout, num_segments, max_segment_len, copies)
    }

    /// Floats of an intermediate for batches of up to `max_tokens` tokens that leaves
    /// [`Self::choose_for_room`] the copies a K split wants on this layout: one copy for every
    /// token, the extra decode copies for the tokens up to
    /// [`MmaShrinkConfig::split_k_max_tokens`], and room for the copies of the wide prefill
    /// tiles ([`MmaShrinkConfig::wide_split_layouts`]) of batches up to their
    /// [`MmaShrinkConfig::wide_split_max_tokens`].
    pub fn intermediate_len<R: Runtime, F: Float>(client: &ComputeClient<R>, layout: &LoraLayout, max_tokens: usize) -> usize {
        let width = layout.intermediate_width() as usize;
        let props = client.properties();
        let extra = MmaShrinkConfig::split_k_layout::<F>(props, layout).map_or(0, |c| c.k_splits as usize - 1);
        let split_tokens = max_tokens.min(MmaShrinkConfig::split_k_max_tokens(props) as usize);
        let wide = MmaShrinkConfig::wide_split_layouts::<F>(props, layout)
            .map(|c| c.k_splits as usize * max_tokens.min(c.wide_split_max_tokens(props) as usize))
            .max()
            .unwrap_or(0);
        (max_tokens + extra * split_tokens).max(wide) * width
    }

    /// Copies of the intermediate the kernel writes (`[copies, tokens, groups·R]`): one per K
    /// split of the tensor-core kernel, each holding partial sums that the expand adds up
    /// (`ExpandConfig::a_splits` must match), else 1.
    pub fn intermediate_copies(&self) -> u32 {
        match self {
            ShrinkKernel::Scalar(_) => 1,
            ShrinkKernel::Mma { config, .. } => config.k_splits,
        }
    }
}

/// Launches the segmented shrink: `x` is `[tokens, in]`, `out` is the f32 intermediate
/// `[tokens, groups·R]` (only `j < rank` entries of tokens with an adapter are written), or
/// `[k_splits, tokens, groups·R]` of partial sums for a tensor-core kernel with K splits
/// ([`ShrinkKernel::intermediate_copies`]).
pub fn launch_shrink<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    x: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<f32>,
    kernel: Option<ShrinkKernel>,
) -> Result<()> {
    pool.check_layout(layout)?;
    if layout.experts().is_some() {
        return Err(LoraError::Layout("expert layouts go through the MoE kernels".into()));
    }
    let rows = ShrinkRows { a_pool: &pool.a, ranks: &pool.ranks, x_row_divisor: 1 };
    launch_shrink_rows(client, layout, rows, segs, x, out, kernel)
}

/// What the segmented shrink reads besides the batch: A as `[slots, groups·R, in]` of
/// `layout` with `ranks[slot]`, and the x row of a token (`token / x_row_divisor`).
/// The MoE grouped path passes a pool viewed per (slot, expert) and, for gate_up, one x row
/// per token shared by its `topk` pairs.
#[derive(Clone, Copy)]
pub(crate) struct ShrinkRows<'a, F> {
    pub a_pool: &'a DeviceBuffer<F>,
    pub ranks: &'a DeviceBuffer<u32>,
    pub x_row_divisor: u32,
}

/// [`launch_shrink`] on explicit A, ranks and x-row mapping (`layout` has no expert dims).
pub(crate) fn launch_shrink_rows<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    rows: ShrinkRows<'_, F>,
    segs: &DeviceSegments,
    x: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<f32>,
    kernel: Option<ShrinkKernel>,
) -> Result<()> {
    segs.check_slots(layout)?;
    rows.a_pool.check_len("A", layout.a_elements() as usize)?;
    rows.ranks.check_len("ranks", layout.slots() as usize)?;
    let divisor = rows.x_row_divisor;
    if divisor == 0 || !segs.tokens.is_multiple_of(divisor) {
        return Err(LoraError::Layout(format!("{} token rows do not share x rows in groups of {divisor}", segs.tokens)));
    }
    let kernel = kernel.unwrap_or_else(|| ShrinkKernel::choose::<R, F>(client, layout, segs.num_segments, segs.max_segment_len));
    let tokens = segs.tokens as usize;
    let k = layout.in_features();
    x.check_len("x", tokens / divisor as usize * k as usize)?;
    out.check_len("a (shrink output)", kernel.intermediate_copies() as usize * tokens * layout.intermediate_width() as usize)?;
    match kernel {
        ShrinkKernel::Scalar(cfg) => check_shrink_config(layout, &cfg)?,
        ShrinkKernel::Mma { config, .. } => {
            if !config.fits::<F>(client.properties(), layout) {
                return Err(LoraError::Layout(format!("tensor-core shrink config {config:?} does not fit the layout or device")));
            }
        }
    }
    if segs.num_segments == 0 || tokens == 0 {
        return Ok(());
    }
    match kernel {
        ShrinkKernel::Scalar(cfg) => {
            let n = cfg.vector as usize;
            let row_blocks = layout.intermediate_width() / cfg.rows_per_cube;
            unsafe {
                shrink_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(row_blocks, segs.num_segments as u32, cfg.token_splits),
                    CubeDim::new_1d(cfg.threads),
                    n,
                    x.arg(n),
                    rows.a_pool.arg(n),
                    segs.seg_indptr.arg(1),
                    segs.weight_indices.arg(1),
                    segs.token_perm.arg(1),
                    rows.ranks.arg(1),
                    out.arg(1),
                    k / n as u32,
                    divisor,
                    cfg,
                    // Segments a kernel wrote are read only after the wait.
                    !segs.written_by_kernels,
                );
            }
        }
        ShrinkKernel::Mma { config, tiles_per_segment } => {
            let tiles = if tiles_per_segment > 0 { tiles_per_segment } else { segs.max_segment_len.div_ceil(config.tile_tokens()) };
            let n = config.vector as usize;
            let count = CubeCount::Static(tiles.max(1), segs.num_segments as u32, config.row_blocks() * config.k_splits);
            let dim = CubeDim::new_2d(32, config.warps());
            let (seg_indptr, weight_indices, token_perm) = (segs.seg_indptr.arg(1), segs.weight_indices.arg(1), segs.token_perm.arg(1));
            unsafe {
                if config.stages > 1 {
                    shrink_mma_pipelined_kernel::launch_unchecked::<F, R>(
                        client,
                        count,
                        dim,
                        n,
                        x.arg(n),
                        rows.a_pool.arg(n),
                        seg_indptr,
                        weight_indices,
                        token_perm,
                        rows.ranks.arg(1),
                        out.arg(1),
                        k,
                        divisor,
                        config,
                        // Segments a kernel wrote are read only after the wait.
                        !segs.written_by_kernels,
                    );
                } else {
                    shrink_mma_kernel::launch_unchecked::<F, R>(
                        client,
                        count,
                        dim,
                        n,
                        x.arg(n),
                        rows.a_pool.arg(n),
                        seg_indptr,
                        weight_indices,
                        token_perm,
                        rows.ranks.arg(1),
                        out.arg(1),
                        k,
                        divisor,
                        config,
                        // Segments a kernel wrote are read only after the wait.
                        !segs.written_by_kernels,
                    );
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn check_shrink_config(layout: &LoraLayout, cfg: &ShrinkConfig) -> Result<()> {
    let ok = cfg.groups == layout.groups()
        && cfg.max_rank == layout.max_rank()
        && cfg.rows_per_cube > 0
        && cfg.max_rank % cfg.rows_per_cube == 0
        && cfg.tokens_per_tile > 0
        && cfg.token_splits > 0
        && cfg.threads.is_power_of_two()
        && (cfg.plane_size == 0 || cfg.threads % cfg.plane_size == 0)
        && cfg.vector > 0
        && layout.in_features() % cfg.vector == 0;
    if !ok {
        return Err(LoraError::Layout(format!("shrink config {cfg:?} does not fit the layout")));
    }
    Ok(())
}

/// Plain f64 reference. `a` must hold the caller's prior contents (entries the kernel must not
/// touch keep them).
pub fn reference_shrink(layout: &LoraLayout, ranks: &[u32], segs: &crate::batch::Segments, x: &[f64], a_pool: &[f64], a: &mut [f64]) {
    let (k, big_r, c) = (layout.in_features() as usize, layout.max_rank() as usize, layout.groups() as usize);
    for s in 0..segs.num_segments() {
        let slot = segs.weight_indices()[s];
        if slot == NO_SLOT {
            continue;
        }
        let rank = ranks[slot as usize] as usize;
        for p in segs.seg_indptr()[s]..segs.seg_indptr()[s + 1] {
            let t = segs.token_perm()[p as usize] as usize;
            for g in 0..c {
                for j in 0..rank {
                    let row = &a_pool[((slot as usize * c + g) * big_r + j) * k..][..k];
                    a[t * c * big_r + g * big_r + j] = row.iter().zip(&x[t * k..(t + 1) * k]).map(|(w, v)| w * v).sum();
                }
            }
        }
    }
}
