//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` over rows of width D, f32 accumulation.
//!
//! Rounding follows HF's `LlamaRMSNorm` / `Qwen3RMSNorm`: the normalised row is computed in f32
//! and rounded to the storage type, then multiplied by the weight (one more rounding), so bf16
//! results match transformers bit for bit up to the order of the sum.
//!
//! Entry points: [`launch_rms_norm`] (contiguous `[rows, D]` → separate output, the layer
//! norms), [`launch_add_rms_norm`] (the residual add fused in front: `h += delta`, then the
//! norm of the new `h`) and [`launch_rms_norm_heads`] (in place on every head of a
//! [`HeadView`], Qwen3's q_norm / k_norm on the fused qkv output). One cube per row; its
//! threads stride over D.

use cubecl::prelude::*;

use super::{HeadView, OpError, OpResult, check_dims, check_len, cube_sum, grid_1d, linear_cube, threads_for};
use crate::buffer::DeviceBuffer;

#[cube]
fn normalise_row<F: Float>(
    input: &Array<F>,
    in_base: usize,
    w: &Array<F>,
    output: &mut Array<F>,
    out_base: usize,
    width: usize,
    eps: f32,
    #[comptime] threads: usize,
) {
    let tid = UNIT_POS as usize;
    let mut buf = SharedMemory::<f32>::new(threads);
    let mut ss = 0.0f32;
    let mut i = tid;
    while i < width {
        let v = f32::cast_from(input[in_base + i]);
        ss += v * v;
        i += threads;
    }
    let total = cube_sum(ss, &mut buf, threads);
    let inv = 1.0f32 / f32::sqrt(total / f32::cast_from(width) + eps);
    let mut i = tid;
    while i < width {
        let normed = F::cast_from(f32::cast_from(input[in_base + i]) * inv);
        output[out_base + i] = F::cast_from(f32::cast_from(normed) * f32::cast_from(w[i]));
        i += threads;
    }
}

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(x: &Array<F>, w: &Array<F>, y: &mut Array<F>, rows: u32, width: u32, eps: f32, #[comptime] threads: usize) {
    let row = linear_cube();
    if row >= rows as usize {
        terminate!();
    }
    let width = width as usize;
    normalise_row::<F>(x, row * width, w, y, row * width, width, eps, threads);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_heads_kernel<F: Float>(
    x: &mut Array<F>,
    w: &Array<F>,
    rows: u32,
    heads: u32,
    head_dim: u32,
    offset: u32,
    token_stride: u32,
    eps: f32,
    #[comptime] threads: usize,
) {
    let row = linear_cube();
    if row >= rows as usize {
        terminate!();
    }
    let heads = heads as usize;
    let head_dim = head_dim as usize;
    let base = offset as usize + (row / heads) * token_stride as usize + (row % heads) * head_dim;
    // In place: every thread reads its elements for the sum before the reduction's barriers and
    // rewrites exactly those elements after it.
    let tid = UNIT_POS as usize;
    let mut buf = SharedMemory::<f32>::new(threads);
    let mut ss = 0.0f32;
    let mut i = tid;
    while i < head_dim {
        let v = f32::cast_from(x[base + i]);
        ss += v * v;
        i += threads;
    }
    let total = cube_sum(ss, &mut buf, threads);
    let inv = 1.0f32 / f32::sqrt(total / f32::cast_from(head_dim) + eps);
    let mut i = tid;
    while i < head_dim {
        let normed = F::cast_from(f32::cast_from(x[base + i]) * inv);
        x[base + i] = F::cast_from(f32::cast_from(normed) * f32::cast_from(w[i]));
        i += threads;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn add_rms_norm_kernel<F: Float>(
    h: &mut Array<F>,
    delta: &Array<F>,
    w: &Array<F>,
    y: &mut Array<F>,
    rows: u32,
    width: u32,
    eps: f32,
    #[comptime] threads: usize,
) {
    let row = linear_cube();
    if row >= rows as usize {
        terminate!();
    }
    let width = width as usize;
    let base = row * width;
    let tid = UNIT_POS as usize;
    let mut buf = SharedMemory::<f32>::new(threads);
    // The residual sum is rounded to the storage type before it is normalised (HF's order);
    // each thread re-reads only the elements it wrote.
    let mut ss = 0.0f32;
    let mut i = tid;
    while i < width {
        let sum = F::cast_from(f32::cast_from(h[base + i]) + f32::cast_from(delta[base + i]));
        h[base + i] = sum;
        let v = f32::cast_from(sum);
        ss += v * v;
        i += threads;
    }
    let total = cube_sum(ss, &mut buf, threads);
    let inv = 1.0f32 / f32::sqrt(total / f32::cast_from(width) + eps);
    let mut i = tid;
    while i < width {
        let normed = F::cast_from(f32::cast_from(h[base + i]) * inv);
        y[base + i] = F::cast_from(f32::cast_from(normed) * f32::cast_from(w[i]));
        i += threads;
    }
}

/// Fused residual add and norm (the post-attention / next-layer input norm):
/// `h += delta` in place, then `y = rms_norm(h) · w`, for `rows` contiguous rows of `width`.
#[allow(clippy::too_many_arguments)]
pub fn launch_add_rms_norm<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    h: &mut DeviceBuffer<F>,
    delta: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    rows: usize,
    width: usize,
    eps: f32,
) -> OpResult<()> {
    check_rows("add_rms_norm", rows, width, eps, w, &[("h", h.len()), ("delta", delta.len()), ("y", y.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let threads = threads_for(width, 32, 256);
    unsafe {
        add_rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows),
            CubeDim::new_1d(threads),
            h.arg(1),
            delta.arg(1),
            w.arg(1),
            y.arg(1),
            rows as u32,
            width as u32,
            eps,
            threads as usize,
        );
    }
    Ok(())
}

fn check_eps(eps: f32) -> OpResult<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(OpError::Shape(format!("rms_norm eps {eps} must be finite and non-negative")));
    }
    Ok(())
}

/// The checks every row-wise norm launch makes: sizes in range, a usable eps, a positive
/// width, a `[width]` weight and `[rows, width]` activations (given as (name, length)).
fn check_rows<F: CubeElement>(
    op: &str,
    rows: usize,
    width: usize,
    eps: f32,
    w: &DeviceBuffer<F>,
    activations: &[(&'static str, usize)],
) -> OpResult<()> {
    check_dims(op, &[rows, width])?;
    check_eps(eps)?;
    if width == 0 {
        return Err(OpError::Shape("rms_norm width must be positive".into()));
    }
    for &(name, actual) in activations {
        if actual != rows * width {
            return Err(OpError::BufferSize { name, expected: rows * width, actual });
        }
    }
    check_len(w, "weight", width)
}

/// `y[r, :] = rms_norm(x[r, :]) · w` for `rows` contiguous rows of `width`; `w` is `[width]`.
pub fn launch_rms_norm<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    rows: usize,
    width: usize,
    eps: f32,
) -> OpResult<()> {
    check_rows("rms_norm", rows, width, eps, w, &[("x", x.len()), ("y", y.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let threads = threads_for(width, 32, 256);
    unsafe {
        rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows),
            CubeDim::new_1d(threads),
            x.arg(1),
            w.arg(1),
            y.arg(1),
            rows as u32,
            width as u32,
            eps,
            threads as usize,
        );
    }
    Ok(())
}

/// In place on every `(token, head)` row of `view` inside `x` (`tokens` tokens); `w` is
/// `[head_dim]`, shared by the heads (Qwen3 q_norm / k_norm).
pub fn launch_rms_norm_heads<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &mut DeviceBuffer<F>,
    view: HeadView,
    w: &DeviceBuffer<F>,
    tokens: usize,
    eps: f32,
) -> OpResult<()> {
    view.check("x", tokens, x.len())?;
    check_eps(eps)?;
    check_len(w, "weight", view.head_dim as usize)?;
    let rows = tokens * view.heads as usize;
    if rows == 0 {
        return Ok(());
    }
    let threads = threads_for(view.head_dim as usize, 32, 256);
    unsafe {
        rms_norm_heads_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows),
            CubeDim::new_1d(threads),
            x.arg(1),
            w.arg(1),
            rows as u32,
            view.heads,
            view.head_dim,
            view.offset,
            view.token_stride,
            eps,
            threads as usize,
        );
    }
    Ok(())
}

/// Plain f64 reference of one row (no intermediate rounding).
pub fn reference_rms_norm_row(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// Plain f64 reference over `[rows, width]`.
pub fn reference_rms_norm(x: &[f64], w: &[f64], width: usize, eps: f64) -> Vec<f64> {
    x.chunks(width).flat_map(|row| reference_rms_norm_row(row, w, eps)).collect()
}
