//! Tensor-core variant of the segmented expand, for long segments (prefill) in bf16/f16.
//!
//! The scalar expand does `T·out·r` FMAs with a horizontal sum per output element; at rank 64
//! that, not the pass over y, bounds a prefill. Here a cube takes a `16·m_frags`-token tile of
//! one segment and a `16·n_frags`-column block of one slice, and the y tile itself is the MMA
//! accumulator: y is read into shared memory (f32), each warp loads its 16×16 fragment of it as
//! the accumulator, adds `(scale·a) · Bᵀ` over the slot's rank in 16-wide steps, and the tile
//! goes back to y in one write, so every y element is read and written exactly once.
//!
//! The cube's B block (`16·n_frags` rows of the slot, rank columns) is staged once for all of
//! its token tiles; the intermediate tile is staged per token tile, scaled and rounded to the
//! storage type. Both are zero past the slot's rank, so the padding of a low-rank adapter (and
//! the intermediate's unwritten columns) is never read into a product. Slice widths must be
//! multiples of 16 so a fragment never straddles two slices; grid, exits and contract are the
//! scalar [`crate::expand`]'s, and so is its f64 reference. [`crate::expand_mma_pipelined`] is
//! the variant with asynchronous copies, the default up to rank 32 (see
//! [`MmaExpandConfig::supported`]).

use cubecl::ir::DeviceProperties;
use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::NO_SLOT;
use crate::cuda_graph::grid_dependency_point;
use crate::mma_fragments::{self, Fragments, cmma_supported};
use crate::shrink_mma::{LaunchMode, TILE};

/// Shared memory the tiles may use: small enough for several cubes per multiprocessor.
const SHARED_BUDGET: u32 = 50 * 1024;

/// Most warps (one per output fragment) in one cube.
const MAX_WARPS: u32 = 16;

/// Shared-memory stages of the default pipelined tile (see [`MmaExpandConfig::supported`]).
const DEFAULT_STAGES: u32 = 3;

/// Largest rank whose default tile is the 16-token pipelined one (see
/// [`MmaExpandConfig::supported`]).
const PIPELINED_MAX_RANK: u32 = 64;

/// Largest rank at which the pipelined kernel on tensor cores keeps each warp's B fragments
/// in registers for all its tiles ([`MmaExpandConfig::b_in_registers`]): four fragments,
/// 16 registers per thread. Larger ranks (untimed) stage the B block in shared memory.
const B_REGISTERS_MAX_RANK: u32 = 64;

/// Shared-memory stages of the default tile above [`PIPELINED_MAX_RANK`].
const HIGH_RANK_STAGES: u32 = 2;

/// Smallest rank whose pipelined tiles multiply by hand ([`MmaExpandConfig::multiplies_by_hand`];
/// up to [`B_REGISTERS_MAX_RANK`]). H100, T = 4096, 8 adapters (runtime/BENCHMARKS.md, runs
/// 124–127): at rank 64 by hand took the expand alone from 64.0 to 58.4 µs (qkv, one copy,
/// three stages), 66.6 to 61.5 (qkv, two copies) and 28.7 to 26.0 (MLA); at rank 16 it was
/// level or slower (qkv pair 70.4 → 73.0 µs; ptxas gives the kernel 64 registers instead of
/// 48, four cubes per multiprocessor instead of five). Rank 32 is untimed.
const BY_HAND_MIN_RANK: u32 = 32;

/// Smallest rank whose default by-hand tile takes [`BY_HAND_HIGH_RANK_STAGES`] stages, not
/// [`DEFAULT_STAGES`]: each stage's f32 intermediate rows are as large as its y tile there.
/// H100, expands alone (run 127): qkv R=64 one copy 58.4 → 56.7 µs, two copies 61.5 → 59.0;
/// MLA R=64 level (26.0 / 25.9, 27.8 / 27.6).
const BY_HAND_HIGH_RANK: u32 = 64;
const BY_HAND_HIGH_RANK_STAGES: u32 = 2;

/// Copies of the intermediate for which a by-hand tile from [`BY_HAND_HIGH_RANK`] takes
/// [`DEFAULT_STAGES`] stages after all ([`MmaExpandConfig::batch_summing`]): the wide
/// prefill shrink's two.
const BY_HAND_DEEP_COPIES: u32 = 2;

/// Registers per thread of the by-hand pipelined kernels, as ptxas allocates them for the
/// rank-64 qkv and MLA tiles (ncu, H100 run 132; offline also in three stages reading rows
/// ahead, `MmaExpandConfig::prefetches_rows`): with the register file of
/// [`crate::config::SM_REGISTERS`], five 256-thread cubes per multiprocessor
/// ([`MmaExpandConfig::balanced_token_splits`]).
const BY_HAND_REGISTERS: u32 = 48;

/// What starting a cube costs in its tiles' time, in the token-split model
/// ([`MmaExpandConfig::balanced_token_splits`]): with 2 the model picks the fastest split of
/// the H100 sweeps for qkv and MLA at rank 64 (runs 132–133).
const CUBE_OVERHEAD_TILES: u32 = 2;

/// Fewest tokens in a batch's longest segment for which a batch too small to fill the GPU
/// with 16-token tiles still takes the tensor-core expand ([`MmaExpandConfig::for_decode`]).
pub const DECODE_MIN_SEGMENT: u32 = 8;

