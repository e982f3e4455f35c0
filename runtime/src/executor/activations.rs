//! The activation arena: one device allocation, laid out at start-up for the plan's largest
//! step, and viewed at each step's token count.
//!
//! The layout is the executor's own rather than the plan's `values` / `arena_offset`: the plan
//! places one value per graph edge of every layer (lifetimes across the whole model, LoRA
//! intermediates in the LoRA dtype, lm_head rows sized by `max_seqs`), while the executor runs
//! fused kernels (qkv and gate_up fused by rows, the residual add fused into the next norm),
//! reuses one set of buffers for every layer and accumulates the LoRA shrink in f32. Those
//! buffers do not map 1:1 onto the plan's values, so the executor lays out its own buffers
//! back to back (each start [`VIEW_ALIGN`]-aligned, no aliasing) in one allocation made by
//! `Engine::new`; it follows the plan where they agree (token rows by `max_batch_tokens`,
//! lm_head rows by `max_seqs`). Without the plan's lifetime-based sharing it is larger than
//! `memory.activations` (906 KB against 459 KB for the tiny Llama test plan; about 1 GiB
//! against 640 MiB estimated for Qwen3-8B at 8192 tokens); gate_up and the SiLU product could
//! share qkv's and the attention output's bytes, which are dead by then.

use std::collections::HashMap;

use cubecl::prelude::*;

use super::error::{ExecResult, ExecutorError};
use super::model::ModelDesc;
use crate::buffer::{DeviceArena, DeviceBuffer, VIEW_ALIGN};

/// Activations of a T-token step (views of the arena).
pub(crate) struct TokenViews<F> {
    pub h: DeviceBuffer<F>,
    pub x: DeviceBuffer<F>,
    pub qkv: DeviceBuffer<F>,
    pub attn: DeviceBuffer<F>,
    pub o: DeviceBuffer<F>,
    pub gate_up: DeviceBuffer<F>,
    pub act: DeviceBuffer<F>,
    /// LoRA intermediates by width (groups · max_rank), f32, each at full capacity: a site
    /// takes the prefix its shrink writes (one copy of `[t, width]`, or a K split's copies).
    pub lora_a: HashMap<usize, DeviceBuffer<f32>>,
    /// The folded GEMM's output at full capacity (see [`TokenViews::gemm_scratch`]).
    gemm: Option<(usize, DeviceBuffer<F>)>,
    /// Split-sequence attention partials at full capacity (see [`TokenViews::attn_partial`]).
    attn_partial: Option<(usize, DeviceBuffer<f32>)>,
}

impl<F: CubeElement> TokenViews<F> {
    /// `[t, width]` of the folded GEMM's output buffer (`LoraShrink`), shared by every site.
    pub fn gemm_scratch(&self, t: usize, width: usize) -> ExecResult<DeviceBuffer<F>> {
        let (rows, buf) = self.gemm.as_ref().ok_or_else(|| ExecutorError::Plan("no folded-GEMM buffer in the arena".into()))?;
        if t > *rows || t * width > buf.len() {
            return Err(ExecutorError::Batch(format!("a folded GEMM of {t} × {width} exceeds its buffer ({rows} rows)")));
        }
        buf.prefix(t * width).map_err(|e| ExecutorError::Plan(format!("activation arena: {e}")))
    }

    /// The first `len` floats of the split-attention partials, for a step of `t` tokens;
    /// `None` when the arena has none or `t` exceeds its rows (attention then runs unsplit).
    pub fn attn_partial(&self, t: usize, len: usize) -> Option<DeviceBuffer<f32>> {
        let (rows, buf) = self.attn_partial.as_ref()?;
        if t > *rows {
            return None;
        }
        buf.prefix(len).ok()
    }
}

/// The rows that reach lm_head in one head pass (views of the arena).
pub(crate) struct HeadViews<F> {
    pub last: DeviceBuffer<F>,
    pub x: DeviceBuffer<F>,
    pub logits: DeviceBuffer<F>,
    pub next: DeviceBuffer<i32>,
    /// lm_head's LoRA intermediate at full capacity (as [`TokenViews::lora_a`]).
    pub lora_a: Option<DeviceBuffer<f32>>,
}

/// Byte offset of a buffer in the arena and its elements per row.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    per_row: usize,
}

/// A buffer viewed whole at every step (`len` elements).
#[derive(Debug, Clone, Copy)]
struct Whole {
    offset: u64,
    len: usize,
}

pub(crate) struct Activations {
    arena: DeviceArena,
    max_tokens: usize,
    max_head_rows: usize,
    h: Slot,
    x: Slot,
    qkv: Slot,
    attn: Slot,
    o: Slot,
    gate_up: Slot,
    act: Slot,
    lora_a: Vec<(usize, Whole)>,
    head_last: Slot,
    head_x: Slot,
    logits: Slot,
    next: Slot,
    head_lora_a: Option<Whole>,
    /// Rows and slot of the folded GEMM's output.
    gemm: Option<(usize, Slot)>,
    /// Rows and slot of the split-attention partials.
    attn_partial: Option<(usize, Slot)>,
}

/// Back-to-back placement at aligned offsets.
struct Layout {
    bytes: u64,
}

impl Layout {
    fn place(&mut self, rows: usize, per_row: usize, elem: usize) -> Slot {
        let offset = self.bytes;
        self.bytes = (offset + (rows * per_row * elem) as u64).next_multiple_of(VIEW_ALIGN);
        Slot { offset, per_row }
    }

