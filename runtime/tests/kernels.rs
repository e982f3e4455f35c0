//! Property tests of every kernel family against its f64 reference, on random shapes, ranks,
//! slot mixes, slice widths and permutations, with fresh random (never zero) data. Outputs are
//! poisoned before each launch: NaN in write-only buffers (an unwritten element stays NaN and
//! fails), random values in the in-place accumulation targets (an element that misses its
//! delta fails the element-wise check). Bodies are generic over the cubecl runtime and stamped
//! for wgpu (lavapipe in CI, f32) and, with `--features cuda-tests`, for CUDA (f32 and bf16).

use std::num::NonZeroU32;

use cubecl::ir::DeviceProperties;
use cubecl::prelude::*;
use lorac_plan::{ExpertDims, LoraLayout, LoraSlice};
use lorac_runtime::chunked::ChunkedPlan;
use lorac_runtime::embedding::{launch_embedding, reference_embedding};
use lorac_runtime::expand::{ExpandKernel, launch_expand, launch_pair_expand, reference_expand};
use lorac_runtime::expand_mma::MmaExpandConfig;
use lorac_runtime::fused::launch_fused;
use lorac_runtime::gemm_expand::{gemm_width, launch_gemm_expand, reference_gemm_expand};
use lorac_runtime::mma_fragments::Fragments;
use lorac_runtime::moe::{MoeInput, MoeOutput, MoeRouting, NO_EXPERT, launch_moe_expand, launch_moe_shrink, reference_moe};
use lorac_runtime::moe_combine::PairScratch;
use lorac_runtime::moe_grouped::{MoeGroups, launch_moe_grouped_expand, launch_moe_grouped_expand_weighted, launch_moe_grouped_shrink};
use lorac_runtime::shrink::{ShrinkKernel, launch_shrink, reference_shrink};
use lorac_runtime::shrink_mma::{LaunchMode, MmaShrinkConfig, SPLIT_K_COPIES, ShrinkTile, TALL_SPLIT_COPIES, WIDE_SPLIT_COPIES};
use lorac_runtime::testing::{Rng, StorageElem, relative_error};
use lorac_runtime::{AdapterPool, DeviceBuffer, ExpandConfig, LoraError, NO_SLOT, Segments, ShrinkConfig};

const CASES: u64 = 12;
/// Value written into the padding rows/columns of low-rank adapters: the contract says zero,
/// but a kernel that read them would pick this up and fail.
const PADDING: f64 = 7.0;

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

fn slice(name: &str, width: u32, group: u32) -> LoraSlice {
    LoraSlice { name: name.into(), width, group }
}

/// A scaled-down instance of each module family the compiler emits.
fn random_slices(rng: &mut Rng) -> (u32, Vec<LoraSlice>, &'static str) {
    match rng.range(0, 5) {
        // qkv under GQA / KV replication: unequal q vs kv widths.
        0 => (3, vec![slice("q", 8 * rng.range(1, 12), 0), slice("k", 4 * rng.range(1, 6), 1), slice("v", 4 * rng.range(1, 6), 2)], "qkv"),
        1 => {
            let w = rng.range(1, 70);
            (2, vec![slice("gate", w, 0), slice("up", w, 1)], "gate_up")
        }
        // Qwen3.5 GDN in_proj_qkvz: a qkv group with three slices and a z group.
        2 => (
            2,
            vec![
                slice("q", 4 * rng.range(1, 8), 0),
                slice("k", 4 * rng.range(1, 8), 0),
                slice("v", 4 * rng.range(1, 8), 0),
                slice("z", 4 * rng.range(1, 8), 1),
            ],
            "gdn_qkvz",
        ),
        // Mamba in_proj: one A, five B slices of different widths.
        3 => (
            1,
            vec![
                slice("z", rng.range(1, 64), 0),
                slice("x", rng.range(1, 64), 0),
                slice("B", rng.range(1, 16), 0),
                slice("C", rng.range(1, 16), 0),
                slice("dt", rng.range(1, 8), 0),
            ],
            "mamba_in_proj",
        ),
        // MLA fused q_a / kv_a (1536 and 576 at full size).
        4 => (2, vec![slice("q_a", 16 * rng.range(1, 6), 0), slice("kv_a", 6 * rng.range(1, 6), 1)], "mla_qkv_a"),
        _ => (1, vec![slice("o", rng.range(1, 96), 0)], "single"),
    }
}

fn random_layout(rng: &mut Rng, experts: Option<ExpertDims>) -> (LoraLayout, &'static str) {
    let (groups, slices, family) = random_slices(rng);
    let slots = rng.range(1, 6);
    let max_rank = rng.pick(&[1, 3, 4, 8, 12, 16]);
    let in_features = rng.pick(&[3, 8, 12, 64, 100, 256, 260]);
    (LoraLayout::new(nz(slots), nz(max_rank), in_features, groups, slices, experts).unwrap(), family)
}

/// Ranks per slot: 0 (empty slot) and full rank both occur.
fn random_ranks(rng: &mut Rng, layout: &LoraLayout) -> (Vec<u32>, Vec<f32>) {
    let ranks = (0..layout.slots()).map(|_| if rng.range(0, 5) == 0 { 0 } else { rng.range(1, layout.max_rank()) }).collect();
    let scales = (0..layout.slots()).map(|_| 0.5 + rng.value().abs() as f32).collect();
    (ranks, scales)
}

/// Pool data in the compiler's layout: random where the adapter lives, `PADDING` elsewhere.
struct PoolData<F> {
    a: Vec<F>,
    b: Vec<F>,
    a64: Vec<f64>,
    b64: Vec<f64>,
}

fn random_pool<F: StorageElem>(rng: &mut Rng, layout: &LoraLayout, ranks: &[u32]) -> PoolData<F> {
    let big_r = layout.max_rank() as usize;
    let experts_a = layout.experts().map_or(1, |e| e.a.get() as usize);
    let experts_b = layout.experts().map_or(1, |e| e.b.get() as usize);
    let (k, c, out) = (layout.in_features() as usize, layout.groups() as usize, layout.out_features() as usize);
    let mut a64 = vec![PADDING; layout.a_elements() as usize];
    for (s, &rank) in ranks.iter().enumerate() {
        for e in 0..experts_a {
            for g in 0..c {
                for j in 0..rank as usize {
                    let row = (((s * experts_a + e) * c + g) * big_r + j) * k;
                    for v in &mut a64[row..row + k] {
                        *v = rng.value();
                    }
                }
            }
        }
    }
    let mut b64 = vec![PADDING; layout.b_elements() as usize];
    for (s, &rank) in ranks.iter().enumerate() {
        for e in 0..experts_b {
            for n in 0..out {
                let row = ((s * experts_b + e) * out + n) * big_r;
                for v in &mut b64[row..row + rank as usize] {
                    *v = rng.value();
                }
            }
        }
    }
    let a: Vec<F> = a64.iter().map(|&v| F::round_from(v)).collect();
    let b: Vec<F> = b64.iter().map(|&v| F::round_from(v)).collect();
    let a64 = a.iter().map(|v| v.as_f64()).collect();
    let b64 = b.iter().map(|v| v.as_f64()).collect();
    PoolData { a, b, a64, b64 }
}

fn upload_pool<R: Runtime, F: StorageElem>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    data: &PoolData<F>,
    ranks: &[u32],
    scales: &[f32],
) -> AdapterPool<F> {
    AdapterPool::new(layout, DeviceBuffer::upload(client, &data.a), DeviceBuffer::upload(client, &data.b), ranks, scales, client).unwrap()
}

/// Random slot per token (about one in five without adapter); sometimes an explicit
/// no-adapter segment, and tokens in shuffled order inside segments.
fn random_segments(rng: &mut Rng, tokens: u32, slots: u32) -> Segments {
    let token_slots: Vec<Option<u32>> =
        (0..tokens).map(|_| if rng.range(0, 4) == 0 { None } else { Some(rng.range(0, slots - 1)) }).collect();
    let grouped = Segments::from_token_slots(&token_slots, slots).unwrap();
    let mut perm = grouped.token_perm().to_vec();
    for s in 0..grouped.num_segments() {
        let (lo, hi) = (grouped.seg_indptr()[s] as usize, grouped.seg_indptr()[s + 1] as usize);
        for i in (lo + 1..hi).rev() {
            perm.swap(i, lo + rng.range(0, (i - lo) as u32) as usize);
        }
    }
    let mut indptr = grouped.seg_indptr().to_vec();
    let mut weights = grouped.weight_indices().to_vec();
    let unassigned: Vec<u32> = (0..tokens).filter(|t| token_slots[*t as usize].is_none()).collect();
    if rng.range(0, 1) == 0 && !unassigned.is_empty() {
        perm.extend(&unassigned);
        indptr.push(perm.len() as u32);
        weights.push(NO_SLOT);
    }
    Segments::new(tokens, indptr, weights, perm, slots).unwrap()
}

/// Norm-wise and element-wise comparison (the element-wise bound catches a single missed or
/// unwritten element that the norm would average away).
fn check_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    assert_eq!(out.len(), reference.len());
    if reference.is_empty() {
        return;
    }
    let rms = (reference.iter().map(|r| r * r).sum::<f64>() / reference.len() as f64).sqrt();
    for (i, (o, r)) in out.iter().zip(reference).enumerate() {
        assert!((o - r).abs() <= tol * (r.abs() + rms), "{what}: element {i}: got {o}, expected {r} (rms {rms})");
    }
    let err = relative_error(out.iter().copied().zip(reference.iter().copied()));
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Whether token `t` receives a delta, and from which slot.
fn token_slot_ranks(segs: &Segments, ranks: &[u32]) -> Vec<Option<(u32, u32)>> {
    segs.token_slots().iter().map(|&s| if s == NO_SLOT { None } else { Some((s, ranks[s as usize])) }).collect()
}

/// y before the launch: random values of the delta's size, rounded to the storage type.
fn initial_y<F: StorageElem>(rng: &mut Rng, delta: &[f64]) -> (Vec<F>, Vec<f64>) {
    let rms = (delta.iter().map(|d| d * d).sum::<f64>() / delta.len().max(1) as f64).sqrt().max(1e-3);
    rng.tensor::<F>(delta.len(), rms)
}

/// Compares y after an in-place accumulation: rows without a delta must be bit-identical, the
/// others within `tol` of `y0 + delta`.
fn check_y<F: StorageElem>(what: &str, y_out: &[F], y0: &[f64], delta: &[f64], touched_rows: &[bool], width: usize, tol: f64) {
    let out: Vec<f64> = y_out.iter().map(|v| v.as_f64()).collect();
    let reference: Vec<f64> = y0.iter().zip(delta).map(|(a, b)| a + b).collect();
    for (row, &touched) in touched_rows.iter().enumerate() {
        if !touched {
            assert_eq!(
                &out[row * width..(row + 1) * width],
                &y0[row * width..(row + 1) * width],
                "{what}: row {row} has no adapter but changed"
            );
        }
    }
    check_close(what, &out, &reference, tol);
}

/// Compares a shrink's intermediate: entries the reference leaves NaN (no adapter, past the
/// rank) must stay unwritten, the others within `tol`.
/// A split-K shrink's copies of the intermediate (`[copies, tokens, groups·R]`, poisoned
/// before the launch): no copy wrote where the reference is NaN, and their sum matches it.
fn check_split_copies(what: &str, copies: &[f32], reference: &[f64], tol: f64) {
    let copy_len = reference.len();
    for (c, copy) in copies.chunks(copy_len).enumerate() {
        let stray = copy.iter().zip(reference).position(|(g, r)| r.is_nan() && !g.is_nan());
        assert!(stray.is_none(), "{what}: copy {c} wrote entry {stray:?} (no adapter / past the rank)");
    }
    let summed: Vec<f32> = (0..copy_len).map(|i| copies.iter().skip(i).step_by(copy_len).sum()).collect();
    check_intermediate(what, &summed, reference, tol);
}

fn check_intermediate(what: &str, got: &[f32], reference: &[f64], tol: f64) {
    let (mut outs, mut refs) = (Vec::new(), Vec::new());
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        if r.is_nan() {
            assert!(g.is_nan(), "{what}: intermediate {i} (no adapter / past the rank) was written");
        } else {
            outs.push(g as f64);
            refs.push(r);
        }
    }
    check_close(what, &outs, &refs, tol);
}

/// Adapters in a layout's slots: their ranks and scales, the host pool data (with its f64
/// copy for the references) and the device pool.
struct Adapters<F> {
    ranks: Vec<u32>,
    scales: Vec<f32>,
    data: PoolData<F>,
    pool: AdapterPool<F>,
}

impl<F: StorageElem> Adapters<F> {
    /// Random ranks (empty and full-rank slots included) and scales.
    fn random<R: Runtime>(client: &ComputeClient<R>, rng: &mut Rng, layout: &LoraLayout) -> Self {
        let (ranks, scales) = random_ranks(rng, layout);
        Self::with_ranks(client, rng, layout, ranks, scales)
    }

    fn with_ranks<R: Runtime>(client: &ComputeClient<R>, rng: &mut Rng, layout: &LoraLayout, ranks: Vec<u32>, scales: Vec<f32>) -> Self {
        let data = random_pool::<F>(rng, layout, &ranks);
        let pool = upload_pool(client, layout, &data, &ranks, &scales);
        Adapters { ranks, scales, data, pool }
    }

    /// Per token: whether it receives a delta (an adapter of nonzero rank).
    fn touched(&self, segs: &Segments) -> Vec<bool> {
        token_slot_ranks(segs, &self.ranks).iter().map(|sr| matches!(sr, Some((_, r)) if *r > 0)).collect()
    }

    /// The f64 reference intermediate of `x64` (`tokens` rows), NaN where nothing is written.
    fn reference_shrink(&self, layout: &LoraLayout, segs: &Segments, x64: &[f64], tokens: u32) -> Vec<f64> {
        let mut a64 = vec![f64::NAN; tokens as usize * layout.intermediate_width() as usize];
        reference_shrink(layout, &self.ranks, segs, x64, &self.data.a64, &mut a64);
        a64
    }

    /// The f64 reference expand delta of the intermediate `a64` (`tokens` rows).
    fn reference_expand(&self, layout: &LoraLayout, segs: &Segments, a64: &[f64], tokens: u32) -> Vec<f64> {
        let mut delta = vec![0.0; tokens as usize * layout.out_features() as usize];
        reference_expand(layout, &self.ranks, &self.scales, segs, a64, &self.data.b64, &mut delta);
        delta
    }
}

/// A NaN-poisoned intermediate of `rows` rows on the device.
fn poisoned_intermediate<R: Runtime>(client: &ComputeClient<R>, layout: &LoraLayout, rows: usize) -> DeviceBuffer<f32> {
    DeviceBuffer::upload(client, &vec![f32::NAN; rows * layout.intermediate_width() as usize])
}

/// Random input rows of the layout's width, rounded to the storage type.
fn random_x<F: StorageElem>(rng: &mut Rng, layout: &LoraLayout, rows: usize) -> (Vec<F>, Vec<f64>) {
    rng.tensor::<F>(rows * layout.in_features() as usize, 1.0)
}