/// The same for a pair launched programmatically, at rank [`PROGRAMMATIC_DECODE_MIN_RANK`] or
/// more, on a grid of at most [`PROGRAMMATIC_DECODE_MAX_CUBES_PER_SM`] cubes per
/// multiprocessor ([`MmaExpandConfig::for_decode_launch`]).
pub const PROGRAMMATIC_DECODE_MIN_SEGMENT: u32 = 4;
const PROGRAMMATIC_DECODE_MIN_RANK: u32 = 64;
const PROGRAMMATIC_DECODE_MAX_CUBES_PER_SM: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaExpandConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// 16-token fragments per cube: its token tile is `16·m_frags` tokens of one segment.
    pub m_frags: u32,
    /// 16-column fragments per cube: its column block is `16·n_frags` columns of one slice.
    pub n_frags: u32,
    /// Vector width of the y loads and stores (divides every slice width).
    pub out_vector: u32,
    /// Vector width of the B loads along the rank (divides `max_rank`).
    pub rank_vector: u32,
    /// How the fragments are multiplied: on tensor cores by hand (`ldmatrix`, m16n8k16 and
    /// `stmatrix`: the pipelined kernel with B in registers, see [`Self::multiplies_by_hand`]),
    /// through cubecl's cooperative matrices (`wmma`), or emulated: each lane computes its
    /// share of a fragment with FMAs from the same staged tiles (see [`emulate_fragment`]),
    /// never chosen by [`Self::supported`], it lets CI run the kernels' tiling on lavapipe.
    pub fragments: Fragments,
    /// 1: the next token tile is loaded into registers while the cube works on the current
    /// one ([`expand_mma_kernel`]). 2–4: asynchronous copies into that many shared-memory
    /// stages, `stages − 1` tiles ahead ([`crate::expand_mma_pipelined`]); see
    /// [`Self::with_stages`].
    pub stages: u32,
    /// Copies of the intermediate to add up while staging it (`[a_splits, tokens, c·R]`):
    /// the partial sums of a tensor-core shrink with `k_splits` = `a_splits`. 1: one copy of
    /// full sums. See [`Self::summing`].
    pub a_splits: u32,
}

