//! The tensor-core shrink with its K chunks staged by asynchronous copies into 2–4
//! shared-memory stages (`MmaShrinkConfig::stages`), for devices with `cp.async` and block
//! barriers (sm_80 and later).
//!
//! [`crate::shrink_mma`]'s kernel loads the next chunk into registers while it multiplies the
//! current one, so each cube has one chunk (20–40 KB) in flight; on an H100 that left the
//! prefill shrink waiting on global loads (ncu: half of all stall cycles) at a third of the
//! DRAM bandwidth. Here each thread copies its 16-byte vectors of chunk `c + stages − 1`
//! straight into a free stage while the warps multiply chunk `c`, so `stages − 1` chunks are
//! in flight and no register holds staged data. Stage `s` has its own barrier: a thread
//! arrives on it once its copies into the stage have landed, and the warps wait on the
//! barrier's phase before reading the stage. Tile, K groups, output and contract are those of
//! [`crate::shrink_mma`] (same reference, same tests). Rows past a slot's rank are not copied:
//! their stage rows hold stale data, which only reaches output columns that are dropped.

use cubecl::prelude::barrier::{Barrier, copy_async};
use cubecl::prelude::*;

use crate::cuda_graph::grid_dependency_point;
use crate::shrink_mma::{
    MmaShrinkConfig, TILE, accumulator_floats, cube_tile, multiply_chunk, new_accumulators, stage_sources, warp_block, write_tile,
};

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn shrink_mma_pipelined_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<Vector<F, N>>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    out: &mut Array<f32>,
    k: u32,
    x_row_divisor: u32,
    #[comptime] cfg: MmaShrinkConfig,
    #[comptime] grid_dependency: bool,
) {
    let tm = comptime!((cfg.m_frags * TILE) as usize);
    let tn = comptime!((cfg.n_frags * TILE) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let kc = comptime!(cfg.k_chunk as usize);
    let nv = comptime!(cfg.vector as usize);
    let kc_vecs = comptime!((cfg.k_chunk / cfg.vector) as usize);
    let sv = comptime!((kc + 8) / nv);

    let cube = cube_tile(seg_indptr, weight_indices, ranks, cfg);
    let block = warp_block(cfg);
    let k_vecs = k as usize / nv;

    // Stage s of the x tile starts at vector s·x_stage, of the A tile at s·a_stage.
    let x_stage = comptime!(tm * sv);
    let a_stage = comptime!(tn * sv);
    let mut x_tiles = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(cfg.stages as usize * tm * sv), 128usize);
    let mut a_tiles = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(cfg.stages as usize * tn * sv), 128usize);
    let mut c_tile = SharedMemory::<f32>::new_aligned(comptime!(accumulator_floats(cfg)), 128usize);
    let mut accs = new_accumulators(cfg);
    // Every thread arrives on a stage's barrier once per fill (all threads fill every stage).
    let barriers = stage_barriers(comptime!(threads as u32));
    sync_cube();

    let x_per = comptime!((tm * kc_vecs).div_ceil(threads));
    let a_per = comptime!((tn * kc_vecs).div_ceil(threads));
    let mut x_src = Array::<usize>::new(x_per);
    let mut a_src = Array::<usize>::new(a_per);
    let mut a_live = Array::<bool>::new(a_per);
    stage_sources(token_perm, x_row_divisor, &cube, k_vecs, &mut x_src, &mut a_src, &mut a_live, cfg);

    // This cube's share of K: its sources already start there (`stage_sources`).
    let chunks = k as usize / kc / comptime!(cfg.k_splits as usize);
    let stages = comptime!(cfg.stages as usize);
    // Fill every stage but the last before the first multiply: their A first, then, past the
    // grid dependency point, their x (x may be the previous kernel's output; A and the batch
    // metadata read above are not, without `grid_dependency` the metadata may be). Under a
    // programmatic launch `stages − 1` chunks of A are in flight while the kernel before
    // finishes. An arrival tracks every copy its thread issued before it, so stage 0 also
    // waits for the A of the stages after it: the first multiply starts a little later.
    #[unroll]
    for s in 0..comptime!(cfg.stages as usize - 1) {
        if s < chunks {
            copy_a_chunk::<F, N>(a_pool, &mut a_tiles, &a_src, &a_live, s, s * kc_vecs, cfg);
        }
    }
    grid_dependency_point(grid_dependency, true);
    #[unroll]
    for s in 0..comptime!(cfg.stages as usize - 1) {
        if s < chunks {
            copy_x_chunk::<F, N>(x, &mut x_tiles, &x_src, s, s * kc_vecs, cfg);
            arrive_on_stage(&barriers, s);
        }
    }

    // Chunk c lives in stage c % stages; its barrier completes phase c / stages when it lands.
    // Before multiplying chunk c, chunk c + stages − 1 is issued into the stage that chunk
    // c − 1 used (free once every warp has passed the barrier after multiplying it).
    let mut c0 = 0usize.runtime();
    while c0 < chunks {
        #[unroll]
        for s in 0..comptime!(cfg.stages as usize) {
            let c = c0 + s;
            if c < chunks {
                let ahead = c + stages - 1;
                if ahead < chunks {
                    let free = comptime!((s + stages - 1) % stages);
                    fill::<F, N>(x, a_pool, &mut x_tiles, &mut a_tiles, &barriers, &x_src, &a_src, &a_live, free, ahead * kc_vecs, cfg);
                }
                wait_stage(&barriers, s, c, cfg.stages);
                multiply_chunk::<F, N>(&x_tiles, s * x_stage, &a_tiles, s * a_stage, &block, &cube, &mut accs, cfg);
                // Every warp is done with this stage before it is refilled.
                sync_cube();
            }
        }
        c0 += stages;
    }
    write_tile(out, &mut c_tile, token_perm, &block, &cube, &accs, cfg);
}

