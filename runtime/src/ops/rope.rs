//! Rotary position embedding, HF `rotate_half` (NeoX) convention, in place on the q or k heads of
//! a [`HeadView`]: for `i < rotary_dim / 2`,
//! `x[i] ← x[i]·cos − x[i + half]·sin`, `x[i + half] ← x[i + half]·cos + x[i]·sin`, with
//! `cos/sin(position · inv_freq[i])`; dimensions `rotary_dim..head_dim` pass through.
//!
//! The cos/sin table `[max_positions, rotary_dim]` (cos in the first half of each row, sin in the
//! second) is computed once on the host by [`RopeParams::cos_sin_table`], replicating HF's
//! arithmetic: `inv_freq` in f32 exactly as `_compute_default_rope_parameters` /
//! `_compute_llama3_parameters` compute it, the angle as the f32 product `pos · inv_freq`, and
//! its cosine/sine evaluated exactly (f64) then rounded to f32 — no device transcendental on
//! large arguments ([`RopeParams::cos_sin_table_bf16`] rounds it further to bf16, as HF does
//! for a bf16 model). Tokens whose position is outside the table are left unrotated.

use cubecl::prelude::*;

use super::{HeadView, OpError, OpResult, check_len, threads_for};
use crate::buffer::DeviceBuffer;

/// HF `rope_scaling` variants supported (`rope_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"` (or no `rope_scaling`).
    Default,
    /// `rope_type: "llama3"` (Llama 3.1 / 3.2).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: u32 },
}

/// Host-side rotary parameters of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub head_dim: u32,
    /// Rotated leading dimensions (`head_dim · partial_rotary_factor`), even, ≤ `head_dim`.
    pub rotary_dim: u32,
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Rows of the cos/sin table (positions `0..max_positions`).
    pub max_positions: u32,
}

impl RopeParams {
    pub fn check(&self) -> OpResult<()> {
        let ok = self.rotary_dim > 0
            && self.rotary_dim % 2 == 0
            && self.rotary_dim <= self.head_dim
            && self.theta.is_finite()
            && self.theta > 1.0
            && (self.max_positions as u64) * (self.rotary_dim as u64) < (1u64 << 31);
        if !ok {
            return Err(OpError::Shape(format!("rope parameters {self:?} are not valid")));
        }
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = self.scaling {
            let ok = factor.is_finite()
                && factor > 0.0
                && low_freq_factor > 0.0
                && high_freq_factor.is_finite()
                && high_freq_factor > low_freq_factor
                && original_max_position_embeddings > 0;
            if !ok {
                return Err(OpError::Shape(format!("llama3 rope scaling {:?} is not valid", self.scaling)));
            }
        }
        Ok(())
    }