impl MmaExpandConfig {
    /// The configuration for a `16·m_frags`-token × `16·n_frags`-column cube tile (on tensor
    /// cores where the device has a 16×16×16 MMA with f32 accumulation for this storage type),
    /// staged through registers, or `None` where it does not apply: a rank or slice width that
    /// is not a multiple of 16, more than [`MAX_WARPS`] warps, or a tile that overruns
    /// [`SHARED_BUDGET`] or the device's shared memory.
    pub fn with_tile<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, m_frags: u32, n_frags: u32) -> Option<Self> {
        Self::tile_unchecked::<F>(device, layout, m_frags, n_frags)?.with_stages::<F>(device, 1)
    }

    /// The tile of [`Self::with_tile`] staged in `stages` shared-memory buffers
    /// ([`Self::with_stages`]), whether or not its register-staged form fits: a 256-column
    /// block at rank 64 does not fit the register-staged budget, but its pipelined stages do.
    pub fn with_pipelined_tile<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        m_frags: u32,
        n_frags: u32,
        stages: u32,
    ) -> Option<Self> {
        Self::tile_unchecked::<F>(device, layout, m_frags, n_frags)?.with_stages::<F>(device, stages)
    }

    /// The tile's configuration before its staging is checked: `None` only where the rank or a
    /// slice width is not a multiple of 16 or the tile has no warps or too many.
    fn tile_unchecked<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, m_frags: u32, n_frags: u32) -> Option<Self> {
        let widths: Vec<u32> = layout.slices().iter().map(|s| s.width).collect();
        if layout.max_rank() % TILE != 0 || widths.iter().any(|w| w % TILE != 0) {
            return None;
        }
        if m_frags == 0 || n_frags == 0 || m_frags * n_frags > MAX_WARPS {
            return None;
        }
        let elem = size_of::<F>();
        Some(MmaExpandConfig {
            groups: layout.groups(),
            max_rank: layout.max_rank(),
            m_frags,
            n_frags,
            out_vector: crate::config::vector_size(device, elem, &widths).min(8) as u32,
            rank_vector: crate::config::vector_size(device, elem, &[layout.max_rank()]) as u32,
            fragments: if cmma_supported::<F>(device) { Fragments::Cmma } else { Fragments::Emulated },
            stages: 1,
            a_splits: 1,
        })
    }

    /// This tile with its token tiles staged through `stages` shared-memory buffers filled by
    /// asynchronous copies (`stages` = 1: through registers, within [`SHARED_BUDGET`]), or
    /// `None` where the device has no asynchronous copies or block barriers, `stages` is not
    /// 1–4, the y vectors are not 16 bytes (the copy size), or the stages overrun the device's
    /// shared memory. The fragments become the kernel's default for this device (by hand where
    /// [`Self::multiplies_by_hand`] applies); [`Self::with_fragments`] picks another way.
    pub fn with_stages<F: CubePrimitive>(self, device: &DeviceProperties, stages: u32) -> Option<Self> {
        if !(1..=4).contains(&stages) {
            return None;
        }
        let staged = MmaExpandConfig { stages, ..self }
            .with_fragments_unchecked::<F>(device, Self::default_fragments::<F>(device, stages, self.max_rank));
        staged.shared_fits::<F>(device).then_some(staged)
    }

    /// This configuration multiplying its fragments as `fragments` says, or `None` where the
    /// device or the kernel lacks that way (by hand: the pipelined kernel with B in registers,
    /// on a device with `ldmatrix`, m16n8k16 and `stmatrix` for `F`) or the tiles no longer
    /// fit.
    pub fn with_fragments<F: CubePrimitive>(self, device: &DeviceProperties, fragments: Fragments) -> Option<Self> {
        // By hand, the kernel also needs `stmatrix`, stages and a rank with B in registers.
        let available = match fragments {
            Fragments::Ldmatrix => Self::by_hand_applies::<F>(device, self.stages, self.max_rank),
            other => other.available_on::<F>(device),
        };
        let config = self.with_fragments_unchecked::<F>(device, fragments);
        (available && config.shared_fits::<F>(device)).then_some(config)
    }

    /// The fastest way the device has for the kernel `stages` and `max_rank` select: by hand
    /// where it applies, else cooperative matrices where the device has them.
    fn default_fragments<F: CubePrimitive>(device: &DeviceProperties, stages: u32, max_rank: u32) -> Fragments {
        if Self::by_hand_applies::<F>(device, stages, max_rank) {
            Fragments::Ldmatrix
        } else if cmma_supported::<F>(device) {
            Fragments::Cmma
        } else {
            Fragments::Emulated
        }
    }

    /// Whether the fragments of the kernel `stages` and `max_rank` select are multiplied by
    /// hand on this device: the pipelined kernel with B in registers, from rank
    /// [`BY_HAND_MIN_RANK`] to [`B_REGISTERS_MAX_RANK`], where the device has `ldmatrix`,
    /// m16n8k16 and `stmatrix` for `F` (it adds its sums to the staged y with the last).
    fn by_hand_applies<F: CubePrimitive>(device: &DeviceProperties, stages: u32, max_rank: u32) -> bool {
        stages > 1
            && (BY_HAND_MIN_RANK..=B_REGISTERS_MAX_RANK).contains(&max_rank)
            && Fragments::Ldmatrix.available_on::<F>(device)
            && mma_fragments::stmatrix_supported::<F>(device)
    }

    /// `fragments`, with the B vector width its kernel reads: register pairs by hand (one
    /// 32-bit load per operand register), else the widest that divides the rank.
    fn with_fragments_unchecked<F: CubePrimitive>(self, device: &DeviceProperties, fragments: Fragments) -> Self {
        let rank_vector = match fragments {
            Fragments::Ldmatrix => 2,
            _ => crate::config::vector_size(device, size_of::<F>(), &[self.max_rank]) as u32,
        };
        MmaExpandConfig { fragments, rank_vector, ..self }
    }

    /// Whether one cube's shared memory fits: within [`SHARED_BUDGET`] for the register-staged
    /// kernel, within the device's limit for the pipelined one (whose y vectors must also be
    /// the 16-byte copy size).
    fn shared_fits<F: CubePrimitive>(&self, device: &DeviceProperties) -> bool {
        let elem = size_of::<F>() as u32;
        if self.stages == 1 {
            self.shared_bytes(elem) <= SHARED_BUDGET.min(device.hardware.max_shared_memory_size as u32)
        } else {
            crate::config::pipeline_fits(device, self.stages, self.out_vector * elem, self.pipelined_shared_bytes(elem))
        }
    }

    /// The default tile for segments of at most `max_segment_len` tokens, where the device
    /// has asynchronous copies (else the register-staged 32 × 128 tile). Up to rank
    /// [`PIPELINED_MAX_RANK`]: 16 tokens by 128 columns (64 where 128 does not fit),
    /// [`DEFAULT_STAGES`] stages ([`BY_HAND_HIGH_RANK_STAGES`] where the tile multiplies by
    /// hand from rank [`BY_HAND_HIGH_RANK`]). Above it: 32 tokens (16 where the longest segment
    /// is shorter) by 128 columns, [`HIGH_RANK_STAGES`] stages.
    ///
    /// Since the B fragments stay in registers ([`Self::b_in_registers`], H100, run 111 in
    /// runtime/BENCHMARKS.md), the 16-token tile (256 threads) is also the fastest
    /// at rank 64: qkv one copy 67.8 µs (the 32-token two-stage tile, B staged) → 63.2, MLA
    /// 31.1 → 28.5–28.8; the 32-token tile (512 threads) got slower with B in registers
    /// (fewer cubes fit a multiprocessor's registers).
    ///
    /// H100 sweeps (runtime/BENCHMARKS.md): at rank 16 the pipelined 16 × 128 tile took
    /// 64.7–69.8 µs for the qkv expand against 73.0–80.2 for the register kernel (runs
    /// 14–16), and 227.7–233.3 against 267.3–267.8 for gate_up; in the sweep of 2026-11-23 it
    /// was still the best or within 1% in all three modules. At rank 64 that sweep put the
    /// two-stage 32 × 128 tile at 282 µs against the register kernel's 375 for gate_up and
    /// 79 against 101 for qkv, and MLA at 47 against 45 (runs 14–16 had found three stages
    /// of the 16-token tile slower than registers at rank 64, its staged f32 intermediate
    /// being as large as its y tile). `None` without tensor cores.
    pub fn supported<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, max_segment_len: u32) -> Option<Self> {
        if !cmma_supported::<F>(device) {
            return None;
        }
        let widest = |m_frags| Self::widest_tile::<F>(device, layout, m_frags);
        let register_staged = || widest(if max_segment_len >= 2 * TILE { 2 } else { 1 });
        let pipelined = if layout.max_rank() <= PIPELINED_MAX_RANK {
            let by_hand_high_rank =
                layout.max_rank() >= BY_HAND_HIGH_RANK && Self::by_hand_applies::<F>(device, DEFAULT_STAGES, layout.max_rank());
            let stages = if by_hand_high_rank { BY_HAND_HIGH_RANK_STAGES } else { DEFAULT_STAGES };
            widest(1).and_then(|config| config.with_stages::<F>(device, stages))
        } else {
            register_staged().and_then(|config| config.with_stages::<F>(device, HIGH_RANK_STAGES))
        };
        pipelined.or_else(register_staged)
    }

    /// This tile, the one [`Self::for_batch`] gave the batch, adding up an intermediate of
    /// `copies` copies ([`Self::summing`]). Above [`PIPELINED_MAX_RANK`], with two or more
    /// copies, the default's 32-token pipelined tile becomes a 16-token one (measured at rank
    /// 64 while the 32-token tile was its default, before run 111): each stage holds every
    /// copy's f32 intermediate rows, so halving the tokens halves what the copies add to a stage. H100, T = 4096 in 8
    /// segments, rank 64, each expand alone from CUDA graphs (runtime/BENCHMARKS.md, run
    /// 102): 2 copies, qkv 79.0 → 76.2 µs, MLA 36.2 → 33.2; 4 copies, 118.7 → 81.0 and
    /// 54.4 → 36.9 (one copy: 76.1 → 72.3 and 30.9 → 31.9, so one copy keeps the 32-token
    /// tile). In MLA's prefill pair after the wide split shrink (run 106, three rounds):
    /// expand 36.2–36.6 → 33.4–33.8 µs, pair 90.4–91.6 → 87.7–88.4. `None` where the copies
    /// do not fit.
    ///
    /// A tile multiplied by hand from rank [`BY_HAND_HIGH_RANK`] adding up exactly
    /// [`BY_HAND_DEEP_COPIES`] copies takes [`DEFAULT_STAGES`] stages, where the kernel reads
    /// each tile's token rows a tile ahead (`prefetches_rows`). H100, T = 4096 in 8 segments,
    /// rank 64, two copies, each expand alone at the default split (run 139): qkv 58.6 µs in
    /// two stages → 53.7 in three, MLA 25.1 → 23.6; the qkv pair (run 140, two rounds) 94.9–95.7
    /// → 90.5–93.1 µs. In two stages the same reads cost ptxas 64 registers instead of 48 (four
    /// cubes per multiprocessor): they stay off there. Four copies (MLA's tall shrink) keep
    /// two stages: in three, 60 registers and 63 KiB give three cubes per multiprocessor, and
    /// the expand alone took 29.3 µs at its split against 25.7 in two (run 142; no split of
    /// the three-stage tile came under 29); the 16 × 256 tiles took 27.4 at best (run 148).
    /// One copy was not timed with them.
    pub fn batch_summing<F: CubePrimitive>(self, device: &DeviceProperties, layout: &LoraLayout, copies: u32) -> Option<Self> {
        let shorter = || Self::with_tile::<F>(device, layout, 1, self.n_frags).and_then(|c| c.with_stages::<F>(device, self.stages));
        let copies_staged = copies > 1 && self.stages > 1 && self.m_frags > 1 && layout.max_rank() > PIPELINED_MAX_RANK;
        let tile = if copies_staged { shorter().unwrap_or(self) } else { self };
        let deep = tile.multiplies_by_hand() && tile.max_rank >= BY_HAND_HIGH_RANK && copies == BY_HAND_DEEP_COPIES;
        let deep = deep.then(|| tile.with_stages::<F>(device, DEFAULT_STAGES).filter(|c| c.multiplies_by_hand())).flatten();
        deep.and_then(|c| c.summing::<F>(device, copies)).or_else(|| tile.summing::<F>(device, copies))
    }

    /// Whether the pipelined kernel reads each tile's token rows a tile ahead of its copies:
    /// by hand, in three or four stages (see [`Self::batch_summing`]).
    pub fn prefetches_rows(&self) -> bool {
        self.multiplies_by_hand() && self.stages >= 3
    }

    /// [`Self::supported`], and only for batches with enough 16-token tiles to fill the GPU
    /// (smaller batches: [`Self::for_decode`]).
    pub fn for_batch<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
    ) -> Option<Self> {
        let tiles = num_segments as u64 * u64::from(max_segment_len / TILE);
        (tiles >= u64::from(crate::config::multiprocessors(device)))
            .then(|| Self::supported::<F>(device, layout, max_segment_len))
            .flatten()
    }

    /// The tile for a batch whose longest segment holds `max_segment_len` tokens, where
    /// [`Self::for_batch`] declines (too few 16-token tiles to fill the GPU): the
    /// register-staged tile of one 16-token fragment row by the widest column block (8
    /// fragments, else 4), on tensor cores, from [`DECODE_MIN_SEGMENT`] tokens per segment
    /// on. `None` below that, or without tensor cores.
    ///
    /// H100, decode pairs from CUDA graphs (run 67, runtime/BENCHMARKS.md): with segments of
    /// 8 to 128 tokens this tile made all 24 pairs faster than the CUDA-core expand did, by
    /// 1–30% (gate_up R=64 T=128, 8 adapters: 54.7 → 41.5 µs), and under programmatic launch
    /// 21 of them (up to 34%; the other three within 5%). With segments of 1 to 4 tokens it
    /// lost up to 59% (gate_up R=16 T=8, 8 adapters, PDL: 7.7 → 12.3 µs).
    pub fn for_decode<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, max_segment_len: u32) -> Option<Self> {
        if max_segment_len < DECODE_MIN_SEGMENT || !cmma_supported::<F>(device) {
            return None;
        }
        Self::widest_tile::<F>(device, layout, 1)
    }

    /// [`Self::for_decode`] for a pair launched as `launch` says. Under a programmatic launch
    /// (a CUDA graph, [`crate::cuda_graph::GraphBuilder::set_programmatic_launch`]) also from
    /// [`PROGRAMMATIC_DECODE_MIN_SEGMENT`] tokens, where the rank is
    /// [`PROGRAMMATIC_DECODE_MIN_RANK`] or more and the tile's grid (segments × column
    /// blocks) has at most [`PROGRAMMATIC_DECODE_MAX_CUBES_PER_SM`] cubes per multiprocessor.
    ///
    /// H100, 8 segments of 4 tokens after the programmatic split-K shrink, under PDL (run 99,
    /// runtime/BENCHMARKS.md, two rounds): against the CUDA-core expand the widest tile took
    /// qkv R=64 from 15.0–15.1 to 13.8 µs and MLA R=64 from 13.8–14.0 to 13.0–13.2 (grids of
    /// 384 and 136 cubes), but gate_up R=64 (1792 cubes) from 23.6–24.9 to 27.3–27.4, and
    /// every rank-16 pair 4–70% slower. Plainly launched it was level or slower.
    pub fn for_decode_launch<F: CubePrimitive>(
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        launch: LaunchMode,
    ) -> Option<Self> {
        let plain = Self::for_decode::<F>(device, layout, max_segment_len);
        if launch == LaunchMode::Plain || plain.is_some() {
            return plain;
        }
        if max_segment_len < PROGRAMMATIC_DECODE_MIN_SEGMENT
            || layout.max_rank() < PROGRAMMATIC_DECODE_MIN_RANK
            || !cmma_supported::<F>(device)
        {
            return None;
        }
        let tile = Self::widest_tile::<F>(device, layout, 1)?;
        let cubes = num_segments as u64 * u64::from(tile.column_blocks(layout));
        let most = u64::from(crate::config::multiprocessors(device)) * u64::from(PROGRAMMATIC_DECODE_MAX_CUBES_PER_SM);
        (cubes <= most).then_some(tile)
    }

    /// Column blocks of all slices: the cubes per token tile of a segment that have columns
    /// to work on (grid x spans the widest slice; cubes past a narrower one exit at once).
    pub fn column_blocks(&self, layout: &LoraLayout) -> u32 {
        layout.slices().iter().map(|s| s.width.div_ceil(self.block_columns())).sum()
    }

    /// Cubes sharing out each segment's token tiles for a batch of `num_segments` segments of
    /// at most `max_segment_len` tokens: `requested` (clamped to the tiles) or, for 0, the
    /// default: for tiles multiplied by hand the split of [`Self::balanced_token_splits`],
    /// else until the grid has about eight cubes per multiprocessor.
    pub fn token_splits(
        &self,
        device: &DeviceProperties,
        layout: &LoraLayout,
        num_segments: usize,
        max_segment_len: u32,
        requested: u32,
    ) -> u32 {
        let segments = (num_segments as u32).max(1);
        let tiles = max_segment_len.div_ceil(self.tile_tokens()).max(1);
        let splits = match requested {
            0 if self.multiplies_by_hand() => self.balanced_token_splits(device, self.column_blocks(layout) * segments, tiles),
            0 => crate::config::splits_to_fill_on(device, self.column_blocks(layout) * segments, tiles),
            n => n.clamp(1, tiles),
        };
        splits.min((65535 / segments).max(1))
    }

    /// The token split, from 1 to `tiles`, with the shortest makespan for `cubes_per_split`
    /// cubes per split (the first of equals): the grid runs in waves of
    /// [`Self::resident_cubes_by_hand`] per multiprocessor, each wave as long as a cube's
    /// tiles plus [`CUBE_OVERHEAD_TILES`] (filling its stages and loading its B operands).
    /// Eight cubes per multiprocessor, the rule before, put 1.65 waves of cubes with 4 tiles
    /// on MLA's grid; the model picks 0.82 waves of 8 tiles. H100, T = 4096 in 8 segments, rank 64, two stages, the expand alone
    /// (runtime/BENCHMARKS.md, runs 132–133): MLA 25.8 → 23.7–23.9 µs (one copy) and
    /// 27.4 → 24.8 (two); qkv keeps its split of 3, the fastest of 1–16 in both runs.
    fn balanced_token_splits(&self, device: &DeviceProperties, cubes_per_split: u32, tiles: u32) -> u32 {
        let slots = u64::from(crate::config::multiprocessors(device) * self.resident_cubes_by_hand(device));
        (1..=tiles.max(1))
            .min_by_key(|&splits| {
                let waves = (u64::from(cubes_per_split) * u64::from(splits)).div_ceil(slots.max(1));
                waves * u64::from(tiles.div_ceil(splits) + CUBE_OVERHEAD_TILES)
            })
            .unwrap_or(1)
    }

    /// Cubes of this by-hand configuration one multiprocessor holds at once, by its shared
    /// memory (a 16-bit storage type: the only kind multiplied by hand) and by
    /// [`BY_HAND_REGISTERS`] registers per thread (at least one).
    fn resident_cubes_by_hand(&self, device: &DeviceProperties) -> u32 {
        let by_registers = crate::config::SM_REGISTERS / (BY_HAND_REGISTERS * self.warps() * 32).max(1);
        let by_shared = device.hardware.max_shared_memory_size as u32 / self.pipelined_shared_bytes(2).max(1);
        by_registers.min(by_shared).max(1)
    }

    /// The `m_frags`-row tile with the widest column block that fits: 8 fragments, else 4.
    fn widest_tile<F: CubePrimitive>(device: &DeviceProperties, layout: &LoraLayout, m_frags: u32) -> Option<Self> {
        Self::with_tile::<F>(device, layout, m_frags, 8).or_else(|| Self::with_tile::<F>(device, layout, m_frags, 4))
    }

    /// This configuration adding up `a_splits` copies of partial sums as it stages the
    /// intermediate (see [`Self::a_splits`]), or `None` where `a_splits` is 0 or the larger
    /// intermediate stages no longer fit (the pipelined kernel stages every copy).
    pub fn summing<F: CubePrimitive>(self, device: &DeviceProperties, a_splits: u32) -> Option<Self> {
        if a_splits == 0 {
            return None;
        }
        MmaExpandConfig { a_splits, ..self }.with_stages::<F>(device, self.stages)
    }

    /// Whether this is the configuration [`Self::with_pipelined_tile`], [`Self::summing`] and
    /// [`Self::with_fragments`] derive for its tile, depth, copies and fragments on this layout
    /// and device.
    pub fn fits<F: CubePrimitive>(&self, device: &DeviceProperties, layout: &LoraLayout) -> bool {
        Self::with_pipelined_tile::<F>(device, layout, self.m_frags, self.n_frags, self.stages)
            .and_then(|base| base.summing::<F>(device, self.a_splits))
            .and_then(|base| base.with_fragments::<F>(device, self.fragments))
            == Some(*self)
    }

    /// Whether the fragments are multiplied on tensor cores.
    pub fn tensor_cores(&self) -> bool {
        self.fragments.tensor_cores()
    }

    /// Whether the pipelined kernel multiplies by hand: A fragments by `ldmatrix`, B operand
    /// registers from the pool, m16n8k16 MMAs, and each warp adds its sums to the staged y tile
    /// itself (`ldmatrix` / `stmatrix` on the storage type), with no f32 delta tile.
    pub fn multiplies_by_hand(&self) -> bool {
        self.fragments == Fragments::Ldmatrix
    }

    pub fn warps(&self) -> u32 {
        self.m_frags * self.n_frags
    }

    pub fn tile_tokens(&self) -> u32 {
        self.m_frags * TILE
    }

    pub fn block_columns(&self) -> u32 {
        self.n_frags * TILE
    }

    /// Shared memory one cube of this configuration holds, for storage type `F`.
    pub fn shared_memory<F: CubePrimitive>(&self) -> u32 {
        let elem = size_of::<F>() as u32;
        if self.stages == 1 { self.shared_bytes(elem) } else { self.pipelined_shared_bytes(elem) }
    }

    /// The staged B block and intermediate tile and the f32 y tile (rows padded by 8 elements).
    fn shared_bytes(&self, elem: u32) -> u32 {
        let rank_stride = self.max_rank + 8;
        (self.block_columns() + self.tile_tokens()) * rank_stride * elem + self.tile_tokens() * (self.block_columns() + 8) * 4
    }

    /// Whether the pipelined kernel loads each warp's B fragments from the pool into registers
    /// once for all the cube's tiles instead of staging the B block in shared memory and
    /// loading its fragments every tile: on tensor cores, up to rank
    /// [`B_REGISTERS_MAX_RANK`]. A B fragment costs as many instructions to load as the
    /// intermediate's: with them in registers each rank step loads one fragment, not two.
    /// H100, prefill expands alone (runtime/BENCHMARKS.md, run 111): the 16-token tiles
    /// 6–16% faster (qkv R=64 73.4 → 63.2 µs, MLA R=64 two copies 33.3 → 30.0).
    pub fn b_in_registers(&self) -> bool {
        self.tensor_cores() && self.max_rank <= B_REGISTERS_MAX_RANK
    }

    /// The pipelined kernel's: the operand tile, the B block unless its fragments are in
    /// registers ([`Self::b_in_registers`]), the f32 delta tile unless the warps add their sums
    /// to the staged y themselves ([`Self::multiplies_by_hand`]), and per stage a y tile in the
    /// storage type (by hand, rows one vector longer: `ldmatrix` and `stmatrix` rows then fall
    /// in different banks) and an f32 intermediate tile per copy.
    fn pipelined_shared_bytes(&self, elem: u32) -> u32 {
        let (tm, bw, rs) = (self.tile_tokens(), self.block_columns(), self.max_rank + 8);
        let b_block = if self.b_in_registers() { 0 } else { bw * rs * elem };
        let delta = if self.multiplies_by_hand() { 0 } else { tm * (bw + 8) * 4 };
        let y_row = bw + if self.multiplies_by_hand() { self.out_vector } else { 0 };
        tm * rs * elem + b_block + delta + self.stages * tm * (y_row * elem + self.a_splits * self.max_rank * 4)
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_mma_kernel<F: Float, NY: Size, NB: Size>(
    a: &Array<f32>,
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
    #[comptime] grid_dependency: bool,
    #[comptime] y_before_wait: bool,
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
    // Padded strides keep consecutive rows out of the same shared-memory banks; both stay
    // multiples of 16 bytes as the MMA loads require.
    let rs = comptime!(max_rank + 8);
    let ys = comptime!(bw + 8);
    // y and B tiles hold whole vectors (one shared-memory access per vector, not per element);
    // MMA loads and stores address them in vectors, with strides in elements.
    let ysv = comptime!(ys / ny);

    let cube = expand_cube(slice_info, seg_indptr, weight_indices, ranks, scales, token_splits, cfg);
    let (rank, end, cols, group, scale) = (cube.rank, cube.end, cube.cols, cube.group, cube.scale);
    let tid = UNIT_POS as usize;
    let warp = UNIT_POS_Y as usize;
    let mf = warp / n_frags;
    let nf = warp % n_frags;
    // Warp-uniform: fragments past the slice's end do nothing.
    let active = nf * tile < cols;
    let rank_steps = rank.div_ceil(tile);

    let mut b_tile = SharedMemory::<Vector<F, NB>>::new_aligned(comptime!(bw * rs / nb), 128usize);
    let mut a_tile = SharedMemory::<F>::new_aligned(comptime!(tm * rs), 128usize);
    let mut y_tile = SharedMemory::<Vector<f32, NY>>::new_aligned(comptime!(tm * ys / ny), 128usize);

    let y_vecs = out_features as usize / ny;
    let y_col = (cube.offset + cube.block0) / ny;
    // Each thread moves the same `a_per` intermediate entries and `y_per` y vectors of every
    // token tile; the next tile's are loaded into registers before the current tile's MMAs,
    // so a cube looping over several tiles overlaps their memory latency with its work.
    let a_per = comptime!((tm * max_rank).div_ceil(threads));
    let y_per = comptime!((tm * bw_vecs).div_ceil(threads));
    let mut a_next = Array::<f32>::new(a_per);
    let mut y_next = Array::<Vector<F, NY>>::new(y_per);
    // The permuted token of each of the thread's intermediate and y entries: batch metadata,
    // read before the grid dependency point so that after it y and the intermediate are one
    // round trip away. H100, 16-token segments, rank 64, the split-K pair under PDL (runs
    // 90-91): qkv and MLA 2% faster, gate_up 10%.
    let mut a_tokens = Array::<usize>::new(a_per);
    let mut y_tokens = Array::<usize>::new(y_per);
    let step = cube.step;
    let mut p0 = cube.first;
    tile_tokens(token_perm, &mut a_tokens, &mut y_tokens, p0, end, cfg);
    // Where the kernel before does not write y (see `YWrittenBy`), the first tile's y loads go
    // out before B's, so the two overlap.
    let y_early = comptime!(grid_dependency && y_before_wait);
    if comptime!(y_early) {
        load_y_tile::<F, NY>(y, &y_tokens, &mut y_next, p0, end, cols, y_vecs, y_col, cfg);
    }
    stage_b_block(b_pool, &mut b_tile, &cube, out_features, cfg);
    // The intermediate and y may be the previous kernels' outputs; B and the batch metadata
    // are not (as in the scalar expand): under a programmatic launch B streams in first.
    grid_dependency_point(grid_dependency, true);
    if comptime!(!y_early) {
        load_y_tile::<F, NY>(y, &y_tokens, &mut y_next, p0, end, cols, y_vecs, y_col, cfg);
    }
    load_a_tile(a, &a_tokens, &mut a_next, p0, end, rank, group, cfg);
    while p0 < end {
        // The tile's intermediate, scaled, in the storage type, and y in f32; zeros past the
        // rank, the segment and the slice.
        #[unroll]
        for s in 0..a_per {
            let idx = tid + s * threads;
            if idx < comptime!(tm * max_rank) {
                a_tile[(idx / max_rank) * rs + idx % max_rank] = F::cast_from(scale * a_next[s]);
            }
        }
        #[unroll]
        for s in 0..y_per {
            let w = tid + s * threads;
            if w < comptime!(tm * bw_vecs) {
                y_tile[(w / bw_vecs) * ysv + w % bw_vecs] = Vector::<f32, NY>::cast_from(y_next[s]);
            }
        }
        sync_cube();
        if p0 + step < end {
            tile_tokens(token_perm, &mut a_tokens, &mut y_tokens, p0 + step, end, cfg);
            load_a_tile(a, &a_tokens, &mut a_next, p0 + step, end, rank, group, cfg);
            load_y_tile::<F, NY>(y, &y_tokens, &mut y_next, p0 + step, end, cols, y_vecs, y_col, cfg);
        }
        if comptime!(cfg.tensor_cores()) {
            if active {
                let acc = unsafe {
                    cmma::Matrix::<f32>::uninitialized(
                        cmma::MatrixIdent::Accumulator,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::Undefined,
                    )
                };
                let y_frag = (mf * tile * ys + nf * tile) / ny;
                cmma::load_with_layout(
                    &acc,
                    &y_tile.slice(y_frag, comptime!(tm * ysv)),
                    comptime!(ys as u32),
                    cmma::MatrixLayout::RowMajor,
                );
                multiply_rank_steps::<F, NB>(&acc, &a_tile, &b_tile, mf, nf, rank_steps, cfg);
                cmma::store(&mut y_tile.slice_mut(y_frag, comptime!(tm * ysv)), &acc, comptime!(ys as u32), cmma::MatrixLayout::RowMajor);
            }
        } else {
            if active {
                let (y0, a0, b0) = (mf * tile * ys + nf * tile, mf * tile * rs, nf * tile * rs);
                emulate_fragment::<F, NY, NB>(&mut y_tile, y0, &a_tile, a0, &b_tile, b0, rank_steps, ys, rs, ny, nb, true);
            }
        }
        sync_cube();
        let mut w = tid;
        while w < comptime!(tm * bw_vecs) {
            let i = w / bw_vecs;
            let cv = w % bw_vecs;
            if p0 + i < end && cv * ny < cols {
                let yi = token_perm[p0 + i] as usize * y_vecs + y_col + cv;
                y[yi] = Vector::<F, NY>::cast_from(y_tile[i * ysv + cv]);
            }
            w += threads;
        }
        sync_cube();
        p0 += step;
    }
}

/// Adds to the warp's accumulator its fragment's product `(scale·a)·Bᵀ` over `rank_steps`
/// 16-wide rank steps, on tensor cores: rows `16·mf..` of the staged intermediate `a_tile`
/// (storage type, row stride `max_rank + 8`) and rows `16·nf..` of the staged B block.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn multiply_rank_steps<F: Float, NB: Size>(
    acc: &cmma::Matrix<f32>,
    a_tile: &SharedMemory<F>,
    b_tile: &SharedMemory<Vector<F, NB>>,
    mf: usize,
    nf: usize,
    rank_steps: usize,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tile = comptime!(TILE as usize);
    let bw = comptime!(cfg.block_columns() as usize);
    let nb = comptime!(cfg.rank_vector as usize);
    let rs = comptime!(cfg.max_rank as usize + 8);
    let rsv = comptime!(rs / nb);
    for kk in 0..rank_steps {
        let af = load_operand_fragment::<F>(a_tile, mf, kk, cfg);
        // Operand B(j, n) = B[slot, column n, j]: the staged rows are its columns.
        let bf = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::ColMajor) };
        cmma::load(&bf, &b_tile.slice((nf * tile * rs + kk * tile) / nb, comptime!(bw * rsv)), comptime!(rs as u32));
        cmma::execute::<F, F, f32, f32>(&af, &bf, acc, acc);
    }
}

