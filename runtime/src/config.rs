//! Host-side kernel configurations. Each is computed from the `LoraLayout` (plus what the plan
//! knows about the batch) and becomes the kernel's comptime specialisation, so one compiled
//! kernel exists per (layout shape, tile choice) and the layout cannot disagree with the code.

use cubecl::ir::{BarrierLevel, DeviceProperties, OpaqueType};
use cubecl::prelude::*;
use lorac_plan::LoraLayout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShrinkConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// A rows handled by one cube; divides `max_rank` so a cube never straddles two groups.
    pub rows_per_cube: u32,
    /// Tokens sharing each A load (they all read the same adapter).
    pub tokens_per_tile: u32,
    /// Cubes sharing one segment's token tiles (prefill parallelism; 1 for chunked launches).
    pub token_splits: u32,
    /// Threads splitting K; a power of two so the partial sums tree-reduce.
    pub threads: u32,
    /// Lanes per plane when the device reduces across a plane (warp) of fixed width; 0 falls
    /// back to a shared-memory tree.
    pub plane_size: u32,
    /// Vector width of the x and A loads (divides `in_features`).
    pub vector: u32,
}

/// Longest segment of a decode-sized batch, for the CUDA-core shrink's choice of tile.
const DECODE_SEGMENT_TOKENS: u32 = 128;

impl ShrinkConfig {
    /// Picks the widest token tile (most reuse of each A load) that still gives the grid two
    /// cubes per multiprocessor; decode batches end up with narrow tiles and every cube's A rows
    /// in flight at once, prefill with 8×8 register tiles. Every token tile gets its own cube.
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        elem_size: usize,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Self {
        let max_rank = layout.max_rank();
        let target = 2 * u64::from(multiprocessors(client.properties()));
        let fits = |r: u32| [r, 4, 2, 1].into_iter().find(|d| max_rank % d == 0).unwrap_or(1);
        let longest = max_segment_len.max(1).next_power_of_two();
        // Cubes of a grid of `rows`-row, `tokens`-token tiles.
        let cubes = |rows: u32, tokens: u32| {
            u64::from(layout.intermediate_width() / rows) * num_segments as u64 * u64::from(max_segment_len.div_ceil(tokens))
        };
        let options = [(8, 8), (4, 4), (4, 2), (4, 1)];
        let (rows_per_cube, tokens) = options
            .iter()
            .filter(|(_, t)| *t <= longest)
            // 8×8 tiles (64 sums per thread) only past decode sizes: on a T = 128 batch of 8
            // adapters (qkv R=64, H100, run 40) 4×4 tiles took 19.5–27 µs against 39.7.
            .filter(|(r, t)| r * t < 64 || max_segment_len > DECODE_SEGMENT_TOKENS)
            .map(|&(r, t)| (fits(r), t))
            .find(|&(r, t)| cubes(r, t) >= target)
            .unwrap_or((fits(4), 1));
        let vector = vector_size(client.properties(), elem_size, &[layout.in_features()]) as u32;
        let k_vecs = layout.in_features() / vector;
        // A decode grid of six or more cubes per multiprocessor runs faster on half the threads
        // (twice the cubes resident): T = 128 on the H100 (runs 40 and 43), qkv R=64 25–27 →
        // 18–19.4 µs, gate_up and MLA R=64 8–13% faster; grids of up to four cubes per
        // multiprocessor (qkv R=16 T=128, the T ≤ 32 cases) were faster on 256.
        let max_threads = if max_segment_len <= DECODE_SEGMENT_TOKENS && cubes(rows_per_cube, tokens) >= 3 * target { 128 } else { 256 };
        let (threads, plane) = shrink_threads(client, k_vecs, rows_per_cube * tokens, max_threads);
        ShrinkConfig {
            groups: layout.groups(),
            max_rank,
            rows_per_cube,
            tokens_per_tile: tokens,
            // One tile per cube (the grid's z dimension bounds it).
            token_splits: max_segment_len.div_ceil(tokens).clamp(1, 65535),
            threads,
            plane_size: plane,
            vector,
        }
    }
}

