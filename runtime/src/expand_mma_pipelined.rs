//! The tensor-core expand with its y and intermediate tiles staged by asynchronous copies into
//! 2–4 shared-memory stages (`MmaExpandConfig::stages`), for devices with `cp.async` and block
//! barriers (sm_80 and later).
//!
//! A prefill expand is a pass over y: at rank 16 its MMAs are a few percent of the time, and
//! [`crate::expand_mma`]'s kernel, which loads one token tile ahead into registers, kept too
//! few bytes in flight to stream y at the copy bandwidth (H100: 1.2–1.4 TB/s against 3.0).
//! Here the delta `(scale·a)·Bᵀ` of a tile is computed from zero, not on top of y, so y need
//! not pass through the accumulator: each thread copies its 16-byte y vectors and intermediate
//! vectors of tile `c + stages − 1` straight into a free stage while the cube works on tile
//! `c`, and adds the delta to the staged y on the way out. `stages − 1` tiles are in flight
//! per cube, no register holds them, and each y element is still read and written once. An
//! intermediate of several copies (a split-K shrink's partial sums, `MmaExpandConfig::a_splits`)
//! has every copy staged, and the copies are added up where the operand is built.
//!
//! Up to rank 64 on tensor cores each warp loads the B fragments of its column fragment from
//! the pool into registers once, before its first tile (`MmaExpandConfig::b_in_registers`):
//! a wmma fragment load from shared memory costs as many instructions as the MMA step it
//! feeds, and the kernel issues instructions about two thirds of its cycles (ncu, run 110).
//! Above that rank the B block is staged in shared memory once per cube.
//!
//! From rank 32 to 64 on devices with `ldmatrix`, m16n8k16 and `stmatrix` the kernel multiplies
//! by hand ([`MmaExpandConfig::multiplies_by_hand`]): the staged operand is loaded with
//! `ldmatrix`, the B operands sit in registers as 32-bit pairs, and each warp adds its f32
//! sums to its 16×16 block of the staged y itself (`ldmatrix` / `stmatrix` on the storage
//! type, [`crate::mma_fragments::add_to_block`]), so there is no delta tile and the epilogue
//! only copies the staged y out (H100, runs 124–130: the rank-64 qkv expand of two copies 67
//! → 58–59 µs).
//!
//! By hand in three or four stages (`MmaExpandConfig::prefetches_rows`: the rank-64 tile adding
//! up the wide prefill shrink's two copies) each thread reads the token rows of the tile it
//! copies next at the top of the current one, so the permutation's latency passes while the
//! current tile lands (H100, runs 138–140: the expand's largest stall was on these loads; the
//! qkv R=64 pair 94.9–95.7 → 90.5–93.1 µs).
//!
//! Per tile: wait for its stage's barrier; scale the staged intermediate into the MMA operand
//! (zero past the slot's rank and the segment); block sync (after which the stage the previous
//! tile used is free and is refilled); MMAs into an f32 delta tile; block sync; y + delta back
//! to y. Rows past the segment are neither copied nor written. Tile, grid, exits, contract and
//! reference are [`crate::expand_mma`]'s.

use cubecl::prelude::barrier::copy_async;
use cubecl::prelude::*;

use crate::expand_mma::{
    ExpandCube, MmaExpandConfig, emulate_fragment, expand_cube, load_operand_fragment, multiply_rank_steps, stage_b_block,
};
use crate::mma_fragments::{self, Pair, Registers};
use crate::shrink_mma::{TILE, zero_accumulator};
use crate::shrink_mma_pipelined::{StageBarriers, arrive_on_stage, stage_barriers, wait_stage};

