//! Gated activation of the fused gate_up projection: `out[t, i] = silu(g[t, i]) · u[t, i]` where
//! the input row is `[gate (I) | up (I)]` (`[T, 2I]` → `[T, I]`).
//!
//! Rounding follows HF's `act_fn(gate_proj(x)) * up_proj(x)`: silu in f32 rounded to the storage
//! type, then the product rounded once more.

use cubecl::prelude::*;

use super::{OpResult, check_dims, check_len, grid_1d, linear_cube};
use crate::buffer::DeviceBuffer;

const THREADS: u32 = 256;

#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(gate_up: &Array<F>, out: &mut Array<F>, total: u32, inter: u32) {
    let idx = linear_cube() * THREADS as usize + UNIT_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let inter = inter as usize;
    let t = idx / inter;
    let i = idx % inter;
    let g = f32::cast_from(gate_up[t * 2 * inter + i]);
    let u = gate_up[t * 2 * inter + inter + i];
    let act = F::cast_from(g / (1.0f32 + f32::exp(-g)));
    out[idx] = F::cast_from(f32::cast_from(act) * f32::cast_from(u));
}

/// `gate_up` is `[tokens, 2·inter]` (gate first), `out` is `[tokens, inter]`.
pub fn launch_silu_mul<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    gate_up: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<F>,
    tokens: usize,
    inter: usize,
) -> OpResult<()> {
    check_dims("silu_mul", &[tokens, 2 * inter])?;
    check_len(gate_up, "gate_up", tokens * 2 * inter)?;
    check_len(out, "out", tokens * inter)?;
    let total = tokens * inter;
    if total == 0 {
        return Ok(());
    }
    unsafe {
        silu_mul_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(total.div_ceil(THREADS as usize)),
            CubeDim::new_1d(THREADS),
            gate_up.arg(1),
            out.arg(1),
            total as u32,
            inter as u32,
        );
    }
    Ok(())
}

/// Plain f64 reference.
pub fn reference_silu_mul(gate_up: &[f64], tokens: usize, inter: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(tokens * inter);
    for t in 0..tokens {
        for i in 0..inter {
            let g = gate_up[t * 2 * inter + i];
            out.push(g / (1.0 + (-g).exp()) * gate_up[t * 2 * inter + inter + i]);
        }
    }
    out
}
