//! How the tensor-core kernels multiply their 16×16×16 fragments, and the hand-managed way:
//! operands loaded from shared memory with `ldmatrix` and multiplied with `mma.sync`
//! m16n8k16 (cubecl's manual MMA), where the device has both.
//!
//! cubecl's `cmma` API lowers to CUDA's `wmma`, whose fragment loads take generic pointers:
//! ptxas turns each 16×16 operand load from shared memory into four generic 32-bit loads
//! (`LD.E`) with 64-bit address arithmetic around them (H100 run 115, SASS of the rank-64 qkv
//! prefill shrink: 96 HMMA, 144 LD and 293 IMAD in its code; ncu: 13.7 M instructions for
//! 1.6 M MMAs, a fixed-latency wait the top stall). `ldmatrix.x4` loads the same fragment in
//! one shared-memory instruction, and the accumulators are plain registers.
//!
//! Register layouts (PTX ISA, `mma.m16n8k16` with 16-bit operands, f32 accumulators), for lane
//! `l`, `g = l / 4`, `t = l % 4`:
//! * A (16×16, row-major): registers 0–3 hold rows `g`, `g + 8`, `g`, `g + 8` at columns
//!   `2t, 2t + 1` (registers 0–1) and `8 + 2t, 8 + 2t + 1` (registers 2–3).
//! * B (16×8, K × N): registers 0–1 hold column `g` at rows `2t, 2t + 1` and `8 + 2t, 8 + 2t + 1`.
//! * Accumulator (16×8): vector 0 holds row `g`, vector 1 row `g + 8`, columns `2t, 2t + 1`.
//!
//! `ldmatrix.x4` loads four 8×8 matrices, lanes `8i … 8i + 7` giving the row addresses of
//! matrix `i`, and leaves row `g`, columns `2t, 2t + 1` of matrix `i` in lane `l`'s register
//! `i`: so the A operand is matrices (rows 0–7 | 8–15) × (columns 0–7 | 8–15) in that order,
//! and two B operands (N blocks 0–7 and 8–15) come from one load of rows stored N-major (K
//! contiguous, as the shrink's A rows and the expand's B rows are).
//!
//! Since the accumulators' layout is that of an `ldmatrix.x4` of a 16×16 block of 16-bit
//! elements, a warp can add its sums to such a block in shared memory with one `ldmatrix.x4`
//! and one `stmatrix.x4` (sm_90 on): [`add_to_block`], the prefill expand's epilogue.

use cubecl::cmma::MmaDefinition;
use cubecl::features::MmaConfig;
use cubecl::ir::{DeviceProperties, MatrixIdent};
use cubecl::prelude::*;

use crate::shrink_mma::TILE;

/// Two elements per vector: one 32-bit register of two 16-bit operands, or two f32
/// accumulators.
pub type Pair = Const<2>;

/// One lane's registers of an MMA operand or accumulator.
pub type Registers<E> = Array<Vector<E, Pair>>;

/// How a kernel multiplies its 16×16×16 fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragments {
    /// No tensor cores (wgpu, lavapipe in CI): each lane computes its elements of a fragment
    /// with FMAs from the same staged tiles. Slow, but it runs the kernels' tiling, staging and
    /// stores where there is no GPU.
    Emulated,
    /// cubecl's cooperative matrices (CUDA `wmma`): 16×16×16 fragments.
    Cmma,
    /// `ldmatrix` loads and `mma.sync` m16n8k16 on hand-managed registers (CUDA, sm_80 on).
    Ldmatrix,
}

impl Fragments {
    /// The fastest way the device has for storage type `F` with f32 accumulation.
    pub fn best_for<F: CubePrimitive>(device: &DeviceProperties) -> Self {
        if ldmatrix_supported::<F>(device) {
            Fragments::Ldmatrix
        } else if cmma_supported::<F>(device) {
            Fragments::Cmma
        } else {
            Fragments::Emulated
        }
    }

