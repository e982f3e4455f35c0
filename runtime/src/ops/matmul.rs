//! Dense projection `y[M, N] = x[M, K] · W[N, K]ᵀ` with the HF weight layout (W row-major
//! `[out_features, in_features]`), f32 accumulation, storage `F` (f32 or bf16).
//!
//! A tiled shared-memory kernel: one cube owns a `block_m × block_n` output tile and walks K in
//! steps of `block_k`; both operands are K-major, so the tile loads are coalesced along K for x
//! and for W alike. Each thread accumulates `thread_m × thread_n` outputs in registers, its rows
//! and columns strided by the thread grid (conflict-free shared reads, coalesced stores). Tiles
//! past M, N or K are zero-filled, so any shape works.
//!
//! Decode-sized M (≤ 8 rows) goes to a GEMV kernel instead: one cube per `rows` W rows, its
//! threads splitting K with vector loads (each W row is read contiguously, once), the
//! `rows × M` partial sums tree-reduced in shared memory; the grid spreads over N.
//!
//! Half-precision storage (bf16 / f16) with M past the GEMV range goes to cubek-matmul's
//! tensor-core kernels, W passed as the column-major `[K, N]` right-hand side (strides
//! `[1, K]`), so the HF layout needs no transpose: `SpecializedTmaMma` (warp-specialised, TMA
//! loads) up to [`DECODE_TMA_MAX_M`] rows, `SimpleCyclicCmma` past it; where cubek reports the
//! problem or device unsupported (no TMA: anything before Hopper; no tensor cores:
//! wgpu/lavapipe), the next one, then the tiled kernel, runs.
//! f32 storage never takes cubek's tensor cores (they would compute in tf32).

use cubecl::prelude::*;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::Strategy;
use cubek_std::InputBinding;

use super::{OpError, OpResult, check_dims, check_len, linear_cube};
use crate::buffer::DeviceBuffer;

/// Tile shape of the matmul kernel (its comptime specialisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatmulConfig {
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    /// Output rows per thread (divides `block_m`).
    pub thread_m: u32,
    /// Output columns per thread (divides `block_n`).
    pub thread_n: u32,
}

impl MatmulConfig {
    /// Decode-sized M gets a short, wide tile (every W element is loaded once per cube and the
    /// grid spreads over N); prefill gets square 64×64 tiles.
    pub fn new(m: usize) -> Self {
        match m {
            0..=8 => MatmulConfig { block_m: 8, block_n: 128, block_k: 32, thread_m: 1, thread_n: 4 },
            9..=32 => MatmulConfig { block_m: 32, block_n: 64, block_k: 16, thread_m: 2, thread_n: 4 },
            _ => MatmulConfig { block_m: 64, block_n: 64, block_k: 16, thread_m: 4, thread_n: 4 },
        }
    }

    pub fn threads(&self) -> u32 {
        (self.block_m / self.thread_m) * (self.block_n / self.thread_n)
    }

    fn check(&self) -> OpResult<()> {
        let ok = self.thread_m > 0
            && self.thread_n > 0
            && self.block_k > 0
            && self.block_m % self.thread_m == 0
            && self.block_n % self.thread_n == 0
            && (1..=1024).contains(&self.threads())
            && (self.block_m + self.block_n) * self.block_k <= 8192;
        if !ok {
            return Err(OpError::Shape(format!("matmul config {self:?} is not valid")));
        }
        Ok(())
    }
}

/// Stages rows `row0 .. row0 + tile_rows` × columns `k0 .. k0 + bk` of the row-major
/// `[rows, k]` matrix `src` (x, or W in the HF layout) into `tile` K-major
/// (`tile[kk · tile_rows + r]`), as f32, zeros past either edge. Consecutive threads read
/// consecutive k of one row, so the loads are coalesced for both operands.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_tile<F: Float>(
    src: &Array<F>,
    tile: &mut SharedMemory<f32>,
    row0: usize,
    rows: usize,
    k0: usize,
    k: usize,
    #[comptime] tile_rows: usize,
    #[comptime] bk: usize,
    #[comptime] threads: usize,
) {
    let mut e = UNIT_POS as usize;
    while e < comptime!(tile_rows * bk) {
        let r = e / bk;
        let kk = e % bk;
        let mut v = 0.0f32;
        if row0 + r < rows && k0 + kk < k {
            v = f32::cast_from(src[(row0 + r) * k + k0 + kk]);
        }
        tile[kk * tile_rows + r] = v;
        e += threads;
    }
}