/// One block barrier per shared-memory stage (up to four; cubecl 0.10 has no arrays of
/// barriers), each initialised by unit 0 for every unit of the cube to arrive on it once per
/// fill of its stage.
#[derive(CubeType)]
pub(crate) struct StageBarriers {
    stage_0: Shared<Barrier>,
    stage_1: Shared<Barrier>,
    stage_2: Shared<Barrier>,
    stage_3: Shared<Barrier>,
}

/// The four stage barriers of a cube of `threads` units. A block sync must follow before the
/// first copy, so that every unit sees them initialised.
#[cube]
pub(crate) fn stage_barriers(#[comptime] threads: u32) -> StageBarriers {
    let leader = UNIT_POS == 0;
    StageBarriers {
        stage_0: Barrier::shared(threads, leader),
        stage_1: Barrier::shared(threads, leader),
        stage_2: Barrier::shared(threads, leader),
        stage_3: Barrier::shared(threads, leader),
    }
}

/// Waits until chunk (or tile) `c`, which lives in stage `stage` (`c % stages`), has landed:
/// the stage's barrier completes phase `c / stages` when it does.
#[cube]
pub(crate) fn wait_stage(barriers: &StageBarriers, #[comptime] stage: usize, c: usize, #[comptime] stages: u32) {
    let phase = ((c / comptime!(stages as usize)) % 2) as u32;
    if comptime!(stage == 0) {
        barriers.stage_0.wait_parity(phase);
    } else if comptime!(stage == 1) {
        barriers.stage_1.wait_parity(phase);
    } else if comptime!(stage == 2) {
        barriers.stage_2.wait_parity(phase);
    } else {
        barriers.stage_3.wait_parity(phase);
    }
}

/// Makes this thread's asynchronous copies into stage `stage` visible on the stage's barrier,
/// and arrives on it.
#[cube]
pub(crate) fn arrive_on_stage(barriers: &StageBarriers, #[comptime] stage: usize) {
    if comptime!(stage == 0) {
        barriers.stage_0.commit_copy_async();
        barriers.stage_0.arrive();
    } else if comptime!(stage == 1) {
        barriers.stage_1.commit_copy_async();
        barriers.stage_1.arrive();
    } else if comptime!(stage == 2) {
        barriers.stage_2.commit_copy_async();
        barriers.stage_2.arrive();
    } else {
        barriers.stage_3.commit_copy_async();
        barriers.stage_3.arrive();
    }
}

/// Issues this thread's asynchronous copies of one chunk (`step` vectors into every row) into
/// stage `stage`, and arrives on the stage's barrier once they land.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<Vector<F, N>>,
    x_tiles: &mut SharedMemory<Vector<F, N>>,
    a_tiles: &mut SharedMemory<Vector<F, N>>,
    barriers: &StageBarriers,
    x_src: &Array<usize>,
    a_src: &Array<usize>,
    a_live: &Array<bool>,
    #[comptime] stage: usize,
    step: usize,
    #[comptime] cfg: MmaShrinkConfig,
) {
    copy_a_chunk::<F, N>(a_pool, a_tiles, a_src, a_live, stage, step, cfg);
    copy_x_chunk::<F, N>(x, x_tiles, x_src, stage, step, cfg);
    arrive_on_stage(barriers, stage);
}

/// Issues this thread's asynchronous copies of one chunk of the x tile into stage `stage`
/// (tracked by the stage's barrier from the thread's next arrival on it).
#[cube]
fn copy_x_chunk<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_tiles: &mut SharedMemory<Vector<F, N>>,
    x_src: &Array<usize>,
    #[comptime] stage: usize,
    step: usize,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tm = comptime!((cfg.m_frags * TILE) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let kc_vecs = comptime!((cfg.k_chunk / cfg.vector) as usize);
    let sv = comptime!((cfg.k_chunk as usize + 8) / cfg.vector as usize);
    let x_stage = comptime!(stage * tm * sv);
    let tid = UNIT_POS as usize;
    #[unroll]
    for s in 0..comptime!((tm * kc_vecs).div_ceil(threads)) {
        let v = tid + s * threads;
        if v < comptime!(tm * kc_vecs) {
            let src = x_src[s] + step;
            let dst = x_stage + (v / kc_vecs) * sv + v % kc_vecs;
            copy_async(&x.slice(src, src + 1), &mut x_tiles.slice_mut(dst, dst + 1), comptime!(cfg.vector));
        }
    }
}

/// Issues this thread's asynchronous copies of one chunk of the live A rows into stage
/// `stage` (tracked by the stage's barrier from the thread's next arrival on it).
#[cube]
fn copy_a_chunk<F: Float, N: Size>(
    a_pool: &Array<Vector<F, N>>,
    a_tiles: &mut SharedMemory<Vector<F, N>>,
    a_src: &Array<usize>,
    a_live: &Array<bool>,
    #[comptime] stage: usize,
    step: usize,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tn = comptime!((cfg.n_frags * TILE) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let kc_vecs = comptime!((cfg.k_chunk / cfg.vector) as usize);
    let sv = comptime!((cfg.k_chunk as usize + 8) / cfg.vector as usize);
    let a_stage = comptime!(stage * tn * sv);
    let tid = UNIT_POS as usize;
    #[unroll]
    for s in 0..comptime!((tn * kc_vecs).div_ceil(threads)) {
        let v = tid + s * threads;
        if a_live[s] {
            let src = a_src[s] + step;
            let dst = a_stage + (v / kc_vecs) * sv + v % kc_vecs;
            copy_async(&a_pool.slice(src, src + 1), &mut a_tiles.slice_mut(dst, dst + 1), comptime!(cfg.vector));
        }
    }
}