    fn place_whole(&mut self, len: usize, elem: usize) -> Whole {
        Whole { offset: self.place(1, len, elem).offset, len }
    }
}

impl Activations {
    /// Lays out and allocates the arena for `max_tokens` token rows and `max_head_rows` rows
    /// per lm_head pass; `lora_buffers` are the (width, f32 elements) of the layers' LoRA
    /// intermediates and `head_lora_len` the elements of lm_head's; `gemm_scratch` the (rows,
    /// width) of the folded GEMM's output, where some site folds its shrink into the GEMM;
    /// `attn_partial` the (rows, floats per row) of the split-sequence attention partials.
    pub fn new<R: Runtime, F: CubeElement>(
        client: &ComputeClient<R>,
        desc: &ModelDesc,
        max_tokens: usize,
        max_head_rows: usize,
        lora_buffers: &[(usize, usize)],
        head_lora_len: Option<usize>,
        gemm_scratch: Option<(usize, usize)>,
        attn_partial: Option<(usize, usize)>,
    ) -> ExecResult<Self> {
        let (t, r, e) = (max_tokens, max_head_rows, size_of::<F>());
        let mut l = Layout { bytes: 0 };
        let h = l.place(t, desc.hidden, e);
        let x = l.place(t, desc.hidden, e);
        let qkv = l.place(t, desc.qkv_width(), e);
        let attn = l.place(t, desc.attn_width(), e);
        let o = l.place(t, desc.hidden, e);
        let gate_up = l.place(t, 2 * desc.inter, e);
        let act = l.place(t, desc.inter, e);
        let lora_a = lora_buffers.iter().map(|&(w, len)| (w, l.place_whole(len, 4))).collect();
        let head_last = l.place(r, desc.hidden, e);
        let head_x = l.place(r, desc.hidden, e);
        let logits = l.place(r, desc.vocab, e);
        let next = l.place(r, 1, 4);
        let head_lora_a = head_lora_len.map(|len| l.place_whole(len, 4));
        let gemm = gemm_scratch.filter(|&(rows, _)| rows > 0).map(|(rows, w)| (rows, l.place(rows, w, e)));
        let attn_partial = attn_partial.filter(|&(rows, _)| rows > 0).map(|(rows, w)| (rows, l.place(rows, w, 4)));
        if l.bytes / 4 >= u32::MAX as u64 {
            return Err(ExecutorError::Unsupported(format!("an activation arena of {} bytes (indices past u32)", l.bytes)));
        }
        Ok(Activations {
            arena: DeviceArena::new(client, l.bytes),
            max_tokens,
            max_head_rows,
            h,
            x,
            qkv,
            attn,
            o,
            gate_up,
            act,
            lora_a,
            head_last,
            head_x,
            logits,
            next,
            head_lora_a,
            gemm,
            attn_partial,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.arena.bytes()
    }

    pub fn max_head_rows(&self) -> usize {
        self.max_head_rows
    }

    /// Rows of the folded GEMM's output buffer (0: none).
    pub fn gemm_rows(&self) -> usize {
        self.gemm.map_or(0, |(rows, _)| rows)
    }

    fn view<E: CubeElement>(&self, slot: Slot, rows: usize) -> ExecResult<DeviceBuffer<E>> {
        self.arena.view(slot.offset, rows * slot.per_row).map_err(|e| ExecutorError::Plan(format!("activation arena: {e}")))
    }

    fn whole<E: CubeElement>(&self, whole: Whole) -> ExecResult<DeviceBuffer<E>> {
        self.arena.view(whole.offset, whole.len).map_err(|e| ExecutorError::Plan(format!("activation arena: {e}")))
    }

    /// The activations of a `t`-token step.
    pub fn tokens<F: CubeElement>(&self, t: usize) -> ExecResult<TokenViews<F>> {
        if t > self.max_tokens {
            return Err(ExecutorError::Batch(format!("{t} tokens exceed the arena's {}", self.max_tokens)));
        }
        Ok(TokenViews {
            h: self.view(self.h, t)?,
            x: self.view(self.x, t)?,
            qkv: self.view(self.qkv, t)?,
            attn: self.view(self.attn, t)?,
            o: self.view(self.o, t)?,
            gate_up: self.view(self.gate_up, t)?,
            act: self.view(self.act, t)?,
            lora_a: self.lora_a.iter().map(|&(w, whole)| Ok((w, self.whole(whole)?))).collect::<ExecResult<_>>()?,
            gemm: self.gemm.map(|(rows, slot)| Ok::<_, ExecutorError>((rows, self.view(slot, rows)?))).transpose()?,
            attn_partial: self.attn_partial.map(|(rows, slot)| Ok::<_, ExecutorError>((rows, self.view(slot, rows)?))).transpose()?,
        })
    }

    /// The buffers of a head pass over `rows` rows.
    pub fn head<F: CubeElement>(&self, rows: usize) -> ExecResult<HeadViews<F>> {
        if rows > self.max_head_rows {
            return Err(ExecutorError::Batch(format!("{rows} lm_head rows exceed the arena's {}", self.max_head_rows)));
        }
        Ok(HeadViews {
            last: self.view(self.head_last, rows)?,
            x: self.view(self.head_x, rows)?,
            logits: self.view(self.logits, rows)?,
            next: self.view(self.next, rows)?,
            lora_a: self.head_lora_a.map(|whole| self.whole(whole)).transpose()?,
        })
    }
}
