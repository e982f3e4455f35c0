//! MoE LoRA for routed experts. Work items are (token, chosen expert) pairs, `pair = t·topk + k`;
//! the slot comes from the token, the expert from the router. Pools are `[S, E_a, c·R, in]` and
//! `[S, E_b, out, R]`, where an expert dim of 1 is the shared-outer layout (one A for all experts
//! on gate_up's input side, one B for all on down's output side).
//!
//! * shrink: `a[pair, g·R + j] = x_row · A[slot, e_a, g·R + j]`, with `x_row` the token's hidden
//!   state (gate_up) or the pair's activated intermediate (down);
//! * expand, per pair: `h[pair, slice] += scale · a[pair] · B[slot, e_b, slice]ᵀ` (gate_up: the
//!   gated kernel's 2 slices, or 1 slice non-gated);
//! * expand, router-weighted: `y[t] += Σ_k w[t,k] · scale · a[pair] · B[slot, e_b]ᵀ` (down).
//!   One thread owns one output vector of one token and loops over its k, so the sum over
//!   experts needs no atomics.
//!
//! These kernels give each pair its own cubes, which suits decode; at prefill, where many pairs
//! share a (slot, expert), [`crate::moe_grouped`] groups them and reads each adapter once per
//! token tile.
//!
//! Experts that are not on this rank are marked `NO_EXPERT` and cost nothing. Nothing is
//! allocated here: the intermediate is a plan-sized `[tokens·topk, c·R]` buffer.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, NO_SLOT, Segments};
use crate::buffer::DeviceBuffer;
use crate::config::{shrink_threads, vector_size};
use crate::error::{LoraError, Result};
use crate::expand::expand_geometry;
use crate::pool::AdapterPool;
use crate::shrink::{cube_dot_rows, result_stride};

/// Router choice of an expert that lives on another rank.
pub const NO_EXPERT: u32 = u32::MAX;

const MOE_EXPAND_THREADS: u32 = 64;

/// Router output for the batch: `topk` (local expert id, weight) per token.
#[derive(Debug, Clone)]
pub struct MoeRouting {
    tokens: u32,
    topk: u32,
    experts: u32,
    expert_ids: DeviceBuffer<u32>,
    weights: DeviceBuffer<f32>,
}

impl MoeRouting {
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        tokens: u32,
        topk: u32,
        experts: u32,
        expert_ids: &[u32],
        weights: &[f32],
    ) -> Result<Self> {
        let pairs = (tokens * topk) as usize;
        check_expert_ids(expert_ids, pairs, experts)?;
        if weights.len() != pairs {
            return Err(LoraError::BufferSize { name: "router weights", expected: pairs, actual: weights.len() });
        }
        Ok(MoeRouting {
            tokens,
            topk,
            experts,
            expert_ids: DeviceBuffer::upload(client, expert_ids),
            weights: DeviceBuffer::upload(client, weights),
        })
    }
    pub fn pairs(&self) -> usize {
        (self.tokens * self.topk) as usize
    }
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
    pub fn topk(&self) -> u32 {
        self.topk
    }
    pub fn experts(&self) -> u32 {
        self.experts
    }
    pub(crate) fn expert_ids(&self) -> &DeviceBuffer<u32> {
        &self.expert_ids
    }
    pub(crate) fn weights(&self) -> &DeviceBuffer<f32> {
        &self.weights
    }
}

/// Which rows the shrink reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeInput {
    /// `x` is `[tokens, in]`, shared by a token's experts (gate_up).
    PerToken,
    /// `x` is `[tokens·topk, in]`, one row per pair (down).
    PerPair,
}

/// Where the expand accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeOutput {
    /// `y` is `[tokens·topk, out]` (gate_up's per-expert output).
    PerPair,
    /// `y` is `[tokens, out]`, each expert's delta scaled by its router weight (down).
    RouterWeighted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MoeConfig {
    pub groups: u32,
    pub max_rank: u32,
    pub rows_per_cube: u32,
    pub threads: u32,
    pub per_pair_input: bool,
    pub router_weighted: bool,
    pub shared_a: bool,
    pub shared_b: bool,
    pub plane_size: u32,
    /// Vector width of the shrink's x and A loads.
    pub vector: u32,
    /// Vector width of the expand's B loads along the rank (set at launch).
    pub rank_vector: u32,
    /// Experts per token (set at launch; sizes the expand's staging of router-weighted pairs).
    pub topk: u32,
}