pub fn segmented_shrink<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES {
        let rng = &mut Rng::new(100 + seed);
        let (layout, family) = random_layout(rng, None);
        let tokens = rng.pick(&[1, 2, 5, 17, 40]);
        shrink_case::<R, F>(client, rng, &layout, tokens, &format!("shrink {family} seed {seed} {layout:?}"), |_| None);
    }
    // A K as long as MLA's (7168): several paired rounds of loads per thread.
    let rng = &mut Rng::new(199);
    for tokens in [1, 8] {
        shrink_case::<R, F>(client, rng, &long_k_layout(), tokens, &format!("shrink long K, {tokens} tokens"), |_| None);
    }
    // Each decode tiling on 128 and 256 threads (the default picks 128 for grids of six or
    // more cubes per multiprocessor, too large for the random cases above), long K.
    let layout = long_k_layout();
    for (rows, tokens, threads) in [(4, 4, 128), (4, 4, 256), (4, 1, 128), (2, 2, 128)] {
        let tiling = |segs: &Segments| {
            let default = ShrinkConfig::new(client, &layout, size_of::<F>(), segs.num_segments(), segs.max_segment_len());
            Some(ShrinkKernel::Scalar(ShrinkConfig {
                rows_per_cube: rows,
                tokens_per_tile: tokens,
                token_splits: segs.max_segment_len().div_ceil(tokens),
                threads: if default.plane_size > 0 { threads } else { default.threads.min(threads) },
                ..default
            }))
        };
        shrink_case::<R, F>(client, rng, &layout, 40, &format!("shrink long K, {rows}x{tokens} tiles on {threads} threads"), tiling);
    }
}

/// MLA's fused q_a / kv_a at full K (7168), scaled-down widths.
fn long_k_layout() -> LoraLayout {
    LoraLayout::new(nz(3), nz(16), 7168, 2, vec![slice("q_a", 48, 0), slice("kv_a", 18, 1)], None).unwrap()
}

/// One segmented shrink on random adapters, segments and x, against the reference, with the
/// kernel `kernel` picks for the segments (None: the launch's own choice).
fn shrink_case<R: Runtime, F: StorageElem>(
    client: &ComputeClient<R>,
    rng: &mut Rng,
    layout: &LoraLayout,
    tokens: u32,
    what: &str,
    kernel: impl FnOnce(&Segments) -> Option<ShrinkKernel>,
) {
    let adapters = Adapters::<F>::random(client, rng, layout);
    let segs = random_segments(rng, tokens, layout.slots());
    let (x, x64) = random_x::<F>(rng, layout, tokens as usize);
    let mut out = poisoned_intermediate(client, layout, tokens as usize);
    let kernel = kernel(&segs);
    launch_shrink(client, layout, &adapters.pool, &segs.upload(client), &DeviceBuffer::upload(client, &x), &mut out, kernel).unwrap();
    let reference = adapters.reference_shrink(layout, &segs, &x64, tokens);
    check_intermediate(what, &out.read(client), &reference, F::TOLERANCE);
}

/// Every tile shape and K-group count of the tensor-core shrink the device has for this
/// layout, each default tile also with 2–4 asynchronous-copy stages, and warp blocks of 2×1,
/// 2×2 and 2×4 fragments over the widest row block of up to four fragments, in 32-token tiles
/// with one K group and 128-token tiles with two, register-staged and with three stages, and
/// the default for a long prefill batch (on a
/// device without MMA, such as wgpu, the emulated-MMA kernels, register-staged only: wgpu has
/// no asynchronous copies).
fn mma_shrink_configs<F: StorageElem>(device: &DeviceProperties, layout: &LoraLayout) -> Vec<MmaShrinkConfig> {
    let tiles = || [1, 2, 4].into_iter().flat_map(|m| [1, 2, 3, 4].into_iter().map(move |n| (m, n)));
    let groups = tiles().flat_map(|(m, n)| {
        [1, 2, 4].into_iter().filter_map(move |g| MmaShrinkConfig::with_tile_groups::<F>(device, layout, ShrinkTile::new(m, n), g))
    });
    let pipelined = tiles()
        .filter_map(|(m, n)| MmaShrinkConfig::with_tile::<F>(device, layout, m, n))
        .flat_map(|config| [2, 3, 4].into_iter().filter_map(move |stages| config.with_stages::<F>(device, stages)));
    let row_frags = layout.intermediate_width() / 16;
    let widest = [4, 2, 1].into_iter().find(|n| row_frags.is_multiple_of(*n)).unwrap_or(1);
    let blocks = [(2, 1), (8, 2)].into_iter().flat_map(|(m, g)| {
        [(2, 1), (2, 2), (2, 4)].into_iter().filter_map(move |(wm, wn)| {
            MmaShrinkConfig::with_tile_groups::<F>(device, layout, ShrinkTile::new(m, widest).with_warps(wm, wn), g)
        })
    });
    let blocks = blocks.flat_map(|config| [1, 3].into_iter().filter_map(move |stages| config.with_stages::<F>(device, stages)));
    // Where the device multiplies by hand (CUDA), the warp blocks on cooperative matrices too.
    let cooperative =
        blocks.clone().filter(|c| c.fragments == Fragments::Ldmatrix).filter_map(|c| c.with_fragments::<F>(device, Fragments::Cmma));
    // The default for a long prefill batch (for 64-row blocks: 2×4-fragment warp blocks).
    let large_batch = MmaShrinkConfig::default_for::<F>(device, layout, 8, 4096);
    let mut configs: Vec<MmaShrinkConfig> = groups.chain(pipelined).chain(blocks).chain(cooperative).collect();
    configs.extend(large_batch.filter(|c| !configs.contains(c)));
    configs
}

/// [`mma_shrink_configs`] as kernels, and the automatic choice.
/// (With emulated MMAs, lavapipe runs the whole list in about two and a half minutes.)
fn mma_shrink_kernels<R: Runtime, F: StorageElem>(client: &ComputeClient<R>, layout: &LoraLayout) -> Vec<Option<ShrinkKernel>> {
    let mut kernels: Vec<Option<ShrinkKernel>> = mma_shrink_configs::<F>(client.properties(), layout)
        .into_iter()
        .map(|config| Some(ShrinkKernel::Mma { config, tiles_per_segment: 0 }))
        .collect();
    // The automatic choice too (on wgpu the scalar kernel, on prefill-sized segments).
    kernels.push(None);
    kernels
}

/// Ranks for the prefill tests: 0, partial 16-row fragments and full rank (slot 0).
fn prefill_ranks(rng: &mut Rng, layout: &LoraLayout) -> Vec<u32> {
    let mut ranks: Vec<u32> = (0..layout.slots()).map(|_| rng.pick(&[0, 5, 16, 17, layout.max_rank()]).min(layout.max_rank())).collect();
    ranks[0] = layout.max_rank();
    ranks
}

/// Seeds of the prefill shrink tests: [`CASES`]` / 2` random layouts and one fixed one.
const PREFILL_SHRINK_SEEDS: std::ops::RangeInclusive<u64> = 0..=CASES / 2;

/// The prefill shrink tests' layouts: every module family, ranks 16 and 32, inputs of one to
/// twenty 16-wide steps; the last seed a gate_up layout at rank 32 over 320 inputs, whose row
/// block of four fragments takes the 2×4 warp-block default of long batches.
fn prefill_shrink_layout(seed: u64, rng: &mut Rng) -> (LoraLayout, &'static str) {
    if seed == *PREFILL_SHRINK_SEEDS.end() {
        let slices = vec![slice("gate", 40, 0), slice("up", 40, 1)];
        return (LoraLayout::new(nz(3), nz(32), 320, 2, slices, None).unwrap(), "gate_up (64-row blocks)");
    }
    let (groups, slices, family) = random_slices(rng);
    let layout = LoraLayout::new(nz(rng.range(1, 4)), nz(rng.pick(&[16, 32])), rng.pick(&[16, 48, 256, 320]), groups, slices, None);
    (layout.unwrap(), family)
}

/// Prefill-sized segments through every tile shape, warp block and K-group count of the
/// tensor-core shrink: on tensor cores where the device and storage type have them (CUDA bf16),
/// else with emulated MMAs (wgpu, CUDA f32), which tests the same tiling, staging and stores.
pub fn prefill_shrink<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in PREFILL_SHRINK_SEEDS {
        let rng = &mut Rng::new(600 + seed);
        let (layout, family) = prefill_shrink_layout(seed, rng);
        let ranks = prefill_ranks(rng, &layout);
        let scales = vec![1.0; layout.slots() as usize];
        let adapters = Adapters::<F>::with_ranks(client, rng, &layout, ranks, scales);
        let tokens = rng.pick(&[40, 130, 200]);
        let segs = random_segments(rng, tokens, layout.slots());
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let reference = adapters.reference_shrink(&layout, &segs, &x64, tokens);
        for kernel in mma_shrink_kernels::<R, F>(client, &layout) {
            let what = format!("prefill shrink {family} seed {seed} {kernel:?} {layout:?}");
            let mut out = poisoned_intermediate(client, &layout, tokens as usize);
            launch_shrink(client, &layout, &adapters.pool, &segs.upload(client), &DeviceBuffer::upload(client, &x), &mut out, kernel)
                .unwrap();
            check_intermediate(&what, &out.read(client), &reference, F::TOLERANCE);
        }
    }
}

/// Decode-sized batches (1, 6 or 21 tokens) through the tensor-core shrink with K split across
/// cubes, whose partial sums (`[k_splits, tokens, c·R]`) the expand adds up: tiles of one
/// 16-token fragment row by one fragment and by the widest row block of up to four, one or
/// two K groups, 2–8 splits (register-staged, and with two asynchronous-copy stages where the
/// device has them). Each copy must stay unwritten where the reference is NaN, the summed
/// copies match the reference shrink, and the expand of the copies the reference pair.
pub fn split_k_shrink<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let device = client.properties();
    for seed in 0..CASES / 3 {
        let rng = &mut Rng::new(900 + seed);
        let (groups, slices, family) = random_slices(rng);
        let layout =
            LoraLayout::new(nz(rng.range(2, 4)), nz(rng.pick(&[16, 32])), rng.pick(&[64, 192, 256]), groups, slices, None).unwrap();
        let ranks = prefill_ranks(rng, &layout);
        let scales = (0..layout.slots()).map(|_| 0.5 + rng.value().abs() as f32).collect();
        let adapters = Adapters::<F>::with_ranks(client, rng, &layout, ranks, scales);
        let tokens = rng.pick(&[1, 6, 21]);
        let segs = random_segments(rng, tokens, layout.slots());
        let dev_segs = segs.upload(client);
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let x = DeviceBuffer::upload(client, &x);
        let reference = adapters.reference_shrink(&layout, &segs, &x64, tokens);
        let delta = adapters.reference_expand(
            &layout,
            &segs,
            &reference.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect::<Vec<_>>(),
            tokens,
        );
        let (y0, y064) = initial_y::<F>(rng, &delta);
        for config in split_k_configs::<F>(device, &layout) {
            let what = format!("split-K shrink {family} seed {seed} {tokens} tokens {config:?} {layout:?}");
            let kernel = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
            let mut partials = poisoned_intermediate(client, &layout, config.k_splits as usize * tokens as usize);
            launch_shrink(client, &layout, &adapters.pool, &dev_segs, &x, &mut partials, Some(kernel)).unwrap();
            check_split_copies(&what, &partials.read(client), &reference, F::TOLERANCE);
            let expand =
                ExpandConfig::new(client, &layout, size_of::<F>(), segs.num_segments(), segs.max_segment_len()).summing(config.k_splits);
            let mut y = DeviceBuffer::upload(client, &y0);
            launch_expand(client, &layout, &adapters.pool, &dev_segs, &partials, &mut y, Some(ExpandKernel::Scalar(expand))).unwrap();
            let out = layout.out_features() as usize;
            check_y(&format!("{what}, expand"), &y.read(client), &y064, &delta, &adapters.touched(&segs), out, F::TOLERANCE);
            // The default expand reads as many copies as the intermediate holds; launched as a
            // pair's expand, it reads its first y tile before the grid dependency point.
            let mut y = DeviceBuffer::upload(client, &y0);
            launch_pair_expand(client, &layout, &adapters.pool, &dev_segs, &partials, &mut y, None).unwrap();
            check_y(&format!("{what}, default expand"), &y.read(client), &y064, &delta, &adapters.touched(&segs), out, F::TOLERANCE);
        }
    }
    // The automatic choice with room for the default split count, on a batch it applies to
    // where the device has tensor cores (rank 64 over two slices, two 40-token segments, K in
    // four 256-wide shares of two 128-wide chunks); elsewhere the one-copy kernels.
    let rng = &mut Rng::new(990);
    let layout = LoraLayout::new(nz(2), nz(64), 1024, 2, vec![slice("gate", 48, 0), slice("up", 48, 1)], None).unwrap();
    let adapters = Adapters::<F>::random(client, rng, &layout);
    let tokens = 80;
    let segs = Segments::from_token_slots(&(0..tokens).map(|t| Some(t % 2)).collect::<Vec<_>>(), layout.slots()).unwrap();
    let kernel = ShrinkKernel::choose_within::<R, F>(client, &layout, segs.num_segments(), segs.max_segment_len(), SPLIT_K_COPIES);
    let split = MmaShrinkConfig::split_k_for::<F>(device, &layout, segs.num_segments(), segs.max_segment_len());
    assert_eq!(kernel.intermediate_copies(), split.map_or(1, |c| c.k_splits), "{kernel:?}");
    let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
    let dev_segs = segs.upload(client);
    let mut a = poisoned_intermediate(client, &layout, kernel.intermediate_copies() as usize * tokens as usize);
    launch_shrink(client, &layout, &adapters.pool, &dev_segs, &DeviceBuffer::upload(client, &x), &mut a, Some(kernel)).unwrap();
    let delta = adapters.reference_expand(&layout, &segs, &adapters.reference_shrink(&layout, &segs, &x64, tokens), tokens);
    let (y0, y064) = initial_y::<F>(rng, &delta);
    let mut y = DeviceBuffer::upload(client, &y0);
    launch_expand(client, &layout, &adapters.pool, &dev_segs, &a, &mut y, None).unwrap();
    let what = format!("automatic split-K pair {kernel:?}");
    check_y(&what, &y.read(client), &y064, &delta, &adapters.touched(&segs), layout.out_features() as usize, F::TOLERANCE);
}

