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
use crate::config::{ExpandConfig, ShrinkConfig};
use crate::error::{LoraError, Result};
use crate::expand::ExpandKernel;
use crate::expand_mma::MmaExpandConfig;
use crate::pool::AdapterPool;
use crate::shrink::ShrinkKernel;
use crate::shrink_mma::{MmaShrinkConfig, TILE};
use crate::{expand, shrink};

/// The tensor-core shrink with a token tile that divides the chunk, where one applies.
fn mma_shrink_for_chunks<R: Runtime, F: Float>(
    client: &ComputeClient<R>,
    layout: &LoraLayout,
    capacity: usize,
    chunk: u32,
) -> Option<MmaShrinkConfig> {
    if chunk % TILE != 0 {
        return None;
    }
    let preferred = MmaShrinkConfig::supported::<F>(client.properties(), layout, capacity, chunk)?;
    if chunk % preferred.tile_tokens() == 0 {
        return Some(preferred);
    }
    MmaShrinkConfig::with_tile::<F>(client.properties(), layout, frags_dividing(chunk, preferred.m_frags), preferred.n_frags)
}

/// The tensor-core expand with a token tile that divides the chunk, where one applies.
fn mma_expand_for_chunks<R: Runtime, F: Float>(client: &ComputeClient<R>, layout: &LoraLayout, chunk: u32) -> Option<MmaExpandConfig> {
    if chunk % TILE != 0 {
        return None;
    }
    let preferred = MmaExpandConfig::supported::<F>(client.properties(), layout, chunk)?;
    MmaExpandConfig::with_tile::<F>(client.properties(), layout, frags_dividing(chunk, preferred.m_frags), preferred.n_frags)?
        .with_stages::<F>(client.properties(), preferred.stages)
}

/// The largest of `m_frags`, `m_frags / 2`, … (powers of two) whose 16-token tiles divide
/// `chunk`, a multiple of 16: a chunk then never ends inside a tile.
fn frags_dividing(chunk: u32, mut m_frags: u32) -> u32 {
    while m_frags > 1 && chunk % (m_frags * TILE) != 0 {
        m_frags /= 2;
    }
    m_frags.max(1)
}

/// Fixed launch shape of one module, computed once from the layout and the plan's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedPlan {
    pub chunk: u32,
    pub capacity: usize,
    pub shrink: ShrinkKernel,
    pub expand: ExpandKernel,
}

impl ChunkedPlan {
    pub fn new<R: Runtime, F: Float>(client: &ComputeClient<R>, layout: &LoraLayout, max_tokens: u32, chunk: u32) -> Result<Self> {
        if chunk == 0 {
            return Err(LoraError::BadIndptr("chunk size must be positive"));
        }
        // The grid already has a cube per chunk: no further token split.
        let capacity = Segments::chunk_capacity(max_tokens, layout.slots(), chunk);
        // Tensor cores where the storage type has them and chunks hold whole token tiles.
        let shrink = match mma_shrink_for_chunks::<R, F>(client, layout, capacity, chunk) {
            Some(config) => ShrinkKernel::Mma { config, tiles_per_segment: chunk / config.tile_tokens() },
            None => {
                ShrinkKernel::Scalar(ShrinkConfig { token_splits: 1, ..ShrinkConfig::new(client, layout, size_of::<F>(), capacity, chunk) })
            }
        };
        let expand = match mma_expand_for_chunks::<R, F>(client, layout, chunk) {
            Some(config) => ExpandKernel::Mma { config, token_splits: 1 },
            None => {
                ExpandKernel::Scalar(ExpandConfig { token_splits: 1, ..ExpandConfig::new(client, layout, size_of::<F>(), capacity, chunk) })
            }
        };
        Ok(ChunkedPlan { chunk, capacity, shrink, expand })
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