#[cube(launch_unchecked)]
fn matmul_kernel<F: Float>(x: &Array<F>, w: &Array<F>, y: &mut Array<F>, m: u32, n: u32, k: u32, #[comptime] cfg: MatmulConfig) {
    let bm = comptime!(cfg.block_m as usize);
    let bn = comptime!(cfg.block_n as usize);
    let bk = comptime!(cfg.block_k as usize);
    let tm = comptime!(cfg.thread_m as usize);
    let tn = comptime!(cfg.thread_n as usize);
    let threads_m = comptime!((cfg.block_m / cfg.thread_m) as usize);
    let threads_n = comptime!((cfg.block_n / cfg.thread_n) as usize);
    let threads = comptime!(((cfg.block_m / cfg.thread_m) * (cfg.block_n / cfg.thread_n)) as usize);
    let m = m as usize;
    let n = n as usize;
    let k = k as usize;

    let tid = UNIT_POS as usize;
    let tx = tid % threads_n;
    let ty = tid / threads_n;
    let row0 = CUBE_POS_Y as usize * bm;
    let col0 = CUBE_POS_X as usize * bn;

    // Tiles stored K-major in shared memory: xs[kk · bm + r], ws[kk · bn + c].
    let mut xs = SharedMemory::<f32>::new(comptime!(bk * bm));
    let mut ws = SharedMemory::<f32>::new(comptime!(bk * bn));
    let mut acc = Array::<f32>::new(comptime!(tm * tn));
    #[unroll]
    for i in 0..comptime!(tm * tn) {
        acc[i] = 0.0f32;
    }
    let mut a_reg = Array::<f32>::new(tm);
    let mut b_reg = Array::<f32>::new(tn);

    let mut k0 = 0usize;
    while k0 < k {
        stage_tile::<F>(x, &mut xs, row0, m, k0, k, bm, bk, threads);
        stage_tile::<F>(w, &mut ws, col0, n, k0, k, bn, bk, threads);
        sync_cube();
        #[unroll]
        for kk in 0..bk {
            #[unroll]
            for i in 0..tm {
                a_reg[i] = xs[kk * bm + ty + i * threads_m];
            }
            #[unroll]
            for j in 0..tn {
                b_reg[j] = ws[kk * bn + tx + j * threads_n];
            }
            #[unroll]
            for i in 0..tm {
                #[unroll]
                for j in 0..tn {
                    acc[i * tn + j] += a_reg[i] * b_reg[j];
                }
            }
        }
        sync_cube();
        k0 += bk;
    }

    #[unroll]
    for i in 0..tm {
        let r = row0 + ty + i * threads_m;
        #[unroll]
        for j in 0..tn {
            let c = col0 + tx + j * threads_n;
            if r < m && c < n {
                y[r * n + c] = F::cast_from(acc[i * tn + j]);
            }
        }
    }
}

/// Comptime shape of the GEMV kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemvConfig {
    /// x rows (= M, 1..=8).
    pub tokens: u32,
    /// W rows per cube.
    pub rows: u32,
    /// Threads splitting K (a power of two).
    pub threads: u32,
}

/// Largest M the GEMV path takes.
pub const GEMV_MAX_M: usize = 8;

/// Largest M sent to cubek's `SpecializedTmaMma` (half precision); measured for M = 16 and 32.
pub const DECODE_TMA_MAX_M: usize = 32;