    /// Whether the fragments are multiplied on tensor cores.
    pub fn tensor_cores(self) -> bool {
        self != Fragments::Emulated
    }

    /// Whether the device has this way for storage type `F` (emulated: always).
    pub fn available_on<F: CubePrimitive>(self, device: &DeviceProperties) -> bool {
        match self {
            Fragments::Emulated => true,
            Fragments::Cmma => cmma_supported::<F>(device),
            Fragments::Ldmatrix => ldmatrix_supported::<F>(device),
        }
    }
}

/// `F` and f32 as cubecl storage types, where `F` has a native one.
fn storage_types<F: CubePrimitive>() -> Option<(StorageType, StorageType)> {
    let (elem, f32_ty) = (F::as_type_native()?, f32::as_type_native()?);
    Some((elem.storage_type(), f32_ty.storage_type()))
}

/// Whether the device has a 16×16×16 cooperative MMA on `F` with f32 accumulation.
pub fn cmma_supported<F: CubePrimitive>(device: &DeviceProperties) -> bool {
    storage_types::<F>().is_some_and(|(elem, f32_ty)| {
        device.features.matmul.cmma.contains(&MmaConfig { a_type: elem, b_type: elem, cd_type: f32_ty, m: TILE, n: TILE, k: TILE })
    })
}

/// Whether the device has `ldmatrix` for `F` and a manual m16n8k16 MMA on `F` with f32
/// accumulation.
pub fn ldmatrix_supported<F: CubePrimitive>(device: &DeviceProperties) -> bool {
    let matmul = &device.features.matmul;
    storage_types::<F>().is_some_and(|(elem, f32_ty)| {
        matmul.ldmatrix.contains(&elem)
            && matmul.mma.contains(&MmaConfig { a_type: elem, b_type: elem, cd_type: f32_ty, m: 16, n: 8, k: 16 })
    })
}

/// Whether the device has `stmatrix` for `F` (CUDA sm_90 on).
pub fn stmatrix_supported<F: CubePrimitive>(device: &DeviceProperties) -> bool {
    storage_types::<F>().is_some_and(|(elem, _)| device.features.matmul.stmatrix.contains(&elem))
}

/// The m16n8k16 MMA on `F` with f32 accumulation.
#[cube]
fn definition<F: Float>() -> MmaDefinition<F, F, f32> {
    MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize)
}

/// Where this lane's row of an `ldmatrix.x4` / `stmatrix.x4` of the 16×16 block at element
/// `first` of `tile` (row-major, rows `stride` elements apart) starts, in vectors of `nv`:
/// lanes 0–7 give rows 0–7 and lanes 8–15 rows 8–15 of columns 0–7, lanes 16–31 the same rows
/// of columns 8–15. Matrix `i` then lands in register `i`: rows `g` / `g + 8` at columns
/// `2t, 2t + 1` (registers 0 / 1) and `8 + 2t, 8 + 2t + 1` (registers 2 / 3).
#[cube]
fn block_row_start(first: usize, #[comptime] stride: usize, #[comptime] nv: usize) -> usize {
    let lane = UNIT_POS_PLANE as usize;
    let row = lane % 8 + (lane / 8) % 2 * 8;
    let col = lane / 16 * 8;
    (first + row * stride + col) / nv
}

/// This lane's A operand (four registers) of the 16×16 block whose top-left element is
/// element `first` of `tile` (staged vectors of `nv` elements, rows `stride` elements apart,
/// K contiguous along a row). Every row must start on 16 bytes (`stride` and `first` whole
/// 8-element blocks).
#[cube]
pub(crate) fn load_a<F: Float, N: Size>(
    tile: &SharedMemory<Vector<F, N>>,
    first: usize,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
) -> Registers<F> {
    let start = block_row_start(first, stride, nv);
    definition::<F>().load_matrix::<Vector<F, N>, Pair>(&tile.slice(start, start + comptime!(8 / nv)), MatrixIdent::A, 4usize, false)
}

