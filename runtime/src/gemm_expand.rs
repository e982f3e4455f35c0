//! Expand after a shrink folded into the base GEMM.
//!
//! At decode a LoRA site costs two extra launches (shrink, expand) on top of its base GEMM,
//! and each of those small launches costs about as much as its work (runtime/BENCHMARKS.md).
//! When the adapter pool's A `[S, c·R, K]` is stored right after the base weight `W [N, K]` in
//! one buffer, a single GEMM against `[W; A]` computes the base output *and* every slot's
//! shrink for every token: `g[t, :N] = x·Wᵀ`, `g[t, N + s·c·R + …] = x·A[s]ᵀ`. This kernel then
//! finishes the site in one pass:
//!
//! `y[t, n] = g[t, n] + scale[s] · Σ_{j < rank(s)} g[t, N + s·c·R + group(n)·R + j] · B[s, n, j]`,
//! `s = slot(t)`; a token without an adapter (or whose slot has rank 0) gets `y[t, n] = g[t, n]`.
//!
//! Grid: x = column blocks of a slice, y = slice (unequal widths: cubes past a narrow slice's
//! end exit at once), z = token. A cube stages its token's rank-r intermediate in shared
//! memory; every thread owns `NY` consecutive output columns and reads its B rows once.
//! Meant for decode-sized batches (the executor uses it up to a few dozen tokens): each token
//! reads its adapter's B rows itself, which the L2 serves after the first token of a slot.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT};
use crate::buffer::DeviceBuffer;
use crate::config::{EXPAND_THREADS, vector_size};
use crate::error::{LoraError, Result};
use crate::pool::AdapterPool;

/// Comptime shape of [`gemm_expand_kernel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmExpandConfig {
    pub groups: u32,
    pub max_rank: u32,
    pub threads: u32,
    /// Output columns per thread; divides every slice width and the GEMM output's width.
    pub out_vector: u32,
    /// Vector width of the B loads along the rank (divides `max_rank`).
    pub rank_vector: u32,
}

impl GemmExpandConfig {
    pub fn new<R: Runtime>(client: &ComputeClient<R>, layout: &LoraLayout, elem_size: usize) -> Self {
        let mut widths: Vec<u32> = layout.slices().iter().map(|s| s.width).collect();
        widths.push(gemm_width(layout));
        GemmExpandConfig {
            groups: layout.groups(),
            max_rank: layout.max_rank(),
            threads: EXPAND_THREADS,
            out_vector: vector_size(client.properties(), elem_size, &widths).min(4) as u32,
            rank_vector: vector_size(client.properties(), elem_size, &[layout.max_rank()]) as u32,
        }
    }

    fn check(&self, layout: &LoraLayout) -> Result<()> {
        let ok = self.groups == layout.groups()
            && self.max_rank == layout.max_rank()
            && self.out_vector > 0
            && layout.slices().iter().all(|s| s.width.is_multiple_of(self.out_vector))
            && gemm_width(layout).is_multiple_of(self.out_vector)
            && self.rank_vector > 0
            && self.max_rank.is_multiple_of(self.rank_vector)
            && self.threads > 0;
        if !ok {
            return Err(LoraError::Layout(format!("GEMM-expand config {self:?} does not fit the layout")));
        }
        Ok(())
    }
}