    /// HF's `inv_freq` (f32, `rotary_dim / 2` entries), computed with f32 arithmetic in HF's
    /// order of operations.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim as f32;
        let base = self.theta as f32;
        // 1.0 / (base ** (arange(0, dim, 2).float() / dim))
        let inv: Vec<f32> = (0..self.rotary_dim).step_by(2).map(|i| 1.0f32 / base.powf(i as f32 / dim)).collect();
        match self.scaling {
            RopeScaling::Default => inv,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // Python-float scalars meet an f32 tensor: each operation runs in f32.
                let old_context_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
                let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
                let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old_context_len as f32);
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = two_pi / f;
                        let llama = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let smooth = (old / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                        let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                        if medium { smoothed } else { llama }
                    })
                    .collect()
            }
        }
    }

    /// The table rounded to bf16 values (still stored as f32): HF casts cos and sin to the
    /// activation dtype before rotating, so a bf16 model matches transformers closest with this.
    pub fn cos_sin_table_bf16(&self) -> Vec<f32> {
        self.cos_sin_table().into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect()
    }

    /// The `[max_positions, rotary_dim]` table the kernel reads (cos half, then sin half).
    /// `attention_factor` is 1 for both supported scalings.
    pub fn cos_sin_table(&self) -> Vec<f32> {
        let inv = self.inv_freq();
        let half = inv.len();
        let mut table = vec![0.0f32; self.max_positions as usize * 2 * half];
        for (p, row) in table.chunks_mut(2 * half).enumerate() {
            for (i, &f) in inv.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                row[i] = angle.cos() as f32;
                row[half + i] = angle.sin() as f32;
            }
        }
        table
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float>(
    x: &mut Array<F>,
    table: &Array<f32>,
    positions: &Array<i32>,
    offset: u32,
    token_stride: u32,
    head_dim: u32,
    rotary_dim: u32,
    max_positions: u32,
    #[comptime] threads: usize,
) {
    let t = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let pos = positions[t];
    if pos < 0 || pos >= max_positions as i32 {
        terminate!();
    }
    let rot = rotary_dim as usize;
    let half = rot / 2;
    let base = offset as usize + t * token_stride as usize + h * head_dim as usize;
    let row = pos as usize * rot;
    let mut i = UNIT_POS as usize;
    while i < half {
        let c = table[row + i];
        let s = table[row + half + i];
        let x1 = f32::cast_from(x[base + i]);
        let x2 = f32::cast_from(x[base + half + i]);
        // HF's `q * cos + rotate_half(q) * sin` in the storage type: each product rounded, then
        // the sum (no-ops for f32).
        let x1c = f32::cast_from(F::cast_from(x1 * c));
        let x2s = f32::cast_from(F::cast_from(x2 * s));
        let x2c = f32::cast_from(F::cast_from(x2 * c));
        let x1s = f32::cast_from(F::cast_from(x1 * s));
        x[base + i] = F::cast_from(x1c - x2s);
        x[base + half + i] = F::cast_from(x2c + x1s);
        i += threads;
    }
}

/// Rotates every head of `view` inside `x` in place. `positions` is `[tokens]` (i32), `table`
/// is `params.cos_sin_table()` uploaded once. Call once for the q view and once for the k view.
pub fn launch_rope<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &mut DeviceBuffer<F>,
    view: HeadView,
    positions: &DeviceBuffer<i32>,
    table: &DeviceBuffer<f32>,
    params: &RopeParams,
    tokens: usize,
) -> OpResult<()> {
    params.check()?;
    view.check("x", tokens, x.len())?;
    if view.head_dim != params.head_dim {
        return Err(OpError::Shape(format!("view head_dim {} differs from the rope head_dim {}", view.head_dim, params.head_dim)));
    }
    check_len(positions, "positions", tokens)?;
    check_len(table, "cos/sin table", params.max_positions as usize * params.rotary_dim as usize)?;
    if tokens > super::MAX_GRID || view.heads as usize > super::MAX_GRID {
        return Err(OpError::Shape(format!("rope over {tokens} tokens × {} heads exceeds the grid", view.heads)));
    }
    if tokens == 0 {
        return Ok(());
    }
    let threads = threads_for(params.rotary_dim as usize / 2, 32, 128);
    unsafe {
        rope_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(tokens as u32, view.heads, 1),
            CubeDim::new_1d(threads),
            x.arg(1),
            table.arg(1),
            positions.arg(1),
            view.offset,
            view.token_stride,
            view.head_dim,
            params.rotary_dim,
            params.max_positions,
            threads as usize,
        );
    }
    Ok(())
}

/// Plain f64 reference, in place on `x` (the same view layout): the angle is HF's f32 product
/// `pos · inv_freq`, its cosine and sine and the rotation are exact (f64).
pub fn reference_rope(x: &mut [f64], view: HeadView, positions: &[i32], inv_freq: &[f32], max_positions: u32) {
    let half = inv_freq.len();
    for (t, &pos) in positions.iter().enumerate() {
        if pos < 0 || pos as u32 >= max_positions {
            continue;
        }
        for h in 0..view.heads as usize {
            for (i, f) in inv_freq.iter().enumerate() {
                let (s, c) = ((pos as f32 * f) as f64).sin_cos();
                let (a, b) = (view.index(t, h, i), view.index(t, h, half + i));
                let (x1, x2) = (x[a], x[b]);
                x[a] = x1 * c - x2 * s;
                x[b] = x2 * c + x1 * s;
            }
        }
    }
}
