//! The adapter pool of one LoRA module: A and B in the compiler's layout, plus per-slot rank
//! and scale. Constructed from the `LoraLayout`, so its buffer sizes match the plan's.

use cubecl::prelude::*;
use lorac_plan::LoraLayout;

use crate::buffer::DeviceBuffer;
use crate::error::{LoraError, Result};

#[derive(Debug, Clone)]
pub struct AdapterPool<F> {
    pub(crate) layout: LoraLayout,
    pub(crate) a: DeviceBuffer<F>,
    pub(crate) b: DeviceBuffer<F>,
    pub(crate) ranks: DeviceBuffer<u32>,
    pub(crate) scales: DeviceBuffer<f32>,
    /// `[offset, width, group]` per slice, uploaded once so launches allocate nothing.
    pub(crate) slice_table: DeviceBuffer<u32>,
    host_ranks: Vec<u32>,
    host_scales: Vec<f32>,
}

impl<F: CubeElement> AdapterPool<F> {
    /// `ranks[s]` is slot `s`'s adapter rank (0 = empty slot), `scales[s]` its `alpha / r`.
    pub fn new(
        layout: &LoraLayout,
        a: DeviceBuffer<F>,
        b: DeviceBuffer<F>,
        ranks: &[u32],
        scales: &[f32],
        client: &ComputeClient<impl Runtime>,
    ) -> Result<Self> {
        a.check_len("A", layout.a_elements() as usize)?;
        b.check_len("B", layout.b_elements() as usize)?;
        let slots = layout.slots() as usize;
        if ranks.len() != slots {
            return Err(LoraError::BufferSize { name: "ranks", expected: slots, actual: ranks.len() });
        }
        if scales.len() != slots {
            return Err(LoraError::BufferSize { name: "scales", expected: slots, actual: scales.len() });
        }
        if let Some((slot, &rank)) = ranks.iter().enumerate().find(|(_, r)| **r > layout.max_rank()) {
            return Err(LoraError::RankTooLarge { slot, rank, max_rank: layout.max_rank() });
        }
        Ok(AdapterPool {
            layout: layout.clone(),
            a,
            b,
            ranks: DeviceBuffer::upload(client, ranks),
            scales: DeviceBuffer::upload(client, scales),
            slice_table: DeviceBuffer::upload(client, &crate::config::slice_table(layout)),
            host_ranks: ranks.to_vec(),
            host_scales: scales.to_vec(),
        })
    }

    pub fn layout(&self) -> &LoraLayout {
        &self.layout
    }
    pub fn ranks(&self) -> &[u32] {
        &self.host_ranks
    }
    pub fn scales(&self) -> &[f32] {
        &self.host_scales
    }

    /// Rewrites every slot's rank in the existing device buffer (an adapter load or unload; no
    /// new buffer).
    pub fn write_ranks<R: Runtime>(&mut self, client: &ComputeClient<R>, ranks: &[u32]) -> Result<()> {
        if ranks.len() != self.host_ranks.len() {
            return Err(LoraError::BufferSize { name: "ranks", expected: self.host_ranks.len(), actual: ranks.len() });
        }
        if let Some((slot, &rank)) = ranks.iter().enumerate().find(|(_, r)| **r > self.layout.max_rank()) {
            return Err(LoraError::RankTooLarge { slot, rank, max_rank: self.layout.max_rank() });
        }
        self.ranks.write_at(client, 0, ranks)?;
        self.host_ranks.copy_from_slice(ranks);
        Ok(())
    }

    /// The launch API takes the layout explicitly; this rejects a pool built for another one.
    pub(crate) fn check_layout(&self, layout: &LoraLayout) -> Result<()> {
        if &self.layout != layout {
            return Err(LoraError::Layout("the adapter pool was built for a different LoraLayout".into()));
        }
        Ok(())
    }
}
