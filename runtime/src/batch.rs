//! Batch metadata: tokens grouped into segments by adapter slot.
//!
//! `token_perm[p]` is the row (in x and y) of the `p`-th token in slot order; segment `s` covers
//! positions `seg_indptr[s]..seg_indptr[s+1]` and uses slot `weight_indices[s]`
//! (`NO_SLOT` = no adapter). Tokens that appear in no segment are left untouched.

use cubecl::prelude::*;

use crate::buffer::DeviceBuffer;
use crate::error::{LoraError, Result};

/// Marks a segment (or token) that uses no adapter.
pub const NO_SLOT: u32 = u32::MAX;

/// Host copy of the segment metadata, validated against a slot count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    tokens: u32,
    /// Slot count the weight indices were validated against.
    slots: u32,
    seg_indptr: Vec<u32>,
    weight_indices: Vec<u32>,
    token_perm: Vec<u32>,
}

impl Segments {
    /// Checks every index so the kernels can trust the metadata.
    pub fn new(tokens: u32, seg_indptr: Vec<u32>, weight_indices: Vec<u32>, token_perm: Vec<u32>, slots: u32) -> Result<Self> {
        if seg_indptr.len() != weight_indices.len() + 1 {
            return Err(LoraError::BadIndptr("seg_indptr must have one more entry than weight_indices"));
        }
        if seg_indptr[0] != 0 {
            return Err(LoraError::BadIndptr("seg_indptr must start at 0"));
        }
        if seg_indptr.windows(2).any(|w| w[0] > w[1]) {
            return Err(LoraError::BadIndptr("seg_indptr must be non-decreasing"));
        }
        if *seg_indptr.last().unwrap() as usize != token_perm.len() {
            return Err(LoraError::BadIndptr("seg_indptr must end at the permutation length"));
        }
        if let Some(&slot) = weight_indices.iter().find(|&&w| w != NO_SLOT && w >= slots) {
            return Err(LoraError::SlotOutOfRange { slot, slots });
        }
        let mut seen = vec![false; tokens as usize];
        for &t in &token_perm {
            let entry = seen.get_mut(t as usize).ok_or(LoraError::TokenOutOfRange { token: t, tokens })?;
            if *entry {
                return Err(LoraError::DuplicateToken { token: t });
            }
            *entry = true;
        }
        Ok(Segments { tokens, slots, seg_indptr, weight_indices, token_perm })
    }

    /// Groups tokens by slot (stable, in slot order), the way a scheduler would.
    pub fn from_token_slots(token_slots: &[Option<u32>], slots: u32) -> Result<Self> {
        let mut order: Vec<u32> = (0..token_slots.len() as u32).filter(|&t| token_slots[t as usize].is_some()).collect();
        order.sort_by_key(|&t| token_slots[t as usize]);
        let mut seg_indptr = vec![0];
        let mut weight_indices = Vec::new();
        for (p, &t) in order.iter().enumerate() {
            let slot = token_slots[t as usize].unwrap();
            if weight_indices.last() != Some(&slot) {
                if p > 0 {
                    seg_indptr.push(p as u32);
                }
                weight_indices.push(slot);
            }
        }
        if !order.is_empty() {
            seg_indptr.push(order.len() as u32);
        }
        Segments::new(token_slots.len() as u32, seg_indptr, weight_indices, order, slots)
    }

