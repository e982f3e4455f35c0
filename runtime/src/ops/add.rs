//! Residual add: `y += x` in place, or `out = a + b`, f32 arithmetic rounded once to the storage
//! type (what HF's `residual + hidden_states` does in bf16).

use cubecl::prelude::*;

use super::{OpError, OpResult, check_len, grid_1d, linear_cube};
use crate::buffer::DeviceBuffer;

const THREADS: u32 = 256;

#[cube(launch_unchecked)]
fn add_inplace_kernel<F: Float>(y: &mut Array<F>, x: &Array<F>, len: u32) {
    let idx = linear_cube() * THREADS as usize + UNIT_POS as usize;
    if idx >= len as usize {
        terminate!();
    }
    y[idx] = F::cast_from(f32::cast_from(y[idx]) + f32::cast_from(x[idx]));
}

#[cube(launch_unchecked)]
fn add_kernel<F: Float>(a: &Array<F>, b: &Array<F>, out: &mut Array<F>, len: u32) {
    let idx = linear_cube() * THREADS as usize + UNIT_POS as usize;
    if idx >= len as usize {
        terminate!();
    }
    out[idx] = F::cast_from(f32::cast_from(a[idx]) + f32::cast_from(b[idx]));
}

fn check_total(len: usize) -> OpResult<()> {
    if len >= u32::MAX as usize / 2 {
        return Err(OpError::Shape(format!("add over {len} elements exceeds the supported size")));
    }
    Ok(())
}

/// `y += x` element-wise (same length).
pub fn launch_add_inplace<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    y: &mut DeviceBuffer<F>,
    x: &DeviceBuffer<F>,
) -> OpResult<()> {
    let len = y.len();
    check_total(len)?;
    check_len(x, "x", len)?;
    if len == 0 {
        return Ok(());
    }
    unsafe {
        add_inplace_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(len.div_ceil(THREADS as usize)),
            CubeDim::new_1d(THREADS),
            y.arg(1),
            x.arg(1),
            len as u32,
        );
    }
    Ok(())
}

/// `out = a + b` element-wise (same length).
pub fn launch_add<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    a: &DeviceBuffer<F>,
    b: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<F>,
) -> OpResult<()> {
    let len = out.len();
    check_total(len)?;
    check_len(a, "a", len)?;
    check_len(b, "b", len)?;
    if len == 0 {
        return Ok(());
    }
    unsafe {
        add_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(len.div_ceil(THREADS as usize)),
            CubeDim::new_1d(THREADS),
            a.arg(1),
            b.arg(1),
            out.arg(1),
            len as u32,
        );
    }
    Ok(())
}
