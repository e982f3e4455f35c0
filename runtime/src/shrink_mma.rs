//! Tensor-core variant of the segmented shrink, for long segments (prefill) in bf16/f16.
//!
//! The scalar shrink spends most of a prefill in FMAs (T·c·R·K of them), so here each cube
//! takes a tile of `16·m_frags` tokens of one segment and `16·n_frags` of the `c·R` A rows of
//! its slot (grid z covers the rest). Each warp computes a block of `warp_m` × `warp_n` 16×16
//! output fragments, with `k_groups` warps per block, each with f32 accumulators over its
//! share of every K chunk (summed when the tile is stored). A tile has few fragments (qkv at
//! R = 16: six), so one warp per fragment left each scheduler with one or two warps and the
//! kernel bound by instruction latency (H100 ncu: 1.5 active warps per scheduler, an
//! instruction every 5 cycles, 22% of DRAM bandwidth): hence the K groups. Blocks of several
//! fragments reuse each operand fragment loaded from shared memory (1×1: two loads per MMA;
//! 2×2: one), for the larger tiles that cut how often A is re-read across token tiles.
//!
//! Per K chunk the tile's x rows (gathered through the token permutation) and its A rows are
//! staged in shared memory; every MMA operand comes from there, so no warp waits on a global
//! load between MMAs. On CUDA the operands are loaded with `ldmatrix` and multiplied with
//! m16n8k16 MMAs on hand-managed registers ([`crate::mma_fragments`]), except in the blocked
//! rank-64 prefill tile, which measured faster on cooperative matrices (`wmma`). This file's
//! kernel stages through registers, the next chunk's loads issued before the current chunk's
//! MMAs; [`crate::shrink_mma_pipelined`] copies
//! asynchronously into 2–4 stages and is the default where the device has `cp.async`. x is
//! read from memory once per row block, A once per token tile (the L2 serves the repeats).
//! Rows past the slot's rank are neither loaded nor computed where a whole fragment lies past
//! it; partial fragments compute their padding columns and drop them when stored. Same
//! contract and reference as [`crate::shrink`], except with K splits
//! ([`MmaShrinkConfig::k_splits`], for decode batches too small to fill the GPU with token
//! tiles): the intermediate then holds one copy of partial sums per split, which the expand
//! adds up.

use cubecl::ir::DeviceProperties;
use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::NO_SLOT;
use crate::cuda_graph::grid_dependency_point;
use crate::mma_fragments::{self, Fragments, Registers, cmma_supported};

/// M, N and K of one MMA.
pub(crate) const TILE: u32 = 16;

/// Most shared memory the default K chunk stages (x and A tiles; the per-warp accumulators
/// come on top). In the H100 sweep (runtime/BENCHMARKS.md, run 11) 256-wide chunks were best
/// for the 32-token × 32–48-row tiles of rank 16, and 128-wide ones for the 64-row tiles of
/// rank 64, where a 256-wide chunk (50 KB) was 3–17% slower. (cubecl's CUDA runtime raises a
/// kernel's dynamic shared-memory limit to what it declares, so a cube may pass the 48 KiB
/// static limit; `with_tile_chunk` checks the device's maximum.)
const STAGED_BUDGET: u32 = 48 * 1024;

/// K splits of the default decode tile with K splits ([`MmaShrinkConfig::split_k_for`]): each
/// split is one more copy of the intermediate for every expand cube to read, and more than
/// four cost the wide expands (gate_up) more than the shrink saved (H100, run 52).
pub const SPLIT_K_COPIES: u32 = 4;

/// K splits of the wide prefill tile ([`MmaShrinkConfig::wide_split_for`]).
pub const WIDE_SPLIT_COPIES: u32 = 2;

/// K splits of the tall wide prefill tile, 128 tokens by every A row
/// ([`MmaShrinkConfig::tall_split_layout`]): half the token tiles of the wide one, so each
/// split needs twice the cubes to fill the GPU.
pub const TALL_SPLIT_COPIES: u32 = 4;

/// Fewest fragments in a tile with several K groups whose first group stores from registers
/// ([`MmaShrinkConfig::stores_from_registers`]): there the accumulator tile shrinks by a
/// group, 16 KiB or more. H100, T = 4096 in 8 segments, rank 64, from graphs
/// (runtime/BENCHMARKS.md, runs 141–148): MLA's tall tile (64 fragments, two groups) fits
/// three stages and its shrink went from 45.8–46.9 to 43.2–43.4 µs; qkv's wide tile (48
/// fragments, two groups, three stages as before) from 42.2–42.3 to 39.8–40.1. The decode
/// tiles with K split (1–4 fragments, four groups, at most 4 KiB of accumulator tile to
/// save) gain no stage from it; with it they were level but for gate_up R=64 T=32, 5%
/// slower in one round, a case that swung 5% the other way between identical kernels in the
/// next. They keep storing through the tile, with all the cube's threads.
const REGISTER_STORE_MIN_FRAGMENTS: u32 = 16;

/// Registers per thread ptxas gives the tall wide tile's kernel, whose 4×4-fragment warp
/// blocks hold 128 f32 accumulators per thread: MLA R=64, 184 in two stages (H100 ncu, run
/// 138), 196 in three (offline, `nvrtc_check.py`). The register file holds eight of its
/// warps, so a row block needing more does not take the tall tile.
const TALL_TILE_REGISTERS: u32 = 196;

/// Most A-row fragments in the wide prefill tile's row block.
const WIDE_MAX_ROW_FRAGS: u32 = 12;

/// Fewest tokens in a batch's longest segment for which a pair launched programmatically
/// splits K ([`MmaShrinkConfig::split_k_for_launch`]).
const PROGRAMMATIC_SPLIT_MIN_SEGMENT: u32 = 4;

/// How a shrink/expand pair is launched, where the best kernel depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchMode {
    /// Each kernel starts after the one before has finished: cubecl launches, or a CUDA
    /// graph captured plainly.
    #[default]
    Plain,
    /// Programmatic dependent launch (`cuda_graph::GraphBuilder::set_programmatic_launch`):
    /// each kernel starts while the one before runs and waits at its grid dependency point.
    Programmatic,
}

/// Most warps in one shrink cube (fragments × K groups): 1024 threads.
const MAX_SHRINK_WARPS: u32 = 32;

/// The default tiles split K until a cube has at least this many warps (four per scheduler).
const MIN_SHRINK_WARPS: u32 = 16;

/// Bytes the default pipelined tiles keep in flight per cube: enough stages that the chunks
/// issued ahead hold at least this much. In the H100 sweep (run 12) that meant two stages of
/// the 34–42 KB rank-16 chunks and three of the 26 KB rank-64 ones, the best or within 4% of
/// the best depth in five of six prefill cases (gate_up R = 64: within 10%).
const IN_FLIGHT_TARGET: u32 = 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaShrinkConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// 16-token fragments per cube: its token tile is `16·m_frags` tokens of one segment.
    pub m_frags: u32,
    /// 16-row A fragments per cube; divides `groups·max_rank/16` (grid z covers the rest).
    pub n_frags: u32,
    /// 16×16 output fragments each warp computes, along the tokens (`warp_m`) and the A rows
    /// (`warp_n`): per 16-wide K step a warp loads `warp_m + warp_n` operand fragments from
    /// shared memory for `warp_m·warp_n` MMAs (1×1: two loads per MMA).
    pub warp_m: u32,
    pub warp_n: u32,
    /// Warps per warp block; each takes a contiguous `1/k_groups` of every K chunk.
    pub k_groups: u32,
    /// K elements staged per round (divides `in_features`, multiple of 16).
    pub k_chunk: u32,
    /// Vector width of the staging loads of x and A.
    pub vector: u32,
    /// How the fragments are multiplied: by hand (`ldmatrix`, m16n8k16 MMAs) where the device
    /// has it, else on cooperative matrices, else emulated (wgpu: never chosen by
    /// [`Self::supported`], but it runs the kernels' tiling, staging and stores where CI can
    /// test them, on lavapipe).
    pub fragments: Fragments,
    /// 1: each chunk's loads go through registers, one chunk ahead ([`shrink_mma_kernel`]).
    /// 2–4: asynchronous copies into that many shared-memory stages, `stages − 1` chunks
    /// ahead ([`crate::shrink_mma_pipelined`]); see [`Self::with_stages`].
    pub stages: u32,
    /// Cubes along K (grid z, times the row blocks): each sums `1/k_splits` of the inputs and
    /// writes its partial sums to its own copy of the intermediate, which is then
    /// `[k_splits, tokens, c·R]` and which the expand adds up (`ExpandConfig::a_splits`).
    /// 1: one copy holding the full sums. A decode batch has a 16-token tile or two per
    /// segment: without K splits its grid would hold a few dozen cubes; see
    /// [`Self::with_k_splits`].
    pub k_splits: u32,
}