/// Vector width of the staged intermediate (f32): one 16-byte copy.
pub(crate) const A_VECTOR: usize = 4;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_mma_pipelined_kernel<F: Float, NY: Size, NB: Size, NA: Size>(
    a: &Array<Vector<f32, NA>>,
    b_pool: &Array<Vector<F, NB>>,
    y: &mut Array<Vector<F, NY>>,
    slice_info: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    out_features: u32,
    token_splits: u32,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tile = comptime!(TILE as usize);
    let tm = comptime!(cfg.tile_tokens() as usize);
    let bw = comptime!(cfg.block_columns() as usize);
    let n_frags = comptime!(cfg.n_frags as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let ny = comptime!(cfg.out_vector as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let a_vecs = comptime!(max_rank / A_VECTOR);
    let stages = comptime!(cfg.stages as usize);
    let a_splits = comptime!(cfg.a_splits as usize);
    let by_hand = comptime!(cfg.multiplies_by_hand());
    let prefetch = comptime!(cfg.prefetches_rows());
    // Padded strides keep the MMA operands' rows out of the same shared-memory banks.
    let rs = comptime!(max_rank + 8);
    let ds = comptime!(bw + 8);
    let dsv = comptime!(ds / ny);
    // Staged y rows, in vectors (see `y_stride`).
    let ysv = comptime!(y_stride(cfg));

    let cube = expand_cube(slice_info, seg_indptr, weight_indices, ranks, scales, token_splits, cfg);
    let (rank, end, cols, scale, first, step) = (cube.rank, cube.end, cube.cols, cube.scale, cube.first, cube.step);
    let tid = UNIT_POS as usize;
    let warp = UNIT_POS_Y as usize;
    let mf = warp / n_frags;
    let nf = warp % n_frags;
    let active = nf * tile < cols;
    let rank_steps = rank.div_ceil(tile);
    let tiles = (end - first).div_ceil(step);

    let y_stage = comptime!(tm * ysv);
    // A stage holds every copy of the tile's intermediate (one per K split of the shrink).
    let a_stage = comptime!(a_splits * tm * a_vecs);
    let mut y_tiles = SharedMemory::<Vector<F, NY>>::new_aligned(comptime!(stages * tm * ysv), 128usize);
    let mut a_tiles = SharedMemory::<Vector<f32, NA>>::new_aligned(comptime!(stages * a_splits * tm * a_vecs), 128usize);
    // B fragments in registers (below) need no staged block.
    let b_registers = comptime!(cfg.b_in_registers());
    let b_staged = comptime!(if b_registers { nb } else { bw * rs });
    let mut b_tile = SharedMemory::<Vector<F, NB>>::new_aligned(comptime!(b_staged / nb), 128usize);
    // The operand in the storage type: by hand in vectors (one store per staged vector, rows
    // for `ldmatrix`), else in elements (cubecl's fragment loads); the other holds one vector.
    let mut a_tile = SharedMemory::<F>::new_aligned(comptime!(if by_hand { A_VECTOR } else { tm * rs }), 128usize);
    let mut a_vectors = SharedMemory::<Vector<F, NA>>::new_aligned(comptime!(if by_hand { tm * rs / A_VECTOR } else { 1 }), 128usize);
    // By hand the warps add their sums to the staged y: no delta tile.
    let mut delta = SharedMemory::<Vector<f32, NY>>::new_aligned(comptime!(if by_hand { 1 } else { tm * ds / ny }), 128usize);
    let barriers = stage_barriers(comptime!(threads as u32));

    // The barriers' initialisation is visible to every thread before the first copy.
    sync_cube();

    let y_vecs = out_features as usize / ny;
    let y_col = (cube.offset + cube.block0) / ny;
    let a_row = comptime!((cfg.groups * cfg.max_rank) as usize / A_VECTOR);
    let a_col = cube.group * a_vecs;
    let a_copy = a.len() / a_splits;
    let geometry = TileGeometry { end, rank, cols, y_vecs, y_col, a_row, a_col, a_copy };

    // Prefetching, each tile's token rows are read a tile ahead of its copies (below).
    let mut y_rows = Array::<u32>::new(comptime!(if prefetch { (tm * bw_vecs).div_ceil(threads) } else { 1 }));
    let mut a_rows = Array::<u32>::new(comptime!(if prefetch { (tm * a_vecs).div_ceil(threads) } else { 1 }));

    // Fill every stage but the last before the first tile.
    #[unroll]
    for s in 0..comptime!(stages - 1) {
        if s < tiles {
            if comptime!(prefetch) {
                load_tile_rows(token_perm, first + s * step, &geometry, &mut y_rows, &mut a_rows, cfg);
                fill_rows::<F, NY, NA>(a, y, &y_rows, &a_rows, &mut y_tiles, &mut a_tiles, &barriers, first + s * step, s, &geometry, cfg);
            } else {
                fill::<F, NY, NA>(a, y, token_perm, &mut y_tiles, &mut a_tiles, &barriers, first + s * step, s, &geometry, cfg);
            }
        }
    }

    // B is loaded while the first tiles' copies are in flight: each warp's fragments of its
    // column fragment, once for all its tiles, or the staged block (the first tile's block
    // sync publishes it).
    let b_frags = load_b_fragments::<F, NB>(b_pool, &cube, nf, active, rank_steps, out_features, cfg);
    let b_registers_by_hand = load_b_registers::<F, NB>(b_pool, &cube, nf, active, rank_steps, out_features, cfg);
    if comptime!(!b_registers) {
        stage_b_block(b_pool, &mut b_tile, &cube, out_features, cfg);
    }

    // Tile c lives in stage c % stages; its barrier completes phase c / stages when it lands.
    let mut c0 = 0usize.runtime();
    while c0 < tiles {
        #[unroll]
        for s in 0..stages {
            let c = c0 + s;
            if c < tiles {
                let p0 = first + c * step;
                let ahead = c + stages - 1;
                // Prefetching, the rows of the tile to copy next are read now: their latency
                // passes while this tile lands and its operand is built (run 138: the expand's
                // largest stall was on global loads).
                if comptime!(prefetch) {
                    if ahead < tiles {
                        load_tile_rows(token_perm, first + ahead * step, &geometry, &mut y_rows, &mut a_rows, cfg);
                    }
                }
                wait_stage(&barriers, s, c, cfg.stages);
                // The scaled intermediate in the storage type (its copies added up): zero past
                // the rank and the segment (the stage holds stale data there). One staged
                // vector per step, its lanes indexed at compile time (a runtime lane index put
                // the vector in local memory: ncu, run 18).
                let mut v = tid;
                while v < comptime!(tm * a_vecs) {
                    let i = v / a_vecs;
                    let j0 = (v % a_vecs) * A_VECTOR;
                    let mut staged = a_tiles[s * a_stage + v];
                    #[unroll]
                    for copy in 1..a_splits {
                        staged = staged + a_tiles[s * a_stage + copy * comptime!(tm * a_vecs) + v];
                    }
                    let live = p0 + i < end;
                    if comptime!(by_hand) {
                        let mut values = Vector::<F, NA>::new(F::new(0.0));
                        #[unroll]
                        for l in 0..A_VECTOR {
                            if live && j0 + l < rank {
                                values[l] = F::cast_from(scale * staged[l]);
                            }
                        }
                        a_vectors[(i * rs + j0) / A_VECTOR] = values;
                    } else {
                        #[unroll]
                        for l in 0..A_VECTOR {
                            let mut value = F::new(0.0);
                            if live && j0 + l < rank {
                                value = F::cast_from(scale * staged[l]);
                            }
                            a_tile[i * rs + j0 + l] = value;
                        }
                    }
                    v += threads;
                }
                sync_cube();
                // Every thread is past the previous tile's epilogue: its stage is free.
                if ahead < tiles {
                    let free = comptime!((s + stages - 1) % stages);
                    let pa = first + ahead * step;
                    if comptime!(prefetch) {
                        fill_rows::<F, NY, NA>(a, y, &y_rows, &a_rows, &mut y_tiles, &mut a_tiles, &barriers, pa, free, &geometry, cfg);
                    } else {
                        fill::<F, NY, NA>(a, y, token_perm, &mut y_tiles, &mut a_tiles, &barriers, pa, free, &geometry, cfg);
                    }
                }
                if comptime!(by_hand) {
                    // Per rank step one `ldmatrix.x4` of the operand and two m16n8k16 MMAs;
                    // then the warp adds its sums to its block of the staged y.
                    if active {
                        let mut low = mma_fragments::zero_accumulator();
                        let mut high = mma_fragments::zero_accumulator();
                        #[unroll]
                        for kk in 0..comptime!(max_rank / tile) {
                            if kk < rank_steps {
                                let af = mma_fragments::load_a::<F, NA>(&a_vectors, mf * tile * rs + kk * tile, rs, A_VECTOR);
                                mma_fragments::multiply_accumulate::<F>(&af, b_registers_by_hand.index(2 * kk), &mut low);
                                mma_fragments::multiply_accumulate::<F>(&af, b_registers_by_hand.index(2 * kk + 1), &mut high);
                            }
                        }
                        let y0 = (s * y_stage + mf * tile * ysv) * ny + nf * tile;
                        mma_fragments::add_to_block::<F, NY>(&mut y_tiles, y0, &low, &high, comptime!(ysv * ny), ny);
                    }
                } else if comptime!(cfg.tensor_cores()) {
                    if active {
                        let acc = zero_accumulator();
                        if comptime!(!b_registers) {
                            multiply_rank_steps::<F, NB>(&acc, &a_tile, &b_tile, mf, nf, rank_steps, cfg);
                        }
                        #[unroll]
                        for kk in 0..comptime!(if b_registers { max_rank / tile } else { 0 }) {
                            if kk < rank_steps {
                                let af = load_operand_fragment::<F>(&a_tile, mf, kk, cfg);
                                cmma::execute::<F, F, f32, f32>(&af, b_frags.index(kk), &acc, &acc);
                            }
                        }
                        let d0 = (mf * tile * ds + nf * tile) / ny;
                        cmma::store(
                            &mut delta.slice_mut(d0, comptime!(tm * dsv)),
                            &acc,
                            comptime!(ds as u32),
                            cmma::MatrixLayout::RowMajor,
                        );
                    }
                } else {
                    if active {
                        let (d0, a0, b0) = (mf * tile * ds + nf * tile, mf * tile * rs, nf * tile * rs);
                        emulate_fragment::<F, NY, NB>(&mut delta, d0, &a_tile, a0, &b_tile, b0, rank_steps, ds, rs, ny, nb, false);
                    }
                }
                sync_cube();
                let mut w = tid;
                while w < comptime!(tm * bw_vecs) {
                    let i = w / bw_vecs;
                    let cv = w % bw_vecs;
                    if p0 + i < end && cv * ny < cols {
                        if comptime!(by_hand) {
                            let yi = token_perm[p0 + i] as usize * y_vecs + y_col + cv;
                            y[yi] = y_tiles[s * y_stage + i * ysv + cv];
                        } else {
                            let sum = Vector::<f32, NY>::cast_from(y_tiles[s * y_stage + w]) + delta[i * dsv + cv];
                            let yi = token_perm[p0 + i] as usize * y_vecs + y_col + cv;
                            y[yi] = Vector::<F, NY>::cast_from(sum);
                        }
                    }
                    w += threads;
                }
            }
        }
        c0 += stages;
    }
}

/// The B operand fragments of column fragment `nf` of the cube's block where they live in
/// registers (else none): one per 16-wide rank step up to the configuration's rank, loaded
/// from the pool (rows of `max_rank` values) where `load` holds and the step is below the
/// slot's `rank_steps`. Columns past the slot's rank within the last step are the pool's
/// padding: they meet only the operand's zeros.
#[cube]
fn load_b_fragments<F: Float, NB: Size>(
    b_pool: &Array<Vector<F, NB>>,
    cube: &ExpandCube,
    nf: usize,
    load: bool,
    rank_steps: usize,
    out_features: u32,
    #[comptime] cfg: MmaExpandConfig,
) -> Sequence<cmma::Matrix<F>> {
    let tile = comptime!(TILE as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let row_vecs = comptime!(max_rank / nb);
    let row0 = cube.slot * out_features as usize + cube.offset + cube.block0 + nf * tile;
    let mut frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for kk in 0..comptime!(if cfg.b_in_registers() && !cfg.multiplies_by_hand() { max_rank / tile } else { 0 }) {
        // Operand B(j, n) = B[slot, column n, j]: the pool's rows are its columns.
        let bf = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::ColMajor) };
        if load && kk < rank_steps {
            let start = row0 * row_vecs + comptime!(kk * tile / nb);
            cmma::load(&bf, &b_pool.slice(start, start + comptime!(tile * row_vecs)), comptime!(max_rank as u32));
        }
        frags.push(bf);
    }
    frags
}

/// The by-hand kernel's B operands of column fragment `nf` of the cube's block
/// ([`MmaExpandConfig::multiplies_by_hand`], else none), in registers for all its tiles: per
/// 16-wide rank step `kk` up to the configuration's rank, the 16×8 operands of columns 0–7
/// (at `2·kk`) and 8–15 (at `2·kk + 1`). Lane `l` holds column `l / 4` of its operand at rank
/// rows `2t, 2t + 1` and `8 + 2t, 8 + 2t + 1` (`t = l % 4`): two 32-bit loads from the pool,
/// whose rows are B's columns (`rank_vector` is 2 by hand). Zero where `load` fails or the
/// step is past the slot's `rank_steps`; columns past the slot's rank within its last step are
/// the pool's padding and meet only the operand's zeros.
#[cube]
fn load_b_registers<F: Float, NB: Size>(
    b_pool: &Array<Vector<F, NB>>,
    cube: &ExpandCube,
    nf: usize,
    load: bool,
    rank_steps: usize,
    out_features: u32,
    #[comptime] cfg: MmaExpandConfig,
) -> Sequence<Registers<F>> {
    let tile = comptime!(TILE as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let row_pairs = comptime!(max_rank / 2);
    let lane = UNIT_POS_PLANE as usize;
    let row0 = cube.slot * out_features as usize + cube.offset + cube.block0 + nf * tile + lane / 4;
    let mut operands = Sequence::<Registers<F>>::new();
    #[unroll]
    for kk in 0..comptime!(if cfg.multiplies_by_hand() { max_rank / tile } else { 0 }) {
        #[unroll]
        for half in 0..2usize {
            let mut regs = Registers::<F>::new(2usize);
            #[unroll]
            for r in 0..2usize {
                let mut pair = Vector::<F, Pair>::new(F::new(0.0));
                if load && kk < rank_steps {
                    let at = (row0 + half * 8) * row_pairs + comptime!(kk * tile / 2 + r * 4) + lane % 4;
                    let loaded = b_pool[at];
                    pair[0] = loaded[0];
                    pair[1] = loaded[1];
                }
                regs[r] = pair;
            }
            operands.push(regs);
        }
    }
    operands
}

/// Row stride of a staged y tile, in vectors: the block's columns, and by hand one vector
/// more, so the eight 16-byte rows of an `ldmatrix` / `stmatrix` fall in different banks.
fn y_stride(cfg: MmaExpandConfig) -> usize {
    let padding = if cfg.multiplies_by_hand() { 1 } else { 0 };
    (cfg.block_columns() / cfg.out_vector) as usize + padding
}

/// Where a cube's tiles live: the segment's end, the slot's rank, the columns of the block in
/// its slice, the y and intermediate row strides and column offsets, and the length of one
/// copy of the intermediate (all in vectors).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct TileGeometry {
    end: usize,
    rank: usize,
    cols: usize,
    y_vecs: usize,
    y_col: usize,
    a_row: usize,
    a_col: usize,
    a_copy: usize,
}

/// Issues this thread's asynchronous copies of the token tile at `p0` (its y vectors and its
/// intermediate vectors of every copy, none past the segment, the slice's end or the rank)
/// into `stage`, and arrives on the stage's barrier once they land.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill<F: Float, NY: Size, NA: Size>(
    a: &Array<Vector<f32, NA>>,
    y: &Array<Vector<F, NY>>,
    token_perm: &Array<u32>,
    y_tiles: &mut SharedMemory<Vector<F, NY>>,
    a_tiles: &mut SharedMemory<Vector<f32, NA>>,
    barriers: &StageBarriers,
    p0: usize,
    #[comptime] stage: usize,
    geometry: &TileGeometry,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let ny = comptime!(cfg.out_vector as usize);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let a_vecs = comptime!(cfg.max_rank as usize / A_VECTOR);
    let a_splits = comptime!(cfg.a_splits as usize);
    let ysv = comptime!(y_stride(cfg));
    let y_base = comptime!(stage * tm * ysv);
    let a_base = comptime!(stage * a_splits * tm * a_vecs);
    let tid = UNIT_POS as usize;
    let mut w = tid;
    while w < comptime!(tm * bw_vecs) {
        let i = w / bw_vecs;
        let cv = w % bw_vecs;
        if p0 + i < geometry.end && cv * ny < geometry.cols {
            let src = token_perm[p0 + i] as usize * geometry.y_vecs + geometry.y_col + cv;
            // Unpadded, the stage is row-major in `w`: the cooperative path keeps that index
            // (another expression of it, with the epilogue's loads reordered, got 40 registers
            // from ptxas and ran rank-16 expands 6% slower: H100 run 129, runtime/BENCHMARKS.md).
            let to = if comptime!(ysv == bw_vecs) { y_base + w } else { y_base + i * ysv + cv };
            copy_async(&y.slice(src, src + 1), &mut y_tiles.slice_mut(to, to + 1), comptime!(ny as u32));
        }
        w += threads;
    }
    let mut v = tid;
    while v < comptime!(tm * a_vecs) {
        let i = v / a_vecs;
        let j0 = (v % a_vecs) * A_VECTOR;
        if p0 + i < geometry.end && j0 < geometry.rank {
            let src = token_perm[p0 + i] as usize * geometry.a_row + geometry.a_col + j0 / A_VECTOR;
            #[unroll]
            for copy in 0..a_splits {
                let (from, to) = (copy * geometry.a_copy + src, a_base + copy * comptime!(tm * a_vecs) + v);
                copy_async(&a.slice(from, from + 1), &mut a_tiles.slice_mut(to, to + 1), comptime!(A_VECTOR as u32));
            }
        }
        v += threads;
    }
    arrive_on_stage(barriers, stage);
}

