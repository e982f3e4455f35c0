//! The per-step metadata block: one device allocation of u32 words holding, at fixed
//! [`VIEW_ALIGN`]-aligned offsets, every index buffer a step's kernels read (token ids,
//! attention positions / slots / sequences / block tables, the adapter segments of the tokens and
//! of the lm_head rows, the rows that reach lm_head), each at its largest size under the plan's
//! limits. A step views each region at its actual length.
//!
//! Writing: the host packs the regions a step changes into one staging vector (a small header of
//! `(dst_offset, src_offset, len)` triples, then the words) and [`MetadataWrite::flush`] uploads
//! it and launches one scatter kernel that writes every region in place. cubecl 0.10's client has
//! no host→device write into an existing handle, so the staging vector is the one temporary pool
//! slice of a step; its length is rounded up to a power of two so that, after start-up has seen
//! each size class, the pool always finds a free slice of that size and reserves nothing new.

use cubecl::prelude::*;

use super::error::{ExecResult, ExecutorError};
use crate::buffer::{DeviceBuffer, VIEW_ALIGN};

/// Words per aligned step of the block's layout.
const ALIGN_WORDS: usize = (VIEW_ALIGN / 4) as usize;
/// Smallest staging vector (words): tiny decode steps all share one size class.
const MIN_STAGING_WORDS: usize = 1024;
const SCATTER_THREADS: u32 = 256;

/// The regions of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    TokenIds,
    Positions,
    SlotMapping,
    TokenSeq,
    BlockTables,
    SegIndptr,
    WeightIndices,
    TokenPerm,
    TokenSlots,
    HeadRows,
    HeadSegIndptr,
    HeadWeightIndices,
    HeadTokenPerm,
    HeadTokenSlots,
}

const REGIONS: usize = 14;

impl Region {
    const ALL: [Region; REGIONS] = [
        Region::TokenIds,
        Region::Positions,
        Region::SlotMapping,
        Region::TokenSeq,
        Region::BlockTables,
        Region::SegIndptr,
        Region::WeightIndices,
        Region::TokenPerm,
        Region::TokenSlots,
        Region::HeadRows,
        Region::HeadSegIndptr,
        Region::HeadWeightIndices,
        Region::HeadTokenPerm,
        Region::HeadTokenSlots,
    ];
}

/// Largest sizes of the regions, from the plan's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetadataLimits {
    pub tokens: usize,
    pub seqs: usize,
    pub pages_per_seq: usize,
    pub head_rows: usize,
    pub slots: usize,
}

impl MetadataLimits {
    fn capacity(&self, region: Region) -> usize {
        let segments = self.slots;
        match region {
            Region::TokenIds | Region::Positions | Region::SlotMapping | Region::TokenSeq => self.tokens,
            Region::BlockTables => self.seqs * self.pages_per_seq,
            // One segment per adapter slot in use (`Segments::from_token_slots`).
            Region::SegIndptr | Region::HeadSegIndptr => segments + 1,
            Region::WeightIndices | Region::HeadWeightIndices => segments,
            Region::TokenPerm | Region::TokenSlots => self.tokens,
            Region::HeadRows | Region::HeadTokenPerm | Region::HeadTokenSlots => self.head_rows,
        }
        .max(1)
    }
}

pub(crate) struct StepMetadata {
    block: DeviceBuffer<u32>,
    /// Word offset and capacity of each region, in [`Region::ALL`] order.
    regions: [(usize, usize); REGIONS],
    /// Largest staging vector a step can need (header plus every region full).
    max_staging_words: usize,
}

impl StepMetadata {
    pub fn new<R: Runtime>(client: &ComputeClient<R>, limits: MetadataLimits) -> ExecResult<Self> {
        let mut regions = [(0, 0); REGIONS];
        let mut words = 0usize;
        for (slot, region) in regions.iter_mut().zip(Region::ALL) {
            let capacity = limits.capacity(region);
            *slot = (words, capacity);
            words = (words + capacity).next_multiple_of(ALIGN_WORDS);
        }
        if words >= u32::MAX as usize {
            return Err(ExecutorError::Unsupported(format!("{words} words of per-step metadata")));
        }
        let max_staging_words = staging_words(3 * REGIONS + regions.iter().map(|r| r.1).sum::<usize>());
        Ok(StepMetadata { block: DeviceBuffer::empty(client, words), regions, max_staging_words })
    }

    /// `region` viewed at `len` words (checked against its capacity).
    pub fn view(&self, region: Region, len: usize) -> ExecResult<DeviceBuffer<u32>> {
        let (offset, capacity) = self.regions[region as usize];
        if len > capacity {
            return Err(ExecutorError::Batch(format!("{len} entries of {region:?} exceed the {capacity} sized from the plan's limits")));
        }
        self.block.slice(offset, len).map_err(|e| ExecutorError::Plan(format!("metadata region {region:?}: {e}")))
    }