/// A cube's tile of 16×16 output fragments (`m_frags` along the tokens, `n_frags` along the
/// A rows) and the block of them each warp computes (`warp_m` × `warp_n`, dividing the tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShrinkTile {
    pub m_frags: u32,
    pub n_frags: u32,
    pub warp_m: u32,
    pub warp_n: u32,
}

impl ShrinkTile {
    /// A `16·m_frags`-token × `16·n_frags`-row tile, one fragment per warp.
    pub fn new(m_frags: u32, n_frags: u32) -> Self {
        ShrinkTile { m_frags, n_frags, warp_m: 1, warp_n: 1 }
    }

    /// This tile with `warp_m` × `warp_n` fragments per warp.
    pub fn with_warps(self, warp_m: u32, warp_n: u32) -> Self {
        ShrinkTile { warp_m, warp_n, ..self }
    }

    /// Warps per K group: the tile's warp blocks (0 where the warp block does not divide it).
    fn warp_blocks(&self) -> u32 {
        if self.warp_m == 0 || self.warp_n == 0 || !self.m_frags.is_multiple_of(self.warp_m) || !self.n_frags.is_multiple_of(self.warp_n) {
            return 0;
        }
        (self.m_frags / self.warp_m) * (self.n_frags / self.warp_n)
    }
}