impl MoeConfig {
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        elem_size: usize,
        input: MoeInput,
        output: MoeOutput,
    ) -> Result<Self> {
        let e = layout.experts().ok_or_else(|| LoraError::Layout("MoE LoRA needs an expert layout".into()))?;
        let max_rank = layout.max_rank();
        let rows_per_cube = [4, 2, 1].into_iter().find(|r| max_rank % r == 0).unwrap_or(1);
        let vector = vector_size(client.properties(), elem_size, &[layout.in_features()]) as u32;
        let (threads, plane_size) = shrink_threads(client, layout.in_features() / vector, rows_per_cube, 256);
        Ok(MoeConfig {
            groups: layout.groups(),
            max_rank,
            rows_per_cube,
            threads,
            plane_size,
            vector,
            rank_vector: 1,
            topk: 1,
            per_pair_input: input == MoeInput::PerPair,
            router_weighted: output == MoeOutput::RouterWeighted,
            shared_a: e.a.get() == 1,
            shared_b: e.b.get() == 1,
        })
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn moe_shrink_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_pool: &Array<Vector<F, N>>,
    expert_ids: &Array<u32>,
    token_slots: &Array<u32>,
    ranks: &Array<u32>,
    out: &mut Array<f32>,
    k_vecs: u32,
    topk: u32,
    experts_a: u32,
    #[comptime] cfg: MoeConfig,
) {
    let rows = comptime!(cfg.rows_per_cube as usize);
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);

    let pair = CUBE_POS_Y as usize;
    let t = pair / topk as usize;
    let expert = expert_ids[pair];
    let slot = token_slots[t];
    if expert == NO_EXPERT || slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let row0 = CUBE_POS_X as usize * rows;
    let j0 = row0 % max_rank;
    if j0 >= rank {
        terminate!();
    }
    let k_vecs = k_vecs as usize;
    let mut e_a = expert as usize;
    if comptime!(cfg.shared_a) {
        e_a = 0;
    }
    let a_base = ((slot as usize * experts_a as usize + e_a) * c_r + row0) * k_vecs;
    let mut x_off = Array::<usize>::new(1usize);
    let mut x_row = t;
    if comptime!(cfg.per_pair_input) {
        x_row = pair;
    }
    x_off[0] = x_row * k_vecs;
    let plane = comptime!(cfg.plane_size as usize);
    let stride = comptime!(result_stride(cfg.threads, cfg.plane_size));
    let mut partials = SharedMemory::<f32>::new(comptime!(rows * stride));
    // No grid dependency point: expert_ids come from the router, a kernel before this one.
    cube_dot_rows::<F, N>(x, &x_off, a_pool, a_base, k_vecs, &mut partials, rows, 1usize, threads, plane, false, false);
    let mut r = UNIT_POS as usize;
    while r < rows {
        if j0 + r < rank {
            out[pair * c_r + row0 + r] = partials[r * stride];
        }
        r += threads;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn moe_expand_kernel<F: Float, NY: Size, NB: Size>(
    a: &Array<f32>,
    b_pool: &Array<Vector<F, NB>>,
    y: &mut Array<Vector<F, NY>>,
    slice_info: &Array<u32>,
    expert_ids: &Array<u32>,
    router_weights: &Array<f32>,
    token_slots: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    out_features: u32,
    topk: u32,
    experts_b: u32,
    #[comptime] cfg: MoeConfig,
) {
    let threads = comptime!(cfg.threads as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let ny = NY::value();
    let nb = NB::value();

    let slice = CUBE_POS_Y as usize;
    let row = CUBE_POS_Z as usize;
    let topk = topk as usize;
    let offset = slice_info[slice * 3] as usize;
    let width = slice_info[slice * 3 + 1] as usize;
    let group = slice_info[slice * 3 + 2] as usize;
    let col = (CUBE_POS_X as usize * threads + UNIT_POS as usize) * ny;
    let mut t = row / topk;
    let mut pairs = 1usize;
    if comptime!(cfg.router_weighted) {
        t = row;
        pairs = topk;
    }
    let slot = token_slots[t];
    if slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    if rank == 0 {
        terminate!();
    }
    let active = col < width;
    let out_features = out_features as usize;
    let b_vecs = max_rank / nb;
    let rank_vecs = rank.div_ceil(nb);

    // The cube's pairs' intermediates, router-weighted and zero past the rank (never written
    // there), staged once as rank vectors for all of the cube's threads.
    let rv = comptime!((cfg.max_rank / cfg.rank_vector) as usize);
    let nbc = comptime!(cfg.rank_vector as usize);
    let kmax = comptime!(if cfg.router_weighted { cfg.topk as usize } else { 1 });
    let mut a_tile = SharedMemory::<Vector<f32, NB>>::new(comptime!(kmax * rv));
    let mut idx = UNIT_POS as usize;
    while idx < comptime!(kmax * rv) {
        let kk = idx / rv;
        let jv = idx % rv;
        let mut pair = row;
        let mut w = 1.0f32;
        if comptime!(cfg.router_weighted) {
            pair = row * topk + kk;
            w = router_weights[pair];
        }
        let mut v = Vector::<f32, NB>::new(0.0f32);
        if expert_ids[pair] != NO_EXPERT {
            #[unroll]
            for l in 0..nbc {
                let j = jv * nbc + l;
                if j < rank {
                    v[l] = a[pair * c_r + group * max_rank + j] * w;
                }
            }
        }
        a_tile[idx] = v;
        idx += threads;
    }
    sync_cube();
    if active {
        let mut acc = Array::<f32>::new(NY::value());
        #[unroll]
        for v in 0..ny {
            acc[v] = 0.0f32;
        }
        for kk in 0..pairs {
            let mut pair = row;
            if comptime!(cfg.router_weighted) {
                pair = row * topk + kk;
            }
            let expert = expert_ids[pair];
            if expert != NO_EXPERT {
                let mut e_b = expert as usize;
                if comptime!(cfg.shared_b) {
                    e_b = 0;
                }
                let b_row0 = ((slot as usize * experts_b as usize + e_b) * out_features + offset + col) * b_vecs;
                for jv in 0..rank_vecs {
                    let av = a_tile[kk * rv + jv];
                    #[unroll]
                    for v in 0..ny {
                        let prod = av * Vector::<f32, NB>::cast_from(b_pool[b_row0 + v * b_vecs + jv]);
                        let mut s = 0.0f32;
                        #[unroll]
                        for l in 0..nb {
                            s += prod[l];
                        }
                        acc[v] += s;
                    }
                }
            }
        }
        let scale = scales[slot as usize];
        let yi = row * (out_features / ny) + (offset + col) / ny;
        let mut yv = Vector::<f32, NY>::cast_from(y[yi]);
        #[unroll]
        for v in 0..ny {
            yv[v] += scale * acc[v];
        }
        y[yi] = Vector::<F, NY>::cast_from(yv);
    }
}

/// One expert id per pair, each a local expert or [`NO_EXPERT`].
pub(crate) fn check_expert_ids(expert_ids: &[u32], pairs: usize, experts: u32) -> Result<()> {
    if expert_ids.len() != pairs {
        return Err(LoraError::BufferSize { name: "expert_ids", expected: pairs, actual: expert_ids.len() });
    }
    if let Some(&expert) = expert_ids.iter().find(|&&e| e != NO_EXPERT && e >= experts) {
        return Err(LoraError::ExpertOutOfRange { expert, experts });
    }
    Ok(())
}

/// A's and B's expert dims, each 1 (shared) or the `experts` local experts.
pub(crate) fn expert_dims(layout: &LoraLayout, experts: u32) -> Result<(u32, u32)> {
    let e = layout.experts().ok_or_else(|| LoraError::Layout("MoE LoRA needs an expert layout".into()))?;
    for dim in [e.a.get(), e.b.get()] {
        if dim != 1 && dim != experts {
            return Err(LoraError::Layout(format!("expert dim {dim} is neither 1 (shared) nor the {experts} local experts")));
        }
    }
    Ok((e.a.get(), e.b.get()))
}

/// MoE shrink into `a` (`[tokens·topk, c·R]`).
#[allow(clippy::too_many_arguments)]
pub fn launch_moe_shrink<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    routing: &MoeRouting,
    input: MoeInput,
    x: &DeviceBuffer<F>,
    a: &mut DeviceBuffer<f32>,
) -> Result<()> {
    pool.check_layout(layout)?;
    segs.check_slots(layout)?;
    let (experts_a, _) = expert_dims(layout, routing.experts)?;
    let cfg = MoeConfig::new(client, layout, size_of::<F>(), input, MoeOutput::PerPair)?;
    if segs.tokens != routing.tokens {
        return Err(LoraError::BufferSize { name: "routing tokens", expected: segs.tokens as usize, actual: routing.tokens as usize });
    }
    let k = layout.in_features();
    let x_rows = match input {
        MoeInput::PerToken => routing.tokens as usize,
        MoeInput::PerPair => routing.pairs(),
    };
    x.check_len("x", x_rows * k as usize)?;
    a.check_len("a (MoE intermediate)", routing.pairs() * layout.intermediate_width() as usize)?;
    if routing.pairs() == 0 {
        return Ok(());
    }
    let n = cfg.vector as usize;
    unsafe {
        moe_shrink_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(layout.intermediate_width() / cfg.rows_per_cube, routing.pairs() as u32, 1),
            CubeDim::new_1d(cfg.threads),
            n,
            x.arg(n),
            pool.a.arg(n),
            routing.expert_ids.arg(1),
            segs.token_slots.arg(1),
            pool.ranks.arg(1),
            a.arg(1),
            k / n as u32,
            routing.topk,
            experts_a,
            cfg,
        );
    }
    Ok(())
}

