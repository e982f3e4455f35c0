//! Base (non-LoRA) operators the plan executor needs to run dense GQA decoders (Llama, Qwen3),
//! one kernel family per file, each with a plain f64 CPU reference beside it:
//! * [`matmul`]: `y = x · Wᵀ` with the HF weight layout (W row-major `[out, in]`), f32 accumulation;
//! * [`rms_norm`]: RMSNorm over rows, out of place, fused behind the residual add, or in place
//!   per head (Qwen3 q_norm/k_norm);
//! * [`rope`]: rotary embedding (NeoX / HF `rotate_half`), `default` and `llama3` scaling,
//!   partial rotary, applied in place from a host-computed cos/sin table;
//! * [`silu_mul`]: `silu(gate) · up` from the fused gate_up output;
//! * [`add`]: residual add (in place or out of place);
//! * [`gather`]: embedding lookup by token id and selection of rows (last token per sequence);
//! * [`attention`]: paged KV cache write and causal GQA attention over mixed prefill/decode batches;
//! * [`argmax`]: greedy sampling over a logits buffer.
//!
//! Every launch checks buffer sizes and shapes on the host and returns an [`OpError`] instead of
//! panicking; no launch allocates. Storage is `F: Float` (f32 or bf16); accumulation is f32.
//! Per-head tensors inside a wider buffer (q, k, v inside the fused qkv projection output) are
//! described by a [`HeadView`], so norms, rotary and attention read them in place.
//!
//! One decoder step of a dense GQA model (T tokens, hidden H, Hq/Hkv heads of d, fused qkv
//! weight `[(Hq + 2·Hkv)·d, H]`, fused gate_up `[2·I, H]`), all buffers preallocated:
//! ```text
//! embedding:  gather::launch_embedding_lookup(table, ids, h, V, H)
//! per layer:  rms_norm::launch_rms_norm(h, w_in, x, T, H, eps)
//!             matmul::launch_matmul(x, w_qkv, qkv, T, (Hq+2Hkv)·d, H, None)      (+ LoRA expand into qkv)
//!             [Qwen3] rms_norm::launch_rms_norm_heads(qkv, q_view, q_norm, T, eps), same for k_view
//!             rope::launch_rope(qkv, q_view, positions, table, params, T), same for k_view
//!             attention::launch_kv_write(qkv, k_view, qkv, v_view, cache, batch, T)
//!             attention::launch_attention(qkv, q_view, cache, batch, attn, T, 1/sqrt(d))
//!             matmul::launch_matmul(attn, w_o, o, T, H, Hq·d, None);  add::launch_add_inplace(h, o)
//!             rms_norm::launch_rms_norm(h, w_post, x, T, H, eps)
//!             matmul::launch_matmul(x, w_gate_up, gu, T, 2I, H, None)
//!             silu_mul::launch_silu_mul(gu, act, T, I)
//!             matmul::launch_matmul(act, w_down, o, T, H, I, None);  add::launch_add_inplace(h, o)
//! head:       rms_norm::launch_rms_norm(h, w_final, x, T, H, eps)
//!             gather::launch_gather_rows(x, last_rows, xl, T, H)          (last token per sequence)
//!             matmul::launch_matmul(xl, lm_head, logits, S, V, H, None);  argmax::launch_argmax(logits, next, S, V)
//! ```
//! with `q_view = HeadView::slice(Hq+2Hkv, 0, Hq, d)`, `k_view = …slice(…, Hq, Hkv, d)`,
//! `v_view = …slice(…, Hq+Hkv, Hkv, d)`, `batch = AttentionBatch::new(..).upload(..)` (its
//! `positions` also feed rope) and `table = RopeParams::cos_sin_table()` uploaded once
//! (`cos_sin_table_bf16()` for a bf16 model). Each `add_inplace` + following `rms_norm` pair may
//! be one `rms_norm::launch_add_rms_norm(h, o, w, x, T, H, eps)`.

pub mod add;
pub mod argmax;
pub mod attention;
pub mod gather;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod silu_mul;

use cubecl::prelude::*;

use crate::buffer::DeviceBuffer;

/// Errors of the base-op launch API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("buffer `{name}` holds {actual} elements but the shape needs {expected}")]
    BufferSize { name: &'static str, expected: usize, actual: usize },
    #[error("invalid shape: {0}")]
    Shape(String),
    #[error("the device does not support {0}")]
    Unsupported(String),
}

pub type OpResult<T> = std::result::Result<T, OpError>;