impl MmaShrinkConfig {
    /// The configuration for a `16·m_frags`-token × `16·n_frags`-row cube tile with one
    /// fragment per warp, the default K groups (the fewest giving [`MIN_SHRINK_WARPS`]
    /// warps), the largest K chunk that fits the staging budget and, where the device has
    /// asynchronous copies, the pipelined kernel with enough stages for [`IN_FLIGHT_TARGET`];
    /// `None` where the tile does not apply (see [`Self::with_tile_chunk`]).
    pub fn with_tile<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, m_frags: u32, n_frags: u32) -> Option<Self> {
        let tile = ShrinkTile::new(m_frags, n_frags);
        let blocks = tile.warp_blocks();
        let k_groups = [1, 2, 4].into_iter().find(|g| blocks * g >= MIN_SHRINK_WARPS || blocks * g * 2 > MAX_SHRINK_WARPS).unwrap_or(1);
        let config = Self::with_tile_groups::<F>(device, layout, tile, k_groups)?;
        let staged = Self::staged_bytes(m_frags, n_frags, config.k_chunk, size_of::<F>() as u32);
        let stages = (1 + IN_FLIGHT_TARGET.div_ceil(staged)).clamp(2, 4);
        Some(config.with_stages::<F>(device, stages).unwrap_or(config))
    }

    /// [`Self::with_tile`] for `tile` with `k_groups` warps per warp block, staged through
    /// registers.
    pub fn with_tile_groups<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        tile: ShrinkTile,
        k_groups: u32,
    ) -> Option<Self> {
        let elem = size_of::<F>() as u32;
        [256, 128, 64, 32, 16]
            .into_iter()
            .filter(|kc| Self::staged_bytes(tile.m_frags, tile.n_frags, *kc, elem) <= STAGED_BUDGET)
            .find_map(|kc| Self::with_tile_chunk::<F>(device, layout, tile, kc, k_groups))
    }

    /// The configuration for `tile` staging `k_chunk` input columns per round, with `k_groups`
    /// warps per warp block (on tensor cores where the device has a 16×16×16 MMA with f32
    /// accumulation for this storage type), or `None` where it does not apply: a rank or input
    /// width that is not a multiple of 16, `n_frags` not dividing the row fragments, a warp block not dividing the
    /// tile, more than [`MAX_SHRINK_WARPS`] warps, a chunk that does not divide the input width
    /// or whose 16-wide steps `k_groups` does not divide, more than 16 staged vectors per
    /// thread, or more shared memory than the device gives a cube.
    pub fn with_tile_chunk<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        tile: ShrinkTile,
        k_chunk: u32,
        k_groups: u32,
    ) -> Option<Self> {
        let ShrinkTile { m_frags, n_frags, warp_m, warp_n } = tile;
        if layout.max_rank() % TILE != 0 || layout.in_features() % TILE != 0 {
            return None;
        }
        let row_frags = layout.intermediate_width() / TILE;
        let warps = tile.warp_blocks() * k_groups;
        if m_frags == 0 || n_frags == 0 || row_frags % n_frags != 0 || warps == 0 || warps > MAX_SHRINK_WARPS {
            return None;
        }
        if k_chunk == 0 || k_chunk % TILE != 0 || layout.in_features() % k_chunk != 0 || (k_chunk / TILE) % k_groups != 0 {
            return None;
        }
        let elem = size_of::<F>() as u32;
        let vector = crate::config::vector_size(device, elem as usize, &[k_chunk]) as u32;
        let staged = ((m_frags + n_frags) * TILE * k_chunk / vector).div_ceil(warps * 32);
        if staged > 16 {
            return None;
        }
        let config = MmaShrinkConfig {
            groups: layout.groups(),
            max_rank: layout.max_rank(),
            m_frags,
            n_frags,
            warp_m,
            warp_n,
            k_groups,
            k_chunk,
            vector,
            fragments: Fragments::best_for::<F>(device),
            stages: 1,
            k_splits: 1,
        };
        (config.shared_bytes_per_cube::<F>() <= device.hardware.max_shared_memory_size as u32).then_some(config)
    }

    /// This tile with its fragments multiplied `fragments`' way, or `None` where the device
    /// does not have it for `F`.
    pub fn with_fragments<F: CubePrimitive>(self, device: &DeviceProperties, fragments: Fragments) -> Option<Self> {
        fragments.available_on::<F>(device).then_some(MmaShrinkConfig { fragments, ..self })
    }

    /// The cube's tile and warp blocks.
    pub fn tile(&self) -> ShrinkTile {
        ShrinkTile { m_frags: self.m_frags, n_frags: self.n_frags, warp_m: self.warp_m, warp_n: self.warp_n }
    }

    /// The staged x and A tiles of one K chunk (rows padded by 8 elements).
    fn staged_bytes(m_frags: u32, n_frags: u32, k_chunk: u32, elem: u32) -> u32 {
        (m_frags + n_frags) * TILE * (k_chunk + 8) * elem
    }

    /// [`Self::default_for`] where the device has tensor cores for `F`, else `None`.
    pub fn supported<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        cmma_supported::<F>(device).then(|| Self::default_for::<F>(device, layout, num_segments, max_segment_len)).flatten()
    }

    /// The default tile for a batch of `num_segments` segments of at most `max_segment_len`
    /// tokens (on tensor cores where the device has them, else emulated). Row blocks of up to
    /// four fragments. A block of four (64 rows: rank 64, or rank 32 over two slices) takes
    /// 64-token tiles of 2×4-fragment warp blocks, 64-wide chunks, two K groups and three
    /// stages, on cooperative matrices, where the grid still fills the GPU (H100 sweep of
    /// 2026-11-23, runtime/BENCHMARKS.md: rank-64 qkv shrink 89 → 62 µs, MLA 103 → 72 µs).
    /// Otherwise [`Self::with_tile`] with 32-token tiles unless that leaves fewer cubes than about one
    /// per multiprocessor (32-token tiles were the best or within 3% of it in every prefill
    /// case of run 9, and within 15% in run 11, where 16-token tiles won one case).
    pub fn default_for<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        let row_frags = layout.intermediate_width() / TILE;
        let n_frags = Self::widest_row_block(layout);
        let target = u64::from(crate::config::multiprocessors(device)) * 3 / 4;
        let fills = |m: u32| {
            let tiles = u64::from(max_segment_len.div_ceil(m * TILE));
            num_segments as u64 * tiles * u64::from(row_frags / n_frags) >= target
        };
        if n_frags == 4 && fills(4) {
            // On cooperative matrices: with `ldmatrix` fragments this tile was slower (H100, run
            // 119: the gate_up shrink 39.6 → 49.6 µs, qkv 55.8 → 58–60), unlike the wide tile.
            let blocked = Self::with_tile_chunk::<F>(device, layout, ShrinkTile::new(4, 4).with_warps(2, 4), 64, 2)
                .map(|c| c.with_fragments::<F>(device, Fragments::Cmma).unwrap_or(c));
            if let Some(config) = blocked.map(|c| c.with_stages::<F>(device, 3).unwrap_or(c)) {
                return Some(config);
            }
        }
        let m_frags = [2, 1].into_iter().find(|&m| fills(m)).unwrap_or(1);
        Self::with_tile::<F>(device, layout, m_frags, n_frags)
    }

    /// The decode tile with K splits ([`Self::k_splits`]) for a batch whose segments do not
    /// fill the GPU with 16-token tiles (where [`Self::for_batch`] declines), or `None` where
    /// [`Self::split_k_layout`] has no tile for the layout, the batch's longest segment is
    /// shorter than one 16-token fragment, or its segments hold fewer than 64 tokens at most
    /// (segments × longest).
    ///
    /// H100, pairs from CUDA graphs with the tensor-core expand summing the copies
    /// (runtime/BENCHMARKS.md, runs 76–80): at 128 tokens, in 8 segments of 16 or in one,
    /// every dense case is faster split, plainly launched and under programmatic launch.
    /// Rank 64, one segment: qkv 25.0 → 15.7–16.1 µs, gate_up 34.1 → 27.6–28.0, MLA 25.8 →
    /// 15.3. Rank 16, 8 segments: qkv 12.5 → 10.2, gate_up 18.8–18.9 → 18.4–18.5, MLA 11.6 →
    /// 10.0–10.1 (under programmatic launch 10.7 → 8.5–8.7, 22.2 → 17.8, 14.6–15.0 → 8.0).
    /// Four tokens per segment stay on the CUDA-core kernels: split, their pairs were 2–13%
    /// slower plainly launched (run 82; see [`Self::split_k_for_launch`] for programmatic
    /// launches).
    pub fn split_k_for<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        Self::split_k_for_launch::<F>(device, layout, num_segments, max_segment_len, LaunchMode::Plain)
    }

    /// [`Self::split_k_for`] for pairs launched as `launch` says. Under programmatic launch
    /// the tile also takes segments of 4 to 15 tokens when the batch holds at least 32 tokens
    /// (segments × longest): there the expand summing the copies reads y before its wait
    /// (`launch_pair_expand`), and the pair gained where plainly launched it lost. H100, T = 32
    /// in 8 segments of 4 tokens, pairs under PDL from CUDA graphs, this choice against the
    /// plain one (runtime/BENCHMARKS.md, run 93, two rounds): qkv R=16 7.5 → 6.3 µs, MLA
    /// R=64 17.3 → 14.0, gate_up R=16 9.3 → 8.6, MLA R=16 7.7 → 7.1, qkv R=64 15.2–15.3 →
    /// 14.9–15.1; gate_up R=64 loses, 24.0 → 24.9. Segments of 5 to 15 tokens were not timed
    /// split under PDL; shorter ones (T = 8) stay on the CUDA-core kernels.
    pub fn split_k_for_launch<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        launch: LaunchMode,
    ) -> Option<Self> {
        let (min_segment, min_tokens) = match launch {
            LaunchMode::Plain => (TILE, 64),
            LaunchMode::Programmatic => (PROGRAMMATIC_SPLIT_MIN_SEGMENT, 32),
        };
        let few_tokens = (num_segments as u64 * u64::from(max_segment_len)) < min_tokens;
        if max_segment_len < min_segment || few_tokens || Self::for_batch::<F>(device, layout, num_segments, max_segment_len).is_some() {
            return None;
        }
        Self::split_k_layout::<F>(device, layout)
    }

    /// The tile [`Self::split_k_for`] gives the batches it accepts on this layout, or `None`
    /// where it accepts none: no tensor cores for `F`, or K not splitting into four shares of
    /// whole 128-wide chunks (256-wide without asynchronous copies). A caller sizes its
    /// intermediates by this tile's `k_splits` copies, for at most
    /// [`Self::split_k_max_tokens`] tokens.
    ///
    /// The tile: one fragment of A rows, four K groups over 128-wide chunks staged through
    /// four shared-memory stages (three chunks in flight, their A issued before the grid
    /// dependency point). Without asynchronous copies, 16 K groups over 256-wide chunks
    /// staged through registers. H100, rank 64, 128 tokens in 8 segments, pairs with the
    /// tensor-core summing expand from CUDA graphs (runtime/BENCHMARKS.md, runs 76–78, three
    /// rounds): under programmatic launch qkv 15.2–15.5 → 14.6–14.9 µs, gate_up 31.1–31.2 →
    /// 29.7–29.8, MLA 15.9–16.8 → 13.7–14.5; plainly launched MLA −5%, qkv and gate_up equal.
    pub fn split_k_layout<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout) -> Option<Self> {
        if !cmma_supported::<F>(device) {
            return None;
        }
        let staged = Self::split_k_tile::<F>(device, layout, 1, 4, SPLIT_K_COPIES, &[128]).and_then(|c| c.with_stages::<F>(device, 4));
        staged.or_else(|| Self::split_k_tile::<F>(device, layout, 1, 16, SPLIT_K_COPIES, &[256]))
    }

    /// The wide prefill tile ([`Self::wide_split_layouts`]: the tall one, 128 tokens split four
    /// ways, or the 64-token one split in two) for a batch whose tile ([`Self::for_batch`],
    /// this one) is the blocked rank-64 tile (64 tokens by 4 fragments of A rows, see
    /// [`Self::default_for`]), among those where
    /// * the wide tile's grid fills the GPU only with its K split (at least three quarters of
    ///   a cube per multiprocessor split, fewer unsplit), and
    /// * the bytes its cubes stage less than the blocked tile's are at least the bytes its
    ///   extra copies of the intermediate add to the default expand (each column block reads
    ///   its tokens' rank columns once per copy),
    ///
    /// the one saving the most bytes net. At rank 64, 8 segments of 512 tokens: MLA saves
    /// 118 MB for 53 MB of copy reads on the tall tile, 59 MB for 18 MB on the 64-token one
    /// (tall: its pair 77.5 → 75.4 µs, H100 run 134); qkv 117 MB for 150 MB and 67 MB for 50
    /// (64-token: the tall tile's pair took 99.6 µs against 95.9); gate_up neither.
    ///
    /// Only tiles of at most `max_copies` K splits (the intermediate's room) count. `None` for
    /// any other batch, or where the layout has no wide tile that counts.
    ///
    /// Why: the blocked tile re-reads x once per row block and A once per token tile, so at
    /// rank 64 its cubes stage several times the shrink's inputs from the L2. H100, T = 4096
    /// in 8 segments of 512 tokens, rank 64, from CUDA graphs (runtime/BENCHMARKS.md, runs
    /// 101–105): the shrink alone, qkv 56.0 → 45.7 µs (201 → 134 MB staged), MLA 64.2–67.7
    /// → 54.4–55.5 (235 → 176 MB), gate_up 39.6–40.8 → 34.3–34.7 (134 → 101 MB). Pairs with
    /// the default expand summing the copies, three rounds each: MLA 95.9–100.5 → 90.2–91.3
    /// µs, 90.2–91.0 under programmatic launch (was 107.8–116.4; 18 MB more copy reads:
    /// taken), qkv 121.7–122.7 → 121.3–122.0 (50 MB: level), gate_up 302.0–303.5
    /// → 329.9–330.8 (235 MB: slower, not taken). With `ldmatrix` fragments (run 117) the qkv
    /// wide shrink takes 38.4 µs (45.5 on `wmma`) and its pair 105.0 against 118.0–119.6:
    /// taken since. Unsplit wide grids (longer batches) were not timed: those keep the blocked
    /// tile.
    pub fn wide_split_for<F: CubePrimitive>(
        self,
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        max_copies: u32,
    ) -> Option<Self> {
        if (self.m_frags, self.n_frags, self.k_splits) != (4, 4, 1) {
            return None;
        }
        let target = u64::from(crate::config::multiprocessors(device)) * 3 / 4;
        let elem = size_of::<F>() as u64;
        let staged = |c: &Self| {
            let rows = u64::from((c.m_frags + c.n_frags) * TILE);
            c.token_tiles(num_segments, max_segment_len) * u64::from(c.row_blocks()) * rows * u64::from(layout.in_features()) * elem
        };
        let columns =
            crate::expand_mma::MmaExpandConfig::supported::<F>(device, layout, max_segment_len).map_or(128, |e| e.block_columns());
        let column_blocks: u64 = layout.slices().iter().map(|s| u64::from(s.width.div_ceil(columns))).sum();
        let tokens = num_segments as u64 * u64::from(max_segment_len);
        let copy_reads = |c: &Self| u64::from(c.k_splits - 1) * column_blocks * tokens * u64::from(layout.max_rank()) * 4;
        let blocked = i128::from(staged(&self));
        Self::wide_split_layouts::<F>(device, layout)
            .filter(|wide| {
                let unsplit = wide.token_tiles(num_segments, max_segment_len) * u64::from(wide.row_blocks());
                wide.k_splits <= max_copies && unsplit < target && unsplit * u64::from(wide.k_splits) >= target
            })
            .filter_map(|wide| {
                let net = blocked - i128::from(staged(&wide)) - i128::from(copy_reads(&wide));
                (net >= 0).then_some((net, wide))
            })
            .max_by_key(|(net, _)| *net)
            .map(|(_, wide)| wide)
    }

    /// Token tiles of this tile's grid for a batch: each segment's share of the longest.
    fn token_tiles(&self, num_segments: usize, max_segment_len: u32) -> u64 {
        num_segments as u64 * u64::from(max_segment_len.div_ceil(self.tile_tokens()))
    }

    /// The wide prefill tile of this layout ([`Self::wide_split_for`]): 64 tokens by the
    /// widest row block of 8 or 12 fragments that divides the A rows (every A row of a
    /// three-slice rank-64 layout, or of a two-slice one), the blocked tile's 2×4-fragment
    /// warp blocks, 64-wide chunks in three stages, K split [`WIDE_SPLIT_COPIES`] ways, and
    /// four K groups where that makes at most [`MIN_SHRINK_WARPS`] warps and fits, else two
    /// (H100, run 118, MLA's 8-fragment block: 16 warps, 50.4 µs against 55.9 with two
    /// groups; qkv's 12-fragment block: 12 warps, four groups do not fit). `None` where no
    /// such row block divides the A rows, or without tensor cores or asynchronous copies.
    pub fn wide_split_layout<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout) -> Option<Self> {
        if !cmma_supported::<F>(device) {
            return None;
        }
        let row_frags = layout.intermediate_width() / TILE;
        let n_frags = [WIDE_MAX_ROW_FRAGS, 8].into_iter().find(|n| row_frags.is_multiple_of(*n))?;
        let tile = ShrinkTile::new(4, n_frags).with_warps(2, 4);
        [4, 2].into_iter().find_map(|k_groups| {
            Self::with_tile_chunk::<F>(device, layout, tile, 64, k_groups)
                .filter(|c| k_groups == 2 || c.warps() <= MIN_SHRINK_WARPS)?
                .with_stages::<F>(device, 3)?
                .with_k_splits(layout, WIDE_SPLIT_COPIES)
        })
    }

    /// The tall wide prefill tile of this layout ([`Self::wide_split_for`]): 128 tokens by the
    /// wide tile's row block (every A row), 4×4-fragment warp blocks, two K groups, 64-wide
    /// chunks in three stages (two where three do not fit), K split
    /// [`TALL_SPLIT_COPIES`] ways. H100, MLA R=64, T = 4096 in 8 segments (run 134, the
    /// fastest of 41 wide shrink tiles, two stages then): 45.96 µs against the wide tile's
    /// 50.40, its pair with the default expand 75.4 against 77.5 µs. Since its first K group
    /// stores from registers (run 141, `--prefill-tiles`): two stages 44.90 µs, three 43.08–43.54,
    /// four 43.81; 128-wide chunks in two stages 43.95 (run 142). `None` where the wide tile
    /// is, or where this one does not divide, fit in shared memory, or its warps'
    /// [`TALL_TILE_REGISTERS`] in the register file.
    pub fn tall_split_layout<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout) -> Option<Self> {
        Self::tall_split_of::<F>(device, layout, &Self::wide_split_layout::<F>(device, layout)?)
    }

    /// [`Self::tall_split_layout`] of the layout whose 64-token wide tile is `wide`.
    fn tall_split_of<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, wide: &Self) -> Option<Self> {
        let tile = ShrinkTile::new(8, wide.n_frags).with_warps(4, 4);
        let config = Self::with_tile_chunk::<F>(device, layout, tile, 64, 2)
            .filter(|c| c.warps() * 32 * TALL_TILE_REGISTERS <= crate::config::SM_REGISTERS)?;
        config.with_stages::<F>(device, 3).or_else(|| config.with_stages::<F>(device, 2))?.with_k_splits(layout, TALL_SPLIT_COPIES)
    }

    /// The wide prefill tiles of this layout [`Self::wide_split_for`] chooses from: the tall
    /// one and the 64-token one, where they apply.
    pub fn wide_split_layouts<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout) -> impl Iterator<Item = Self> {
        let wide = Self::wide_split_layout::<F>(device, layout);
        let tall = wide.as_ref().and_then(|wide| Self::tall_split_of::<F>(device, layout, wide));
        [tall, wide].into_iter().flatten()
    }

    /// Tokens from which no batch takes this wide prefill tile: its unsplit grid then holds at
    /// least one token tile per three quarters of a multiprocessor ([`Self::wide_split_for`]).
    pub fn wide_split_max_tokens(&self, device: &DeviceProperties) -> u32 {
        crate::config::multiprocessors(device) * 3 / 4 * self.tile_tokens()
    }

    /// Tokens from which [`Self::for_batch`] takes every batch it has a tile for, so that
    /// [`Self::split_k_for`] declines it: a batch of `n` segments has at least `tokens / 16 / n`
    /// 16-token tiles in its longest, so at least one per multiprocessor from here on.
    pub fn split_k_max_tokens(device: &DeviceProperties) -> u32 {
        TILE * crate::config::multiprocessors(device)
    }

    /// A tile of one 16-token fragment row by `n_frags` fragments of A rows, with `k_groups`
    /// K groups and K split across `k_splits` cubes, staging the first of `chunks` that divides
    /// a split's share of K into 16-wide steps `k_groups` divides; `None` where K does not
    /// split evenly, no chunk fits or the tile does not apply ([`Self::with_tile_chunk`]).
    pub fn split_k_tile<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        n_frags: u32,
        k_groups: u32,
        k_splits: u32,
        chunks: &[u32],
    ) -> Option<Self> {
        let k = layout.in_features();
        let share = k.checked_div(k_splits).filter(|share| share * k_splits == k)?;
        let chunk = chunks.iter().copied().find(|c| share.is_multiple_of(*c) && (c / TILE).is_multiple_of(k_groups))?;
        Self::with_tile_chunk::<F>(device, layout, ShrinkTile::new(1, n_frags), chunk, k_groups)?.with_k_splits(layout, k_splits)
    }

    /// Fragments in the widest row block of up to four that divides the layout's `c·R / 16`
    /// fragments of A rows.
    pub fn widest_row_block(layout: &LoraLayout) -> u32 {
        let row_frags = layout.intermediate_width() / TILE;
        [4, 3, 2, 1].into_iter().find(|n| row_frags.is_multiple_of(*n)).unwrap_or(1)
    }

    /// [`Self::supported`], and only for batches with enough 16-token tiles to fill the GPU
    /// (short decode segments run faster on the scalar kernel's finer grid).
    pub fn for_batch<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        let tiles = num_segments as u64 * u64::from(max_segment_len.div_ceil(TILE));
        (tiles >= u64::from(crate::config::multiprocessors(device)))
            .then(|| Self::supported::<F>(device, layout, num_segments, max_segment_len))
            .flatten()
    }

    /// Whether this is the configuration [`Self::with_tile_chunk`] derives for its tile and
    /// chunk on this layout and device (a hand-made one could overrun shared memory or rows).
    pub fn fits<F: CubePrimitive>(&self, device: &DeviceProperties, layout: &LoraLayout) -> bool {
        Self::with_tile_chunk::<F>(device, layout, self.tile(), self.k_chunk, self.k_groups)
            .and_then(|base| base.with_fragments::<F>(device, self.fragments))
            .and_then(|base| base.with_stages::<F>(device, self.stages))
            .and_then(|base| base.with_k_splits(layout, self.k_splits))
            == Some(*self)
    }

    /// This tile with its K chunks staged through `stages` shared-memory buffers filled by
    /// asynchronous copies (`stages` = 1: through registers), or `None` where the device has
    /// no asynchronous copies or block barriers, `stages` is not 1–4, the vectors are not 16
    /// bytes (the copy size), or the stages overrun the device's shared memory.
    pub fn with_stages<F: CubePrimitive>(self, device: &DeviceProperties, stages: u32) -> Option<Self> {
        if stages == 1 {
            return Some(MmaShrinkConfig { stages, ..self });
        }
        let staged = MmaShrinkConfig { stages, ..self };
        let elem = size_of::<F>() as u32;
        crate::config::pipeline_fits(device, stages, self.vector * elem, staged.shared_bytes_per_cube::<F>()).then_some(staged)
    }

    /// Shared memory one cube uses: the staged x and A tiles (one set per stage, one for the
    /// register-staged kernel) and the accumulator tile ([`accumulator_floats`]). It bounds
    /// how many cubes a multiprocessor holds at once.
    pub fn shared_bytes_per_cube<F: CubePrimitive>(&self) -> u32 {
        let elem = size_of::<F>() as u32;
        self.stages.max(1) * Self::staged_bytes(self.m_frags, self.n_frags, self.k_chunk, elem) + accumulator_floats(*self) as u32 * 4
    }

    /// Whether the warps write the sums to the intermediate straight from their registers:
    /// with hand-managed fragments, whose lanes know the elements they hold, and one K group
    /// or tiles of at least [`REGISTER_STORE_MIN_FRAGMENTS`]. With several K groups the first
    /// group's warps add the other groups' partial sums, which pass through the accumulator
    /// tile ([`accumulator_floats`]), to their own before they store. Otherwise every group's
    /// sums go through the accumulator tile, where all the cube's threads add them up and
    /// store them.
    pub fn stores_from_registers(&self) -> bool {
        self.fragments == Fragments::Ldmatrix && (self.k_groups == 1 || self.m_frags * self.n_frags >= REGISTER_STORE_MIN_FRAGMENTS)
    }

    /// This tile with K split across `k_splits` cubes (see [`Self::k_splits`]), or `None`
    /// where `k_splits` is 0 or its share of the inputs is not a whole number of K chunks.
    pub fn with_k_splits(self, layout: &LoraLayout, k_splits: u32) -> Option<Self> {
        let share = self.k_chunk.checked_mul(k_splits)?;
        (k_splits > 0 && layout.in_features().is_multiple_of(share)).then_some(MmaShrinkConfig { k_splits, ..self })
    }

    /// `k_groups` warps per warp block.
    pub fn warps(&self) -> u32 {
        self.tile().warp_blocks() * self.k_groups
    }

    /// Token rows of one cube's tile.
    pub fn tile_tokens(&self) -> u32 {
        self.m_frags * TILE
    }

    /// Cubes along the `c·R` rows (grid z).
    pub fn row_blocks(&self) -> u32 {
        self.groups * self.max_rank / (self.n_frags * TILE)
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn shrink_mma_kernel<F: Float, N: Size>(
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
    // Rows of the staged tiles are padded by 8 elements: with a stride of exactly `kc` every
    // row would start in the same shared-memory bank and the fragment loads would serialise.
    let stride = comptime!(kc + 8);

    let cube = cube_tile(seg_indptr, weight_indices, ranks, cfg);
    let tid = UNIT_POS as usize;
    let block = warp_block(cfg);
    let k_vecs = k as usize / nv;

    // wmma loads and stores need 256-bit aligned shared-memory tiles.
    // Tiles of whole vectors: one 16-byte shared-memory store per staged vector (eight 2-byte
    // stores, four bank wavefronts each, were the staging's cost). The MMA loads read the
    // same memory as elements: offsets below are in vectors, strides in elements.
    let sv = comptime!(stride / nv);
    let mut x_tile = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(tm * stride / nv), 128usize);
    let mut a_tile = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(tn * stride / nv), 128usize);
    let mut c_tile = SharedMemory::<f32>::new_aligned(comptime!(accumulator_floats(cfg)), 128usize);
    let mut accs = new_accumulators(cfg);

    // Each thread stages the same vectors of every chunk: `x_per` of the x tile, `a_per` of
    // the A rows. Their sources are fixed up front; x rows past the segment's end repeat its
    // last token (their results are dropped), A rows past the rank are not loaded.
    let x_per = comptime!((tm * kc_vecs).div_ceil(threads));
    let a_per = comptime!((tn * kc_vecs).div_ceil(threads));
    let mut x_src = Array::<usize>::new(x_per);
    let mut a_src = Array::<usize>::new(a_per);
    let mut a_live = Array::<bool>::new(a_per);
    stage_sources(token_perm, x_row_divisor, &cube, k_vecs, &mut x_src, &mut a_src, &mut a_live, cfg);
    let mut x_staged = Array::<Vector<F, N>>::new(x_per);
    let mut a_staged = Array::<Vector<F, N>>::new(a_per);
    #[unroll]
    for s in 0..a_per {
        a_staged[s] = Vector::<F, N>::new(F::new(0.0));
        if a_live[s] {
            a_staged[s] = a_pool[a_src[s]];
        }
    }
    // x may be the previous kernel's output; A and the batch metadata read above are not
    // (without `grid_dependency` the metadata may be): under a programmatic launch the first
    // chunk of A is in flight while the kernel before finishes.
    grid_dependency_point(grid_dependency, true);
    #[unroll]
    for s in 0..x_per {
        if tid + s * threads < comptime!(tm * kc_vecs) {
            x_staged[s] = x[x_src[s]];
        }
    }

    // This cube's share of K: its sources already start there (`stage_sources`).
    let k_elems = k as usize / comptime!(cfg.k_splits as usize);
    let mut k0 = 0usize.runtime();
    while k0 < k_elems {
        #[unroll]
        for s in 0..x_per {
            let v = tid + s * threads;
            if v < comptime!(tm * kc_vecs) {
                x_tile[(v / kc_vecs) * sv + v % kc_vecs] = x_staged[s];
            }
        }
        #[unroll]
        for s in 0..a_per {
            let v = tid + s * threads;
            if v < comptime!(tn * kc_vecs) {
                a_tile[(v / kc_vecs) * sv + v % kc_vecs] = a_staged[s];
            }
        }
        sync_cube();
        let next = k0 + kc;
        if next < k_elems {
            let step = next / nv;
            #[unroll]
            for s in 0..x_per {
                if tid + s * threads < comptime!(tm * kc_vecs) {
                    x_staged[s] = x[x_src[s] + step];
                }
            }
            #[unroll]
            for s in 0..a_per {
                if a_live[s] {
                    a_staged[s] = a_pool[a_src[s] + step];
                }
            }
        }
        multiply_chunk::<F, N>(&x_tile, 0, &a_tile, 0, &block, &cube, &mut accs, cfg);
        sync_cube();
        k0 = next;
    }
    write_tile(out, &mut c_tile, token_perm, &block, &cube, &accs, cfg);
}