/// MoE expand from `a` into `y` (shape set by `output`), accumulating in place.
#[allow(clippy::too_many_arguments)]
pub fn launch_moe_expand<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    routing: &MoeRouting,
    output: MoeOutput,
    a: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<F>,
) -> Result<()> {
    pool.check_layout(layout)?;
    segs.check_slots(layout)?;
    let (_, experts_b) = expert_dims(layout, routing.experts)?;
    let mut cfg = MoeConfig::new(client, layout, size_of::<F>(), MoeInput::PerToken, output)?;
    cfg.threads = MOE_EXPAND_THREADS;
    if segs.tokens != routing.tokens {
        return Err(LoraError::BufferSize { name: "routing tokens", expected: segs.tokens as usize, actual: routing.tokens as usize });
    }
    a.check_len("a (MoE intermediate)", routing.pairs() * layout.intermediate_width() as usize)?;
    let y_rows = match output {
        MoeOutput::PerPair => routing.pairs(),
        MoeOutput::RouterWeighted => routing.tokens as usize,
    };
    y.check_len("y", y_rows * layout.out_features() as usize)?;
    if y_rows == 0 {
        return Ok(());
    }
    let (ny, nb, blocks) = expand_geometry(client, layout, size_of::<F>(), cfg.threads);
    let cfg = MoeConfig { rank_vector: nb as u32, topk: routing.topk, ..cfg };
    unsafe {
        moe_expand_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(blocks, layout.slices().len() as u32, y_rows as u32),
            CubeDim::new_1d(cfg.threads),
            ny,
            nb,
            a.arg(1),
            pool.b.arg(nb),
            y.arg(ny),
            pool.slice_table.arg(1),
            routing.expert_ids.arg(1),
            routing.weights.arg(1),
            segs.token_slots.arg(1),
            pool.ranks.arg(1),
            pool.scales.arg(1),
            layout.out_features(),
            routing.topk,
            experts_b,
            cfg,
        );
    }
    Ok(())
}

