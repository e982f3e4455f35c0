//! Fused decode LoRA: shrink and expand in one launch.
//!
//! Decode is launch-bound: a cubecl launch costs about 6.5 µs of host time on the H100 (more
//! than either kernel's work at decode sizes), so the two-launch shrink → expand pays it twice.
//! Here each expand cube first computes, for its segment's tokens, the rank-r intermediate of
//! the group its slice reads (the shrink, reduced across the cube as in [`crate::shrink`]),
//! keeps it in shared memory, then does the expand of its column block. The group's A rows are
//! re-read by every column block of its slices (from L2 after the first), which is why this is
//! a decode kernel: [`FusedConfig::worthwhile`] says when the saved launch outweighs that
//! (on the H100: single-token segments at rank ≤ 16 only).
//! No intermediate buffer is needed at all. Reference: the shrink reference, then the expand's.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::DeviceSegments;
use crate::buffer::DeviceBuffer;
use crate::config::{shrink_threads, vector_size};
use crate::error::{LoraError, Result};
use crate::expand::{add_tile_to_y, expand_block};
use crate::pool::AdapterPool;
use crate::shrink::{cube_dot_rows, result_stride};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FusedConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// A rows per pass of the shrink (divides `max_rank`).
    pub rows_per_pass: u32,
    pub tokens_per_tile: u32,
    pub threads: u32,
    pub plane_size: u32,
    /// Vector widths: x and A loads, y (output columns per thread), B loads along the rank.
    pub vector: u32,
    pub out_vector: u32,
    pub rank_vector: u32,
}

impl FusedConfig {
    pub fn new<R: Runtime>(client: &ComputeClient<R>, layout: &LoraLayout, elem_size: usize, max_segment_len: u32) -> Self {
        let max_rank = layout.max_rank();
        let tokens_per_tile = max_segment_len.clamp(1, 4).next_power_of_two();
        let rows_per_pass = [16, 8, 4, 2, 1].into_iter().find(|r| max_rank % r == 0 && r * tokens_per_tile <= 64).unwrap_or(1);
        let vector = vector_size(client.properties(), elem_size, &[layout.in_features()]) as u32;
        let (threads, plane_size) = shrink_threads(client, layout.in_features() / vector, rows_per_pass * tokens_per_tile, 256);
        let widths: Vec<u32> = layout.slices().iter().map(|s| s.width).collect();
        FusedConfig {
            groups: layout.groups(),
            max_rank,
            rows_per_pass,
            tokens_per_tile,
            threads,
            plane_size,
            vector,
            out_vector: vector_size(client.properties(), elem_size, &widths) as u32,
            rank_vector: vector_size(client.properties(), elem_size, &[max_rank]) as u32,
        }
    }

    /// Column blocks reading each group's intermediate: each recomputes it, so fusing pays
    /// off only for short segments and modules whose slices span few blocks.
    pub fn blocks_per_group(&self, layout: &LoraLayout) -> u32 {
        (0..layout.groups())
            .map(|g| layout.slices().iter().filter(|s| s.group == g).map(|s| s.width.div_ceil(self.threads * self.out_vector)).sum())
            .max()
            .unwrap_or(1)
    }

