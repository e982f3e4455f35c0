//! Greedy sampling: `out[r] = argmax_j logits[r, j]` (i32), the first index on ties (as
//! `torch.argmax`); NaN entries are never chosen (an all-NaN row gives 0). One cube per row: a strided scan per thread,
//! then a shared-memory tree over the threads' (value, index) pairs.

// The kernel tests `v == v` to skip NaN: WGSL offers no is_nan, so the self-comparison is
// deliberate.
#![allow(clippy::eq_op)]

use cubecl::prelude::*;

use super::{OpResult, check_dims, check_len, grid_1d, linear_cube};
use crate::buffer::DeviceBuffer;

const THREADS: u32 = 256;

#[cube(launch_unchecked)]
fn argmax_kernel<F: Float>(logits: &Array<F>, out: &mut Array<i32>, rows: u32, vocab: u32) {
    let row = linear_cube();
    if row >= rows as usize {
        terminate!();
    }
    let threads = THREADS as usize;
    let vocab = vocab as usize;
    let tid = UNIT_POS as usize;
    let base = row * vocab;
    // No infinite literal (WGSL has none): `found` marks whether `best` holds a real value.
    let mut best = 0.0f32;
    let mut best_i = 0u32;
    let mut found = 0u32;
    let mut j = tid;
    while j < vocab {
        let v = f32::cast_from(logits[base + j]);
        // `v == v` is false for NaN.
        if v == v && (found == 0 || v > best) {
            best = v;
            best_i = j as u32;
            found = 1;
        }
        j += threads;
    }
    let mut vals = SharedMemory::<f32>::new(threads);
    let mut idxs = SharedMemory::<u32>::new(threads);
    let mut founds = SharedMemory::<u32>::new(threads);
    vals[tid] = best;
    idxs[tid] = best_i;
    founds[tid] = found;
    sync_cube();
    let mut stride = comptime!(THREADS as usize / 2).runtime();
    while stride > 0 {
        if tid < stride {
            let of = founds[tid + stride];
            let ov = vals[tid + stride];
            let oi = idxs[tid + stride];
            let mf = founds[tid];
            let mv = vals[tid];
            let mi = idxs[tid];
            if of == 1 && (mf == 0 || ov > mv || (ov == mv && oi < mi)) {
                vals[tid] = ov;
                idxs[tid] = oi;
                founds[tid] = 1;
            }
        }
        sync_cube();
        stride /= 2;
    }
    if tid == 0 {
        out[row] = idxs[0] as i32;
    }
}

/// `logits` `[rows, vocab]` → `out` `[rows]` (i32 token ids).
pub fn launch_argmax<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    logits: &DeviceBuffer<F>,
    out: &mut DeviceBuffer<i32>,
    rows: usize,
    vocab: usize,
) -> OpResult<()> {
    check_dims("argmax", &[rows, vocab])?;
    if vocab == 0 || vocab > i32::MAX as usize {
        return Err(super::OpError::Shape(format!("argmax vocab {vocab} must be in 1..2^31")));
    }
    check_len(logits, "logits", rows * vocab)?;
    check_len(out, "out", rows)?;
    if rows == 0 {
        return Ok(());
    }
    unsafe {
        argmax_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows),
            CubeDim::new_1d(THREADS),
            logits.arg(1),
            out.arg(1),
            rows as u32,
            vocab as u32,
        );
    }
    Ok(())
}

/// Plain reference: first index of the maximum (NaN ignored; 0 for an all-NaN row).
pub fn reference_argmax(logits: &[f64], vocab: usize) -> Vec<i32> {
    logits
        .chunks(vocab)
        .map(|row| {
            let mut best: Option<(f64, usize)> = None;
            for (j, &v) in row.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
                    best = Some((v, j));
                }
            }
            best.map_or(0, |(_, j)| j as i32)
        })
        .collect()
}
