//! Adapter-pool layout of one LoRA module on one tensor-parallel rank.
//!
//! This is the contract between the compiler (which computes it) and the runtime kernels (which
//! index the pool with it). Both sides use this one type, so they agree by construction:
//!
//! * A: `[slots, (experts_a,) groups * max_rank, in_features]`
//! * B: `[slots, (experts_b,) out_features, max_rank]`, `out_features = Σ slice widths`
//!
//! `groups` (the issue's `c`) is the number of adapter modules packed into the fused module, each
//! bringing its own A (q/k/v → 3, gate/up → 2, Mamba `in_proj` → 1). `slices` are the row
//! partitions of B in order; slice `i` is multiplied by the rank-`R` intermediate of its group.
//! An adapter of rank `r < max_rank` fills the first `r` rows of each group's A block and the
//! first `r` columns of B; the rest stays zero and the kernels skip it.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// One row partition of B (for example `k_proj` inside `qkv_proj`), per rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraSlice {
    pub name: String,
    pub width: u32,
    /// Index of the A block (adapter module) whose intermediate feeds this slice.
    pub group: u32,
}

/// Expert dimensions of a routed-expert module. `shared-outer` MoE LoRA stores one A for all
/// experts on the input side of gate_up (a = 1) and one B on the output side of down (b = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertDims {
    pub a: NonZeroU32,
    pub b: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("LoRA layout has no slices")]
    NoSlices,
    #[error("LoRA slice `{slice}` has width 0")]
    ZeroWidth { slice: String },
    #[error("LoRA slice `{slice}` names group {group} but the module packs {groups} groups")]
    GroupOutOfRange { slice: String, group: u32, groups: u32 },
    #[error("LoRA group {group} feeds no slice")]
    UnusedGroup { group: u32 },
    #[error("LoRA input width is 0")]
    ZeroInput,
    #[error("LoRA buffer of {elements} elements overflows u64")]
    Overflow { elements: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawLoraLayout", into = "RawLoraLayout")]
pub struct LoraLayout {
    slots: NonZeroU32,
    max_rank: NonZeroU32,
    in_features: u32,
    groups: u32,
    slices: Vec<LoraSlice>,
    experts: Option<ExpertDims>,
}

/// Unchecked mirror used only for (de)serialisation; decoding re-runs the checks of `new`.
#[derive(Serialize, Deserialize)]
struct RawLoraLayout {
    slots: NonZeroU32,
    max_rank: NonZeroU32,
    in_features: u32,
    groups: u32,
    slices: Vec<LoraSlice>,
    experts: Option<ExpertDims>,
}

impl TryFrom<RawLoraLayout> for LoraLayout {
    type Error = LayoutError;
    fn try_from(raw: RawLoraLayout) -> Result<Self, LayoutError> {
        LoraLayout::new(raw.slots, raw.max_rank, raw.in_features, raw.groups, raw.slices, raw.experts)
    }
}

impl From<LoraLayout> for RawLoraLayout {
    fn from(l: LoraLayout) -> Self {
        RawLoraLayout {
            slots: l.slots,
            max_rank: l.max_rank,
            in_features: l.in_features,
            groups: l.groups,
            slices: l.slices,
            experts: l.experts,
        }
    }
}

impl LoraLayout {
    /// Checks that every slice names an existing group, that every group feeds a slice, and
    /// that no dimension is zero, so a layout that exists is one the kernels can run.
    pub fn new(
        slots: NonZeroU32,
        max_rank: NonZeroU32,
        in_features: u32,
        groups: u32,
        slices: Vec<LoraSlice>,
        experts: Option<ExpertDims>,
    ) -> Result<Self, LayoutError> {
        if slices.is_empty() {
            return Err(LayoutError::NoSlices);
        }
        if in_features == 0 {
            return Err(LayoutError::ZeroInput);
        }
        for s in &slices {
            if s.width == 0 {
                return Err(LayoutError::ZeroWidth { slice: s.name.clone() });
            }
            if s.group >= groups {
                return Err(LayoutError::GroupOutOfRange { slice: s.name.clone(), group: s.group, groups });
            }
        }
        if let Some(group) = (0..groups).find(|g| !slices.iter().any(|s| s.group == *g)) {
            return Err(LayoutError::UnusedGroup { group });
        }
        let layout = LoraLayout { slots, max_rank, in_features, groups, slices, experts };
        for elements in [layout.a_shape(), layout.b_shape()].map(|s| s.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d))) {
            if elements.is_none() {
                return Err(LayoutError::Overflow { elements: format!("{:?}", layout.a_shape()) });
            }
        }
        Ok(layout)
    }

    pub fn slots(&self) -> u32 {
        self.slots.get()
    }
    pub fn max_rank(&self) -> u32 {
        self.max_rank.get()
    }
    pub fn in_features(&self) -> u32 {
        self.in_features
    }
    pub fn groups(&self) -> u32 {
        self.groups
    }
    /// `c·R`: rows of A per slot (each group's `max_rank` rows), the width of a row of the
    /// shrink's intermediate.
    pub fn intermediate_width(&self) -> u32 {
        self.groups * self.max_rank.get()
    }
    pub fn slices(&self) -> &[LoraSlice] {
        &self.slices
    }
    pub fn experts(&self) -> Option<ExpertDims> {
        self.experts
    }
    /// Rows of B: the sum of the slice widths (the base layer's per-rank output width).
    pub fn out_features(&self) -> u32 {
        self.slices.iter().map(|s| s.width).sum()
    }
    /// First row of each slice inside B, in slice order.
    pub fn slice_offsets(&self) -> Vec<u32> {
        self.slices
            .iter()
            .scan(0u32, |row, s| {
                let start = *row;
                *row += s.width;
                Some(start)
            })
            .collect()
    }
    /// `[S, (E_a,) c·R, in]`
    pub fn a_shape(&self) -> Vec<u64> {
        let mut shape = vec![u64::from(self.slots.get())];
        if let Some(e) = self.experts {
            shape.push(u64::from(e.a.get()));
        }
        shape.push(u64::from(self.groups) * u64::from(self.max_rank.get()));
        shape.push(u64::from(self.in_features));
        shape
    }
    /// `[S, (E_b,) out, R]`
    pub fn b_shape(&self) -> Vec<u64> {
        let mut shape = vec![u64::from(self.slots.get())];
        if let Some(e) = self.experts {
            shape.push(u64::from(e.b.get()));
        }
        shape.push(u64::from(self.out_features()));
        shape.push(u64::from(self.max_rank.get()));
        shape
    }
    pub fn a_elements(&self) -> u64 {
        self.a_shape().iter().product()
    }
    pub fn b_elements(&self) -> u64 {
        self.b_shape().iter().product()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }
    fn slice(name: &str, width: u32, group: u32) -> LoraSlice {
        LoraSlice { name: name.into(), width, group }
    }

    #[test]
    fn llama_qkv_tp8_shapes() {
        let l =
            LoraLayout::new(nz(8), nz(16), 4096, 3, vec![slice("q_proj", 512, 0), slice("k_proj", 128, 1), slice("v_proj", 128, 2)], None)
                .unwrap();
        assert_eq!(l.a_shape(), vec![8, 48, 4096]);
        assert_eq!(l.b_shape(), vec![8, 768, 16]);
        assert_eq!(l.slice_offsets(), vec![0, 512, 640]);
    }

    #[test]
    fn routed_experts_add_an_expert_dim() {
        let e = ExpertDims { a: nz(256), b: nz(256) };
        let l = LoraLayout::new(nz(8), nz(16), 7168, 2, vec![slice("gate_proj", 256, 0), slice("up_proj", 256, 1)], Some(e)).unwrap();
        assert_eq!(l.a_shape(), vec![8, 256, 32, 7168]);
        assert_eq!(l.b_shape(), vec![8, 256, 512, 16]);
    }

    #[test]
    fn rejects_inconsistent_groups() {
        let err = LoraLayout::new(nz(8), nz(16), 64, 2, vec![slice("x", 4, 0)], None).unwrap_err();
        assert_eq!(err, LayoutError::UnusedGroup { group: 1 });
        let err = LoraLayout::new(nz(8), nz(16), 64, 1, vec![slice("x", 4, 1)], None).unwrap_err();
        assert!(matches!(err, LayoutError::GroupOutOfRange { .. }));
    }

    #[test]
    fn decoding_rechecks_invariants() {
        let raw = RawLoraLayout { slots: nz(1), max_rank: nz(1), in_features: 0, groups: 1, slices: vec![slice("x", 1, 0)], experts: None };
        let bytes = postcard::to_allocvec(&raw).unwrap();
        assert!(postcard::from_bytes::<LoraLayout>(&bytes).is_err());
    }
}
