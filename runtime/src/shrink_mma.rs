//! Tensor-core variant of the segmented shrink, for long segments (prefill) in bf16/f16.
//!
//! The scalar shrink spends most of a prefill in FMAs (T·c·R·K of them), so here each cube
//! takes a 16-token tile of one segment and computes all `c·R` rows of its slot with 16×16×16
//! MMAs (one warp per 16-row fragment, f32 accumulators). The tile's x rows, gathered through
//! the token permutation, are staged once per K chunk in shared memory and shared by every
//! warp, so x is read from memory exactly once; A fragments come straight from global memory.
//! Fragments wholly past the slot's rank are skipped; partial ones are computed and their
//! padding columns dropped when stored. Same contract and reference as [`crate::shrink`].

use cubecl::features::MmaConfig;
use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::NO_SLOT;

/// M, N and K of one MMA.
pub(crate) const TILE: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaShrinkConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// K elements staged per round (divides `in_features`, multiple of 16).
    pub k_chunk: u32,
    /// Vector width of the staging loads of x.
    pub vector: u32,
}

impl MmaShrinkConfig {
    /// `None` where the tensor-core path does not apply: no 16×16×16 MMA with f32
    /// accumulation for this storage type on this device, or a rank or input width that is
    /// not a multiple of 16.
    pub fn supported<R: Runtime, F: CubePrimitive>(client: &ComputeClient<R>, layout: &LoraLayout) -> Option<Self> {
        let elem = F::as_type_native()?.storage_type();
        let f32_ty = f32::as_type_native()?.storage_type();
        let mma = MmaConfig { a_type: elem, b_type: elem, cd_type: f32_ty, m: TILE, n: TILE, k: TILE };
        if !client.features().matmul.cmma.contains(&mma) || layout.max_rank() % TILE != 0 || layout.in_features() % TILE != 0 {
            return None;
        }
        let k_chunk = [256, 128, 64, 32, 16].into_iter().find(|c| layout.in_features() % c == 0)?;
        let vector = crate::config::vector_size(client, size_of::<F>(), &[k_chunk]) as u32;
        Some(MmaShrinkConfig { groups: layout.groups(), max_rank: layout.max_rank(), k_chunk, vector })
    }

    /// [`Self::supported`], and only for batches with enough 16-token tiles to fill the GPU
    /// (short decode segments run faster on the scalar kernel's finer grid).
    pub fn for_batch<R: Runtime, F: CubePrimitive>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        let tiles = num_segments as u64 * u64::from(max_segment_len.div_ceil(TILE));
        (tiles >= u64::from(crate::config::multiprocessors(client))).then(|| Self::supported::<R, F>(client, layout)).flatten()
    }

    /// One warp per 16-row fragment of the `c·R` rows.
    pub fn warps(&self) -> u32 {
        self.groups * self.max_rank / TILE
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn shrink_mma_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<F>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    out: &mut Array<f32>,
    k: u32,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tile = comptime!(TILE as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let warps = comptime!(cfg.warps() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let kc = comptime!(cfg.k_chunk as usize);
    let nv = comptime!(cfg.vector as usize);
    let kc_vecs = comptime!((cfg.k_chunk / cfg.vector) as usize);

    let seg = CUBE_POS_Y as usize;
    let slot = weight_indices[seg];
    if slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let start = seg_indptr[seg] as usize;
    let end = seg_indptr[seg + 1] as usize;
    let p0 = start + CUBE_POS_X as usize * tile;
    if rank == 0 || p0 >= end {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let warp = UNIT_POS_Y as usize;
    let row0 = warp * tile;
    // Warp-uniform: fragments entirely in a low-rank adapter's padding do nothing.
    let active = row0 % max_rank < rank;
    let k_elems = k as usize;
    let k_vecs = k_elems / nv;

    // Rows of the staged x tile are padded by 8 elements: with a stride of exactly `kc` every
    // row would start in the same shared-memory bank and the fragment loads would serialise.
    let stride = comptime!(kc + 8);
    // wmma loads and stores need 256-bit aligned shared-memory tiles.
    let mut x_tile = SharedMemory::<F>::new_aligned(comptime!(tile * (kc + 8)), 128usize);
    let mut c_tile = SharedMemory::<f32>::new_aligned(comptime!(warps * tile * tile), 128usize);
    let acc =
        cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, 16usize, 16usize, 16usize, cmma::MatrixLayout::Undefined, 0.0);
    let a_base = (slot as usize * c_r + row0) * k_elems;
    let a_len = a_pool.len();

    // Each thread stages the same `per_thread` vectors of every chunk; the next chunk's are
    // loaded into registers before the current chunk's MMAs, hiding their latency.
    let per_thread = comptime!((tile * kc_vecs).div_ceil(threads));
    let mut staged = Array::<Vector<F, N>>::new(per_thread);
    let mut x_rows = Array::<usize>::new(per_thread);
    #[unroll]
    for s in 0..per_thread {
        let v = tid + s * threads;
        let i = min(v / kc_vecs, comptime!(tile - 1));
        let p = min(p0 + i, end - 1);
        x_rows[s] = token_perm[p] as usize * k_vecs + v % kc_vecs;
        if v < comptime!(tile * kc_vecs) {
            staged[s] = x[x_rows[s]];
        }
    }

    let mut k0 = 0usize.runtime();
    while k0 < k_elems {
        #[unroll]
        for s in 0..per_thread {
            let v = tid + s * threads;
            if v < comptime!(tile * kc_vecs) {
                let i = v / kc_vecs;
                let cv = v % kc_vecs;
                let xv = staged[s];
                #[unroll]
                for l in 0..nv {
                    x_tile[i * stride + cv * nv + l] = xv[l];
                }
            }
        }
        sync_cube();
        let next = k0 + kc;
        if next < k_elems {
            #[unroll]
            for s in 0..per_thread {
                let v = tid + s * threads;
                if v < comptime!(tile * kc_vecs) {
                    staged[s] = x[x_rows[s] + next / nv];
                }
            }
        }
        if active {
            #[unroll]
            for kk in 0..comptime!(kc / 16) {
                let xa = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::A,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &x_tile.slice(kk * 16, comptime!(tile * (kc + 8))),
                    comptime!((kc + 8) as u32),
                );
                // B(k, n) = A[row0 + n, k0 + k]: A's rows are B's columns.
                let wa = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::ColMajor,
                    &a_pool.slice(a_base + k0 + kk * 16, a_len),
                    k,
                );
                cmma::execute::<F, F, f32, f32>(&xa, &wa, &acc, &acc);
            }
        }
        sync_cube();
        k0 = next;
    }
    if active {
        cmma::store(&mut c_tile.slice_mut(warp * 256, warp * 256 + 256), &acc, 16, cmma::MatrixLayout::RowMajor);
    }
    sync_cube();
    let mut e = tid;
    while e < comptime!(warps * tile * tile) {
        let w = e / 256;
        let i = (e % 256) / 16;
        let row = w * 16 + e % 16;
        let p = p0 + i;
        if p < end && row % max_rank < rank {
            let t = token_perm[p] as usize;
            out[t * c_r + row] = c_tile[e];
        }
        e += threads;
    }
}