/// Plain f64 reference of shrink followed by expand. `x` rows follow `input`, `y` rows `output`.
#[allow(clippy::too_many_arguments)]
pub fn reference_moe(
    layout: &LoraLayout,
    ranks: &[u32],
    scales: &[f32],
    segs: &Segments,
    topk: usize,
    expert_ids: &[u32],
    router_weights: &[f32],
    input: MoeInput,
    output: MoeOutput,
    x: &[f64],
    a_pool: &[f64],
    b_pool: &[f64],
    y: &mut [f64],
) {
    let e = layout.experts().expect("expert layout");
    let (ea, eb) = (e.a.get() as usize, e.b.get() as usize);
    let (k, big_r, c, out) =
        (layout.in_features() as usize, layout.max_rank() as usize, layout.groups() as usize, layout.out_features() as usize);
    let slots = segs.token_slots();
    for t in 0..segs.tokens() as usize {
        let slot = slots[t];
        if slot == NO_SLOT {
            continue;
        }
        let (slot, rank, scale) = (slot as usize, ranks[slot as usize] as usize, scales[slot as usize] as f64);
        for kk in 0..topk {
            let pair = t * topk + kk;
            let expert = expert_ids[pair];
            if expert == NO_EXPERT {
                continue;
            }
            let (e_a, e_b) = (if ea == 1 { 0 } else { expert as usize }, if eb == 1 { 0 } else { expert as usize });
            let x_row = &x[if input == MoeInput::PerToken { t } else { pair } * k..][..k];
            let (y_row, w) = match output {
                MoeOutput::PerPair => (pair, 1.0),
                MoeOutput::RouterWeighted => (t, router_weights[pair] as f64),
            };
            for (slice, off) in layout.slices().iter().zip(layout.slice_offsets()) {
                let g = slice.group as usize;
                let a: Vec<f64> = (0..rank)
                    .map(|j| a_pool[(((slot * ea + e_a) * c + g) * big_r + j) * k..][..k].iter().zip(x_row).map(|(u, v)| u * v).sum())
                    .collect();
                for n in off as usize..(off + slice.width) as usize {
                    let b_row = &b_pool[((slot * eb + e_b) * out + n) * big_r..][..rank];
                    y[y_row * out + n] += w * scale * a.iter().zip(b_row).map(|(u, v)| u * v).sum::<f64>();
                }
            }
        }
    }
}