/// This thread's token rows (through the permutation) for the copies of the token tile at `p0`
/// in [`fill_rows`]: per copy it issues, in the order it issues them, the row of its y vector
/// (`y_rows`) and of its intermediate vectors (`a_rows`); 0 past the segment.
#[cube]
fn load_tile_rows(
    token_perm: &Array<u32>,
    p0: usize,
    geometry: &TileGeometry,
    y_rows: &mut Array<u32>,
    a_rows: &mut Array<u32>,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let a_vecs = comptime!(cfg.max_rank as usize / A_VECTOR);
    let tid = UNIT_POS as usize;
    #[unroll]
    for k in 0..comptime!((tm * bw_vecs).div_ceil(threads)) {
        y_rows[k] = token_row(token_perm, p0 + (tid + k * threads) / bw_vecs, geometry.end);
    }
    #[unroll]
    for k in 0..comptime!((tm * a_vecs).div_ceil(threads)) {
        a_rows[k] = token_row(token_perm, p0 + (tid + k * threads) / a_vecs, geometry.end);
    }
}

/// The token row at position `p` of the permutation, or 0 from the segment's `end` on.
#[cube]
fn token_row(token_perm: &Array<u32>, p: usize, end: usize) -> u32 {
    let mut row = 0u32;
    if p < end {
        row = token_perm[p];
    }
    row
}

