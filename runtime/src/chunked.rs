//! Chunked variant for prefill and mixed batches: segments are cut into chunks of at most
//! `chunk` tokens and padded with empty segments up to a capacity the plan fixes from its
//! maximum batch, so the launch grid (row blocks × capacity) and the comptime configuration
//! never change from step to step: a captured launch stays valid for every batch, and a long
//! prefill segment spreads over many cubes without a per-batch split heuristic.
//!
//! The math is the segmented shrink/expand's, so their f64 references apply unchanged.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::batch::{DeviceSegments, Segments};
use crate::buffer::DeviceBuffer;
use crate::config::{EXPAND_THREADS, ExpandConfig, SHRINK_THREADS, ShrinkConfig};
use crate::error::{LoraError, Result};
use crate::pool::AdapterPool;
use crate::{expand, shrink};

/// Fixed launch shape of one module, computed once from the layout and the plan's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedPlan {
    pub chunk: u32,
    pub capacity: usize,
    pub shrink: ShrinkConfig,
    pub expand: ExpandConfig,
}

impl ChunkedPlan {
    pub fn new(layout: &LoraLayout, max_tokens: u32, chunk: u32) -> Result<Self> {
        if chunk == 0 {
            return Err(LoraError::BadIndptr("chunk size must be positive"));
        }
        let max_rank = layout.max_rank();
        Ok(ChunkedPlan {
            chunk,
            capacity: Segments::chunk_capacity(max_tokens, layout.slots(), chunk),
            shrink: ShrinkConfig {
                groups: layout.groups(),
                max_rank,
                rows_per_cube: [4, 2, 1].into_iter().find(|r| max_rank % r == 0).unwrap_or(1),
                tokens_per_tile: chunk.min(4),
                token_splits: 1,
                threads: SHRINK_THREADS,
            },
            expand: ExpandConfig {
                groups: layout.groups(),
                out_vector: 1,
                max_rank,
                tokens_per_tile: chunk.min(8),
                token_splits: 1,
                threads: EXPAND_THREADS,
            },
        })
    }

    /// Host-side step: cut and pad this batch's segments to the plan's fixed shape.
    pub fn prepare(&self, segs: &Segments) -> Result<Segments> {
        segs.chunked(self.chunk, self.capacity)
    }

    fn check(&self, segs: &DeviceSegments) -> Result<()> {
        if segs.num_segments != self.capacity {
            return Err(LoraError::CapacityExceeded { needed: segs.num_segments, capacity: self.capacity });
        }
        Ok(())
    }

    pub fn launch_shrink<R: Runtime, F: Float + CubeElement>(
        &self,
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        chunks: &DeviceSegments,
        x: &DeviceBuffer<F>,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.check(chunks)?;
        shrink::launch_shrink(client, layout, pool, chunks, x, out, Some(self.shrink))
    }

    pub fn launch_expand<R: Runtime, F: Float + CubeElement>(
        &self,
        client: &ComputeClient<R>,
        layout: &LoraLayout,
        pool: &AdapterPool<F>,
        chunks: &DeviceSegments,
        a: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<F>,
    ) -> Result<()> {
        self.check(chunks)?;
        expand::launch_expand(client, layout, pool, chunks, a, y, Some(self.expand))
    }
}