/// Prefill-sized segments (40 or 130 tokens) through tensor-core shrink tiles of 32 and 64
/// tokens (one fragment per warp, and 2×2 warp blocks; register-staged, and with three
/// asynchronous-copy stages where the device has them) with K split two and three ways, each
/// copy's partial sums then added up by the tensor-core expand (register-staged, and with two
/// stages where the device has them) and by the automatic expand for an intermediate of that
/// many copies. Copies stay unwritten where the reference is NaN; the summed copies match the
/// reference shrink and each expand the reference pair.
pub fn split_k_prefill<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let device = client.properties();
    let (mut shrinks, mut tensor_core_expands) = (0, 0);
    // Seeds 0 and 1: random layouts of rank up to 32; seed 2: rank 64 over three slices (192 A
    // rows), which takes the wide prefill tile where the device has it; seed 3: rank 64 over
    // two slices (128 A rows, as MLA's), which has the tall wide tile too.
    for seed in 0..4 {
        let rng = &mut Rng::new(950 + seed);
        let (layout, family) = match seed {
            0 | 1 => prefill_expand_layout(rng),
            2 => {
                let slices = vec![slice("q", 128, 0), slice("k", 64, 1), slice("v", 64, 2)];
                (LoraLayout::new(nz(4), nz(64), 24, 3, slices, None).unwrap(), "qkv (wide tile)")
            }
            _ => {
                let slices = vec![slice("q_a", 96, 0), slice("kv_a", 48, 1)];
                (LoraLayout::new(nz(4), nz(64), 24, 2, slices, None).unwrap(), "MLA (wide and tall tiles)")
            }
        };
        // K of six 64-wide chunks: whole chunks per split for two and three splits; eight for
        // the tall tile's four.
        let max_rank = if seed < 2 { layout.max_rank().min(32) } else { 64 };
        let k = if seed < 3 { 384 } else { 512 };
        let layout = LoraLayout::new(nz(layout.slots()), nz(max_rank), k, layout.groups(), layout.slices().to_vec(), None).unwrap();
        let ranks = prefill_ranks(rng, &layout);
        let scales = (0..layout.slots()).map(|_| 0.5 + rng.value().abs() as f32).collect();
        let adapters = Adapters::<F>::with_ranks(client, rng, &layout, ranks, scales);
        let tokens = rng.pick(&[40, 130]);
        let segs = random_segments(rng, tokens, layout.slots());
        let dev_segs = segs.upload(client);
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let x = DeviceBuffer::upload(client, &x);
        let reference = adapters.reference_shrink(&layout, &segs, &x64, tokens);
        let zeroed: Vec<f64> = reference.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
        let delta = adapters.reference_expand(&layout, &segs, &zeroed, tokens);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let out = layout.out_features() as usize;
        let widest = MmaShrinkConfig::widest_row_block(&layout);
        let tiles = [ShrinkTile::new(2, widest), ShrinkTile::new(4, widest).with_warps(2, widest.min(2))];
        let configs: Vec<MmaShrinkConfig> = if seed < 2 {
            let bases = tiles.into_iter().filter_map(|tile| {
                // The widest chunk that fits the device (lavapipe's shared memory is small).
                [64, 32, 16].into_iter().find_map(|chunk| MmaShrinkConfig::with_tile_chunk::<F>(device, &layout, tile, chunk, 1))
            });
            let staged = bases.flat_map(|base| [base].into_iter().chain(base.with_stages::<F>(device, 3)));
            staged.flat_map(|c| [2, 3].map(|s| c.with_k_splits(&layout, s).expect("K = 384 splits into 64-wide chunks"))).collect()
        } else {
            let wide: Vec<MmaShrinkConfig> = MmaShrinkConfig::wide_split_layouts::<F>(device, &layout).collect();
            let shapes: Vec<_> = wide.iter().map(|c| (c.m_frags, c.n_frags, c.k_splits)).collect();
            if !wide.is_empty() {
                // K = 384 has no four 64-wide shares (and the tall tile's accumulators for 12
                // row fragments would overrun the shared memory).
                let expected =
                    if seed == 2 { vec![(4, 12, WIDE_SPLIT_COPIES)] } else { vec![(8, 8, TALL_SPLIT_COPIES), (4, 8, WIDE_SPLIT_COPIES)] };
                assert_eq!(shapes, expected, "{wide:?}");
            }
            wide
        };
        for config in configs {
            let what = format!("split-K prefill {family} seed {seed} {tokens} tokens {config:?} {layout:?}");
            let mut partials = poisoned_intermediate(client, &layout, config.k_splits as usize * tokens as usize);
            launch_shrink(
                client,
                &layout,
                &adapters.pool,
                &dev_segs,
                &x,
                &mut partials,
                Some(ShrinkKernel::Mma { config, tiles_per_segment: 0 }),
            )
            .unwrap();
            check_split_copies(&what, &partials.read(client), &reference, F::TOLERANCE);
            // A 32 × 128 tile (the rank-64 default), or 32 × 32 where it does not fit, staged
            // through registers and two stages, and its 16-token variant in two stages (the
            // rank-64 prefill default summing copies).
            let columns = if MmaExpandConfig::with_tile::<F>(device, &layout, 2, 8).is_some() { 8 } else { 2 };
            let expands = [(2, 1), (2, 2), (1, 2)].into_iter().filter_map(|(m_frags, stages)| {
                MmaExpandConfig::with_tile::<F>(device, &layout, m_frags, columns)
                    .and_then(|c| c.with_stages::<F>(device, stages))
                    .and_then(|c| c.summing::<F>(device, config.k_splits))
                    .map(|config| Some(ExpandKernel::Mma { config, token_splits: 0 }))
            });
            shrinks += 1;
            for expand in expands.chain([None]) {
                tensor_core_expands += usize::from(expand.is_some());
                let mut y = DeviceBuffer::upload(client, &y0);
                launch_expand(client, &layout, &adapters.pool, &dev_segs, &partials, &mut y, expand).unwrap();
                let what = format!("{what}, expand {expand:?}");
                check_y(&what, &y.read(client), &y064, &delta, &adapters.touched(&segs), out, F::TOLERANCE);
            }
        }
    }
    assert!(shrinks >= 4 && tensor_core_expands >= shrinks, "{shrinks} split-K shrinks, {tensor_core_expands} tensor-core expands");
    eprintln!("split-K prefill: {shrinks} shrinks, {tensor_core_expands} tensor-core expands");
}

/// The split-K shrink configurations [`split_k_shrink`] runs on this layout.
fn split_k_configs<F: StorageElem>(device: &DeviceProperties, layout: &LoraLayout) -> Vec<MmaShrinkConfig> {
    let widest = MmaShrinkConfig::widest_row_block(layout);
    let mut configs = Vec::new();
    for n_frags in [1, widest].into_iter().take(if widest > 1 { 2 } else { 1 }) {
        for (k_groups, k_splits) in [(1, 2), (2, 4), (1, 8)] {
            let Some(config) = MmaShrinkConfig::split_k_tile::<F>(device, layout, n_frags, k_groups, k_splits, &[64, 32, 16]) else {
                continue;
            };
            configs.push(config);
            configs.extend(config.with_stages::<F>(device, 2));
        }
    }
    assert!(!configs.is_empty(), "no split-K shrink configuration for {layout:?}");
    configs
}

/// The prefill expand tests' layouts: every module family with slice widths rounded up to
/// multiples of 16 (as the tensor-core expand needs), ranks 16–64.
fn prefill_expand_layout(rng: &mut Rng) -> (LoraLayout, &'static str) {
    let (groups, slices, family) = random_slices(rng);
    let slices = slices.into_iter().map(|s| LoraSlice { width: s.width.div_ceil(16) * 16, ..s }).collect();
    (LoraLayout::new(nz(rng.range(1, 4)), nz(rng.pick(&[16, 32, 64])), 24, groups, slices, None).unwrap(), family)
}

/// Every tile shape of the tensor-core expand the device has for this layout, register-staged,
/// and the corner tiles (up to 32 tokens, 16 or 128 columns) also with 2–4 asynchronous-copy
/// stages (each configuration compiles its own kernel); with emulated MMAs on a device without
/// them.
fn mma_expand_configs<F: StorageElem>(device: &DeviceProperties, layout: &LoraLayout) -> Vec<MmaExpandConfig> {
    [1, 2, 4]
        .into_iter()
        .flat_map(|m| [1, 2, 4, 8].into_iter().filter_map(move |n| MmaExpandConfig::with_tile::<F>(device, layout, m, n)))
        .flat_map(|config| {
            let corner = config.m_frags <= 2 && [1, 8].contains(&config.n_frags);
            [1, 2, 3, 4].into_iter().filter(move |&s| s == 1 || corner).filter_map(move |stages| config.with_stages::<F>(device, stages))
        })
        // Tiles multiplied by hand also on cooperative matrices (the kernel keeps both ways).
        .flat_map(|config| {
            let cooperative = config.multiplies_by_hand().then(|| config.with_fragments::<F>(device, Fragments::Cmma)).flatten();
            std::iter::once(config).chain(cooperative)
        })
        .collect()
}

/// Prefill-sized segments through every tile shape of the tensor-core expand, register-staged,
/// and the corner tiles with 2–4 asynchronous-copy stages where the device has them (each with
/// one cube per token tile, and one cube looping over a segment's tiles): on tensor cores where
/// the device and storage type have them (CUDA bf16), else with emulated MMAs (wgpu, CUDA
/// f32), and the automatic choice. Slice widths are multiples of 16, as that kernel needs; the
/// intermediate is NaN past each rank and the pool's padding is not zero, so reading either would show.
pub fn prefill_expand<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES / 2 {
        let rng = &mut Rng::new(700 + seed);
        let (layout, family) = prefill_expand_layout(rng);
        let ranks = prefill_ranks(rng, &layout);
        let scales = (0..layout.slots()).map(|_| 0.5 + rng.value().abs() as f32).collect();
        let adapters = Adapters::<F>::with_ranks(client, rng, &layout, ranks, scales);
        let tokens = rng.pick(&[40, 130, 200]);
        let segs = random_segments(rng, tokens, layout.slots());
        let (a, a64) = random_intermediate(rng, &layout, &token_slot_ranks(&segs, &adapters.ranks));
        let delta = adapters.reference_expand(&layout, &segs, &a64, tokens);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let mut kernels: Vec<Option<ExpandKernel>> = mma_expand_configs::<F>(client.properties(), &layout)
            .into_iter()
            .flat_map(|config| [0, 1].map(|token_splits| Some(ExpandKernel::Mma { config, token_splits })))
            .collect();
        kernels.push(None); // the automatic choice too
        for (i, kernel) in kernels.into_iter().enumerate() {
            // Every other launch as a pair's expand (its first y tile read before the grid
            // dependency point), alternating with the seed.
            let pair = (i as u64 + seed) % 2 == 1;
            let what = format!("prefill expand {family} seed {seed} {kernel:?} pair {pair} {layout:?}");
            let mut y = DeviceBuffer::upload(client, &y0);
            let launch = if pair { launch_pair_expand::<R, F> } else { launch_expand::<R, F> };
            launch(client, &layout, &adapters.pool, &segs.upload(client), &DeviceBuffer::upload(client, &a), &mut y, kernel).unwrap();
            let out = layout.out_features() as usize;
            check_y(&what, &y.read(client), &y064, &delta, &adapters.touched(&segs), out, F::TOLERANCE);
        }
    }
}

/// Random intermediate for the expand tests, NaN past each token's rank (never to be read).
fn random_intermediate(rng: &mut Rng, layout: &LoraLayout, slot_ranks: &[Option<(u32, u32)>]) -> (Vec<f32>, Vec<f64>) {
    let (big_r, c) = (layout.max_rank() as usize, layout.groups() as usize);
    let mut a = vec![f32::NAN; slot_ranks.len() * c * big_r];
    for (t, sr) in slot_ranks.iter().enumerate() {
        if let Some((_, rank)) = sr {
            for g in 0..c {
                for j in 0..*rank as usize {
                    a[(t * c + g) * big_r + j] = rng.value() as f32 * 4.0;
                }
            }
        }
    }
    let a64 = a.iter().map(|&v| v as f64).collect();
    (a, a64)
}

pub fn segmented_expand<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES {
        let rng = &mut Rng::new(200 + seed);
        let (layout, family) = random_layout(rng, None);
        let tokens = rng.pick(&[1, 3, 8, 33, 70]);
        expand_case::<R, F>(client, rng, &layout, tokens, seed % 2 == 1, &format!("expand {family} seed {seed} {layout:?}"));
    }
    // Decode-shaped layouts: ranks whose B rows take several staged vectors per thread, slices
    // spanning several column blocks with a partial last block, adapters below the max rank.
    let layouts = [
        (64, 3, vec![slice("q", 264, 0), slice("k", 72, 1), slice("v", 72, 2)]),
        (32, 2, vec![slice("gate", 200, 0), slice("up", 200, 1)]),
        (16, 2, vec![slice("q_a", 520, 0), slice("kv_a", 36, 1)]),
    ];
    for (i, (max_rank, groups, slices)) in layouts.into_iter().enumerate() {
        let layout = LoraLayout::new(nz(4), nz(max_rank), 64, groups, slices, None).unwrap();
        for (j, tokens) in [1, 8, 33].into_iter().enumerate() {
            let seed = 100 * i as u64 + j as u64;
            let rng = &mut Rng::new(250 + seed);
            expand_case::<R, F>(client, rng, &layout, tokens, j % 2 == 1, &format!("expand decode-shaped seed {seed} {layout:?}"));
        }
    }
}

/// One segmented expand on random adapters, segments and intermediate, against the reference;
/// with `pair`, launched as a pair's expand (its first y tile read before the grid dependency
/// point).
fn expand_case<R: Runtime, F: StorageElem>(
    client: &ComputeClient<R>,
    rng: &mut Rng,
    layout: &LoraLayout,
    tokens: u32,
    pair: bool,
    what: &str,
) {
    let adapters = Adapters::<F>::random(client, rng, layout);
    let segs = random_segments(rng, tokens, layout.slots());
    let (a, a64) = random_intermediate(rng, layout, &token_slot_ranks(&segs, &adapters.ranks));
    let delta = adapters.reference_expand(layout, &segs, &a64, tokens);
    let (y0, y064) = initial_y::<F>(rng, &delta);
    let mut y = DeviceBuffer::upload(client, &y0);
    let launch = if pair { launch_pair_expand::<R, F> } else { launch_expand::<R, F> };
    launch(client, layout, &adapters.pool, &segs.upload(client), &DeviceBuffer::upload(client, &a), &mut y, None).unwrap();
    let out = layout.out_features() as usize;
    check_y(what, &y.read(client), &y064, &delta, &adapters.touched(&segs), out, F::TOLERANCE);
}

/// Shrink and expand fused in one launch, against the two references composed.
pub fn fused_decode<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES {
        let rng = &mut Rng::new(700 + seed);
        let (layout, family) = random_layout(rng, None);
        let tokens = rng.pick(&[1, 3, 8, 33]);
        fused_case::<R, F>(client, rng, &layout, tokens, &format!("fused {family} seed {seed} {layout:?}"));
    }
    fused_case::<R, F>(client, &mut Rng::new(799), &long_k_layout(), 8, "fused long K");
}