/// The MMA operand fragment of the staged intermediate `a_tile` (storage type, row stride
/// `max_rank + 8`) for fragment row `mf` and 16-wide rank step `kk`.
#[cube]
pub(crate) fn load_operand_fragment<F: Float>(
    a_tile: &SharedMemory<F>,
    mf: usize,
    kk: usize,
    #[comptime] cfg: MmaExpandConfig,
) -> cmma::Matrix<F> {
    let tile = comptime!(TILE as usize);
    let tm = comptime!(cfg.tile_tokens() as usize);
    let rs = comptime!(cfg.max_rank as usize + 8);
    cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &a_tile.slice(mf * tile * rs + kk * tile, comptime!(tm * rs)),
        comptime!(rs as u32),
    )
}

/// A warp's 16×16 fragment product without tensor cores: `out[r, c] (+)= Σ_j a[r, j]·b[c, j]`
/// over `steps` 16-wide rank steps, for the fragment whose first element is `out0` of the f32
/// tile `out` (row stride `os` elements, vectors of `no`), first A row at element `a0` of `a`
/// and first B row at element `b0` of `b` (vectors of `nb`; both with row stride `rs`);
/// `accumulate` adds to `out`, else overwrites it. Lane l computes the output vectors
/// `l + 32·u` of the fragment (row-major, `16/no` per row), so each lane writes whole vectors
/// of its own.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn emulate_fragment<F: Float, NO: Size, NB: Size>(
    out: &mut SharedMemory<Vector<f32, NO>>,
    out0: usize,
    a: &SharedMemory<F>,
    a0: usize,
    b: &SharedMemory<Vector<F, NB>>,
    b0: usize,
    steps: usize,
    #[comptime] os: usize,
    #[comptime] rs: usize,
    #[comptime] no: usize,
    #[comptime] nb: usize,
    #[comptime] accumulate: bool,
) {
    let tile = comptime!(TILE as usize);
    let row_vecs = comptime!(TILE as usize / no);
    let depth = steps * tile;
    let mut u = UNIT_POS_X as usize;
    while u < comptime!(TILE as usize * TILE as usize / no) {
        let r = u / row_vecs;
        let c0 = (u % row_vecs) * no;
        let at = (out0 + r * os + c0) / no;
        let mut v = Vector::<f32, NO>::new(0.0);
        if comptime!(accumulate) {
            v = out[at];
        }
        #[unroll]
        for l in 0..no {
            let mut sum = 0.0f32;
            for j in 0..depth {
                let bo = b0 + (c0 + l) * rs + j;
                sum += f32::cast_from(a[a0 + r * rs + j]) * f32::cast_from(b[bo / nb][bo % nb]);
            }
            v[l] = v[l] + sum;
        }
        out[at] = v;
        u += 32;
    }
}