/// This lane's B operands of two 16×8 blocks (N 0–7 and 8–15, two registers each) from the
/// 16 rows starting at element `first` of `tile`, one row per N index with K contiguous
/// (`B(k, n) = row n, column k`), rows `stride` elements apart (16-byte aligned as for
/// [`load_a`]).
#[cube]
pub(crate) fn load_b_pair<F: Float, N: Size>(
    tile: &SharedMemory<Vector<F, N>>,
    first: usize,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
) -> (Registers<F>, Registers<F>) {
    let lane = UNIT_POS_PLANE as usize;
    let row = lane % 8 + lane / 16 * 8;
    let col = (lane / 8) % 2 * 8;
    let start = (first + row * stride + col) / nv;
    let regs =
        definition::<F>().load_matrix::<Vector<F, N>, Pair>(&tile.slice(start, start + comptime!(8 / nv)), MatrixIdent::B, 4usize, false);
    let mut low = Registers::<F>::new(2usize);
    let mut high = Registers::<F>::new(2usize);
    low[0] = regs[0];
    low[1] = regs[1];
    high[0] = regs[2];
    high[1] = regs[3];
    (low, high)
}

/// A 16×8 f32 accumulator (two vectors of two per lane) holding zeros.
#[cube]
pub(crate) fn zero_accumulator() -> Registers<f32> {
    let mut acc = Registers::<f32>::new(2usize);
    acc[0] = Vector::new(0.0);
    acc[1] = Vector::new(0.0);
    acc
}

/// `acc += a · b` on one 16×8 block.
#[cube]
pub(crate) fn multiply_accumulate<F: Float>(a: &Registers<F>, b: &Registers<F>, acc: &mut Registers<f32>) {
    definition::<F>().execute_inplace(a, b, acc);
}

/// Writes this lane's elements of the 16×8 accumulator `acc` into a row-major f32 tile:
/// element (r, c) of the block to `out[first + r·stride + c]`.
#[cube]
pub(crate) fn store_accumulator(out: &mut SharedMemory<f32>, acc: &Registers<f32>, first: usize, #[comptime] stride: usize) {
    let lane = UNIT_POS_PLANE as usize;
    let at = first + lane / 4 * stride + lane % 4 * 2;
    out[at] = acc[0][0];
    out[at + 1] = acc[0][1];
    out[at + comptime!(8 * stride)] = acc[1][0];
    out[at + comptime!(8 * stride) + 1] = acc[1][1];
}

/// Adds the 16×16 f32 sums `low` (columns 0–7) and `high` (columns 8–15) to the 16×16 block of
/// the storage-type tile `tile` at element `first` (rows `stride` elements apart, 16-byte
/// aligned as for [`load_a`]), in place: one `ldmatrix.x4` brings this lane's elements of the
/// block in the accumulators' layout, one `stmatrix.x4` writes the sums back. The warp's lanes
/// touch only this block.
#[cube]
pub(crate) fn add_to_block<F: Float, N: Size>(
    tile: &mut SharedMemory<Vector<F, N>>,
    first: usize,
    low: &Registers<f32>,
    high: &Registers<f32>,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
) {
    let start = block_row_start(first, stride, nv);
    let mma = definition::<F>();
    let staged = mma.load_matrix::<Vector<F, N>, Pair>(&tile.slice(start, start + comptime!(8 / nv)), MatrixIdent::A, 4usize, false);
    let mut sums = Registers::<F>::new(4usize);
    #[unroll]
    for i in 0..2usize {
        sums[i] = Vector::<F, Pair>::cast_from(Vector::<f32, Pair>::cast_from(staged[i]) + low[i]);
        sums[i + 2] = Vector::<F, Pair>::cast_from(Vector::<f32, Pair>::cast_from(staged[i + 2]) + high[i]);
    }
    mma.store_matrix::<Vector<F, N>, Pair>(&mut tile.slice_mut(start, start + comptime!(8 / nv)), &sums, MatrixIdent::A, 4usize, false);
}
