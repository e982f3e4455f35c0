//! Host-side kernel configurations. Each is computed from the `LoraLayout` (plus what the plan
//! knows about the batch) and becomes the kernel's comptime specialisation, so one compiled
//! kernel exists per (layout shape, tile choice) and the layout cannot disagree with the code.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

/// Threads per cube of the shrink kernels: the K dimension is split across them and their
/// partial dot products are tree-reduced in shared memory (power of two for that reason).
pub(crate) const SHRINK_THREADS: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShrinkConfig {
    pub groups: u32,
    pub max_rank: u32,
    /// A rows handled by one cube; divides `max_rank` so a cube never straddles two groups.
    pub rows_per_cube: u32,
    /// Tokens sharing each A load (they all read the same adapter).
    pub tokens_per_tile: u32,
    /// Cubes sharing one segment's token tiles (prefill parallelism; 1 for chunked launches).
    pub token_splits: u32,
    pub threads: u32,
}

impl ShrinkConfig {
    pub fn new(layout: &LoraLayout, max_segment_len: u32) -> Self {
        let max_rank = layout.max_rank();
        let rows_per_cube = [4, 2, 1].into_iter().find(|r| max_rank % r == 0).unwrap_or(1);
        let tokens_per_tile = match max_segment_len {
            0 | 1 => 1,
            2 => 2,
            _ => 4,
        };
        let tiles = max_segment_len.div_ceil(tokens_per_tile);
        ShrinkConfig {
            groups: layout.groups(),
            max_rank,
            rows_per_cube,
            tokens_per_tile,
            token_splits: (tiles / 8).clamp(1, 64),
            threads: SHRINK_THREADS,
        }
    }
}

/// Threads per cube of the expand kernels (one output vector per thread).
pub(crate) const EXPAND_THREADS: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpandConfig {
    pub groups: u32,
    /// Output columns per thread (the y vector width); set at launch from the device's vector
    /// widths and the slice widths.
    pub out_vector: u32,
    pub max_rank: u32,
    pub tokens_per_tile: u32,
    pub token_splits: u32,
    pub threads: u32,
}

impl ExpandConfig {
    pub fn new(layout: &LoraLayout, max_segment_len: u32) -> Self {
        let tokens_per_tile = match max_segment_len {
            0 | 1 => 1,
            2..=4 => max_segment_len.next_power_of_two(),
            _ => 8,
        };
        let tiles = max_segment_len.div_ceil(tokens_per_tile);
        ExpandConfig {
            groups: layout.groups(),
            out_vector: 1,
            max_rank: layout.max_rank(),
            tokens_per_tile,
            token_splits: (tiles / 4).clamp(1, 128),
            threads: EXPAND_THREADS,
        }
    }
}

/// Largest vector width the device reads efficiently that divides every given length.
pub(crate) fn vector_size<R: Runtime>(client: &ComputeClient<R>, elem_size: usize, lengths: &[u32]) -> usize {
    client
        .io_optimized_vector_sizes(elem_size)
        .filter(|v| lengths.iter().all(|l| *l as usize % v == 0))
        .max()
        .unwrap_or(1)
}

/// Per-slice table `[offset, width, group]` the expand kernels read (slices have unequal widths).
pub(crate) fn slice_table(layout: &LoraLayout) -> Vec<u32> {
    layout.slices().iter().zip(layout.slice_offsets()).flat_map(|(s, off)| [off, s.width, s.group]).collect()
}