/// Checks that `buf` holds exactly `expected` elements.
pub(crate) fn check_len<E: CubeElement>(buf: &DeviceBuffer<E>, name: &'static str, expected: usize) -> OpResult<()> {
    if buf.len() != expected {
        return Err(OpError::BufferSize { name, expected, actual: buf.len() });
    }
    Ok(())
}

/// Largest size accepted for any dimension (keeps every index computation inside u32).
pub(crate) const MAX_DIM: usize = 1 << 30;

pub(crate) fn check_dims(what: &str, dims: &[usize]) -> OpResult<()> {
    let mut prod: usize = 1;
    for &d in dims {
        prod = prod.saturating_mul(d.max(1));
    }
    if prod >= MAX_DIM * 4 || dims.iter().any(|&d| d >= MAX_DIM) {
        return Err(OpError::Shape(format!("{what}: dimensions {dims:?} exceed the supported size")));
    }
    Ok(())
}

/// `[tokens, heads, head_dim]` stored inside a buffer whose token rows are `token_stride`
/// elements apart, starting at element `offset` (q, k or v inside the fused qkv output, or a
/// plain contiguous tensor with `offset = 0`, `token_stride = heads · head_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeadView {
    pub offset: u32,
    pub token_stride: u32,
    pub heads: u32,
    pub head_dim: u32,
}

impl HeadView {
    /// A contiguous `[tokens, heads, head_dim]` tensor.
    pub fn contiguous(heads: u32, head_dim: u32) -> Self {
        HeadView { offset: 0, token_stride: heads * head_dim, heads, head_dim }
    }

    /// Head block `first_head..first_head + heads` of a buffer with `total_heads` heads per token
    /// (q = heads `0..Hq`, k = `Hq..Hq+Hkv`, v = `Hq+Hkv..` of the fused qkv output).
    pub fn slice(total_heads: u32, first_head: u32, heads: u32, head_dim: u32) -> Self {
        HeadView { offset: first_head * head_dim, token_stride: total_heads * head_dim, heads, head_dim }
    }

    /// Element index of `(token, head, i)` (host side).
    pub fn index(&self, token: usize, head: usize, i: usize) -> usize {
        self.offset as usize + token * self.token_stride as usize + head * self.head_dim as usize + i
    }

    /// Validates the view against a buffer of `len` elements holding `tokens` tokens.
    pub(crate) fn check(&self, what: &'static str, tokens: usize, len: usize) -> OpResult<()> {
        if self.heads == 0 || self.head_dim == 0 {
            return Err(OpError::Shape(format!("{what}: empty view {self:?}")));
        }
        let row = self.offset as u64 + self.heads as u64 * self.head_dim as u64;
        if row > self.token_stride as u64 {
            return Err(OpError::Shape(format!("{what}: heads overlap the next token row in {self:?}")));
        }
        check_dims(what, &[tokens, self.token_stride as usize])?;
        let needed = if tokens == 0 { 0 } else { (tokens as u64 - 1) * self.token_stride as u64 + row };
        if needed > len as u64 {
            return Err(OpError::BufferSize { name: what, expected: needed as usize, actual: len });
        }
        Ok(())
    }
}

/// Most cubes along one grid dimension on every backend (wgpu's limit per dimension).
pub(crate) const MAX_GRID: usize = 65535;

/// A 2-D grid of at least `blocks` cubes for kernels that index cubes linearly through
/// [`linear_cube`] (and exit past `blocks`).
pub(crate) fn grid_1d(blocks: usize) -> CubeCount {
    let x = blocks.clamp(1, MAX_GRID);
    CubeCount::Static(x as u32, blocks.div_ceil(x).max(1) as u32, 1)
}

/// Linear cube index under [`grid_1d`].
#[cube]
pub(crate) fn linear_cube() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Sum of one f32 per thread over the cube (shared-memory tree, `threads` a power of two).
/// Every thread gets the total; `buf` holds at least `threads` floats and may be reused after.
#[cube]
pub(crate) fn cube_sum(value: f32, buf: &mut SharedMemory<f32>, #[comptime] threads: usize) -> f32 {
    let tid = UNIT_POS as usize;
    buf[tid] = value;
    sync_cube();
    let mut stride = comptime!(threads / 2).runtime();
    while stride > 0 {
        if tid < stride {
            buf[tid] = buf[tid] + buf[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = buf[0];
    sync_cube();
    total
}

/// Power-of-two thread count covering `width` items, within `lo..=hi`.
pub(crate) fn threads_for(width: usize, lo: u32, hi: u32) -> u32 {
    (width.min(hi as usize).max(1) as u32).next_power_of_two().clamp(lo, hi)
}