fn fused_case<R: Runtime, F: StorageElem>(client: &ComputeClient<R>, rng: &mut Rng, layout: &LoraLayout, tokens: u32, what: &str) {
    let adapters = Adapters::<F>::random(client, rng, layout);
    let segs = random_segments(rng, tokens, layout.slots());
    let (x, x64) = random_x::<F>(rng, layout, tokens as usize);
    let a64 = adapters.reference_shrink(layout, &segs, &x64, tokens);
    let delta = adapters.reference_expand(layout, &segs, &a64, tokens);
    let (y0, y064) = initial_y::<F>(rng, &delta);
    let mut y = DeviceBuffer::upload(client, &y0);
    launch_fused(client, layout, &adapters.pool, &segs.upload(client), &DeviceBuffer::upload(client, &x), &mut y, None).unwrap();
    // The intermediate stays f32 in shared memory; its inputs were rounded twice.
    let out = layout.out_features() as usize;
    check_y(what, &y.read(client), &y064, &delta, &adapters.touched(&segs), out, 2.0 * F::TOLERANCE);
}

/// The expand after a shrink folded into the base GEMM: y (NaN-poisoned) is written in full
/// from the GEMM's base columns plus each token's delta. Every column the kernel must not read
/// (other slots' intermediates, entries past the token's rank) is NaN in the input.
pub fn gemm_expand<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES {
        let rng = &mut Rng::new(800 + seed);
        let (layout, family) = random_layout(rng, None);
        let what = format!("gemm expand {family} seed {seed} {layout:?}");
        let adapters = Adapters::<F>::random(client, rng, &layout);
        let tokens = rng.pick(&[1, 3, 8, 33]);
        let segs = random_segments(rng, tokens, layout.slots());
        let token_slots = segs.token_slots();
        let (width, out) = (gemm_width(&layout) as usize, layout.out_features() as usize);
        let (big_r, c_r) = (layout.max_rank() as usize, layout.intermediate_width() as usize);
        let mut g64 = vec![f64::NAN; tokens as usize * width];
        for (t, &slot) in token_slots.iter().enumerate() {
            let row = &mut g64[t * width..(t + 1) * width];
            row[..out].iter_mut().for_each(|v| *v = rng.value());
            if slot != NO_SLOT {
                let base = out + slot as usize * c_r;
                for g in 0..layout.groups() as usize {
                    for j in 0..adapters.ranks[slot as usize] as usize {
                        row[base + g * big_r + j] = rng.value() * 4.0;
                    }
                }
            }
        }
        let g: Vec<F> = g64.iter().map(|&v| F::round_from(v)).collect();
        let g64: Vec<f64> = g.iter().map(|v| v.as_f64()).collect();
        let mut reference = vec![0.0; tokens as usize * out];
        reference_gemm_expand(&layout, &adapters.ranks, &adapters.scales, &token_slots, &g64, &adapters.data.b64, &mut reference);
        let mut y = DeviceBuffer::upload(client, &vec![F::round_from(f64::NAN); tokens as usize * out]);
        let dev_segs = segs.upload(client);
        launch_gemm_expand(client, &layout, &adapters.pool, &dev_segs, &DeviceBuffer::upload(client, &g), &mut y, None).unwrap();
        let got: Vec<f64> = y.read(client).iter().map(|v| v.as_f64()).collect();
        check_close(&what, &got, &reference, F::TOLERANCE);
        // A GEMM output of the wrong width is refused before anything launches.
        let short = DeviceBuffer::upload(client, &g[..g.len() - 1]);
        assert!(matches!(
            launch_gemm_expand(client, &layout, &adapters.pool, &dev_segs, &short, &mut y, None),
            Err(LoraError::BufferSize { .. })
        ));
    }
}

/// Chunked shrink → expand on long and short segments under the plan's fixed grid.
pub fn chunked_prefill<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES / 2 {
        let rng = &mut Rng::new(300 + seed);
        let (layout, family) = random_layout(rng, None);
        let chunk = rng.pick(&[1, 5, 16, 64]);
        let what = format!("chunked(chunk {chunk}) {family} seed {seed} {layout:?}");
        let adapters = Adapters::<F>::random(client, rng, &layout);
        let tokens = rng.pick(&[1, 60, 150]);
        let plan = ChunkedPlan::new::<R, F>(client, &layout, 160, chunk).unwrap();
        let segs = random_segments(rng, tokens, layout.slots());
        let chunks = plan.prepare(&segs).unwrap();
        assert_eq!(chunks.num_segments(), plan.capacity);
        assert!(chunks.seg_indptr().windows(2).all(|w| w[1] - w[0] <= chunk));
        let dev_chunks = chunks.upload(client);
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let mut a = poisoned_intermediate(client, &layout, tokens as usize);
        plan.launch_shrink(client, &layout, &adapters.pool, &dev_chunks, &DeviceBuffer::upload(client, &x), &mut a).unwrap();
        // The reference runs on the unchunked segments: chunking must not change the result.
        let a64 = adapters.reference_shrink(&layout, &segs, &x64, tokens);
        let delta = adapters.reference_expand(&layout, &segs, &a64, tokens);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let mut y = DeviceBuffer::upload(client, &y0);
        plan.launch_expand(client, &layout, &adapters.pool, &dev_chunks, &a, &mut y).unwrap();
        // Two roundings of the f32 intermediate's inputs: allow twice the tolerance.
        let out = layout.out_features() as usize;
        check_y(&what, &y.read(client), &y064, &delta, &adapters.touched(&segs), out, 2.0 * F::TOLERANCE);
    }
}

pub fn embedding<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES / 2 {
        let rng = &mut Rng::new(400 + seed);
        let vocab = rng.range(5, 300);
        let hidden = rng.range(1, 80);
        let layout =
            LoraLayout::new(nz(rng.range(1, 5)), nz(rng.pick(&[1, 4, 8, 16])), vocab, 1, vec![slice("embed", hidden, 0)], None).unwrap();
        let what = format!("embedding seed {seed} {layout:?}");
        let adapters = Adapters::<F>::random(client, rng, &layout);
        let tokens = rng.pick(&[1, 7, 30]);
        let segs = random_segments(rng, tokens, layout.slots());
        // One id past the vocabulary: it must contribute nothing rather than read out of bounds.
        let ids: Vec<u32> = (0..tokens).map(|t| if t == 0 && seed % 2 == 1 { vocab + 3 } else { rng.range(0, vocab - 1) }).collect();
        let mut delta = vec![0.0; (tokens * hidden) as usize];
        let (data, ranks, scales) = (&adapters.data, &adapters.ranks, &adapters.scales);
        reference_embedding(&layout, ranks, scales, &segs, &ids, &data.a64, &data.b64, &mut delta);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let mut y = DeviceBuffer::upload(client, &y0);
        let mut scratch = DeviceBuffer::upload(client, &vec![f32::NAN; (tokens * layout.max_rank()) as usize]);
        let ids_dev = DeviceBuffer::upload(client, &ids);
        launch_embedding(client, &layout, &adapters.pool, &segs.upload(client), &ids_dev, &mut scratch, &mut y, None).unwrap();
        check_y(&what, &y.read(client), &y064, &delta, &adapters.touched(&segs), hidden as usize, F::TOLERANCE);
    }
}

/// gate_up (gated, 2 slices, and non-gated, 1 slice) and down (router-weighted), with
/// per-expert and shared-outer pools, some experts off this rank.
pub fn moe<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..CASES {
        let rng = &mut Rng::new(500 + seed);
        let experts = rng.range(2, 6);
        let topk = rng.range(1, 3.min(experts));
        let gated = seed % 3 != 2;
        let down = seed % 3 == 1;
        let shared_outer = seed % 4 >= 2;
        let hidden = rng.pick(&[8, 24, 64]);
        let inter = rng.range(1, 40);
        let (in_features, groups, slices, dims) = if down {
            (inter, 1, vec![slice("down", hidden, 0)], ExpertDims { a: nz(experts), b: nz(if shared_outer { 1 } else { experts }) })
        } else if gated {
            (
                hidden,
                2,
                vec![slice("gate", inter, 0), slice("up", inter, 1)],
                ExpertDims { a: nz(if shared_outer { 1 } else { experts }), b: nz(experts) },
            )
        } else {
            (hidden, 1, vec![slice("up", inter, 0)], ExpertDims { a: nz(if shared_outer { 1 } else { experts }), b: nz(experts) })
        };
        let layout = LoraLayout::new(nz(rng.range(1, 4)), nz(rng.pick(&[2, 4, 8])), in_features, groups, slices, Some(dims)).unwrap();
        let (input, output) = if down { (MoeInput::PerPair, MoeOutput::RouterWeighted) } else { (MoeInput::PerToken, MoeOutput::PerPair) };
        let what = format!("moe seed {seed} down={down} gated={gated} shared_outer={shared_outer} topk {topk} {layout:?}");
        let adapters = Adapters::<F>::random(client, rng, &layout);
        let (ranks, data) = (&adapters.ranks, &adapters.data);
        let tokens = rng.pick(&[1, 4, 19]);
        let segs = random_segments(rng, tokens, layout.slots());
        let pairs = (tokens * topk) as usize;
        let ids: Vec<u32> = (0..pairs).map(|_| if rng.range(0, 5) == 0 { NO_EXPERT } else { rng.range(0, experts - 1) }).collect();
        let weights: Vec<f32> = (0..pairs).map(|_| rng.value().abs() as f32).collect();
        let routing = MoeRouting::new(client, tokens, topk, experts, &ids, &weights).unwrap();
        let x_rows = if down { pairs } else { tokens as usize };
        let (x, x64) = random_x::<F>(rng, &layout, x_rows);
        let out = layout.out_features() as usize;
        let y_rows = if down { tokens as usize } else { pairs };
        let mut delta = vec![0.0; y_rows * out];
        let (a64, b64) = (&data.a64, &data.b64);
        reference_moe(&layout, ranks, &adapters.scales, &segs, topk as usize, &ids, &weights, input, output, &x64, a64, b64, &mut delta);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let mut y = DeviceBuffer::upload(client, &y0);
        let dev_segs = segs.upload(client);
        let mut a = poisoned_intermediate(client, &layout, pairs);
        let pool = &adapters.pool;
        let x = DeviceBuffer::upload(client, &x);
        launch_moe_shrink(client, &layout, pool, &dev_segs, &routing, input, &x, &mut a).unwrap();
        launch_moe_expand(client, &layout, pool, &dev_segs, &routing, output, &a, &mut y).unwrap();
        // The same batch with the pairs grouped by (slot, expert) through the dense kernels.
        let groups = MoeGroups::new(client, &layout, pool, &segs, topk, experts, &ids, input, output).unwrap();
        let mut grouped_a = poisoned_intermediate(client, &layout, pairs);
        let mut grouped_y = DeviceBuffer::upload(client, &y0);
        launch_moe_grouped_shrink(client, &layout, pool, &groups, &x, &mut grouped_a, None).unwrap();
        match output {
            MoeOutput::PerPair => launch_moe_grouped_expand(client, &layout, pool, &groups, &grouped_a, &mut grouped_y, None).unwrap(),
            MoeOutput::RouterWeighted => {
                let err = launch_moe_grouped_expand(client, &layout, pool, &groups, &grouped_a, &mut grouped_y, None).unwrap_err();
                assert!(matches!(err, LoraError::Layout(_)), "{err:?}");
                let mut scratch = PairScratch::zeroed(client, pairs, out).unwrap();
                let (a, y) = (&grouped_a, &mut grouped_y);
                launch_moe_grouped_expand_weighted(client, &layout, pool, &groups, &dev_segs, &routing, a, &mut scratch, y, None).unwrap();
                assert!(scratch.read(client).iter().all(|v| v.as_f64() == 0.0), "{what}: pair scratch not cleared");
            }
        }
        let touched = moe_touched_rows(&segs, ranks, &ids, topk, output);
        // The intermediate is f32 but its inputs were rounded twice: allow twice the tolerance.
        check_y(&what, &y.read(client), &y064, &delta, &touched, out, 2.0 * F::TOLERANCE);
        check_y(&format!("grouped {what}"), &grouped_y.read(client), &y064, &delta, &touched, out, 2.0 * F::TOLERANCE);
    }
}

/// Which rows of a MoE output a LoRA delta reaches: a token with an adapter of nonzero rank
/// and, for a per-pair row, a local expert (for a router-weighted token row, any of its pairs).
fn moe_touched_rows(segs: &Segments, ranks: &[u32], ids: &[u32], topk: u32, output: MoeOutput) -> Vec<bool> {
    let (slots, topk) = (segs.token_slots(), topk as usize);
    let rows = match output {
        MoeOutput::PerPair => ids.len(),
        MoeOutput::RouterWeighted => slots.len(),
    };
    (0..rows)
        .map(|row| {
            let (t, pairs) = match output {
                MoeOutput::PerPair => (row / topk, row..row + 1),
                MoeOutput::RouterWeighted => (row, row * topk..(row + 1) * topk),
            };
            slots[t] != NO_SLOT && ranks[slots[t] as usize] > 0 && pairs.into_iter().any(|p| ids[p] != NO_EXPERT)
        })
        .collect()
}