/// Columns of the extended GEMM's output: the base output, then every slot's intermediate.
pub fn gemm_width(layout: &LoraLayout) -> u32 {
    layout.out_features() + layout.slots() * layout.intermediate_width()
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemm_expand_kernel<F: Float, NY: Size, NB: Size>(
    g: &Array<F>,
    g_vec: &Array<Vector<F, NY>>,
    b_pool: &Array<Vector<F, NB>>,
    y: &mut Array<Vector<F, NY>>,
    slice_info: &Array<u32>,
    token_slots: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    out_features: u32,
    g_width: u32,
    #[comptime] cfg: GemmExpandConfig,
) {
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let ny = comptime!(cfg.out_vector as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let rank_vecs_max = comptime!(max_rank / nb);

    let slice = CUBE_POS_Y as usize;
    let offset = slice_info[slice * 3] as usize;
    let width = slice_info[slice * 3 + 1] as usize;
    let group = slice_info[slice * 3 + 2] as usize;
    let block0 = CUBE_POS_X as usize * threads * ny;
    if block0 >= width {
        terminate!();
    }
    let (out, g_width) = (out_features as usize, g_width as usize);
    let t = CUBE_POS_Z as usize;
    let slot = token_slots[t];
    let mut rank = 0usize;
    let mut scale = 0.0f32;
    let mut slot_idx = 0usize;
    if slot != NO_SLOT {
        slot_idx = slot as usize;
        rank = ranks[slot_idx] as usize;
        scale = scales[slot_idx];
    }
    let tid = UNIT_POS as usize;

    // The token's intermediate as rank vectors, zero past the rank so the vectorised loop may
    // run over the last vector's padding.
    let mut a_tile = SharedMemory::<Vector<f32, NB>>::new(rank_vecs_max);
    let a_row = t * g_width + out + slot_idx * c_r + group * max_rank;
    let mut jv = tid;
    while jv < rank_vecs_max {
        let mut v = Vector::<f32, NB>::new(0.0f32);
        #[unroll]
        for l in 0..nb {
            let j = jv * nb + l;
            if j < rank {
                v[l] = f32::cast_from(g[a_row + j]);
            }
        }
        a_tile[jv] = v;
        jv += threads;
    }
    sync_cube();

    let col = block0 + tid * ny;
    if col < width {
        let mut acc = Array::<f32>::new(ny);
        #[unroll]
        for v in 0..ny {
            acc[v] = 0.0f32;
        }
        let b_row0 = (slot_idx * out + offset + col) * rank_vecs_max;
        for jv in 0..rank.div_ceil(nb) {
            #[unroll]
            for v in 0..ny {
                let prod = a_tile[jv] * Vector::<f32, NB>::cast_from(b_pool[b_row0 + v * rank_vecs_max + jv]);
                let mut s = 0.0f32;
                #[unroll]
                for l in 0..nb {
                    s += prod[l];
                }
                acc[v] += s;
            }
        }
        let mut yv = Vector::<f32, NY>::cast_from(g_vec[(t * g_width + offset + col) / ny]);
        #[unroll]
        for v in 0..ny {
            yv[v] += scale * acc[v];
        }
        y[(t * out + offset + col) / ny] = Vector::<F, NY>::cast_from(yv);
    }
}

/// Writes `y` (`[tokens, out_features]`) from the extended GEMM's output `g`
/// (`[tokens, gemm_width(layout)]`): the base columns plus each token's own adapter delta.
/// Every row of `y` is written, with or without an adapter.
pub fn launch_gemm_expand<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    g: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    config: Option<GemmExpandConfig>,
) -> Result<()> {
    pool.check_layout(layout)?;
    segs.check_slots(layout)?;
    if layout.experts().is_some() {
        return Err(LoraError::Layout("expert layouts go through the MoE kernels".into()));
    }
    let cfg = config.unwrap_or_else(|| GemmExpandConfig::new(client, layout, size_of::<F>()));
    cfg.check(layout)?;
    let tokens = segs.tokens as usize;
    let width = gemm_width(layout) as usize;
    g.check_len("g (extended GEMM output)", tokens * width)?;
    y.check_len("y", tokens * layout.out_features() as usize)?;
    segs.token_slots.check_len("token slots", tokens)?;
    if tokens == 0 {
        return Ok(());
    }
    if tokens > 65535 {
        return Err(LoraError::Layout(format!("{tokens} tokens exceed the grid's z dimension (65535)")));
    }
    let (ny, nb) = (cfg.out_vector as usize, cfg.rank_vector as usize);
    let widest = layout.slices().iter().map(|s| s.width).max().unwrap_or(1);
    let blocks = widest.div_ceil(cfg.threads * cfg.out_vector);
    // Safety: g, y and token_slots were checked against the layout and the token count; the
    // pool's B and tables against the layout when it was built; slots against the pool above.
    unsafe {
        gemm_expand_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(blocks, layout.slices().len() as u32, tokens as u32),
            CubeDim::new_1d(cfg.threads),
            ny,
            nb,
            g.arg(1),
            g.arg(ny),
            pool.b.arg(nb),
            y.arg(ny),
            pool.slice_table.arg(1),
            segs.token_slots.arg(1),
            pool.ranks.arg(1),
            pool.scales.arg(1),
            layout.out_features(),
            width as u32,
            cfg,
        );
    }
    Ok(())
}

/// Plain f64 reference: `y` from the extended GEMM output `g` (see the module docs).
pub fn reference_gemm_expand(
    layout: &LoraLayout,
    ranks: &[u32],
    scales: &[f32],
    token_slots: &[u32],
    g: &[f64],
    b_pool: &[f64],
    y: &mut [f64],
) {
    let (big_r, c_r, out) = (layout.max_rank() as usize, layout.intermediate_width() as usize, layout.out_features() as usize);
    let width = gemm_width(layout) as usize;
    for (t, &slot) in token_slots.iter().enumerate() {
        let g_row = &g[t * width..(t + 1) * width];
        y[t * out..(t + 1) * out].copy_from_slice(&g_row[..out]);
        if slot == NO_SLOT {
            continue;
        }
        let (s, rank, scale) = (slot as usize, ranks[slot as usize] as usize, scales[slot as usize] as f64);
        for (slice, off) in layout.slices().iter().zip(layout.slice_offsets()) {
            let a_row = &g_row[out + s * c_r + slice.group as usize * big_r..][..rank];
            for n in off as usize..(off + slice.width) as usize {
                let b_row = &b_pool[(s * out + n) * big_r..][..rank];
                y[t * out + n] += scale * a_row.iter().zip(b_row).map(|(u, v)| u * v).sum::<f64>();
            }
        }
    }
}