#[cube(launch_unchecked)]
fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    y: &mut Array<F>,
    n: u32,
    k_vecs: u32,
    #[comptime] cfg: GemvConfig,
) {
    let tokens = comptime!(cfg.tokens as usize);
    let rows = comptime!(cfg.rows as usize);
    let threads = comptime!(cfg.threads as usize);
    let values = comptime!((cfg.tokens * cfg.rows) as usize);
    let n = n as usize;
    let k_vecs = k_vecs as usize;
    let tid = UNIT_POS as usize;
    let row0 = linear_cube() * rows;
    if row0 >= n {
        terminate!();
    }
    let mut acc = Array::<f32>::new(values);
    #[unroll]
    for v in 0..values {
        acc[v] = 0.0f32;
    }
    let mut xs = Array::<Vector<f32, N>>::new(tokens);
    let mut kv = tid;
    while kv < k_vecs {
        #[unroll]
        for i in 0..tokens {
            xs[i] = Vector::<f32, N>::cast_from(x[i * k_vecs + kv]);
        }
        #[unroll]
        for r in 0..rows {
            // Rows past N repeat the last row: loads stay in bounds, their sums are dropped.
            let row = min(row0 + r, n - 1);
            let wv = Vector::<f32, N>::cast_from(w[row * k_vecs + kv]);
            #[unroll]
            for i in 0..tokens {
                let prod = wv * xs[i];
                let mut s = 0.0f32;
                #[unroll]
                for l in 0..N::value() {
                    s += prod[l];
                }
                acc[r * tokens + i] += s;
            }
        }
        kv += threads;
    }
    let mut partials = SharedMemory::<f32>::new(comptime!(values * threads));
    #[unroll]
    for v in 0..values {
        partials[v * threads + tid] = acc[v];
    }
    sync_cube();
    let mut stride = comptime!(threads / 2).runtime();
    while stride > 0 {
        if tid < stride {
            #[unroll]
            for v in 0..values {
                partials[v * threads + tid] = partials[v * threads + tid] + partials[v * threads + tid + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    if tid < values {
        let r = tid / tokens;
        let i = tid % tokens;
        if row0 + r < n {
            y[i * n + row0 + r] = F::cast_from(partials[tid * threads]);
        }
    }
}

fn launch_gemv<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    m: usize,
    n: usize,
    k: usize,
) -> OpResult<()> {
    let vec = client.io_optimized_vector_sizes(size_of::<F>()).filter(|v| k % v == 0).max().unwrap_or(1).min(8);
    // rows · tokens sums per thread, at most 32 (registers, and 16 KiB of shared partials).
    let rows = (32 / m).clamp(1, 8);
    let threads = super::threads_for((k / vec).div_ceil(2), 32, 128);
    let cfg = GemvConfig { tokens: m as u32, rows: rows as u32, threads };
    let cubes = n.div_ceil(rows);
    if cubes.div_ceil(super::MAX_GRID) > super::MAX_GRID {
        return Err(OpError::Shape(format!("matmul over {n} output features exceeds the grid")));
    }
    unsafe {
        gemv_kernel::launch_unchecked::<F, R>(
            client,
            super::grid_1d(cubes),
            CubeDim::new_1d(threads),
            vec,
            x.arg(vec),
            w.arg(vec),
            y.arg(1),
            n as u32,
            (k / vec) as u32,
            cfg,
        );
    }
    Ok(())
}

/// The same product through cubek-matmul with the given strategy (`Strategy::SimpleCyclicCmma`
/// for tensor cores). Shapes are checked like [`launch_matmul`]'s; cubek's refusal of the
/// problem or device comes back as [`OpError::Unsupported`] with nothing launched.
#[allow(clippy::too_many_arguments)]
pub fn launch_matmul_cubek<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    m: usize,
    n: usize,
    k: usize,
    strategy: &Strategy,
) -> OpResult<()> {
    check_shapes(x, w, y, m, n, k)?;
    if m == 0 || n == 0 || k == 0 {
        return Err(OpError::Unsupported("cubek matmul of an empty dimension".into()));
    }
    let ty = F::as_type_native_unchecked().storage_type();
    // Safety: the lengths were checked against [m, k], [n, k] and [m, n] above.
    let (lhs, rhs, out) = unsafe {
        (
            TensorBinding::<R>::from_raw_parts(x.handle.clone(), [k, 1].into(), [m, k].into()),
            // W [N, K] row-major is the [K, N] right-hand side in column-major order.
            TensorBinding::<R>::from_raw_parts(w.handle.clone(), [1, k].into(), [k, n].into()),
            TensorBinding::<R>::from_raw_parts(y.handle.clone(), [n, 1].into(), [m, n].into()),
        )
    };
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: ty, rhs: ty, out: ty });
    cubek_matmul::launch::launch_ref(strategy, client, InputBinding::Normal(lhs, ty), InputBinding::Normal(rhs, ty), out, &mut dtypes)
        .map_err(|e| OpError::Unsupported(format!("cubek matmul: {e:?}")))
}