/// A warp's block of the cube tile: its first fragment along the tokens (`mf0`) and along the
/// A rows (`nf0`), its K group, and where the group's share of every chunk starts.
#[derive(CubeType)]
pub(crate) struct WarpBlock {
    pub mf0: usize,
    pub nf0: usize,
    pub group: usize,
    pub group_k: usize,
}

/// This warp's block: warp `g·blocks + b` computes block b (row-major over the tile's
/// `warp_m` × `warp_n` blocks) for K group g.
#[cube]
pub(crate) fn warp_block(#[comptime] cfg: MmaShrinkConfig) -> WarpBlock {
    let blocks = comptime!((cfg.m_frags / cfg.warp_m * (cfg.n_frags / cfg.warp_n)) as usize);
    let blocks_n = comptime!((cfg.n_frags / cfg.warp_n) as usize);
    let group_steps = comptime!((cfg.k_chunk / TILE / cfg.k_groups) as usize);
    let warp = UNIT_POS_Y as usize;
    let b = warp % blocks;
    let group = warp / blocks;
    WarpBlock {
        mf0: (b / blocks_n) * comptime!(cfg.warp_m as usize),
        nf0: (b % blocks_n) * comptime!(cfg.warp_n as usize),
        group,
        group_k: group * group_steps * comptime!(TILE as usize),
    }
}