/// Whether a tensor-core kernel may stage through `stages` (2–4) shared-memory buffers filled
/// by asynchronous copies: the device has `cp.async` and block barriers, each copy moves
/// `copy_bytes` = 16 bytes, and the kernel's `shared_bytes` fit the device's shared memory.
pub(crate) fn pipeline_fits(props: &DeviceProperties, stages: u32, copy_bytes: u32, shared_bytes: u32) -> bool {
    let async_copies = props.features.copy_async && props.supports_type(OpaqueType::Barrier(BarrierLevel::Cube));
    async_copies && (2..=4).contains(&stages) && copy_bytes == 16 && shared_bytes <= props.hardware.max_shared_memory_size as u32
}

/// 32-bit registers per multiprocessor (every NVIDIA architecture from sm_50 to sm_90): with
/// the registers ptxas gives a kernel, it bounds how many of its threads a multiprocessor
/// holds. cubecl 0.10's device properties do not report it.
pub(crate) const SM_REGISTERS: u32 = 65536;

pub(crate) fn multiprocessors(device: &DeviceProperties) -> u32 {
    device.hardware.num_streaming_multiprocessors.unwrap_or(64)
}

/// How many ways to split work laid out as `cubes` cubes so the grid has about eight cubes per
/// multiprocessor (streaming kernels want many loads in flight), between 1 and `max_splits`.
pub(crate) fn splits_to_fill_on(device: &DeviceProperties, cubes: u32, max_splits: u32) -> u32 {
    (8 * multiprocessors(device)).div_ceil(cubes.max(1)).clamp(1, max_splits.max(1))
}

/// Threads splitting a K of `k_vecs` vectors (about two loads each, so the whole adapter is in
/// flight at once) and the plane width for their reduction of `values` sums. Without plane
/// reductions the shared-memory tree needs `values · threads` floats: keep that within 16 KiB.
/// At most `max_threads` (64 to 256).
pub(crate) fn shrink_threads<R: Runtime>(client: &ComputeClient<R>, k_vecs: u32, values: u32, max_threads: u32) -> (u32, u32) {
    // 256 threads at most: 512 (one paired round of loads for MLA's K = 7168 instead of two)
    // ran 1.2–1.6× slower on 2- to 16-token tiles on the H100 (run 41).
    let threads = k_vecs.div_ceil(2).next_power_of_two().clamp(64, max_threads.clamp(64, 256));
    match plane_size(client, threads) {
        0 => (threads.min((4096 / values.max(1)).next_power_of_two() / 2).max(1), 0),
        plane => (threads, plane),
    }
}

/// Fixed plane width usable for reductions over `threads` threads, or 0.
pub(crate) fn plane_size<R: Runtime>(client: &ComputeClient<R>, threads: u32) -> u32 {
    let props = client.properties();
    let hw = &props.hardware;
    let fixed = hw.plane_size_min == hw.plane_size_max && hw.plane_size_min > 1;
    if fixed && props.features.plane.contains(cubecl::features::Plane::Ops) && threads % hw.plane_size_min == 0 {
        hw.plane_size_min
    } else {
        0
    }
}

/// Threads per cube of the expand kernels (one output vector per thread).
pub(crate) const EXPAND_THREADS: u32 = 128;

/// B vectors each thread of the CUDA-core expand stages: few enough to be in flight at once
/// from registers, so a cube's whole block of B is one round trip to memory.
const EXPAND_STAGED_VECTORS: u32 = 8;

/// Shared memory the CUDA-core expand may use for its B block and intermediate tile: small
/// enough for many resident cubes (a decode expand is a latency-bound read of B).
const EXPAND_SHARED_BUDGET: u32 = 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpandConfig {
    pub groups: u32,
    pub max_rank: u32,
    pub tokens_per_tile: u32,
    pub token_splits: u32,
    /// Threads per cube; a cube covers `threads · out_vector` columns of a slice.
    pub threads: u32,
    /// Output columns per thread (the y vector width, divides every slice width).
    pub out_vector: u32,
    /// Vector width of the B loads along the rank (divides `max_rank`).
    pub rank_vector: u32,
    /// Copies of the intermediate to add up (`[a_splits, tokens, c·R]`): the partial sums of
    /// a tensor-core shrink with K splits (`ShrinkKernel::intermediate_copies`); 1 for every
    /// other shrink. See [`Self::summing`].
    pub a_splits: u32,
}