fn check_shapes<F: CubeElement>(
    x: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &DeviceBuffer<F>,
    m: usize,
    n: usize,
    k: usize,
) -> OpResult<()> {
    check_dims("matmul x", &[m, k])?;
    check_dims("matmul w", &[n, k])?;
    check_dims("matmul y", &[m, n])?;
    check_len(x, "x", m * k)?;
    check_len(w, "w", n * k)?;
    check_len(y, "y", m * n)
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`. `x`, `w`, `y` are contiguous row-major; `y` is overwritten.
/// `config: None` picks the GEMV kernel for `m ≤ GEMV_MAX_M` (and `k > 0`), cubek's tensor-core
/// kernel for half-precision storage where the device has them, and the tiled kernel with
/// [`MatmulConfig::new`] otherwise; `Some(config)` forces the tiled kernel with that tile.
#[allow(clippy::too_many_arguments)]
pub fn launch_matmul<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceBuffer<F>,
    w: &DeviceBuffer<F>,
    y: &mut DeviceBuffer<F>,
    m: usize,
    n: usize,
    k: usize,
    config: Option<MatmulConfig>,
) -> OpResult<()> {
    check_shapes(x, w, y, m, n, k)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if config.is_none() && m <= GEMV_MAX_M && k > 0 {
        return launch_gemv(client, x, w, y, m, n, k);
    }
    // Tensor cores for the model-sized shapes (every projection of a real model is a multiple
    // of 8 both ways); odd test shapes stay on the tiled kernel. Decode-sized M past the GEMV
    // range takes cubek's warp-specialised TMA kernel where the device has TMA (Hopper): on an
    // H100 at Llama-3-8B's projections and M = 16 or 32 it ran 2.7–3× faster than
    // `SimpleCyclicCmma` (qkv 82 vs 227 µs, down 255 vs 769 µs; runtime/BENCHMARKS.md, decode
    // section). Where cubek refuses it, the cyclic CMMA kernel, then the tiled one, runs.
    if config.is_none() && size_of::<F>() == 2 && m > GEMV_MAX_M && n.is_multiple_of(8) && k.is_multiple_of(8) && k > 0 {
        if m <= DECODE_TMA_MAX_M {
            let tma = Strategy::SpecializedTmaMma(Default::default());
            if launch_matmul_cubek(client, x, w, y, m, n, k, &tma).is_ok() {
                return Ok(());
            }
        }
        if m >= 16 {
            let cmma = Strategy::SimpleCyclicCmma(Default::default());
            if launch_matmul_cubek(client, x, w, y, m, n, k, &cmma).is_ok() {
                return Ok(());
            }
        }
    }
    let cfg = config.unwrap_or_else(|| MatmulConfig::new(m));
    cfg.check()?;
    let (gx, gy) = (n.div_ceil(cfg.block_n as usize), m.div_ceil(cfg.block_m as usize));
    if gx > super::MAX_GRID || gy > super::MAX_GRID {
        return Err(OpError::Shape(format!("matmul grid {gx}×{gy} exceeds the device limit")));
    }
    unsafe {
        matmul_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(gx as u32, gy as u32, 1),
            CubeDim::new_1d(cfg.threads()),
            x.arg(1),
            w.arg(1),
            y.arg(1),
            m as u32,
            n as u32,
            k as u32,
            cfg,
        );
    }
    Ok(())
}

/// Plain f64 reference: `y[i, j] = Σ_k x[i, k] · w[j, k]`.
pub fn reference_matmul(x: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = x[i * k..(i + 1) * k].iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
        }
    }
    y
}
