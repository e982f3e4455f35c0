//! The host-side copy of every rank's adapter pool.
//!
//! One byte buffer per rank, `memory.lora_pool` bytes, in the plan's LoRA dtype, laid out
//! exactly as the plan's `LoraBuffer`s say (A `[S, (E_a,) c·R, in]`, B `[S, (E_b,) out, R]`
//! at `a_offset` / `b_offset`), so the runtime uploads it to the device as is.
//!
//! **Scaling is folded into B** when the adapter is loaded (`B · α/r`, or `B · α/√r` with
//! rsLoRA, per module with `rank_pattern` / `alpha_pattern`), and the pool holds no scale
//! table. Why: the scale is a constant per (slot, module), so `scale · B (A x) = (scale · B)
//! (A x)` exactly; folding costs one multiply per B element once per load, keeps the expand
//! kernels (linear, embedding, MoE) free of a per-token scale lookup, and per-module scales
//! from `alpha_pattern` come for free. In bf16 nothing is lost: the rounding error of
//! `bf16(s · b)` is relative, like that of `bf16(b)` then an f32 multiply. [`SlotInfo::scales`]
//! still records each module's scale for reports; kernels must not apply it again.
//!
//! Rank: each slot records, per buffer and group, the adapter's rank there (0 where the
//! adapter leaves the module alone); kernels may bound their rank loop with
//! [`HostPool::slot_rank`]. Rows and columns past that rank are zero, as are the A columns and
//! B rows a rank's shard pads (the last rank of a vocab-parallel layer).

use lorac_plan::{DType, Plan};

use crate::error::AdapterError;
use crate::layout::PoolLayout;
use crate::load::{Factors, LoadedAdapter};

/// What one occupied slot holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotInfo {
    pub name: String,
    /// Per plan buffer, per group: the adapter's rank there (0: not targeted).
    pub ranks: Vec<Vec<u32>>,
    /// Per plan buffer, per group: the scale folded into B (0 where not targeted).
    pub scales: Vec<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct HostPool {
    layout: PoolLayout,
    ranks: Vec<Vec<u8>>,
    slots: Vec<Option<SlotInfo>>,
}