/// The grouped MoE path on prefill-sized batches through the tensor-core shrink and expand
/// (emulated where the device has no MMA) as well as the automatic choice: gate_up with
/// per-expert and shared A (x rows shared by a token's `topk` pairs); down router-weighted
/// (grouped expand into a pair scratch, then the weighted combine; the scratch shared by all
/// runs, so each run relies on the previous one clearing it), and down into per-pair rows (as
/// an engine that adds the delta before the router's weighted sum runs it) with a shared-outer B.
/// Shapes are multiples of 16, as the tensor-core kernels need.
pub fn moe_grouped<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let device = client.properties();
    let (experts, topk, hidden, inter) = (4, 3, 64, 48);
    // (down, output, A's expert dim, B's expert dim)
    let cases = [
        (false, MoeOutput::PerPair, experts, experts),
        (false, MoeOutput::PerPair, 1, experts),
        (true, MoeOutput::RouterWeighted, experts, experts),
        (true, MoeOutput::PerPair, experts, 1),
    ];
    for (seed, (down, output, dim_a, dim_b)) in cases.into_iter().enumerate() {
        let rng = &mut Rng::new(900 + seed as u64);
        let (in_features, groups, slices) = if down {
            (inter, 1, vec![slice("down", hidden, 0)])
        } else {
            (hidden, 2, vec![slice("gate", inter, 0), slice("up", inter, 1)])
        };
        let dims = ExpertDims { a: nz(dim_a), b: nz(dim_b) };
        let layout = LoraLayout::new(nz(3), nz(16), in_features, groups, slices.clone(), Some(dims)).unwrap();
        let input = if down { MoeInput::PerPair } else { MoeInput::PerToken };
        let ranks = prefill_ranks(rng, &layout);
        let scales = (0..layout.slots()).map(|_| 0.5 + rng.value().abs() as f32).collect();
        let mut adapters = Adapters::<F>::with_ranks(client, rng, &layout, ranks, scales);
        let tokens = 90;
        let segs = random_segments(rng, tokens, layout.slots());
        let pairs = (tokens * topk) as usize;
        let ids: Vec<u32> = (0..pairs).map(|_| if rng.range(0, 9) == 0 { NO_EXPERT } else { rng.range(0, experts - 1) }).collect();
        let weights: Vec<f32> = (0..pairs).map(|_| rng.value().abs() as f32).collect();
        let routing = MoeRouting::new(client, tokens, topk, experts, &ids, &weights).unwrap();
        let (x, x64) = random_x::<F>(rng, &layout, if down { pairs } else { tokens as usize });
        let out = layout.out_features() as usize;
        let weighted = output == MoeOutput::RouterWeighted;
        let y_rows = if weighted { tokens as usize } else { pairs };
        let (scales, data) = (&adapters.scales, &adapters.data);
        let reference = |ranks: &[u32]| {
            let mut delta = vec![0.0; y_rows * out];
            let (a64, b64) = (&data.a64, &data.b64);
            reference_moe(&layout, ranks, scales, &segs, topk as usize, &ids, &weights, input, output, &x64, a64, b64, &mut delta);
            delta
        };
        let delta = reference(&adapters.ranks);
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let touched = moe_touched_rows(&segs, &adapters.ranks, &ids, topk, output);
        let x = DeviceBuffer::upload(client, &x);
        let dev_segs = segs.upload(client);
        // One pair scratch for every run, sized for a larger batch, as a model shares one.
        let scratch = std::cell::RefCell::new(PairScratch::<F>::zeroed(client, 2 * pairs, out + 16).unwrap());
        // y after the grouped shrink and expand (router-weighted: through the scratch).
        let run = |pool: &AdapterPool<F>, groups: &MoeGroups, shrink: Option<ShrinkKernel>, expand: Option<ExpandKernel>| {
            let mut a = poisoned_intermediate(client, &layout, pairs);
            let mut y = DeviceBuffer::upload(client, &y0);
            launch_moe_grouped_shrink(client, &layout, pool, groups, &x, &mut a, shrink).unwrap();
            if weighted {
                let scratch = &mut scratch.borrow_mut();
                launch_moe_grouped_expand_weighted(client, &layout, pool, groups, &dev_segs, &routing, &a, scratch, &mut y, expand)
                    .unwrap();
            } else {
                launch_moe_grouped_expand(client, &layout, pool, groups, &a, &mut y, expand).unwrap();
            }
            y.read(client)
        };
        let on_host = MoeGroups::new(client, &layout, &adapters.pool, &segs, topk, experts, &ids, input, output).unwrap();
        // Grouped on the device into 16-pair chunks, in buffers that first held a larger batch.
        let mut on_device = MoeGroups::on_device(client, &layout, &adapters.pool, 2 * tokens, topk, experts, 16, input, output).unwrap();
        let earlier_segs = random_segments(rng, tokens + 7, layout.slots());
        let earlier_ids: Vec<u32> = (0..(tokens + 7) * topk).map(|_| rng.range(0, experts - 1)).collect();
        let earlier = MoeRouting::new(client, tokens + 7, topk, experts, &earlier_ids, &vec![1.0; earlier_ids.len()]).unwrap();
        on_device.regroup(client, &earlier_segs.upload(client), &earlier).unwrap();
        on_device.regroup(client, &dev_segs, &routing).unwrap();
        check_device_groups(client, &on_device, &on_host, &format!("device grouping (down={down}, {output:?})"));
        // The tensor-core kernels for the dense views (slot × expert) the grouped path runs on.
        let view = |dim: u32| LoraLayout::new(nz(3 * dim), nz(16), in_features, groups, slices.clone(), None).unwrap();
        let tiled_shrink =
            MmaShrinkConfig::with_tile::<F>(device, &view(dim_a), 2, 1).map(|config| ShrinkKernel::Mma { config, tiles_per_segment: 0 });
        let tiled_expand =
            MmaExpandConfig::with_tile::<F>(device, &view(dim_b), 1, 1).map(|config| ExpandKernel::Mma { config, token_splits: 0 });
        assert!(tiled_shrink.is_some() && tiled_expand.is_some(), "no tensor-core tile for {layout:?}");
        for (grouping, groups) in [("host", &on_host), ("device", &on_device)] {
            for (shrink, expand) in [(None, None), (tiled_shrink, tiled_expand)] {
                let what = format!("moe grouped on the {grouping}, down={down} {output:?} {shrink:?} {expand:?} {layout:?}");
                check_y(&what, &run(&adapters.pool, groups, shrink, expand), &y064, &delta, &touched, out, 2.0 * F::TOLERANCE);
            }
        }
        // Slot 0's adapter unloaded (rank 0) and the groups refreshed in place: its rows are
        // left alone, the others as before.
        let mut unloaded = adapters.ranks.clone();
        unloaded[0] = 0;
        adapters.pool.write_ranks(client, &unloaded).unwrap();
        on_device.refresh_adapters(client, &adapters.pool).unwrap();
        let touched = moe_touched_rows(&segs, &unloaded, &ids, topk, output);
        let what = format!("moe grouped on the device, down={down} {output:?}, after unloading slot 0 {layout:?}");
        let y = run(&adapters.pool, &on_device, None, None);
        check_y(&what, &y, &y064, &reference(&unloaded), &touched, out, 2.0 * F::TOLERANCE);
        let left = scratch.borrow().read(client);
        assert!(left.iter().all(|v| v.as_f64() == 0.0), "pair scratch not cleared after {what}");
    }
}

/// The device grouping holds the host grouping's pairs: every segment of at most 16 pairs
/// inside one (slot, expert) group, the segments of each group covering exactly its pairs.
fn check_device_groups<R: Runtime>(client: &ComputeClient<R>, on_device: &MoeGroups, on_host: &MoeGroups, what: &str) {
    for (device, host) in on_device.read_segments(client).unwrap().into_iter().zip(on_host.read_segments(client).unwrap()) {
        let members = |segs: &Segments| {
            let mut groups = std::collections::BTreeMap::<u32, Vec<u32>>::new();
            for s in 0..segs.num_segments() {
                let (lo, hi) = (segs.seg_indptr()[s] as usize, segs.seg_indptr()[s + 1] as usize);
                if segs.weight_indices()[s] != NO_SLOT {
                    groups.entry(segs.weight_indices()[s]).or_default().extend(&segs.token_perm()[lo..hi]);
                }
            }
            groups.values_mut().for_each(|pairs| pairs.sort());
            groups
        };
        assert!(device.max_segment_len() <= 16, "{what}: a segment longer than its chunk");
        assert_eq!(members(&device), members(&host), "{what}: groups differ");
    }
}

/// Bad input is an error, never a panic or an out-of-bounds launch.
pub fn rejects_bad_input<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let rng = &mut Rng::new(7);
    let layout = LoraLayout::new(nz(2), nz(4), 16, 3, vec![slice("q", 8, 0), slice("k", 4, 1), slice("v", 4, 2)], None).unwrap();
    let pool_data = random_pool::<F>(rng, &layout, &[4, 2]);
    let a = DeviceBuffer::upload(client, &pool_data.a);
    let b = DeviceBuffer::upload(client, &pool_data.b);
    let err = AdapterPool::new(&layout, a.clone(), b.clone(), &[5, 1], &[1.0, 1.0], client).unwrap_err();
    assert_eq!(err, LoraError::RankTooLarge { slot: 0, rank: 5, max_rank: 4 });
    let err = AdapterPool::new(&layout, b.clone(), b.clone(), &[4, 2], &[1.0, 1.0], client).unwrap_err();
    assert!(matches!(err, LoraError::BufferSize { name: "A", .. }), "{err:?}");
    assert_eq!(Segments::new(2, vec![0, 2], vec![2], vec![0, 1], 2).unwrap_err(), LoraError::SlotOutOfRange { slot: 2, slots: 2 });
    assert_eq!(Segments::new(2, vec![0, 2], vec![0], vec![1, 1], 2).unwrap_err(), LoraError::DuplicateToken { token: 1 });
    assert!(matches!(Segments::new(2, vec![0, 3], vec![0], vec![0, 1], 2), Err(LoraError::BadIndptr(_))));
    assert_eq!(Segments::new(2, vec![0, 1], vec![0], vec![2], 2).unwrap_err(), LoraError::TokenOutOfRange { token: 2, tokens: 2 });

    let pool = AdapterPool::new(&layout, a, b, &[4, 2], &[1.0, 1.0], client).unwrap();
    let segs = Segments::from_token_slots(&[Some(0), Some(1), None], 2).unwrap();
    let dev = segs.upload(client);
    let x_short = DeviceBuffer::upload(client, &vec![F::round_from(1.0); 16]);
    let mut out = DeviceBuffer::<f32>::empty(client, 3 * 12);
    let err = launch_shrink(client, &layout, &pool, &dev, &x_short, &mut out, None).unwrap_err();
    assert_eq!(err, LoraError::BufferSize { name: "x", expected: 48, actual: 16 });
    let wide = Segments::from_token_slots(&[Some(5), None, None], 6).unwrap().upload(client);
    assert_eq!(
        launch_shrink(client, &layout, &pool, &wide, &x_short, &mut out, None).unwrap_err(),
        LoraError::SlotOutOfRange { slot: 5, slots: 2 }
    );
    let other = LoraLayout::new(nz(2), nz(4), 16, 1, vec![slice("o", 8, 0)], None).unwrap();
    let x = DeviceBuffer::upload(client, &vec![F::round_from(1.0); 48]);
    assert!(matches!(launch_shrink(client, &other, &pool, &dev, &x, &mut out, None), Err(LoraError::Layout(_))));
    let plan = ChunkedPlan::new::<R, F>(client, &layout, 2, 1).unwrap();
    assert!(matches!(plan.prepare(&Segments::from_token_slots(&[Some(0); 8], 2).unwrap()), Err(LoraError::CapacityExceeded { .. })));
    assert_eq!(MoeRouting::new(client, 1, 2, 4, &[1, 4], &[0.5, 0.5]).unwrap_err(), LoraError::ExpertOutOfRange { expert: 4, experts: 4 });
    // Grouped MoE: routing that does not match the batch or the layout, and a dense layout.
    let (per_pair, per_token) = (MoeOutput::PerPair, MoeInput::PerToken);
    let moe_layout = LoraLayout::new(nz(2), nz(4), 16, 1, vec![slice("up", 8, 0)], Some(ExpertDims { a: nz(4), b: nz(4) })).unwrap();
    let moe = Adapters::<F>::random(client, rng, &moe_layout);
    let groups = |layout: &LoraLayout, pool: &AdapterPool<F>, experts: u32, ids: &[u32]| {
        MoeGroups::new(client, layout, pool, &segs, 2, experts, ids, per_token, per_pair).unwrap_err()
    };
    assert_eq!(groups(&moe_layout, &moe.pool, 4, &[0; 5]), LoraError::BufferSize { name: "expert_ids", expected: 6, actual: 5 });
    assert_eq!(groups(&moe_layout, &moe.pool, 4, &[0, 1, 2, 3, 4, 0]), LoraError::ExpertOutOfRange { expert: 4, experts: 4 });
    assert!(matches!(groups(&moe_layout, &moe.pool, 3, &[0; 6]), LoraError::Layout(_)));
    assert!(matches!(groups(&layout, &pool, 4, &[0; 6]), LoraError::Layout(_)));
}

macro_rules! stamp_kernel_tests {
    ($module:ident, $runtime:ty, $elem:ty) => {
        mod $module {
            type Rt = $runtime;
            type E = $elem;
            fn client() -> cubecl::prelude::ComputeClient<Rt> {
                <Rt as cubecl::prelude::Runtime>::client(&Default::default())
            }
            #[test]
            fn segmented_shrink() {
                super::segmented_shrink::<Rt, E>(&client());
            }
            #[test]
            fn prefill_shrink() {
                super::prefill_shrink::<Rt, E>(&client());
            }
            #[test]
            fn split_k_shrink() {
                super::split_k_shrink::<Rt, E>(&client());
            }
            #[test]
            fn split_k_prefill() {
                super::split_k_prefill::<Rt, E>(&client());
            }
            #[test]
            fn prefill_expand() {
                super::prefill_expand::<Rt, E>(&client());
            }
            #[test]
            fn segmented_expand() {
                super::segmented_expand::<Rt, E>(&client());
            }
            #[test]
            fn fused_decode() {
                super::fused_decode::<Rt, E>(&client());
            }
            #[test]
            fn gemm_expand() {
                super::gemm_expand::<Rt, E>(&client());
            }
            #[test]
            fn chunked_prefill() {
                super::chunked_prefill::<Rt, E>(&client());
            }
            #[test]
            fn embedding() {
                super::embedding::<Rt, E>(&client());
            }
            #[test]
            fn moe() {
                super::moe::<Rt, E>(&client());
            }
            #[test]
            fn moe_grouped() {
                super::moe_grouped::<Rt, E>(&client());
            }
            #[test]
            fn rejects_bad_input() {
                super::rejects_bad_input::<Rt, E>(&client());
            }
        }
    };
}

// bf16 storage is not available through wgpu/lavapipe, so wgpu runs f32 only.
stamp_kernel_tests!(wgpu_f32, cubecl::wgpu::WgpuRuntime, f32);
#[cfg(feature = "cuda-tests")]
stamp_kernel_tests!(cuda_f32, cubecl::cuda::CudaRuntime, f32);
#[cfg(feature = "cuda-tests")]
stamp_kernel_tests!(cuda_bf16, cubecl::cuda::CudaRuntime, half::bf16);

/// Whether a kernel's CUDA source multiplies its fragments `fragments`' way: by hand
/// (`ldmatrix` loads, manual m16n8k16 MMAs), on cooperative matrices (`wmma`), or emulated (no
/// MMA at all).
fn multiplies_as(source: &str, fragments: Fragments) -> bool {
    let by_hand = source.contains("__mma_m16n8k16") && source.contains("ldmatrix.sync");
    match fragments {
        Fragments::Ldmatrix => by_hand,
        Fragments::Cmma => source.contains("mma_sync"),
        Fragments::Emulated => !source.contains("mma_sync") && !source.contains("__mma_m16n8k16"),
    }
}

/// Whether an expand's CUDA source multiplies the way its configuration says: by hand, adding
/// its sums to the staged y with `stmatrix`, or on cooperative matrices.
fn expand_multiplies(source: &str, config: MmaExpandConfig) -> bool {
    let by_hand_update = !config.multiplies_by_hand() || (source.contains("stmatrix.sync") && !source.contains("wmma::"));
    multiplies_as(source, config.fragments) && by_hand_update
}