/// An expand cube's place in the batch: its slot's rank and scale; its token tiles (the first
/// at position `first` of the permuted batch, then every `step` positions up to the segment's
/// `end`); and its column block: the slice's first column in y and intermediate group, the
/// block's first column within the slice and its width (a multiple of 16, as slice widths are).
#[derive(CubeType)]
pub(crate) struct ExpandCube {
    pub slot: usize,
    pub rank: usize,
    pub scale: f32,
    pub first: usize,
    pub step: usize,
    pub end: usize,
    pub offset: usize,
    pub group: usize,
    pub block0: usize,
    pub cols: usize,
}

/// Reads the cube's place from the batch metadata (column block on grid x, slice on y, segment
/// and token split on z) and exits the cube where it has nothing to do: a block past its
/// slice's end, a segment with no adapter or of rank 0, or a split past the segment's end.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_cube(
    slice_info: &Array<u32>,
    seg_indptr: &Array<u32>,
    weight_indices: &Array<u32>,
    ranks: &Array<u32>,
    scales: &Array<f32>,
    token_splits: u32,
    #[comptime] cfg: MmaExpandConfig,
) -> ExpandCube {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let bw = comptime!(cfg.block_columns() as usize);
    let splits = token_splits as usize;
    let seg = CUBE_POS_Z as usize / splits;
    let split = CUBE_POS_Z as usize % splits;
    let slice = CUBE_POS_Y as usize;
    let width = slice_info[slice * 3 + 1] as usize;
    let block0 = CUBE_POS_X as usize * bw;
    let slot = weight_indices[seg];
    if block0 >= width || slot == NO_SLOT {
        terminate!();
    }
    let rank = ranks[slot as usize] as usize;
    let first = seg_indptr[seg] as usize + split * tm;
    let end = seg_indptr[seg + 1] as usize;
    if rank == 0 || first >= end {
        terminate!();
    }
    ExpandCube {
        slot: slot as usize,
        rank,
        scale: scales[slot as usize],
        first,
        step: splits * tm,
        end,
        offset: slice_info[slice * 3] as usize,
        group: slice_info[slice * 3 + 2] as usize,
        block0,
        cols: min(bw, width - block0),
    }
}