fn write_value(bytes: &mut [u8], dtype: DType, index: usize, value: f32) {
    match dtype {
        DType::BF16 => bytes[index * 2..index * 2 + 2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        DType::F16 => bytes[index * 2..index * 2 + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
        // `HostPool::new` accepts only the three dtypes above and this one.
        _ => bytes[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes()),
    }
}

impl HostPool {
    /// A zeroed pool (every slot free) for `plan`.
    pub fn new(plan: &Plan) -> Result<HostPool, AdapterError> {
        let layout = PoolLayout::of(plan)?;
        if !matches!(layout.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(AdapterError::PoolDtype(layout.dtype));
        }
        let ranks = layout
            .ranks
            .iter()
            .map(|(_, bytes)| {
                usize::try_from(*bytes)
                    .map(|n| vec![0u8; n])
                    .map_err(|_| AdapterError::PlanInconsistent(format!("adapter pool of {bytes} bytes does not fit in memory")))
            })
            .collect::<Result<_, _>>()?;
        let slots = vec![None; layout.slots as usize];
        Ok(HostPool { layout, ranks, slots })
    }

    pub fn dtype(&self) -> DType {
        self.layout.dtype
    }

    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Rank `rank`'s pool bytes, laid out as the plan says.
    pub fn rank_bytes(&self, rank: usize) -> &[u8] {
        &self.ranks[rank]
    }

    pub fn slot(&self, slot: usize) -> Option<&SlotInfo> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// The slot holding the adapter named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.name == name))
    }

    /// The first free slot.
    pub fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// The rank of `slot` in plan buffer `buffer` (the largest over its groups; 0 when the
    /// slot is free or the adapter does not target the buffer).
    pub fn slot_rank(&self, slot: usize, buffer: usize) -> u32 {
        self.slot(slot).and_then(|s| s.ranks.get(buffer)).and_then(|g| g.iter().max().copied()).unwrap_or(0)
    }

    fn check_slot(&self, slot: usize) -> Result<(), AdapterError> {
        if slot >= self.slots.len() {
            return Err(AdapterError::SlotOutOfRange { slot, slots: self.slots.len() });
        }
        Ok(())
    }

    /// Byte ranges `(start, end)` of `slot`'s A and B regions in every buffer of rank
    /// `rank`: what a device upload after [`HostPool::write_slot`] / [`HostPool::clear_slot`]
    /// needs to copy (nothing outside them changes).
    pub fn slot_regions(&self, rank: usize, slot: usize) -> Vec<(usize, usize)> {
        let size = self.layout.dtype.size_bytes();
        let slots = u64::from(self.layout.slots);
        self.layout.ranks[rank]
            .0
            .iter()
            .flat_map(|b| {
                let a = b.layout.a_elements() / slots * size;
                let bb = b.layout.b_elements() / slots * size;
                [(b.a_offset + slot as u64 * a, a), (b.b_offset + slot as u64 * bb, bb)]
            })
            .map(|(start, len)| (start as usize, (start + len) as usize))
            .collect()
    }

    /// Writes `adapter` into free slot `slot` on every rank: the slot's region of every buffer
    /// is rewritten whole (zeros for rank padding and for modules the adapter leaves alone);
    /// no other slot's bytes change. Refused, with the pool unchanged, when the slot does not
    /// exist or is taken, when an adapter of the same name is loaded, or when the adapter was
    /// validated against another plan.
    pub fn write_slot(&mut self, slot: usize, adapter: &LoadedAdapter) -> Result<(), AdapterError> {
        self.check_slot(slot)?;
        if let Some(held) = &self.slots[slot] {
            return Err(AdapterError::SlotOccupied { slot, name: held.name.clone() });
        }
        if let Some(other) = self.find(adapter.name()) {
            return Err(AdapterError::AlreadyLoaded { name: adapter.name().to_string(), slot: other });
        }
        if adapter.layout != self.layout {
            return Err(AdapterError::PlanMismatch { name: adapter.name().to_string() });
        }
        self.zero_slot(slot);
        let dtype = self.layout.dtype;
        let buffers = &self.layout.ranks[0].0;
        let mut ranks: Vec<Vec<u32>> = buffers.iter().map(|b| vec![0; b.layout.groups() as usize]).collect();
        let mut scales: Vec<Vec<f32>> = buffers.iter().map(|b| vec![0.0; b.layout.groups() as usize]).collect();
        for delta in &adapter.modules {
            let info = &self.layout.info[delta.buffer];
            let shared_a = self.layout.shared(delta.buffer, true);
            let shared_b = self.layout.shared(delta.buffer, false);
            ranks[delta.buffer][delta.group] = delta.experts.values().map(|f| f.rank).max().unwrap_or(0);
            scales[delta.buffer][delta.group] = delta.experts.values().next().map_or(0.0, |f| f.scale);
            for (rank_bytes, (buffers, _)) in self.ranks.iter_mut().zip(&self.layout.ranks) {
                let buf = &buffers[delta.buffer];
                let l = &buf.layout;
                let (max_rank, in_l, out_l) = (l.max_rank() as usize, l.in_features() as usize, l.out_features() as usize);
                let cr = l.intermediate_width() as usize;
                let size = dtype.size_bytes() as usize;
                let slot_a = (l.a_elements() / u64::from(l.slots())) as usize;
                let slot_b = (l.b_elements() / u64::from(l.slots())) as usize;
                let a_base = buf.a_offset as usize / size + slot * slot_a;
                let b_base = buf.b_offset as usize / size + slot * slot_b;
                // (stored expert index, factors) for each side.
                let pick = |shared: bool, stored: u32| -> Vec<(usize, &Factors)> {
                    match buf.experts {
                        None => delta.experts.get(&0).map(|f| (0, f)).into_iter().collect(),
                        Some(_) if shared => delta.experts.values().next().map(|f| (0, f)).into_iter().collect(),
                        Some((e0, _)) => (0..stored).filter_map(|j| delta.experts.get(&(e0 + j)).map(|f| (j as usize, f))).collect(),
                    }
                };
                let dims = l.experts();
                let (c0, c1) = (buf.input_cols.0 as usize, buf.input_cols.1 as usize);
                let full_in = info.full_in as usize;
                for (j, f) in pick(shared_a, dims.map_or(1, |d| d.a.get())) {
                    for q in 0..f.rank as usize {
                        let row = a_base + (j * cr + delta.group * max_rank + q) * in_l;
                        for (x, col) in (c0..c1).enumerate() {
                            write_value(rank_bytes, dtype, row + x, f.a[q * full_in + col]);
                        }
                    }
                }
                let offsets = l.slice_offsets();
                for (j, f) in pick(shared_b, dims.map_or(1, |d| d.b.get())) {
                    let r = f.rank as usize;
                    for (s, slice) in l.slices().iter().enumerate().filter(|(_, s)| s.group as usize == delta.group) {
                        let (r0, r1) = buf.slice_rows[s];
                        let module_row = info.slice_module_offset[s] as usize + r0 as usize;
                        debug_assert!((r1 - r0) <= slice.width);
                        for y in 0..(r1 - r0) as usize {
                            let at = b_base + (j * out_l + offsets[s] as usize + y) * max_rank;
                            let src = (module_row + y) * r;
                            for q in 0..r {
                                write_value(rank_bytes, dtype, at + q, f.b[src + q]);
                            }
                        }
                    }
                }
            }
        }
        self.slots[slot] = Some(SlotInfo { name: adapter.name().to_string(), ranks, scales });
        Ok(())
    }

    fn zero_slot(&mut self, slot: usize) {
        for rank in 0..self.ranks.len() {
            for (start, end) in self.slot_regions(rank, slot) {
                self.ranks[rank][start..end].fill(0);
            }
        }
    }

    /// Zeroes `slot`'s region of every buffer on every rank and frees it; returns the name of
    /// the adapter it held.
    pub fn clear_slot(&mut self, slot: usize) -> Result<Option<String>, AdapterError> {
        self.check_slot(slot)?;
        self.zero_slot(slot);
        Ok(self.slots[slot].take().map(|s| s.name))
    }
}
