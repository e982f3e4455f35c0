//! The router's weighted sum of a grouped MoE down expand:
//! `y[t] += Σ_k w[t,k] · scratch[t·topk + k]`, then `scratch[t·topk + k] = 0`.
//!
//! The grouped expand ([`crate::moe_grouped`]) runs the dense expand over pairs sorted by
//! (slot, expert); a token's `topk` pairs land in different segments, so they cannot sum into
//! one output row without atomics. They go into per-pair rows of a [`PairScratch`] instead, and
//! this kernel sums each token's rows with its router weights. It reads every scratch row it
//! sums and writes it back to zero, so the scratch is zero again for the next batch (the dense
//! expand accumulates into it) without a separate clear.
//!
//! One thread owns one vector of one token's output and sums the token's `topk` rows (a
//! compile-time count, so all of them are loaded at once): no atomics, and a fixed summation
//! order. Tokens without an adapter are skipped (their pairs were never written), as are the
//! weights of pairs whose expert is on another rank.

use cubecl::prelude::*;

use crate::batch::NO_SLOT;
use crate::buffer::DeviceBuffer;
use crate::config::vector_size;
use crate::error::{LoraError, Result};
use crate::moe::{MoeRouting, NO_EXPERT};

pub(crate) const COMBINE_THREADS: u32 = 128;

/// Per-pair rows `[max_pairs, out]` for a grouped router-weighted expand, zero between
/// batches: created zeroed, and the combine after the expand clears every row it reads
/// ([`crate::moe_grouped::launch_moe_grouped_expand_weighted`] runs both). One scratch
/// serves every MoE layer of a model (launches on one stream run in order), so it is sized once
/// for the largest batch and the widest down projection.
#[derive(Debug)]
pub struct PairScratch<F: CubeElement> {
    rows: DeviceBuffer<F>,
    max_pairs: usize,
    out_features: usize,
}

impl<F: CubeElement + Float> PairScratch<F> {
    pub fn zeroed<R: Runtime>(client: &ComputeClient<R>, max_pairs: usize, out_features: usize) -> Result<Self> {
        let len = max_pairs
            .checked_mul(out_features)
            .filter(|&len| len < (1 << 31))
            .ok_or_else(|| LoraError::Layout(format!("a pair scratch of {max_pairs} pairs × {out_features} outputs")))?;
        Ok(PairScratch { rows: DeviceBuffer::upload(client, &vec![F::from_int(0); len]), max_pairs, out_features })
    }

    pub fn max_pairs(&self) -> usize {
        self.max_pairs
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The first `pairs` rows as a dense `[pairs, out_features]` buffer for the expand.
    pub(crate) fn rows(&self, pairs: usize, out_features: usize) -> Result<DeviceBuffer<F>> {
        if pairs > self.max_pairs || out_features > self.out_features {
            return Err(LoraError::Layout(format!(
                "{pairs} pairs × {out_features} outputs in a pair scratch of {} × {}",
                self.max_pairs, self.out_features
            )));
        }
        self.rows.prefix(pairs * out_features)
    }

    /// Every element, read back (tests: the scratch must be zero between batches).
    pub fn read<R: Runtime>(&self, client: &ComputeClient<R>) -> Vec<F> {
        self.rows.read(client)
    }
}

/// `y[t] += Σ_k w[t,k] · rows[t·topk + k]` over the tokens of `token_slots` with a slot and
/// the pairs with a local expert, clearing the rows it reads. `rows` is
/// [`PairScratch::rows`]`(tokens·topk, out)` after the grouped expand wrote into it.
pub(crate) fn launch_moe_combine<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    routing: &MoeRouting,
    token_slots: &DeviceBuffer<u32>,
    rows: &mut DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    out_features: u32,
) -> Result<()> {
    let tokens = routing.tokens() as usize;
    let out = out_features as usize;
    token_slots.check_len("token slots", tokens)?;
    rows.check_len("pair scratch rows", routing.pairs() * out)?;
    y.check_len("y", tokens * out)?;
    if tokens == 0 || out == 0 {
        return Ok(());
    }
    let vector = vector_size(client.properties(), size_of::<F>(), &[out_features]);
    let out_vectors = out_features / vector as u32;
    // Safety: every index is below `tokens·topk·out` (rows), `tokens·out` (y) or `tokens·topk`
    // (routing), checked above; columns past `out_vectors` are masked in the kernel.
    unsafe {
        moe_combine_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(tokens as u32, out_vectors.div_ceil(COMBINE_THREADS), 1),
            CubeDim::new_1d(COMBINE_THREADS),
            vector,
            rows.arg(vector),
            y.arg(vector),
            routing.expert_ids().arg(1),
            routing.weights().arg(1),
            token_slots.arg(1),
            out_vectors,
            routing.topk(),
        );
    }
    Ok(())
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_combine_kernel<F: Float, N: Size>(
    rows: &mut Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    expert_ids: &Array<u32>,
    router_weights: &Array<f32>,
    token_slots: &Array<u32>,
    out_vectors: u32,
    #[comptime] topk: u32,
) {
    let t = CUBE_POS_X as usize;
    let col = (CUBE_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    let out_vectors = out_vectors as usize;
    if col >= out_vectors || token_slots[t] == NO_SLOT {
        terminate!();
    }
    let topk = comptime!(topk as usize);
    let y_at = t * out_vectors + col;
    let y_old = y[y_at];
    // All of the token's rows are loaded before any is cleared: a store between two loads of
    // the same array would make each load wait for the one before it. A pair off this rank
    // has a zero row (never written) and its weight, which may be anything, is not read.
    let mut sum = Vector::<f32, N>::new(0.0f32);
    #[unroll]
    for k in 0..topk {
        let pair = t * topk + k;
        let w = select(expert_ids[pair] != NO_EXPERT, router_weights[pair], 0.0f32);
        sum += Vector::<f32, N>::cast_from(rows[pair * out_vectors + col]) * Vector::<f32, N>::new(w);
    }
    #[unroll]
    for k in 0..topk {
        rows[(t * topk + k) * out_vectors + col] = Vector::<F, N>::new(F::from_int(0));
    }
    y[y_at] = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(y_old) + sum);
}