    /// Cuts every segment into chunks of at most `chunk` tokens and pads with empty segments up
    /// to `capacity`, so one grid shape (sized by the plan) serves any batch.
    pub fn chunked(&self, chunk: u32, capacity: usize) -> Result<Self> {
        if chunk == 0 {
            return Err(LoraError::BadIndptr("chunk size must be positive"));
        }
        let mut seg_indptr = vec![0];
        let mut weight_indices = Vec::new();
        for s in 0..self.num_segments() {
            let (start, end) = (self.seg_indptr[s], self.seg_indptr[s + 1]);
            let mut p = start;
            while p < end {
                p = (p + chunk).min(end);
                seg_indptr.push(p);
                weight_indices.push(self.weight_indices[s]);
            }
        }
        if weight_indices.len() > capacity {
            return Err(LoraError::CapacityExceeded { needed: weight_indices.len(), capacity });
        }
        let last = *seg_indptr.last().unwrap();
        seg_indptr.resize(capacity + 1, last);
        weight_indices.resize(capacity, NO_SLOT);
        Ok(Segments { tokens: self.tokens, slots: self.slots, seg_indptr, weight_indices, token_perm: self.token_perm.clone() })
    }

    /// Segment capacity a plan must reserve for `max_tokens` tokens over `slots` slots when
    /// segments are cut into `chunk`-token chunks: every slot may leave one partial chunk.
    pub fn chunk_capacity(max_tokens: u32, slots: u32, chunk: u32) -> usize {
        (max_tokens.div_ceil(chunk.max(1)) + slots.min(max_tokens)) as usize
    }

    pub fn tokens(&self) -> u32 {
        self.tokens
    }
    pub fn num_segments(&self) -> usize {
        self.weight_indices.len()
    }
    pub fn seg_indptr(&self) -> &[u32] {
        &self.seg_indptr
    }
    pub fn weight_indices(&self) -> &[u32] {
        &self.weight_indices
    }
    pub fn token_perm(&self) -> &[u32] {
        &self.token_perm
    }
    pub fn max_segment_len(&self) -> u32 {
        self.seg_indptr.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// Slot of every token (`NO_SLOT` where none); the MoE kernels index by token.
    pub fn token_slots(&self) -> Vec<u32> {
        let mut slots = vec![NO_SLOT; self.tokens as usize];
        for s in 0..self.num_segments() {
            for p in self.seg_indptr[s]..self.seg_indptr[s + 1] {
                slots[self.token_perm[p as usize] as usize] = self.weight_indices[s];
            }
        }
        slots
    }

    pub fn upload<R: Runtime>(&self, client: &ComputeClient<R>) -> DeviceSegments {
        DeviceSegments {
            tokens: self.tokens,
            slots: self.slots,
            num_segments: self.num_segments(),
            max_segment_len: self.max_segment_len(),
            seg_indptr: DeviceBuffer::upload(client, &self.seg_indptr),
            weight_indices: DeviceBuffer::upload(client, &self.weight_indices),
            token_perm: DeviceBuffer::upload(client, &self.token_perm),
            token_slots: DeviceBuffer::upload(client, &self.token_slots()),
            written_by_kernels: false,
        }
    }
}

/// Device copy of validated [`Segments`].
#[derive(Debug, Clone)]
pub struct DeviceSegments {
    pub(crate) tokens: u32,
    pub(crate) slots: u32,
    pub(crate) num_segments: usize,
    pub(crate) max_segment_len: u32,
    pub(crate) seg_indptr: DeviceBuffer<u32>,
    pub(crate) weight_indices: DeviceBuffer<u32>,
    pub(crate) token_perm: DeviceBuffer<u32>,
    pub(crate) token_slots: DeviceBuffer<u32>,
    /// Whether kernels write these buffers (the MoE grouping on the device) rather than the
    /// host: the dense LoRA kernels then read them only after a programmatic launch's wait,
    /// not before it with the adapter weights (see `cuda_graph::GRID_DEPENDENCY_POINT`).
    pub(crate) written_by_kernels: bool,
}

impl DeviceSegments {
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
    /// Segments validated against more slots than the pool has could index past it.
    pub(crate) fn check_slots(&self, layout: &lorac_plan::LoraLayout) -> Result<()> {
        if self.slots > layout.slots() {
            return Err(LoraError::SlotOutOfRange { slot: self.slots - 1, slots: layout.slots() });
        }
        Ok(())
    }
    pub fn num_segments(&self) -> usize {
        self.num_segments
    }
}