/// The tensor-core kernels run only on NVIDIA GPUs, so the lavapipe tests above never reach
/// them. Here every configuration the CUDA prefill tests use is derived for a described H100
/// (as a live client would derive it) and lowered by cubecl's CUDA code generator: a kernel
/// that fails to expand or lower for some tile, warp block or pipeline depth fails in CI, not
/// on the GPU. (Compiling the sources takes NVRTC: `lora_bench --cuda-sources` and
/// `scripts/nvrtc_check.py`.)
#[test]
fn tensor_core_kernels_lower_to_cuda_offline() {
    use lorac_runtime::cuda_source::{expand_source, h100_properties, moe_align_source, shrink_source};
    type F = half::bf16;
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    let device = h100_properties();
    let (mut shrinks, mut pipelined, mut warp_blocks, mut emulated, mut expands, mut split_k) = (0, 0, 0, 0, 0, 0);
    let (mut summing_expands, mut by_hand, mut expands_by_hand) = (0, 0, 0);
    for seed in PREFILL_SHRINK_SEEDS {
        let (layout, family) = prefill_shrink_layout(seed, &mut Rng::new(600 + seed));
        for config in mma_shrink_configs::<F>(&device, &layout) {
            let source = shrink_source::<_, F>(&client, config).unwrap_or_else(|e| panic!("shrink {family} {config:?}: {e:?}"));
            let mma = config.fragments.tensor_cores() && multiplies_as(&source, config.fragments);
            assert!(mma, "shrink {family} {config:?}: no MMA in\n{source}");
            shrinks += 1;
            by_hand += usize::from(config.fragments == Fragments::Ldmatrix);
            pipelined += usize::from(config.stages > 1);
            warp_blocks += usize::from(config.warp_m * config.warp_n > 1);
        }
        // f32 storage has no 16×16×16 MMA: the CUDA f32 tests run the emulated kernels (here and
        // for the expand below).
        for config in mma_shrink_configs::<f32>(&device, &layout) {
            let source = shrink_source::<_, f32>(&client, config).unwrap_or_else(|e| panic!("shrink f32 {family} {config:?}: {e:?}"));
            let emulated_here = config.fragments == Fragments::Emulated && multiplies_as(&source, Fragments::Emulated);
            assert!(emulated_here, "shrink f32 {family} {config:?}: MMA in\n{source}");
            emulated += 1;
        }
    }
    // The decode shrink with K splits: chosen on the H100 for qkv at 8 segments of 16 tokens,
    // rank 64 and rank 16, not at 8 of 4 (the expand's reading of the copies costs more than
    // it saves); then lowered for every configuration the CUDA tests run.
    let qkv64 = LoraLayout::new(nz(8), nz(64), 4096, 3, vec![slice("q", 4096, 0), slice("k", 1024, 1), slice("v", 1024, 2)], None).unwrap();
    let chosen = MmaShrinkConfig::split_k_for::<F>(&device, &qkv64, 8, 16).expect("split-K shrink for rank-64 qkv at T = 128");
    let tile = (chosen.tile(), chosen.k_chunk, chosen.k_groups, chosen.k_splits, chosen.stages);
    assert_eq!(tile, (ShrinkTile::new(1, 1), 128, 4, SPLIT_K_COPIES, 4));
    assert!(shrink_source::<_, F>(&client, chosen).is_ok_and(|source| multiplies_as(&source, Fragments::Ldmatrix)));
    assert_eq!(MmaShrinkConfig::split_k_for::<F>(&device, &qkv64, 8, 4), None);
    // Under programmatic launch the same tile from 4-token segments of a 32-token batch on
    // (where its pairs gained on the H100), still not from single-token or 2-token ones.
    let programmatic =
        |segments, longest| MmaShrinkConfig::split_k_for_launch::<F>(&device, &qkv64, segments, longest, LaunchMode::Programmatic);
    assert_eq!(programmatic(8, 4), Some(chosen));
    assert_eq!(programmatic(8, 16), Some(chosen));
    assert_eq!((programmatic(8, 2), programmatic(8, 1), programmatic(4, 4)), (None, None, None));
    assert_eq!(MmaShrinkConfig::split_k_for_launch::<F>(&device, &qkv64, 8, 4, LaunchMode::Plain), None);
    let qkv16 = LoraLayout::new(nz(8), nz(16), 4096, 3, vec![slice("q", 4096, 0), slice("k", 1024, 1), slice("v", 1024, 2)], None).unwrap();
    assert_eq!(MmaShrinkConfig::split_k_for::<F>(&device, &qkv16, 8, 16), Some(MmaShrinkConfig { max_rank: 16, ..chosen }));
    let qkv = LoraLayout::new(nz(4), nz(16), 256, 3, vec![slice("q", 64, 0), slice("k", 16, 1), slice("v", 16, 2)], None).unwrap();
    for config in split_k_configs::<F>(&device, &qkv) {
        let source = shrink_source::<_, F>(&client, config).unwrap_or_else(|e| panic!("split-K shrink {config:?}: {e:?}"));
        assert!(
            config.fragments == Fragments::Ldmatrix && multiplies_as(&source, Fragments::Ldmatrix),
            "split-K shrink {config:?}: no MMA in\n{source}"
        );
        split_k += 1;
    }
    // Prefill with K splits: the H100's long-batch defaults split two and four ways.
    for layout in [&qkv64, &qkv16] {
        let default = MmaShrinkConfig::default_for::<F>(&device, layout, 8, 4096).expect("a tensor-core default on the H100");
        for config in [2, 4].map(|s| default.with_k_splits(layout, s).expect("K = 4096 splits into whole chunks")) {
            let source = shrink_source::<_, F>(&client, config).unwrap_or_else(|e| panic!("split-K prefill shrink {config:?}: {e:?}"));
            let mma = config.fragments.tensor_cores() && multiplies_as(&source, config.fragments);
            assert!(mma, "split-K prefill shrink {config:?}: no MMA in\n{source}");
            split_k += 1;
        }
    }
    for seed in 0..CASES / 2 {
        let (layout, family) = prefill_expand_layout(&mut Rng::new(700 + seed));
        for config in mma_expand_configs::<F>(&device, &layout) {
            let source = expand_source::<_, F>(&client, config).unwrap_or_else(|e| panic!("expand {family} {config:?}: {e:?}"));
            assert!(config.tensor_cores() && expand_multiplies(&source, config), "expand {family} {config:?}: no MMA in\n{source}");
            expands += 1;
            expands_by_hand += usize::from(config.multiplies_by_hand());
            // Summing the copies of a shrink with K splits (register-staged and pipelined).
            for summing in [2, 4].into_iter().filter_map(|copies| config.summing::<F>(&device, copies)) {
                let source = expand_source::<_, F>(&client, summing).unwrap_or_else(|e| panic!("expand {family} {summing:?}: {e:?}"));
                assert!(summing.tensor_cores() && expand_multiplies(&source, summing), "expand {family} {summing:?}: no MMA in\n{source}");
                expands += 1;
                summing_expands += 1;
            }
        }
        for config in mma_expand_configs::<f32>(&device, &layout) {
            let source = expand_source::<_, f32>(&client, config).unwrap_or_else(|e| panic!("expand f32 {family} {config:?}: {e:?}"));
            assert!(!config.tensor_cores() && !source.contains("mma_sync"), "expand f32 {family} {config:?}: MMA in\n{source}");
            emulated += 1;
        }
    }
    // The device-side MoE grouping: its atomic counts and cursors lower to CUDA atomics.
    // Counts in shared memory (512 groups), then in global memory (32768 groups).
    for dense_slots in [512, 32768] {
        let align = moe_align_source(&client, 32, dense_slots).unwrap_or_else(|e| panic!("moe align: {e:?}"));
        assert!(align.contains("atomicAdd"), "moe align without atomicAdd:\n{align}");
        // `buffer_2` is the kernel's third argument, the global counts.
        let global_atomics = align.matches("= &buffer_2[").count();
        assert_eq!(global_atomics > 0, dense_slots > 8192, "moe align counts for {dense_slots} groups:\n{align}");
    }
    // The fixed layout's long-batch default on the H100 is the warp-block tile, which the
    // CUDA tests then run (the other layouts keep one-fragment warps).
    let (blocked, _) = prefill_shrink_layout(*PREFILL_SHRINK_SEEDS.end(), &mut Rng::new(0));
    let default = MmaShrinkConfig::default_for::<F>(&device, &blocked, 8, 4096).expect("a tensor-core default on the H100");
    assert_eq!((default.tile(), default.k_chunk, default.k_groups, default.stages), (ShrinkTile::new(4, 4).with_warps(2, 4), 64, 2, 3));
    // The described H100 must yield the variants the CUDA tests exercise, not an empty list.
    let counts = format!(
        "{shrinks} shrink configurations ({pipelined} pipelined, {warp_blocks} with warp blocks, {by_hand} with ldmatrix fragments), {split_k} split-K shrinks, {expands} expands ({summing_expands} summing copies, {expands_by_hand} by hand), {emulated} emulated f32 shrinks and expands"
    );
    let both_fragments = by_hand > 0 && by_hand < shrinks && expands_by_hand > 0 && expands_by_hand < expands;
    assert!(
        pipelined > 0 && warp_blocks > 0 && both_fragments && split_k > 0 && emulated > 0 && expands > 0 && summing_expands > 0,
        "{counts}"
    );
    eprintln!("lowered {counts}");
}

/// The CUDA-graph path (`lorac_runtime::cuda_graph`) launches cubecl's kernels itself, from what
/// a recording client received: every recorded launch must lower to a CUDA entry point whose
/// parameters are exactly the recorded buffers and `info` block. Checked here without a GPU
/// (the buffers come from the wgpu client; the recording client only refers to them) on the
/// decode kernels the graphs hold, as derived for an H100.
#[test]
fn recorded_launches_lower_to_matching_cuda_entry_points() {
    use lorac_runtime::cuda_graph::{GRID_DEPENDENCY_POINT, lower_recorded, record_launches};
    use lorac_runtime::cuda_source::h100_properties;
    type F = half::bf16;
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    let device = h100_properties();
    let mut checked = 0;
    for seed in 0..CASES {
        let rng = &mut Rng::new(1900 + seed);
        let (layout, family) = random_layout(rng, None);
        let adapters = Adapters::<F>::random(&client, rng, &layout);
        let tokens = rng.pick(&[1, 3, 8, 33]);
        let host_segs = random_segments(rng, tokens, layout.slots());
        let segs = host_segs.upload(&client);
        let x = DeviceBuffer::<F>::upload(&client, &random_x::<F>(rng, &layout, tokens as usize).0);
        let mut a = poisoned_intermediate(&client, &layout, tokens as usize);
        let copies = poisoned_intermediate(&client, &layout, 2 * tokens as usize);
        let mut y = DeviceBuffer::<F>::empty(&client, tokens as usize * layout.out_features() as usize);
        let (launched, mut launches) = record_launches(&device, |rec| {
            launch_shrink(rec, &layout, &adapters.pool, &segs, &x, &mut a, None)?;
            launch_expand(rec, &layout, &adapters.pool, &segs, &a, &mut y, None)?;
            launch_fused(rec, &layout, &adapters.pool, &segs, &x, &mut y, None)?;
            // A pair's CUDA-core expand reads y before its wait only after a split-K shrink.
            launch_pair_expand(rec, &layout, &adapters.pool, &segs, &a, &mut y, None)?;
            let scalar = ExpandConfig::new(rec, &layout, size_of::<F>(), host_segs.num_segments(), host_segs.max_segment_len());
            launch_pair_expand(rec, &layout, &adapters.pool, &segs, &copies, &mut y, Some(ExpandKernel::Scalar(scalar.summing(2))))
        })
        .unwrap();
        launched.unwrap();
        let what = format!("{family} seed {seed} T={tokens} {layout:?}");
        // The register-staged tensor-core expand too, explicitly, on a layout whose widths are
        // multiples of 16 (the random layouts above rarely allow it).
        let (mma_layout, _) = prefill_expand_layout(rng);
        let mma_adapters = Adapters::<F>::random(&client, rng, &mma_layout);
        let mma_segs = random_segments(rng, tokens, mma_layout.slots()).upload(&client);
        let mma_a = poisoned_intermediate(&client, &mma_layout, tokens as usize);
        let mut mma_y = DeviceBuffer::<F>::empty(&client, tokens as usize * mma_layout.out_features() as usize);
        let config = MmaExpandConfig::with_tile::<F>(&device, &mma_layout, 1, 4).expect("a 16 x 64 tile");
        let mma_expand = Some(ExpandKernel::Mma { config, token_splits: 0 });
        let (launched, mma_launches) = record_launches(&device, |rec| {
            launch_expand(rec, &mma_layout, &mma_adapters.pool, &mma_segs, &mma_a, &mut mma_y, mma_expand)?;
            launch_pair_expand(rec, &mma_layout, &mma_adapters.pool, &mma_segs, &mma_a, &mut mma_y, mma_expand)
        })
        .unwrap();
        launched.unwrap();
        launches.extend(mma_launches);
        // The tensor-core shrink, register-staged and through shared-memory stages, on a
        // layout of whole 16-wide K steps.
        let (shrink_layout, _) = prefill_shrink_layout(seed, rng);
        let shrink_adapters = Adapters::<F>::random(&client, rng, &shrink_layout);
        let shrink_segs = random_segments(rng, tokens, shrink_layout.slots()).upload(&client);
        let shrink_x = DeviceBuffer::<F>::upload(&client, &random_x::<F>(rng, &shrink_layout, tokens as usize).0);
        let mut shrink_a = poisoned_intermediate(&client, &shrink_layout, tokens as usize);
        let staged = MmaShrinkConfig::with_tile::<F>(&device, &shrink_layout, 1, 1).expect("a 16 x 16 shrink tile");
        let pipelined = staged.with_stages::<F>(&device, 2).expect("two shared-memory stages");
        let (launched, shrink_launches) = record_launches(&device, |rec| {
            for config in [staged, pipelined] {
                let kernel = Some(ShrinkKernel::Mma { config, tiles_per_segment: 0 });
                launch_shrink(rec, &shrink_layout, &shrink_adapters.pool, &shrink_segs, &shrink_x, &mut shrink_a, kernel)?;
            }
            Ok::<_, LoraError>(())
        })
        .unwrap();
        launched.unwrap();
        launches.extend(shrink_launches);
        assert_eq!(launches.len(), 9, "{what}: one launch per call: {launches:?}");
        let names: Vec<&str> = launches.iter().map(|l| l.kernel.name()).collect();
        let families = ["shrink", "expand", "fused", "expand", "expand", "expand_mma", "expand_mma", "shrink_mma", "shrink_mma_pipelined"];
        for (name, family) in names.iter().zip(families) {
            assert!(name.contains(family), "{what}: recorded {names:?}");
        }
        // The expands of pairs (launched right after their shrinks) that also read y before
        // the wait: the CUDA-core one summing copies, the tensor-core one.
        let pair_expands = [4, 6];
        for (index, launch) in launches.iter().enumerate() {
            let lowered = lower_recorded(launch, 90).unwrap_or_else(|e| panic!("{what}: {e}"));
            let (buffers, info_bytes) = entry_point_parameters(&lowered.source, &lowered.entrypoint);
            assert_eq!(buffers, launch.args.buffers.len(), "{what}: {} buffer parameters", lowered.entrypoint);
            // cubecl packs the block in 8-byte words.
            assert_eq!(info_bytes.div_ceil(8), launch.args.info.data.len(), "{what}: {} info block", lowered.entrypoint);
            assert!(launch.args.tensor_maps.is_empty() && launch.args.info.dynamic_metadata_offset == launch.args.info.data.len());
            // As a programmatic dependent (Hopper): the shrinks and expands wait at their grid
            // dependency points (after loading or issuing their first A, after staging B), the
            // fused kernel before anything else.
            let marker = format!("// {GRID_DEPENDENCY_POINT}");
            let points = lowered.source.matches(&marker).count();
            let dependent = lowered.clone().with_grid_dependency().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(!dependent.source.contains("__restrict__"), "{what}: a restrict pointer may be read before the wait");
            let waits = dependent.source.matches("griddepcontrol.wait;").count();
            let body = dependent.source.find(&format!("{} (", lowered.entrypoint)).expect("entry point");
            let first = dependent.source[body..].split('{').nth(1).expect("body").trim_start();
            let starts_waiting = first.starts_with("asm volatile(\"griddepcontrol.wait;\"");
            let name = launch.kernel.name();
            // Buffers (by parameter index) read before the wait, and those the kernel may only
            // touch after it: x and the intermediate it writes (shrink), the intermediate and
            // y (expand; a pair's expand reads y before the wait but writes it only after).
            let (prefetched, dependent_buffers): (&[usize], &[usize]) = match name {
                name if name.contains("fused") => (&[], &[]),
                name if name.contains("shrink") => (&[1], &[0, 6]),
                _ if pair_expands.contains(&index) => (&[1, 2], &[0]),
                _ => (&[1], &[0, 2]),
            };
            if !prefetched.is_empty() {
                assert!(
                    points >= 1 && waits == points && !starts_waiting,
                    "{what}: {}: {points} points, {waits} waits",
                    lowered.entrypoint
                );
                assert!(!dependent.source.contains(&marker), "{what}: a point left unreplaced");
                let wait_at = dependent.source.find("griddepcontrol.wait;").expect("a wait");
                let before = &dependent.source[body..wait_at];
                // An index, or an address for an asynchronous copy.
                let touched = |i: &usize| before.contains(&format!("buffer_{i}[")) || before.contains(&format!("buffer_{i} + "));
                assert!(prefetched.iter().all(touched), "{what}: {} loads none of {prefetched:?} before its wait", lowered.entrypoint);
                assert!(
                    !dependent_buffers.iter().any(touched),
                    "{what}: {} touches {dependent_buffers:?} before its wait",
                    lowered.entrypoint
                );
                // No buffer is written before the wait (`buffer_N[index] = value`).
                let written = |i: usize| {
                    let at = format!("buffer_{i}[");
                    before.match_indices(&at).any(|(start, _)| {
                        let rest = before[start..].split_once(']').map_or("", |(_, rest)| rest.trim_start());
                        rest.starts_with('=') && !rest.starts_with("==")
                    })
                };
                assert!(!(0..launch.args.buffers.len()).any(written), "{what}: {} writes before its wait", lowered.entrypoint);
            } else {
                assert!(points == 0 && waits == 1 && starts_waiting, "{what}: body starts {:?}", &first[..60.min(first.len())]);
            }
            checked += 1;
        }
        // The expand's first scalar is the layout's output width (its `info` block is what
        // the graph passes the kernel by value).
        let expand_info = &launches[1].args.info.data;
        assert_eq!(expand_info[0] as u32, layout.out_features(), "{what}: expand scalars {expand_info:?}");
    }
    assert_eq!(checked, 9 * CASES);
    // A write cannot be replayed by a graph of launches: recording one is an error, not a
    // silently missing write.
    let refused = record_launches(&device, |rec| DeviceBuffer::<f32>::upload(rec, &[1.0, 2.0]));
    let Err(err) = refused else { panic!("an upload through the recording client must be refused") };
    assert!(err.to_string().contains("only kernel launches"), "{err}");
}

