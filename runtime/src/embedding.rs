//! Embedding LoRA: the shrink is a lookup, `a[t, j] = A[slot, j, token_id[t]]` (A is
//! `[S, R, vocab]`, so no GEMM), followed by the ordinary segmented expand into the embedding
//! output. The layout is the compiler's with `in_features = vocab` and one group.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT, Segments};
use crate::buffer::DeviceBuffer;
use crate::error::{LoraError, Result};
use crate::expand::{self, ExpandKernel, reference_expand};
use crate::pool::AdapterPool;

const GATHER_THREADS: u32 = 128;

#[cube(launch_unchecked)]
fn embedding_gather_kernel<F: Float>(
    a_pool: &Array<F>,
    token_ids: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    token_perm: &Array<u32>,
    ranks: &Array<u32>,
    out: &mut Array<f32>,
    vocab: u32,
    #[comptime] max_rank: u32,
) {
    let big_r = comptime!(max_rank as usize);
    let seg = CUBE_POS_Y as usize;
    let slot = weight_indices[seg];
    if slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let start = seg_indptr[seg] as usize;
    let end = seg_indptr[seg + 1] as usize;
    let n = (end - start) * rank;
    let mut idx = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    while idx < n {
        let t = token_perm[start + idx / rank] as usize;
        let j = idx % rank;
        let id = token_ids[t];
        // Ids live on the device and cannot be checked before launch: an id past the
        // vocabulary contributes no delta instead of reading out of bounds.
        let mut v = 0.0f32;
        if id < vocab {
            v = f32::cast_from(a_pool[(slot as usize * big_r + j) * vocab as usize + id as usize]);
        }
        out[t * big_r + j] = v;
        idx += stride;
    }
}

/// Embedding LoRA into `y` (`[tokens, out]`), using `a` (`[tokens, R]`, f32) as scratch.
#[allow(clippy::too_many_arguments)]
pub fn launch_embedding<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    token_ids: &DeviceBuffer<u32>,
    a: &mut DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
    expand_kernel: Option<ExpandKernel>,
) -> Result<()> {
    pool.check_layout(layout)?;
    segs.check_slots(layout)?;
    if layout.groups() != 1 || layout.experts().is_some() {
        return Err(LoraError::Layout("embedding LoRA takes one group and no experts".into()));
    }
    let tokens = segs.tokens as usize;
    token_ids.check_len("token_ids", tokens)?;
    a.check_len("a (embedding scratch)", tokens * layout.max_rank() as usize)?;
    if segs.num_segments == 0 || tokens == 0 {
        return Ok(());
    }
    let blocks = (segs.max_segment_len * layout.max_rank()).div_ceil(GATHER_THREADS).clamp(1, 1024);
    unsafe {
        embedding_gather_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(blocks, segs.num_segments as u32, 1),
            CubeDim::new_1d(GATHER_THREADS),
            pool.a.arg(1),
            token_ids.arg(1),
            segs.seg_indptr.arg(1),
            segs.weight_indices.arg(1),
            segs.token_perm.arg(1),
            pool.ranks.arg(1),
            a.arg(1),
            layout.in_features(),
            layout.max_rank(),
        );
    }
    expand::launch_expand(client, layout, pool, segs, a, y, expand_kernel)
}

/// Plain f64 reference, accumulating into `y`.
#[allow(clippy::too_many_arguments)]
pub fn reference_embedding(
    layout: &LoraLayout,
    ranks: &[u32],
    scales: &[f32],
    segs: &Segments,
    token_ids: &[u32],
    a_pool: &[f64],
    b_pool: &[f64],
    y: &mut [f64],
) {
    let (big_r, vocab) = (layout.max_rank() as usize, layout.in_features() as usize);
    let mut a = vec![0.0; segs.tokens() as usize * big_r];
    for s in 0..segs.num_segments() {
        let slot = segs.weight_indices()[s];
        if slot == NO_SLOT {
            continue;
        }
        for p in segs.seg_indptr()[s]..segs.seg_indptr()[s + 1] {
            let t = segs.token_perm()[p as usize] as usize;
            let id = token_ids[t] as usize;
            for j in 0..ranks[slot as usize] as usize {
                a[t * big_r + j] = if id < vocab { a_pool[(slot as usize * big_r + j) * vocab + id] } else { 0.0 };
            }
        }
    }
    reference_expand(layout, ranks, scales, segs, &a, b_pool, y);
}
