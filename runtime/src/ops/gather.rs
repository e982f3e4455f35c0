//! Row gathers: the embedding lookup `out[t, :] = table[ids[t], :]` and the selection of rows
//! (`out[i, :] = x[rows[i], :]`, e.g. the last token of each sequence before the LM head). One
//! kernel serves both; an index past the source rows yields a zero row instead of an
//! out-of-bounds read.

use cubecl::prelude::*;

use super::{OpError, OpResult, check_dims, check_len};
use crate::buffer::DeviceBuffer;

const THREADS: u32 = 128;

#[cube(launch_unchecked)]
fn gather_rows_kernel<F: Float>(src: &Array<F>, indices: &Array<u32>, out: &mut Array<F>, src_rows: u32, width: u32) {
    let i = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let width = width as usize;
    let col = CUBE_POS_Z as usize * THREADS as usize + UNIT_POS as usize;
    if i >= indices.len() || col >= width {
        terminate!();
    }
    let row = indices[i];
    let mut v = F::cast_from(0.0f32);
    if row < src_rows {
        v = src[row as usize * width + col];
    }
    out[i * width + col] = v;
}

/// `out[i, :] = src[indices[i], :]` for `src` `[src_rows, width]`, `out` `[indices.len(), width]`.
pub fn launch_gather_rows<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    src: &DeviceBuffer<F>,
    indices: &DeviceBuffer<u32>,
    out: &mut DeviceBuffer<F>,
    src_rows: usize,
    width: usize,
) -> OpResult<()> {
    let n = indices.len();
    check_dims("gather src", &[src_rows, width])?;
    check_dims("gather out", &[n, width])?;
    check_len(src, "src", src_rows * width)?;
    check_len(out, "out", n * width)?;
    let col_blocks = width.div_ceil(THREADS as usize);
    if col_blocks > super::MAX_GRID {
        return Err(OpError::Shape(format!("gather width {width} exceeds the grid")));
    }
    if n == 0 || width == 0 {
        return Ok(());
    }
    let gx = n.min(super::MAX_GRID);
    unsafe {
        gather_rows_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(gx as u32, n.div_ceil(gx) as u32, col_blocks as u32),
            CubeDim::new_1d(THREADS),
            src.arg(1),
            indices.arg(1),
            out.arg(1),
            src_rows as u32,
            width as u32,
        );
    }
    Ok(())
}

/// Embedding lookup: `table` `[vocab, hidden]`, `ids` `[tokens]` → `out` `[tokens, hidden]`.
pub fn launch_embedding_lookup<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    table: &DeviceBuffer<F>,
    ids: &DeviceBuffer<u32>,
    out: &mut DeviceBuffer<F>,
    vocab: usize,
    hidden: usize,
) -> OpResult<()> {
    launch_gather_rows(client, table, ids, out, vocab, hidden)
}

/// Plain reference (exact copy; zero rows for out-of-range indices).
pub fn reference_gather_rows(src: &[f64], indices: &[u32], src_rows: usize, width: usize) -> Vec<f64> {
    indices
        .iter()
        .flat_map(|&r| if (r as usize) < src_rows { src[r as usize * width..(r as usize + 1) * width].to_vec() } else { vec![0.0; width] })
        .collect()
}