/// Floats of the accumulator tile: one 16×16 f32 fragment per output fragment and K group,
/// but for the first group where the warps store from their registers (one unused float
/// with a single group). Where the warps store from registers the tile holds only partial
/// sums, so at two K groups it is half the size: MLA's tall prefill tile (128 tokens × 128
/// rows, two groups) needs 64 KiB instead of 128 and has room for more stages.
pub(crate) fn accumulator_floats(cfg: MmaShrinkConfig) -> usize {
    let partial_groups = if cfg.stores_from_registers() { cfg.k_groups - 1 } else { cfg.k_groups };
    ((cfg.m_frags * cfg.n_frags * partial_groups * TILE * TILE) as usize).max(1)
}

/// Writes the cube's sums into the intermediate: from the first K group's registers, the
/// other groups' partial sums added through `c_tile` ([`MmaShrinkConfig::stores_from_registers`]),
/// else every group's through the accumulator tile `c_tile`.
#[cube]
pub(crate) fn write_tile(
    out: &mut Array<f32>,
    c_tile: &mut SharedMemory<f32>,
    token_perm: &Array<u32>,
    block: &WarpBlock,
    cube: &CubeTile,
    accs: &Accumulators,
    #[comptime] cfg: MmaShrinkConfig,
) {
    if comptime!(cfg.stores_from_registers()) {
        if comptime!(cfg.k_groups > 1) {
            if block.group > 0 {
                store_accumulators(c_tile, block, cube, accs, cfg);
            }
            sync_cube();
        }
        if block.group == 0 {
            store_halves(out, c_tile, token_perm, block, cube, accs, cfg);
        }
    } else {
        store_accumulators(c_tile, block, cube, accs, cfg);
        sync_cube();
        store_tile(out, c_tile, token_perm, cube, cfg);
    }
}