/// The expand a bf16 batch gets on an H100 (derived offline): the CUDA-core kernel while the
/// longest segment is shorter than `DECODE_MIN_SEGMENT` tokens, from there the register-staged
/// tensor-core tile (runs 67–68), and the pipelined prefill tile once 16-token tiles alone
/// fill the GPU; f32 has no tensor-core MMA there and stays on the CUDA-core kernel.
#[test]
fn expand_choice_follows_the_longest_segment() {
    use lorac_runtime::cuda_graph::{RecordingRuntime, record_launches};
    use lorac_runtime::cuda_source::h100_properties;
    use lorac_runtime::expand_mma::DECODE_MIN_SEGMENT;
    let qkv = LoraLayout::new(nz(8), nz(16), 4096, 3, vec![slice("q", 4096, 0), slice("k", 1024, 1), slice("v", 1024, 2)], None).unwrap();
    let batches = [(8, 1), (8, DECODE_MIN_SEGMENT - 1), (1, DECODE_MIN_SEGMENT), (8, 16), (1, 128), (8, 512)];
    let (chosen, launches) = record_launches(&h100_properties(), |rec| {
        let bf16 = batches.map(|(segments, longest)| ExpandKernel::choose::<RecordingRuntime, half::bf16>(rec, &qkv, segments, longest));
        let f32 = batches.map(|(segments, longest)| ExpandKernel::choose::<RecordingRuntime, f32>(rec, &qkv, segments, longest));
        (bf16, f32)
    })
    .unwrap();
    assert!(launches.is_empty());
    let (bf16, f32) = chosen;
    for ((segments, longest), kernel) in batches.iter().zip(bf16) {
        let what = format!("{segments} segments of up to {longest} tokens: {kernel:?}");
        match kernel {
            ExpandKernel::Scalar(_) => assert!(*longest < DECODE_MIN_SEGMENT, "{what}"),
            ExpandKernel::Mma { config, .. } if *longest < 512 => {
                assert!(*longest >= DECODE_MIN_SEGMENT && config.tensor_cores(), "{what}");
                assert_eq!((config.m_frags, config.n_frags, config.stages, config.a_splits), (1, 8, 1, 1), "{what}");
            }
            // 256 16-token tiles fill the H100's 132 multiprocessors: the prefill tile.
            ExpandKernel::Mma { config, .. } => assert!(config.tensor_cores() && config.stages > 1, "{what}"),
        }
    }
    assert!(f32.iter().all(|k| matches!(k, ExpandKernel::Scalar(_))), "f32: {f32:?}");
}

/// The expand a programmatically launched bf16 pair gets on an H100 (derived offline): below
/// `DECODE_MIN_SEGMENT` tokens, from `PROGRAMMATIC_DECODE_MIN_SEGMENT` on, the decode
/// tensor-core tile summing the split-K copies, at rank 64 and only on a grid of few cubes
/// (qkv: 8 × 48, MLA: 8 × 17; gate_up's 8 × 224 is too many); rank 16, shorter segments and
/// a plain launch keep the CUDA-core kernel (run 99).
#[test]
fn programmatic_expand_choice_follows_rank_and_grid() {
    use lorac_runtime::cuda_graph::{RecordingRuntime, record_launches};
    use lorac_runtime::cuda_source::h100_properties;
    use lorac_runtime::expand_mma::PROGRAMMATIC_DECODE_MIN_SEGMENT;
    let layout = |rank: u32, k: u32, widths: &[u32]| {
        let slices = widths.iter().zip(0..).map(|(w, g)| slice(&format!("s{g}"), *w, g)).collect();
        LoraLayout::new(nz(8), nz(rank), k, widths.len() as u32, slices, None).unwrap()
    };
    let qkv = |rank| layout(rank, 4096, &[4096, 1024, 1024]);
    let (mla, gate_up) = (layout(64, 7168, &[1536, 576]), layout(64, 4096, &[14336, 14336]));
    let short = PROGRAMMATIC_DECODE_MIN_SEGMENT;
    let cases = [
        (qkv(64), short, LaunchMode::Programmatic, true),
        (mla.clone(), short, LaunchMode::Programmatic, true),
        (qkv(64), short, LaunchMode::Plain, false),
        (qkv(64), short - 1, LaunchMode::Programmatic, false),
        (qkv(16), short, LaunchMode::Programmatic, false),
        (gate_up, short, LaunchMode::Programmatic, false),
    ];
    let (chosen, launches) = record_launches(&h100_properties(), |rec| {
        cases.clone().map(|(layout, longest, launch, _)| {
            ExpandKernel::choose_summing_for::<RecordingRuntime, half::bf16>(rec, &layout, 8, longest, SPLIT_K_COPIES, launch)
        })
    })
    .unwrap();
    assert!(launches.is_empty());
    for ((layout, longest, launch, tensor_cores), kernel) in cases.iter().zip(chosen) {
        let what =
            format!("rank {}, {} columns, 8 segments of {longest}, {launch:?}: {kernel:?}", layout.max_rank(), layout.out_features());
        assert_eq!(kernel.intermediate_copies(), SPLIT_K_COPIES, "{what}");
        match kernel {
            ExpandKernel::Mma { config, .. } => {
                assert!(*tensor_cores, "{what}");
                assert_eq!((config.m_frags, config.n_frags, config.stages), (1, 8, 1), "{what}");
            }
            ExpandKernel::Scalar(_) => assert!(!tensor_cores, "{what}"),
        }
    }
}

/// Offline, on an H100's properties: the room a caller sizes by `ShrinkKernel::intermediate_len`
/// holds the copies of a K-split shrink for the batches that take one (decode: at most 16
/// tokens per multiprocessor; the wide prefill tile: fewer 64-token tiles than three quarters
/// of the multiprocessors), and `choose_for_room` splits K only where the room holds every copy.
#[test]
fn split_k_shrink_follows_the_room() {
    use lorac_runtime::cuda_graph::{RecordingRuntime, record_launches};
    use lorac_runtime::cuda_source::h100_properties;
    let qkv = |rank: u32| {
        let slices = vec![slice("q", 4096, 0), slice("k", 1024, 1), slice("v", 1024, 2)];
        LoraLayout::new(nz(8), nz(rank), 4096, 3, slices, None).unwrap()
    };
    let (wide, narrow) = (qkv(64), qkv(16));
    // K = 768: four shares of 192, which neither 128- nor 256-wide chunks divide.
    let odd_k = LoraLayout::new(nz(8), nz(64), 768, 3, vec![slice("q", 768, 0), slice("k", 256, 1), slice("v", 256, 2)], None).unwrap();
    let max_split_tokens = MmaShrinkConfig::split_k_max_tokens(&h100_properties()) as usize;
    assert_eq!(max_split_tokens, 16 * 132);
    let ((), launches) = record_launches(&h100_properties(), |rec| {
        let len = |layout: &LoraLayout, tokens: usize, bf16: bool| {
            if bf16 {
                ShrinkKernel::intermediate_len::<RecordingRuntime, half::bf16>(rec, layout, tokens)
            } else {
                ShrinkKernel::intermediate_len::<RecordingRuntime, f32>(rec, layout, tokens)
            }
        };
        // (tokens, bf16) → floats: four copies of qkv in bf16 up to 2112 tokens, one beyond (rank
        // 64: 192 rows, rank 16: 48); a K without four 128-wide shares and f32 (no tensor cores)
        // never split.
        assert_eq!(len(&wide, 128, true), 4 * 128 * 192);
        assert_eq!(len(&wide, 8192, true), (8192 + 3 * max_split_tokens) * 192);
        assert_eq!(len(&narrow, 128, true), 4 * 128 * 48);
        // K = 768 has no four 128-wide shares, but two of six 64-wide chunks: room for the
        // wide prefill tile's two copies.
        assert_eq!(len(&odd_k, 128, true), WIDE_SPLIT_COPIES as usize * 128 * 192);
        assert_eq!(len(&odd_k, 8192, true), WIDE_SPLIT_COPIES as usize * 6336 * 192);
        assert_eq!(len(&wide, 128, false), 128 * 192);
        let copies = |segments: usize, longest: u32, tokens: u32, room_copies: usize| {
            let room = room_copies * tokens as usize * 192;
            ShrinkKernel::choose_for_room::<RecordingRuntime, half::bf16>(rec, &wide, segments, longest, tokens, room).intermediate_copies()
        };
        // 8 segments of 16 tokens: split in four where the room holds four copies, else whole.
        assert_eq!(copies(8, 16, 128, 4), SPLIT_K_COPIES);
        assert_eq!(copies(8, 16, 128, 100), SPLIT_K_COPIES);
        assert_eq!(copies(8, 16, 128, 3), 1);
        assert_eq!(copies(8, 16, 128, 1), 1);
        // Decode (one token per segment) never splits.
        assert_eq!(copies(8, 1, 8, 4), 1);
        // Prefill, rank 64, 8 segments of 512 tokens: the wide tile (64 tokens by every A row,
        // 64 cubes unsplit, K split in two) stages 67 MB less than the blocked one for qkv,
        // more than the 50 MB its second copy adds to the expand's reads: two copies.
        assert_eq!(copies(8, 512, 4096, 4), WIDE_SPLIT_COPIES);
        let prefill = |layout: &LoraLayout, segments: usize, longest: u32, room_copies: usize| {
            let tokens = segments as u32 * longest;
            let room = room_copies * tokens as usize * layout.intermediate_width() as usize;
            ShrinkKernel::choose_for_room::<RecordingRuntime, half::bf16>(rec, layout, segments, longest, tokens, room)
        };
        // MLA's fused q_a / kv_a projection (128 A rows, 17 expand column blocks): 59 MB
        // saved for 18 MB, so the wide tile where the room holds both copies, with four K
        // groups (16 warps).
        let mla = LoraLayout::new(nz(8), nz(64), 7168, 2, vec![slice("q_a", 1536, 0), slice("kv_a", 576, 1)], None).unwrap();
        match prefill(&mla, 8, 512, 2) {
            ShrinkKernel::Mma { config, .. } => {
                let tile = (config.m_frags, config.n_frags, config.warp_m, config.warp_n, config.k_groups, config.k_chunk, config.stages);
                assert_eq!((tile, config.k_splits), ((4, 8, 2, 4, 4, 64, 3), WIDE_SPLIT_COPIES));
            }
            other => panic!("MLA prefill took {other:?}"),
        }
        assert_eq!(prefill(&mla, 8, 512, 1).intermediate_copies(), 1);
        // With room for four copies, the tall wide tile (128 tokens, 4×4-fragment warp blocks,
        // two K groups, three stages: its first group stores from registers, so the
        // accumulator tile holds one group's partial sums): 118 MB saved for 53 MB.
        match prefill(&mla, 8, 512, 4) {
            ShrinkKernel::Mma { config, .. } => {
                let tile = (config.m_frags, config.n_frags, config.warp_m, config.warp_n, config.k_groups, config.k_chunk, config.stages);
                assert_eq!((tile, config.k_splits), ((8, 8, 4, 4, 2, 64, 3), TALL_SPLIT_COPIES));
                assert!(config.stores_from_registers());
                assert_eq!(config.shared_bytes_per_cube::<half::bf16>(), 3 * 2 * 128 * 72 * 2 + 128 * 128 * 4);
            }
            other => panic!("MLA prefill took {other:?}"),
        }
        // qkv's tall tile (12 row fragments: 12 warps of 4×4-fragment blocks) would need more
        // registers than a multiprocessor has: the 64-token one however large the room.
        assert_eq!(MmaShrinkConfig::tall_split_layout::<half::bf16>(rec.properties(), &wide), None);
        assert_eq!(copies(8, 512, 4096, 8), WIDE_SPLIT_COPIES);
        assert_eq!(
            ShrinkKernel::intermediate_len::<RecordingRuntime, half::bf16>(rec, &mla, 4096),
            TALL_SPLIT_COPIES as usize * 4096 * 128
        );
        // Its expand, one copy or adding the two up, runs 16-token tiles multiplied by hand (up
        // to rank 64 the B fragments stay in registers), in two stages, or three reading the
        // token rows a tile ahead when it adds up the wide tile's two copies; at rank 16 on
        // cooperative matrices in three.
        let expand_config =
            |layout: &LoraLayout, copies| match ExpandKernel::choose_summing::<RecordingRuntime, half::bf16>(rec, layout, 8, 512, copies) {
                ExpandKernel::Mma { config, .. } => config,
                other => panic!("prefill expand took {other:?}"),
            };
        let expand_tile = |layout: &LoraLayout, copies| {
            let config = expand_config(layout, copies);
            (config.m_frags, config.n_frags, config.stages, config.a_splits, config.fragments)
        };
        assert_eq!((expand_tile(&mla, 1), expand_tile(&mla, 2)), ((1, 8, 2, 1, Fragments::Ldmatrix), (1, 8, 3, 2, Fragments::Ldmatrix)));
        assert_eq!((expand_tile(&mla, 4), expand_tile(&wide, 2)), ((1, 8, 2, 4, Fragments::Ldmatrix), (1, 8, 3, 2, Fragments::Ldmatrix)));
        assert_eq!([1, 2, 4].map(|copies| expand_config(&mla, copies).prefetches_rows()), [false, true, false]);
        assert_eq!(expand_tile(&narrow, 1), (1, 8, 3, 1, Fragments::Cmma));
        // The by-hand tiles' token splits (five cubes per multiprocessor): MLA's 136 column
        // blocks of segments in four, one wave of 8 tiles each; qkv's 384 in three.
        let token_splits = |layout: &LoraLayout, copies| expand_config(layout, copies).token_splits(rec.properties(), layout, 8, 512, 0);
        assert_eq!((token_splits(&mla, 1), token_splits(&mla, 2), token_splits(&mla, 4)), (4, 4, 4));
        assert_eq!((token_splits(&wide, 1), token_splits(&wide, 2)), (3, 3));
        // 8 segments of 1024 (128 cubes unsplit) keep the blocked tile, and so do gate_up
        // (224 column blocks: 235 MB of copy reads for 34 MB saved) and rank 16 (no 64-row
        // blocks).
        assert_eq!(prefill(&mla, 8, 1024, 2).intermediate_copies(), 1);
        let gate_up = LoraLayout::new(nz(8), nz(64), 4096, 2, vec![slice("gate", 14336, 0), slice("up", 14336, 1)], None).unwrap();
        assert_eq!(prefill(&gate_up, 8, 512, 2).intermediate_copies(), 1);
        assert_eq!(prefill(&narrow, 8, 512, 4).intermediate_copies(), 1);
        // 8 segments of 4 tokens: split only for a programmatic launch.
        let splits =
            |launch| match ShrinkKernel::choose_within_for::<RecordingRuntime, half::bf16>(rec, &wide, 8, 4, SPLIT_K_COPIES, launch) {
                ShrinkKernel::Mma { config, .. } => config.k_splits,
                ShrinkKernel::Scalar(_) => 1,
            };
        assert_eq!((splits(LaunchMode::Plain), splits(LaunchMode::Programmatic)), (1, SPLIT_K_COPIES));
        assert_eq!(copies(8, 4, 32, 4), 1);
    })
    .unwrap();
    assert!(launches.is_empty());
}