/// [`fill`] from token rows read beforehand ([`load_tile_rows`] for the same `p0`), for the
/// by-hand kernel that prefetches them (`MmaExpandConfig::prefetches_rows`; staged y rows
/// padded, see [`y_stride`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill_rows<F: Float, NY: Size, NA: Size>(
    a: &Array<Vector<f32, NA>>,
    y: &Array<Vector<F, NY>>,
    y_rows: &Array<u32>,
    a_rows: &Array<u32>,
    y_tiles: &mut SharedMemory<Vector<F, NY>>,
    a_tiles: &mut SharedMemory<Vector<f32, NA>>,
    barriers: &StageBarriers,
    p0: usize,
    #[comptime] stage: usize,
    geometry: &TileGeometry,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let ny = comptime!(cfg.out_vector as usize);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let a_vecs = comptime!(cfg.max_rank as usize / A_VECTOR);
    let a_splits = comptime!(cfg.a_splits as usize);
    let ysv = comptime!(y_stride(cfg));
    let y_base = comptime!(stage * tm * ysv);
    let a_base = comptime!(stage * a_splits * tm * a_vecs);
    let tid = UNIT_POS as usize;
    #[unroll]
    for k in 0..comptime!((tm * bw_vecs).div_ceil(threads)) {
        let w = tid + k * threads;
        let i = w / bw_vecs;
        let cv = w % bw_vecs;
        if w < comptime!(tm * bw_vecs) && p0 + i < geometry.end && cv * ny < geometry.cols {
            let src = y_rows[k] as usize * geometry.y_vecs + geometry.y_col + cv;
            let to = y_base + i * ysv + cv;
            copy_async(&y.slice(src, src + 1), &mut y_tiles.slice_mut(to, to + 1), comptime!(ny as u32));
        }
    }
    #[unroll]
    for k in 0..comptime!((tm * a_vecs).div_ceil(threads)) {
        let v = tid + k * threads;
        let i = v / a_vecs;
        let j0 = (v % a_vecs) * A_VECTOR;
        if v < comptime!(tm * a_vecs) && p0 + i < geometry.end && j0 < geometry.rank {
            let src = a_rows[k] as usize * geometry.a_row + geometry.a_col + j0 / A_VECTOR;
            #[unroll]
            for copy in 0..a_splits {
                let (from, to) = (copy * geometry.a_copy + src, a_base + copy * comptime!(tm * a_vecs) + v);
                copy_async(&a.slice(from, from + 1), &mut a_tiles.slice_mut(to, to + 1), comptime!(A_VECTOR as u32));
            }
        }
    }
    arrive_on_stage(barriers, stage);
}