impl ExpandConfig {
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        elem_size: usize,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Self {
        Self::for_device(client.properties(), layout, elem_size, num_segments, max_segment_len)
    }

    /// [`ExpandConfig::new`] for a device described by its properties.
    pub fn for_device(props: &DeviceProperties, layout: &LoraLayout, elem_size: usize, num_segments: usize, max_segment_len: u32) -> Self {
        let widths: Vec<u32> = layout.slices().iter().map(|s| s.width).collect();
        let rank_vector = vector_size(props, elem_size, &[layout.max_rank()]) as u32;
        // Up to EXPAND_STAGED_VECTORS B vectors per thread: columns per thread shrink as the
        // rank grows (both are powers of two, so the smaller divides every slice width).
        let rank_vecs = layout.max_rank() / rank_vector;
        let per_thread = (EXPAND_STAGED_VECTORS / rank_vecs).max(1);
        let out_vector = (vector_size(props, elem_size, &widths) as u32).min(1 << per_thread.ilog2());
        let tokens_per_tile = match max_segment_len {
            0 | 1 => 1,
            2..=4 => max_segment_len.next_power_of_two(),
            _ => 8,
        };
        let mut cfg = ExpandConfig {
            groups: layout.groups(),
            max_rank: layout.max_rank(),
            tokens_per_tile,
            token_splits: 1,
            threads: EXPAND_THREADS,
            out_vector,
            rank_vector,
            a_splits: 1,
        };
        let budget = EXPAND_SHARED_BUDGET.min(props.hardware.max_shared_memory_size as u32);
        while cfg.threads > 32 && cfg.shared_bytes(elem_size) > budget {
            cfg.threads /= 2;
        }
        let blocks: u32 = widths.iter().map(|w| w.div_ceil(cfg.threads * out_vector)).sum();
        let tiles = max_segment_len.div_ceil(tokens_per_tile).max(1);
        // Split a segment's tiles over cubes until the grid has eight cubes per multiprocessor:
        // the expand streams y, so it wants many loads in flight.
        cfg.token_splits =
            splits_to_fill_on(props, blocks * num_segments.max(1) as u32, tiles).min(65535 / num_segments.max(1) as u32).max(1);
        cfg
    }

    /// This configuration reading the `a_splits` copies of partial sums a shrink with that
    /// many K splits writes.
    pub fn summing(self, a_splits: u32) -> Self {
        ExpandConfig { a_splits, ..self }
    }

    /// Row stride (in rank vectors) of the B block in shared memory: odd, so the threads of a
    /// warp, one row each, read distinct banks.
    pub(crate) fn b_row_stride(&self) -> u32 {
        let rank_vecs = self.max_rank / self.rank_vector;
        rank_vecs | 1
    }

    /// Shared memory of one cube: the B block in the storage type, the intermediate tile in f32.
    pub fn shared_bytes(&self, elem_size: usize) -> u32 {
        let b_block = self.threads * self.out_vector * self.b_row_stride() * self.rank_vector * elem_size as u32;
        b_block + self.tokens_per_tile * self.max_rank * 4
    }
}

/// Largest vector width the device reads efficiently that divides every given length: the
/// widths `ComputeClient::io_optimized_vector_sizes` offers (powers of two up to the device's
/// load width and largest vector), from the device's properties alone.
pub(crate) fn vector_size(device: &DeviceProperties, elem_size: usize, lengths: &[u32]) -> usize {
    let widest = (device.hardware.load_width as usize / (elem_size * 8)).min(device.hardware.max_vector_size).max(1);
    (0..=widest.trailing_zeros())
        .map(|i| 1usize << i)
        .filter(|v| lengths.iter().all(|l| (*l as usize).is_multiple_of(*v)))
        .max()
        .unwrap_or(1)
}

/// Per-slice table `[offset, width, group]` the expand kernels read (slices have unequal widths).
pub(crate) fn slice_table(layout: &LoraLayout) -> Vec<u32> {
    layout.slices().iter().zip(layout.slice_offsets()).flat_map(|(s, off)| [off, s.width, s.group]).collect()
}