    /// The same as signed words (slot mapping and positions).
    pub fn view_i32(&self, region: Region, len: usize) -> ExecResult<DeviceBuffer<i32>> {
        self.view(region, len)?.reinterpret().map_err(|e| ExecutorError::Plan(format!("metadata region {region:?}: {e}")))
    }

    pub fn bytes(&self) -> u64 {
        self.block.size_bytes()
    }

    pub fn write(&self) -> MetadataWrite<'_> {
        MetadataWrite { meta: self, header: Vec::with_capacity(3 * REGIONS), words: Vec::new() }
    }

    /// Runs one write of the largest staging size and one of each smaller size class, so the
    /// pool has seen every staging size before serving starts.
    pub fn warm_up<R: Runtime>(&self, client: &ComputeClient<R>) -> ExecResult<()> {
        let mut words = MIN_STAGING_WORDS;
        loop {
            let staging = vec![0u32; words];
            self.scatter(client, &staging, 0)?;
            if words >= self.max_staging_words {
                return Ok(());
            }
            words = (words * 2).min(self.max_staging_words);
        }
    }

    fn scatter<R: Runtime>(&self, client: &ComputeClient<R>, staging: &[u32], regions: usize) -> ExecResult<()> {
        let dev = DeviceBuffer::upload(client, staging);
        // Safety: every (dst, src, len) triple of the header was checked against the region's
        // capacity and the staging length when it was added; the kernel skips words outside
        // every triple.
        unsafe {
            scatter_kernel::launch_unchecked::<R>(
                client,
                crate::ops::grid_1d(staging.len().div_ceil(SCATTER_THREADS as usize)),
                CubeDim::new_1d(SCATTER_THREADS),
                dev.arg(1),
                self.block.arg(1),
                regions as u32,
                staging.len() as u32,
            );
        }
        Ok(())
    }
}

/// Regions to write in one scatter.
pub(crate) struct MetadataWrite<'a> {
    meta: &'a StepMetadata,
    header: Vec<(usize, usize)>,
    words: Vec<u32>,
}

impl MetadataWrite<'_> {
    /// Queues `region[..values.len()] = values`.
    pub fn put(&mut self, region: Region, values: impl IntoIterator<Item = u32>) -> ExecResult<usize> {
        let start = self.words.len();
        self.words.extend(values);
        let len = self.words.len() - start;
        let (_, capacity) = self.meta.regions[region as usize];
        if len > capacity {
            return Err(ExecutorError::Batch(format!("{len} entries of {region:?} exceed the {capacity} sized from the plan's limits")));
        }
        if self.header.iter().any(|&(r, _)| r == region as usize) {
            return Err(ExecutorError::Plan(format!("metadata region {region:?} written twice in one step")));
        }
        self.header.push((region as usize, start));
        Ok(len)
    }

    /// Uploads the staging vector and scatters it into the block (one temporary pool slice,
    /// one launch).
    pub fn flush<R: Runtime>(self, client: &ComputeClient<R>) -> ExecResult<()> {
        let MetadataWrite { meta, header, words } = self;
        let head = 3 * header.len();
        let mut staging = Vec::with_capacity(staging_words(head + words.len()));
        for (i, &(region, start)) in header.iter().enumerate() {
            let end = header.get(i + 1).map_or(words.len(), |next| next.1);
            staging.extend([meta.regions[region].0 as u32, (head + start) as u32, (end - start) as u32]);
        }
        staging.extend(words);
        staging.resize(staging_words(staging.len()), 0);
        meta.scatter(client, &staging, header.len())
    }
}

/// Staging length for `words` words: a power of two, at least [`MIN_STAGING_WORDS`].
fn staging_words(words: usize) -> usize {
    words.max(MIN_STAGING_WORDS).next_power_of_two()
}

/// `dst[d + i] = staging[s + i]` for `i < len` of every header triple `(d, s, len)`; one thread
/// per staging word.
#[cube(launch_unchecked)]
fn scatter_kernel(staging: &Array<u32>, dst: &mut Array<u32>, regions: u32, words: u32) {
    let w = crate::ops::linear_cube() * SCATTER_THREADS as usize + UNIT_POS as usize;
    if w >= words as usize || w < regions as usize * 3 {
        terminate!();
    }
    for r in 0..regions as usize {
        let d = staging[3 * r] as usize;
        let s = staging[3 * r + 1] as usize;
        let len = staging[3 * r + 2] as usize;
        if w >= s && w < s + len {
            dst[d + w - s] = staging[w];
        }
    }
}