/// Stages the slot's B rows for the cube's column block (`16·n_frags` rows of `max_rank`
/// values, rows padded by 8 elements), zero past the rank and past the slice's end.
#[cube]
pub(crate) fn stage_b_block<F: Float, NB: Size>(
    b_pool: &Array<Vector<F, NB>>,
    b_tile: &mut SharedMemory<Vector<F, NB>>,
    cube: &ExpandCube,
    out_features: u32,
    #[comptime] cfg: MmaExpandConfig,
) {
    let bw = comptime!(cfg.block_columns() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let nb = comptime!(cfg.rank_vector as usize);
    let rank_vecs_max = comptime!((cfg.max_rank / cfg.rank_vector) as usize);
    let rsv = comptime!((cfg.max_rank as usize + 8) / nb);
    let b_row0 = (cube.slot * out_features as usize + cube.offset + cube.block0) * rank_vecs_max;
    let mut v = UNIT_POS as usize;
    while v < comptime!(bw * rank_vecs_max) {
        let n = v / rank_vecs_max;
        let j0 = (v % rank_vecs_max) * nb;
        let mut bv = Vector::<F, NB>::new(F::new(0.0));
        if n < cube.cols && j0 < cube.rank {
            bv = b_pool[b_row0 + v];
        }
        #[unroll]
        for l in 0..nb {
            if j0 + l >= cube.rank {
                bv[l] = F::new(0.0);
            }
        }
        b_tile[n * rsv + j0 / nb] = bv;
        v += threads;
    }
}

/// The permuted token of each of this thread's entries of the token tile at `p0`: its share of
/// the intermediate (`a_tokens`, as [`load_a_tile`] deals them) and of y (`y_tokens`, as
/// [`load_y_tile`] does); entries past the segment are left as they are (never read).
#[cube]
fn tile_tokens(
    token_perm: &Array<u32>,
    a_tokens: &mut Array<usize>,
    y_tokens: &mut Array<usize>,
    p0: usize,
    end: usize,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let tid = UNIT_POS as usize;
    #[unroll]
    for s in 0..comptime!((tm * max_rank).div_ceil(threads)) {
        let idx = tid + s * threads;
        let p = p0 + idx / max_rank;
        if p < end && idx < comptime!(tm * max_rank) {
            a_tokens[s] = token_perm[p] as usize;
        }
    }
    #[unroll]
    for s in 0..comptime!((tm * bw_vecs).div_ceil(threads)) {
        let w = tid + s * threads;
        let p = p0 + w / bw_vecs;
        if p < end && w < comptime!(tm * bw_vecs) {
            y_tokens[s] = token_perm[p] as usize;
        }
    }
}

/// Loads this thread's share of the intermediate of the token tile at `p0` into registers
/// (the sum of its copies; 0 past the rank or the segment), from the tokens [`tile_tokens`]
/// found.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_a_tile(
    a: &Array<f32>,
    a_tokens: &Array<usize>,
    a_next: &mut Array<f32>,
    p0: usize,
    end: usize,
    rank: usize,
    group: usize,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let max_rank = comptime!(cfg.max_rank as usize);
    let c_r = comptime!((cfg.groups * cfg.max_rank) as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let a_per = comptime!((tm * max_rank).div_ceil(threads));
    let a_splits = comptime!(cfg.a_splits as usize);
    let a_copy = a.len() / a_splits;
    let tid = UNIT_POS as usize;
    #[unroll]
    for s in 0..a_per {
        let idx = tid + s * threads;
        let i = idx / max_rank;
        let j = idx % max_rank;
        let mut e = 0.0f32;
        if p0 + i < end && j < rank && idx < comptime!(tm * max_rank) {
            let at = a_tokens[s] * c_r + group * max_rank + j;
            // A split-K shrink's partial sums: one copy per K split.
            #[unroll]
            for copy in 0..a_splits {
                e += a[copy * a_copy + at];
            }
        }
        a_next[s] = e;
    }
}

/// Loads this thread's share of y for the token tile at `p0` into registers (0 past the
/// segment or the slice's end), from the tokens [`tile_tokens`] found.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_y_tile<F: Float, NY: Size>(
    y: &Array<Vector<F, NY>>,
    y_tokens: &Array<usize>,
    y_next: &mut Array<Vector<F, NY>>,
    p0: usize,
    end: usize,
    cols: usize,
    y_vecs: usize,
    y_col: usize,
    #[comptime] cfg: MmaExpandConfig,
) {
    let tm = comptime!(cfg.tile_tokens() as usize);
    let threads = comptime!(cfg.warps() as usize * 32);
    let ny = comptime!(cfg.out_vector as usize);
    let bw_vecs = comptime!((cfg.block_columns() / cfg.out_vector) as usize);
    let y_per = comptime!((tm * bw_vecs).div_ceil(threads));
    let tid = UNIT_POS as usize;
    #[unroll]
    for s in 0..y_per {
        let w = tid + s * threads;
        let i = w / bw_vecs;
        let cv = w % bw_vecs;
        let mut yv = Vector::<F, NY>::new(F::new(0.0));
        if p0 + i < end && cv * ny < cols && w < comptime!(tm * bw_vecs) {
            yv = y[y_tokens[s] * y_vecs + y_col + cv];
        }
        y_next[s] = yv;
    }
}