/// Writes each lane's elements of the warp's live 16×8 accumulators (rows `g`, `g + 8`,
/// columns `2t`, `2t + 1` of each, see [`crate::mma_fragments`]) for tokens inside the
/// segment and rows below the slot's rank into the cube's copy of the intermediate, each
/// plus the same elements of the other K groups' partial sums in `c_tile`
/// ([`store_accumulators`]). Called by the first group's warps only.
#[cube]
fn store_halves(
    out: &mut Array<f32>,
    c_tile: &SharedMemory<f32>,
    token_perm: &Array<u32>,
    block: &WarpBlock,
    cube: &CubeTile,
    accs: &Accumulators,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tile = comptime!(TILE as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let warp_n = comptime!(cfg.warp_n as usize);
    let copy = cube.split * (out.len() / comptime!(cfg.k_splits as usize));
    let fragments = comptime!((cfg.m_frags * cfg.n_frags) as usize);
    let n_frags = comptime!(cfg.n_frags as usize);
    let lane = UNIT_POS_PLANE as usize;
    #[unroll]
    for i in 0..comptime!(cfg.warp_m as usize) {
        #[unroll]
        for half_row in 0..2usize {
            let p = cube.p0 + (block.mf0 + i) * tile + half_row * 8 + lane / 4;
            if p < cube.end {
                let t_row = copy + token_perm[p] as usize * c_r;
                #[unroll]
                for j in 0..warp_n {
                    if fragment_live(block, cube, j, cfg) {
                        #[unroll]
                        for h in 0..2usize {
                            let row = cube.row_base + (block.nf0 + j) * tile + h * 8 + lane % 4 * 2;
                            let sums = accs.halves.index(2 * (i * warp_n + j) + h)[half_row];
                            let mut low = sums[0];
                            let mut high = sums[1];
                            // This lane's elements of the fragment as `store_accumulator` lays them out.
                            let f = (block.mf0 + i) * n_frags + block.nf0 + j;
                            let at = f * 256 + (half_row * 8 + lane / 4) * tile + h * 8 + lane % 4 * 2;
                            #[unroll]
                            for g in 0..comptime!(cfg.k_groups as usize - 1) {
                                low += c_tile[g * comptime!(fragments * 256) + at];
                                high += c_tile[g * comptime!(fragments * 256) + at + 1];
                            }
                            if row % max_rank < cube.rank {
                                out[t_row + row] = low;
                            }
                            if (row + 1) % max_rank < cube.rank {
                                out[t_row + row + 1] = high;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A warp's accumulators for its `warp_m·warp_n` fragments (fragment (i, j) of its block at
/// `b = i·warp_n + j`): on cooperative matrices `tiles[b]`; by hand, its 16×8 halves at
/// `halves[2b]` (columns 0–7) and `halves[2b + 1]` (columns 8–15); emulated, lane l holds
/// elements `l + 32·t` (t < 8, row-major in the 16×16 fragment) at `lanes[8·b + t]`. The other
/// members are empty (`lanes`: one unused element).
#[derive(CubeType)]
pub(crate) struct Accumulators {
    tiles: Sequence<cmma::Matrix<f32>>,
    halves: Sequence<Registers<f32>>,
    lanes: Array<f32>,
}

/// Lanes of a warp in the emulated multiply (its cube dimension x).
const WARP_LANES: usize = 32;

/// Elements of a 16×16 fragment per lane in the emulated multiply.
const LANE_ELEMS: usize = 256 / WARP_LANES;

/// The warp's accumulators, zeroed.
#[cube]
pub(crate) fn new_accumulators(#[comptime] cfg: MmaShrinkConfig) -> Accumulators {
    let per_warp = comptime!((cfg.warp_m * cfg.warp_n) as usize);
    let mut tiles = Sequence::<cmma::Matrix<f32>>::new();
    let mut halves = Sequence::<Registers<f32>>::new();
    if comptime!(cfg.fragments == Fragments::Cmma) {
        let lanes = Array::<f32>::new(1usize);
        #[unroll]
        for _ in 0..per_warp {
            tiles.push(zero_accumulator());
        }
        Accumulators { tiles, halves, lanes }
    } else if comptime!(cfg.fragments == Fragments::Ldmatrix) {
        let lanes = Array::<f32>::new(1usize);
        #[unroll]
        for _ in 0..comptime!(2 * per_warp) {
            halves.push(mma_fragments::zero_accumulator());
        }
        Accumulators { tiles, halves, lanes }
    } else {
        let mut lanes = Array::<f32>::new(comptime!(per_warp * LANE_ELEMS));
        #[unroll]
        for e in 0..comptime!(per_warp * LANE_ELEMS) {
            lanes[e] = 0.0;
        }
        Accumulators { tiles, halves, lanes }
    }
}

/// A 16×16 f32 MMA accumulator holding zeros.
#[cube]
pub(crate) fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, 16usize, 16usize, 16usize, cmma::MatrixLayout::Undefined, 0.0)
}

/// Whether column `j` of the warp's block has A rows below the slot's rank. Warp-uniform: a
/// fragment wholly in a low-rank adapter's padding is neither loaded nor computed.
#[cube]
fn fragment_live(block: &WarpBlock, cube: &CubeTile, #[comptime] j: usize, #[comptime] cfg: MmaShrinkConfig) -> bool {
    (cube.row_base + (block.nf0 + j) * comptime!(TILE as usize)) % comptime!(cfg.max_rank as usize) < cube.rank
}

/// Whether some fragment of the warp's block has A rows below the slot's rank.
#[cube]
fn any_fragment_live(block: &WarpBlock, cube: &CubeTile, #[comptime] cfg: MmaShrinkConfig) -> bool {
    let mut any_live = false;
    #[unroll]
    for j in 0..comptime!(cfg.warp_n as usize) {
        if fragment_live(block, cube, j, cfg) {
            any_live = true;
        }
    }
    any_live
}

/// Multiplies the warp's share of one staged chunk into its accumulators: the x tile starts
/// at vector `x_base` of `x_tile`, the A tile at `a_base` of `a_tile` (rows padded to
/// `k_chunk + 8` elements). Per 16-wide K step the warp loads its `warp_m` x fragments once
/// and each live A fragment once.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn multiply_chunk<F: Float, N: Size>(
    x_tile: &SharedMemory<Vector<F, N>>,
    x_base: usize,
    a_tile: &SharedMemory<Vector<F, N>>,
    a_base: usize,
    block: &WarpBlock,
    cube: &CubeTile,
    accs: &mut Accumulators,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tile = comptime!(TILE as usize);
    let stride = comptime!(cfg.k_chunk as usize + 8);
    let nv = comptime!(cfg.vector as usize);
    let x_len = comptime!((cfg.m_frags * TILE) as usize * stride / nv);
    let a_len = comptime!((cfg.n_frags * TILE) as usize * stride / nv);
    let warp_m = comptime!(cfg.warp_m as usize);
    let warp_n = comptime!(cfg.warp_n as usize);
    if comptime!(cfg.fragments == Fragments::Emulated) {
        // Skips the dead columns itself.
        emulate_chunk::<F, N>(x_tile, x_base, a_tile, a_base, block, cube, &mut accs.lanes, cfg);
    } else if any_fragment_live(block, cube, cfg) {
        // (The x fragments are loaded only if some A fragment is live.)
        if comptime!(cfg.fragments == Fragments::Ldmatrix) {
            // By hand: per 16-wide K step one `ldmatrix.x4` per x fragment and per live A
            // fragment (two 16×8 B operands), two m16n8k16 MMAs per output fragment.
            #[unroll]
            for kk in 0..comptime!((cfg.k_chunk / TILE / cfg.k_groups) as usize) {
                let col = block.group_k + kk * tile;
                let mut xs = Sequence::<Registers<F>>::new();
                #[unroll]
                for i in 0..warp_m {
                    xs.push(mma_fragments::load_a::<F, N>(x_tile, x_base * nv + (block.mf0 + i) * tile * stride + col, stride, nv));
                }
                #[unroll]
                for j in 0..warp_n {
                    if fragment_live(block, cube, j, cfg) {
                        // B(k, n) = A[row0 + n, k0 + k]: A's rows are B's columns.
                        let first = a_base * nv + (block.nf0 + j) * tile * stride + col;
                        let (low, high) = mma_fragments::load_b_pair::<F, N>(a_tile, first, stride, nv);
                        #[unroll]
                        for i in 0..warp_m {
                            let b = i * warp_n + j;
                            mma_fragments::multiply_accumulate::<F>(xs.index(i), &low, accs.halves.index_mut(2 * b));
                            mma_fragments::multiply_accumulate::<F>(xs.index(i), &high, accs.halves.index_mut(2 * b + 1));
                        }
                    }
                }
            }
        } else {
            #[unroll]
            for kk in 0..comptime!((cfg.k_chunk / TILE / cfg.k_groups) as usize) {
                let col = block.group_k + kk * tile;
                let mut xs = Sequence::<cmma::Matrix<F>>::new();
                #[unroll]
                for i in 0..warp_m {
                    let xa = unsafe {
                        cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor)
                    };
                    let start = x_base + ((block.mf0 + i) * tile * stride + col) / nv;
                    cmma::load(&xa, &x_tile.slice(start, x_base + x_len), comptime!(stride as u32));
                    xs.push(xa);
                }
                #[unroll]
                for j in 0..warp_n {
                    if fragment_live(block, cube, j, cfg) {
                        // B(k, n) = A[row0 + n, k0 + k]: A's rows are B's columns.
                        let wa = unsafe {
                            cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::ColMajor)
                        };
                        let start = a_base + ((block.nf0 + j) * tile * stride + col) / nv;
                        cmma::load(&wa, &a_tile.slice(start, a_base + a_len), comptime!(stride as u32));
                        #[unroll]
                        for i in 0..warp_m {
                            let acc = accs.tiles.index(i * warp_n + j);
                            cmma::execute::<F, F, f32, f32>(xs.index(i), &wa, acc, acc);
                        }
                    }
                }
            }
        }
    }
}

/// Stores the warp's live accumulators into the accumulator tile: fragment f of the cube tile
/// (row-major, `f = mf·n_frags + nf`) for K group g at floats `(g·fragments + f)·256`, the
/// layout [`store_tile`] sums; where the first group stores from registers, group g's
/// partial sums at `((g − 1)·fragments + f)·256`, where [`store_halves`] reads them.
#[cube]
pub(crate) fn store_accumulators(
    c_tile: &mut SharedMemory<f32>,
    block: &WarpBlock,
    cube: &CubeTile,
    accs: &Accumulators,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let fragments = comptime!((cfg.m_frags * cfg.n_frags) as usize);
    let n_frags = comptime!(cfg.n_frags as usize);
    let warp_n = comptime!(cfg.warp_n as usize);
    #[unroll]
    for i in 0..comptime!(cfg.warp_m as usize) {
        #[unroll]
        for j in 0..warp_n {
            if fragment_live(block, cube, j, cfg) {
                // With registers storing, group g > 0 leaves its partial sums at g − 1.
                let partial = if comptime!(cfg.stores_from_registers()) { block.group - 1 } else { block.group };
                let f = partial * fragments + (block.mf0 + i) * n_frags + block.nf0 + j;
                let b = i * warp_n + j;
                if comptime!(cfg.fragments == Fragments::Cmma) {
                    cmma::store(&mut c_tile.slice_mut(f * 256, f * 256 + 256), accs.tiles.index(b), 16, cmma::MatrixLayout::RowMajor);
                } else if comptime!(cfg.fragments == Fragments::Ldmatrix) {
                    mma_fragments::store_accumulator(c_tile, accs.halves.index(2 * b), f * 256, 16usize);
                    mma_fragments::store_accumulator(c_tile, accs.halves.index(2 * b + 1), f * 256 + 8, 16usize);
                } else {
                    #[unroll]
                    for t in 0..LANE_ELEMS {
                        c_tile[f * 256 + UNIT_POS_X as usize + t * WARP_LANES] = accs.lanes[b * LANE_ELEMS + t];
                    }
                }
            }
        }
    }
}

/// [`multiply_chunk`] without tensor cores: lane l of the warp adds to elements `l + 32·t` of
/// each live fragment of its block the products of the staged x row and A row over the
/// group's share of the chunk, reading single elements of the staged vectors.
#[cube]
#[allow(clippy::too_many_arguments)]
fn emulate_chunk<F: Float, N: Size>(
    x_tile: &SharedMemory<Vector<F, N>>,
    x_base: usize,
    a_tile: &SharedMemory<Vector<F, N>>,
    a_base: usize,
    block: &WarpBlock,
    cube: &CubeTile,
    lanes: &mut Array<f32>,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tile = comptime!(TILE as usize);
    let stride = comptime!(cfg.k_chunk as usize + 8);
    let nv = comptime!(cfg.vector as usize);
    let warp_n = comptime!(cfg.warp_n as usize);
    let span = comptime!((cfg.k_chunk / cfg.k_groups) as usize);
    #[unroll]
    for i in 0..comptime!(cfg.warp_m as usize) {
        #[unroll]
        for j in 0..warp_n {
            if fragment_live(block, cube, j, cfg) {
                // Not unrolled: lavapipe compiles the emulation far faster as a loop.
                for t in 0..LANE_ELEMS {
                    let e = UNIT_POS_X as usize + t * WARP_LANES;
                    let x_row = ((block.mf0 + i) * tile + e / tile) * stride;
                    let a_row = ((block.nf0 + j) * tile + e % tile) * stride;
                    let mut sum = 0.0f32;
                    for kk in 0..span {
                        let (xo, ao) = (x_row + block.group_k + kk, a_row + block.group_k + kk);
                        let xv = x_tile[x_base + xo / nv][xo % nv];
                        let av = a_tile[a_base + ao / nv][ao % nv];
                        sum += f32::cast_from(xv) * f32::cast_from(av);
                    }
                    let b = (i * warp_n + j) * LANE_ELEMS + t;
                    lanes[b] += sum;
                }
            }
        }
    }
}

/// A shrink cube's place in the batch: its slot's rank, its segment's end, its first token
/// (position in the permuted batch), its first A row and its share of K.
#[derive(CubeType)]
pub(crate) struct CubeTile {
    pub slot: usize,
    pub rank: usize,
    pub end: usize,
    pub p0: usize,
    pub row_base: usize,
    /// Which `1/k_splits` of the inputs the cube sums (0 without K splits).
    pub split: usize,
}

/// Reads the cube's tile from the batch metadata (segment on grid y, token tile on x, row
/// block and K split on z, the row block fastest) and exits the cube where it has nothing to
/// compute: a segment with no adapter or of rank 0, a tile past the segment's end, or a row
/// block wholly in the padding past a low-rank adapter's rows.
#[cube]
pub(crate) fn cube_tile(
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    ranks: &Array<u32>,
    #[comptime] cfg: MmaShrinkConfig,
) -> CubeTile {
    let tile = comptime!(TILE as usize);
    let tm = comptime!((cfg.m_frags * TILE) as usize);
    let tn = comptime!((cfg.n_frags * TILE) as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let seg = CUBE_POS_Y as usize;
    let slot = weight_indices[seg];
    if slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let end = seg_indptr[seg + 1] as usize;
    let p0 = seg_indptr[seg] as usize + CUBE_POS_X as usize * tm;
    let row_blocks = comptime!(cfg.row_blocks() as usize);
    let row_base = (CUBE_POS_Z as usize % row_blocks) * tn;
    let split = CUBE_POS_Z as usize / row_blocks;
    let mut any_active = false;
    #[unroll]
    for f in 0..comptime!(cfg.n_frags as usize) {
        if (row_base + f * tile) % max_rank < rank {
            any_active = true;
        }
    }
    if rank == 0 || p0 >= end || !any_active {
        terminate!();
    }
    CubeTile { slot: slot as usize, rank, end, p0, row_base, split }
}

/// The global sources of this thread's staged vectors in the cube's first chunk (add
/// `chunk·k_chunk/vector` for later chunks; with K splits, chunk 0 of the cube's share):
/// `x_src` its `x_per` vectors of the x tile (token `t` reads x row
/// `t / x_row_divisor`), whose rows past the segment's end repeat its last token (their
/// results are dropped); `a_src` its `a_per` vectors of the A
/// rows, `a_live` false for rows past the slot's rank or the tile (not loaded).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_sources(
    token_perm: &Array<u32>,
    x_row_divisor: u32,
    cube: &CubeTile,
    k_vecs: usize,
    x_src: &mut Array<usize>,
    a_src: &mut Array<usize>,
    a_live: &mut Array<bool>,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let tm = comptime!((cfg.m_frags * TILE) as usize);
    let tn = comptime!((cfg.n_frags * TILE) as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let kc_vecs = comptime!((cfg.k_chunk / cfg.vector) as usize);
    let tid = UNIT_POS as usize;
    let k_first = cube.split * (k_vecs / comptime!(cfg.k_splits as usize));
    #[unroll]
    for s in 0..comptime!((tm * kc_vecs).div_ceil(threads)) {
        let v = tid + s * threads;
        let i = min(v / kc_vecs, comptime!(tm - 1));
        let p = min(cube.p0 + i, cube.end - 1);
        x_src[s] = (token_perm[p] / x_row_divisor) as usize * k_vecs + k_first + v % kc_vecs;
    }
    #[unroll]
    for s in 0..comptime!((tn * kc_vecs).div_ceil(threads)) {
        let v = tid + s * threads;
        let r = v / kc_vecs;
        a_src[s] = (cube.slot * c_r + cube.row_base + r) * k_vecs + k_first + v % kc_vecs;
        a_live[s] = v < comptime!(tn * kc_vecs) && (cube.row_base + r) % max_rank < cube.rank;
    }
}

/// Writes the cube's output tile from the per-warp accumulators in `c_tile`: each fragment's
/// sum over its K groups (warp `g·fragments + f` holds group g of fragment f), for the tile's
/// tokens inside the segment and rows below the slot's rank, into the copy of the
/// intermediate of the cube's K split (`out` holds `k_splits` equal copies).
#[cube]
pub(crate) fn store_tile(
    out: &mut Array<f32>,
    c_tile: &SharedMemory<f32>,
    token_perm: &Array<u32>,
    cube: &CubeTile,
    #[comptime] cfg: MmaShrinkConfig,
) {
    let (p0, end, row_base, rank) = (cube.p0, cube.end, cube.row_base, cube.rank);
    let copy = cube.split * (out.len() / comptime!(cfg.k_splits as usize));
    let tile = comptime!(TILE as usize);
    let n_frags = comptime!(cfg.n_frags as usize);
    let fragments = comptime!((cfg.m_frags * cfg.n_frags) as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let mut e = UNIT_POS as usize;
    while e < comptime!(fragments * tile * tile) {
        let f = e / 256;
        let i = (f / n_frags) * tile + (e % 256) / 16;
        let row = row_base + (f % n_frags) * tile + e % 16;
        let p = p0 + i;
        if p < end && row % max_rank < rank {
            let mut sum = 0.0f32;
            #[unroll]
            for g in 0..comptime!(cfg.k_groups as usize) {
                sum += c_tile[g * comptime!(fragments * 256) + e];
            }
            let t = token_perm[p] as usize;
            out[copy + t * c_r + row] = sum;
        }
        e += threads;
    }
}