/// The number of buffer parameters of `entry` in `source`, and the size in bytes of its
/// `info_st` grid-constant parameter (0 when it takes none), from the struct's fields.
fn entry_point_parameters(source: &str, entry: &str) -> (usize, usize) {
    let start = source.find(&format!("{entry} (")).unwrap_or_else(|| panic!("no entry point {entry} in\n{source}"));
    let params = &source[start + entry.len() + 2..];
    let params = &params[..params.find(')').expect("parameter list")];
    let buffers = params.split(',').filter(|p| p.contains("buffer_")).count();
    if !params.contains("info_st info") {
        return (buffers, 0);
    }
    let body = &source[source.find("struct info_st {").expect("info_st") + "struct info_st {".len()..];
    let body = &body[..body.find("};").expect("end of info_st")];
    let info_bytes = body
        .split(';')
        .filter(|field| !field.trim().is_empty())
        .map(|field| {
            let field = field.trim();
            let width = match field.split_whitespace().next() {
                Some("uint32" | "int32" | "float") => 4,
                Some("uint64" | "int64" | "double") => 8,
                other => panic!("info_st field type {other:?} in {field}"),
            };
            let count = field.split('[').nth(1).map_or(1, |n| n.trim_end_matches(']').parse::<usize>().expect("array length"));
            width * count
        })
        .sum();
    (buffers, info_bytes)
}

/// Shrink and expand (and the fused kernel) recorded, captured into one CUDA graph and replayed
/// twice: y must hold y0 plus twice the reference delta. The graph runs the kernels on its own
/// stream, with the addresses and `info` blocks it resolved at capture.
#[cfg(feature = "cuda-tests")]
fn cuda_graph_decode<F: StorageElem>() {
    use cubecl::cuda::CudaRuntime;
    use lorac_runtime::cuda_graph::{GraphBuilder, record_launches};
    let device = Default::default();
    let client = CudaRuntime::client(&device);
    let mut builder = GraphBuilder::new(&device).unwrap();
    for seed in 0..CASES {
        let rng = &mut Rng::new(2000 + seed);
        let (layout, family) = random_layout(rng, None);
        let what = format!("graph {family} seed {seed} {layout:?}");
        let adapters = Adapters::<F>::random(&client, rng, &layout);
        let tokens = rng.pick(&[1, 3, 8, 33]);
        let segs = random_segments(rng, tokens, layout.slots());
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let a64 = adapters.reference_shrink(&layout, &segs, &x64, tokens);
        let delta = adapters.reference_expand(&layout, &segs, &a64, tokens);
        let twice: Vec<f64> = delta.iter().map(|d| 2.0 * d).collect();
        let (y0, y064) = initial_y::<F>(rng, &delta);
        let (dev_segs, x) = (segs.upload(&client), DeviceBuffer::upload(&client, &x));
        let mut a = poisoned_intermediate(&client, &layout, tokens as usize);
        let (mut y_pair, mut y_fused) = (DeviceBuffer::upload(&client, &y0), DeviceBuffer::upload(&client, &y0));
        let (launched, launches) = record_launches(client.properties(), |rec| {
            launch_shrink(rec, &layout, &adapters.pool, &dev_segs, &x, &mut a, None)?;
            launch_expand(rec, &layout, &adapters.pool, &dev_segs, &a, &mut y_pair, None)?;
            launch_fused(rec, &layout, &adapters.pool, &dev_segs, &x, &mut y_fused, None)
        })
        .unwrap();
        launched.unwrap();
        // Odd seeds: every kernel a programmatic dependent of the one before (sm_90+).
        let programmatic = seed % 2 == 1 && builder.set_programmatic_launch(true).is_ok();
        builder.set_programmatic_launch(programmatic).unwrap();
        let what = format!("{what} programmatic {programmatic}");
        let graph = builder.capture(&client, &launches).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(graph.kernels(), 3, "{what}");
        graph.replay().unwrap();
        graph.replay().unwrap();
        builder.synchronize().unwrap();
        let (out, touched) = (layout.out_features() as usize, adapters.touched(&segs));
        check_y(&format!("{what} shrink+expand"), &y_pair.read(&client), &y064, &twice, &touched, out, 2.0 * F::TOLERANCE);
        check_y(&format!("{what} fused"), &y_fused.read(&client), &y064, &twice, &touched, out, 4.0 * F::TOLERANCE);
    }
}

/// Two layers chained through y in one graph of programmatic launches: shrink(x) → expand into
/// y1 → shrink(y1) → expand into y2. The second shrink loads its A before its grid dependency
/// point and x (here y1, the expand's output) after it: read any earlier and y2 would be the
/// delta of y1's old values. Runs the CUDA-core and both tensor-core shrinks.
#[cfg(feature = "cuda-tests")]
fn cuda_graph_decode_chain<F: StorageElem>() {
    use cubecl::cuda::CudaRuntime;
    use lorac_runtime::cuda_graph::{GraphBuilder, record_launches};
    let device = Default::default();
    let client = CudaRuntime::client(&device);
    let mut builder = GraphBuilder::new(&device).unwrap();
    if builder.set_programmatic_launch(true).is_err() {
        eprintln!("programmatic dependent launch needs sm_90: chain test skipped");
        return;
    }
    for seed in 0..CASES {
        let rng = &mut Rng::new(2100 + seed);
        let width = rng.pick(&[256, 1024, 4096]);
        let layout = LoraLayout::new(nz(rng.range(1, 8)), nz(rng.pick(&[8, 16, 64])), width, 1, vec![slice("o", width, 0)], None).unwrap();
        let tokens = rng.pick(&[1, 8, 33]);
        let adapters = Adapters::<F>::random(&client, rng, &layout);
        let segs = random_segments(rng, tokens, layout.slots());
        // A third of the seeds each: the default expand, the register-staged tensor-core one
        // (where the rank allows) and the CUDA-core one; both stage B before their grid
        // dependency points.
        let chosen = ExpandKernel::choose::<CudaRuntime, F>(&client, &layout, segs.num_segments(), segs.max_segment_len());
        let expand = match seed % 3 {
            1 => MmaExpandConfig::with_tile::<F>(client.properties(), &layout, 1, 4)
                .map(|config| ExpandKernel::Mma { config, token_splits: 0 }),
            2 => {
                Some(ExpandKernel::Scalar(ExpandConfig::new(&client, &layout, size_of::<F>(), segs.num_segments(), segs.max_segment_len())))
            }
            _ => None,
        }
        .unwrap_or(chosen);
        // Independently, a third of the seeds each: the default shrink, the register-staged
        // tensor-core one and the one staged through shared memory (where the rank allows);
        // each loads (or issues the copies of) its first A before its grid dependency point.
        let mma_shrink = MmaShrinkConfig::with_tile::<F>(client.properties(), &layout, 1, 1);
        let shrink = match seed / 3 % 3 {
            1 => mma_shrink,
            2 => mma_shrink.and_then(|config| config.with_stages::<F>(client.properties(), 3)),
            _ => None,
        }
        .map(|config| ShrinkKernel::Mma { config, tiles_per_segment: 0 });
        let what = format!("chain seed {seed} T={tokens} {layout:?} {shrink:?} {expand:?}");
        let (x, x64) = random_x::<F>(rng, &layout, tokens as usize);
        let delta1 = adapters.reference_expand(&layout, &segs, &adapters.reference_shrink(&layout, &segs, &x64, tokens), tokens);
        let (y1_0, y1_064) = initial_y::<F>(rng, &delta1);
        // y2 starts at the size of layer 2's delta (from y1 in f64), which dwarfs layer 1's.
        let y1_exact: Vec<f64> = y1_064.iter().zip(&delta1).map(|(y, d)| y + d).collect();
        let delta2_size = adapters.reference_expand(&layout, &segs, &adapters.reference_shrink(&layout, &segs, &y1_exact, tokens), tokens);
        let (y2_0, y2_064) = initial_y::<F>(rng, &delta2_size);
        let (dev_segs, x) = (segs.upload(&client), DeviceBuffer::upload(&client, &x));
        let [mut a1, mut a2, mut a3] = [(); 3].map(|_| poisoned_intermediate(&client, &layout, tokens as usize));
        let (mut y1, mut y2) = (DeviceBuffer::upload(&client, &y1_0), DeviceBuffer::upload(&client, &y2_0));
        // Each expand reads its y before its wait (the kernel just before, its shrink, does
        // not write y). Layer 3 adds layer 1's delta to y2 once more: its expand's y was
        // written by the kernel two before it, layer 2's expand, which must have finished.
        let (launched, launches) = record_launches(client.properties(), |rec| {
            launch_shrink(rec, &layout, &adapters.pool, &dev_segs, &x, &mut a1, shrink)?;
            launch_pair_expand(rec, &layout, &adapters.pool, &dev_segs, &a1, &mut y1, Some(expand))?;
            launch_shrink(rec, &layout, &adapters.pool, &dev_segs, &y1, &mut a2, shrink)?;
            launch_pair_expand(rec, &layout, &adapters.pool, &dev_segs, &a2, &mut y2, Some(expand))?;
            launch_shrink(rec, &layout, &adapters.pool, &dev_segs, &x, &mut a3, shrink)?;
            launch_pair_expand(rec, &layout, &adapters.pool, &dev_segs, &a3, &mut y2, Some(expand))
        })
        .unwrap();
        launched.unwrap();
        let graph = builder.capture(&client, &launches).unwrap_or_else(|e| panic!("{what}: {e}"));
        graph.replay().unwrap();
        builder.synchronize().unwrap();
        let touched = adapters.touched(&segs);
        let y1_out = y1.read(&client);
        // The tensor-core expand rounds scale·a to the storage type before its MMAs (as PEFT's
        // bf16 forward does): one more rounding per term, which the element-wise bound at one
        // tolerance does not always cover (runs 67–68: seeds 0 and 11 crossed it by 3–4%,
        // exactly where the f64 reference with that rounding lands).
        let tol = if matches!(expand, ExpandKernel::Mma { .. }) { 2.0 * F::TOLERANCE } else { F::TOLERANCE };
        check_y(&format!("{what} layer 1"), &y1_out, &y1_064, &delta1, &touched, width as usize, tol);
        // Layer 2's reference reads layer 1's output as the device stored it.
        let y1_64: Vec<f64> = y1_out.iter().map(|v| v.as_f64()).collect();
        let delta2 = adapters.reference_expand(&layout, &segs, &adapters.reference_shrink(&layout, &segs, &y1_64, tokens), tokens);
        let delta23: Vec<f64> = delta2.iter().zip(&delta1).map(|(d2, d3)| d2 + d3).collect();
        check_y(&format!("{what} layers 2 and 3"), &y2.read(&client), &y2_064, &delta23, &touched, width as usize, tol);
    }
}

#[cfg(feature = "cuda-tests")]
#[test]
fn cuda_graph_decode_chain_f32() {
    cuda_graph_decode_chain::<f32>();
}

#[cfg(feature = "cuda-tests")]
#[test]
fn cuda_graph_decode_chain_bf16() {
    cuda_graph_decode_chain::<half::bf16>();
}

#[cfg(feature = "cuda-tests")]
#[test]
fn cuda_graph_decode_f32() {
    cuda_graph_decode::<f32>();
}

#[cfg(feature = "cuda-tests")]
#[test]
fn cuda_graph_decode_bf16() {
    cuda_graph_decode::<half::bf16>();
}