    /// Measured on the H100 (runtime/BENCHMARKS.md): fusing wins only when every segment has
    /// one token, the rank is at most 16 and no group is recomputed more than 4 times; longer
    /// segments serialise token tiles and rank passes inside each cube and lose badly.
    pub fn worthwhile(&self, layout: &LoraLayout, max_segment_len: u32) -> bool {
        max_segment_len <= 1 && self.max_rank <= 16 && self.blocks_per_group(layout) <= 4
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn fused_kernel<F: Float, N: Size, NY: Size, NB: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<Vector<F, N>>,
    b_pool: &Array<Vector<F, NB>>,
    y: &mut Array<Vector<F, NY>>,
    slice_info: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    k_vecs: u32,
    out_features: u32,
    #[comptime] cfg: FusedConfig,
) {
    let tokens = comptime!(cfg.tokens_per_tile as usize);
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let rows = comptime!(cfg.rows_per_pass as usize);
    let plane = comptime!(cfg.plane_size as usize);
    let stride = comptime!(result_stride(cfg.threads, cfg.plane_size));
    let ny = comptime!(cfg.out_vector as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let rank_vecs_max = comptime!((cfg.max_rank / cfg.rank_vector) as usize);

    let blk = expand_block(
        CUBE_POS_Z as usize,
        slice_info,
        seg_indptr,
        weight_indices,
        ranks,
        scales,
        out_features as usize,
        threads,
        ny,
        nb,
        rank_vecs_max,
    );
    let k_vecs = k_vecs as usize;
    let a_group = (blk.slot * c_r + blk.group * max_rank) * k_vecs;

    let mut partials = SharedMemory::<f32>::new(comptime!(rows * tokens * result_stride(cfg.threads, cfg.plane_size)));
    let mut a_tile = SharedMemory::<f32>::new(comptime!(tokens * max_rank));
    let mut x_off = Array::<usize>::new(tokens);
    let mut acc = Array::<f32>::new(comptime!(tokens * ny));

    let mut p0 = blk.start;
    while p0 < blk.end {
        #[unroll]
        for i in 0..tokens {
            x_off[i] = token_perm[min(p0 + i, blk.end - 1)] as usize * k_vecs;
        }
        // Zeros past the rank let the vectorised expand run over the last vector's padding.
        let mut idx = blk.tid;
        while idx < comptime!(tokens * max_rank) {
            a_tile[idx] = 0.0f32;
            idx += threads;
        }
        sync_cube();
        // Shrink: the group's first `rank` rows, `rows` at a time.
        let mut r0 = 0usize.runtime();
        while r0 < blk.rank {
            // No grid dependency point (a programmatic launch waits at the kernel's start).
            cube_dot_rows::<F, N>(
                x,
                &x_off,
                a_pool,
                a_group + r0 * k_vecs,
                k_vecs,
                &mut partials,
                rows,
                tokens,
                threads,
                plane,
                false,
                false,
            );
            let mut v = blk.tid;
            while v < comptime!(rows * tokens) {
                let j = r0 + v / tokens;
                if j < blk.rank {
                    a_tile[(v % tokens) * max_rank + j] = partials[v * stride];
                }
                v += threads;
            }
            sync_cube();
            r0 += rows;
        }
        // Expand of this cube's column block.
        if blk.active {
            #[unroll]
            for i in 0..comptime!(tokens * ny) {
                acc[i] = 0.0f32;
            }
            for jv in 0..blk.rank_vecs {
                #[unroll]
                for v in 0..ny {
                    let bv = Vector::<f32, NB>::cast_from(b_pool[blk.b_row0 + v * rank_vecs_max + jv]);
                    #[unroll]
                    for i in 0..tokens {
                        let mut s = 0.0f32;
                        #[unroll]
                        for l in 0..nb {
                            s += a_tile[i * max_rank + jv * nb + l] * bv[l];
                        }
                        acc[i * ny + v] += s;
                    }
                }
            }
            add_tile_to_y::<F, NY>(y, token_perm, &acc, &blk, p0, tokens, ny);
        }
        sync_cube();
        p0 += tokens;
    }
}

/// Shrink and expand in one launch: `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` for every token with an
/// adapter, `x` `[tokens, in]`, `y` `[tokens, out]`; needs no intermediate buffer.
pub fn launch_fused<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    x: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    config: Option<FusedConfig>,
) -> Result<()> {
    pool.check_layout(layout)?;
    segs.check_slots(layout)?;
    if layout.experts().is_some() {
        return Err(LoraError::Layout("expert layouts go through the MoE kernels".into()));
    }
    let cfg = config.unwrap_or_else(|| FusedConfig::new(client, layout, size_of::<F>(), segs.max_segment_len));
    let ok = cfg.groups == layout.groups()
        && cfg.max_rank == layout.max_rank()
        && cfg.rows_per_pass > 0
        && cfg.max_rank % cfg.rows_per_pass == 0
        && cfg.tokens_per_tile > 0
        && cfg.threads.is_power_of_two()
        && (cfg.plane_size == 0 || cfg.threads % cfg.plane_size == 0)
        && cfg.vector > 0
        && layout.in_features() % cfg.vector == 0
        && cfg.out_vector > 0
        && layout.slices().iter().all(|s| s.width % cfg.out_vector == 0)
        && cfg.rank_vector > 0
        && cfg.max_rank % cfg.rank_vector == 0;
    if !ok {
        return Err(LoraError::Layout(format!("fused config {cfg:?} does not fit the layout")));
    }
    let tokens = segs.tokens as usize;
    x.check_len("x", tokens * layout.in_features() as usize)?;
    y.check_len("y", tokens * layout.out_features() as usize)?;
    if segs.num_segments == 0 || tokens == 0 {
        return Ok(());
    }
    let (n, ny, nb) = (cfg.vector as usize, cfg.out_vector as usize, cfg.rank_vector as usize);
    let widest = layout.slices().iter().map(|s| s.width).max().unwrap_or(1);
    unsafe {
        fused_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(widest.div_ceil(cfg.threads * cfg.out_vector), layout.slices().len() as u32, segs.num_segments as u32),
            CubeDim::new_1d(cfg.threads),
            n,
            ny,
            nb,
            x.arg(n),
            pool.a.arg(n),
            pool.b.arg(nb),
            y.arg(ny),
            pool.slice_table.arg(1),
            segs.seg_indptr.arg(1),
            segs.weight_indices.arg(1),
            segs.token_perm.arg(1),
            pool.ranks.arg(1),
            pool.scales.arg(1),
            layout.in_features() / cfg.vector,
            layout.out_features(),
            cfg,
        );
    }
    Ok(())
}
