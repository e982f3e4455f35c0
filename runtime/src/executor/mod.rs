//! The plan executor: runs a compiled [`Plan`] of a dense GQA decoder (Llama, Qwen3) on one
//! device (tp = 1), with per-token multi-LoRA.
//!
//! [`Engine::new`] checks the model directory against the plan, uploads the weights once
//! (q|k|v and gate|up fused by rows, as the plan's projections are), allocates the paged KV
//! cache of every layer, the rotary table and one device A/B pair per LoRA buffer of the plan
//! (uploaded from a [`HostPool`]). [`Engine::load_adapter`] validates a PEFT adapter through
//! lorac-adapters, writes it into its host slot and copies that slot to the device.
//! [`Engine::step`] runs one forward over a batch of sequences (each with its new tokens,
//! position and adapter slot), mixed prefill and decode, and returns logits (all positions or
//! each sequence's last) and the greedy next token of each sequence.
//!
//! One step, T tokens, per layer (see `crate::ops` for the kernels):
//! ```text
//! rms_norm → qkv (+LoRA) → [q_norm, k_norm] → rope(q, k) → kv write → attention
//!          → o_proj (+LoRA) → h += o, rms_norm → gate_up (+LoRA) → silu·mul → down (+LoRA) → h += down
//! ```
//! then the final norm over the rows that reach lm_head, lm_head (+LoRA; the embedding table
//! when tied) and argmax. The embedding runs a lookup plus the embedding LoRA. A projection's
//! "+LoRA" is a shrink and an expand launch after its GEMM, or, in decode-sized steps where
//! [`LoraShrink`] folds the site, one GEMM against `[W; A]` and one GEMM-expand launch.
//!
//! # Memory: everything at start-up, nothing per step
//!
//! `Engine::new` allocates every device buffer the engine will ever use: the weights (uploaded
//! from the memory-mapped safetensors), the paged KV cache of every layer, the rotary table,
//! one A/B pair plus rank / scale / slice tables per LoRA buffer of the plan (a folded site's
//! A is a view of its weight's allocation, right after W), one **activation
//! arena** and one **metadata block**. A step only takes views of those
//! ([`DeviceBuffer::slice`], cubecl's `Handle::offset_start` / `offset_end`, starts aligned to
//! [`crate::buffer::VIEW_ALIGN`]) at its own token and row counts, so every op keeps its
//! exact-length checks.
//! * The activation arena holds the residual stream, the normed input, qkv, attention output,
//!   projection output, gate_up, the SiLU product and the f32 LoRA intermediates for
//!   `max_batch_tokens` rows, and the lm_head buffers for `max_seqs` rows (the plan's
//!   `Rows::Seqs`). Its layout is the executor's own, not the plan's `values` (see
//!   `activations` for why); `LogitsMode::All` runs lm_head in passes of `max_seqs` rows.
//! * The metadata block holds every index buffer a step reads (token ids, positions, slot
//!   mapping, token→sequence, block tables, the token and lm_head adapter segments, the rows
//!   that reach lm_head), each region at its largest size under the plan's limits.
//!
//! Host data reaches existing buffers in place: each step's metadata through one staging
//! upload plus one scatter kernel, an adapter load or unload through one staging upload plus a
//! copy kernel per A/B slot region and its rank table. cubecl 0.10's `ComputeClient` has no
//! host→device write into an existing handle (the server's `write` is reached only by
//! `create*`, which reserves a new slice first), so each of those staging uploads borrows one
//! temporary slice of the device pool, returned as soon as the call ends. Their sizes are
//! bucketed (metadata: powers of two) or fixed (an adapter slot's region), and `new` runs each
//! size once, so afterwards the pool always finds a free slice: the memory it reserves, the
//! slices it has handed out and the engine's own buffers stay exactly as start-up left them
//! (`serving_allocates_nothing_after_start_up` asserts it through `memory_usage`).
//!
//! `new` ends with a warm-up: the staging sizes above, then dummy steps of 1..=8 tokens (the
//! decode GEMV specialisations), 32 and `max_batch_tokens` tokens, with adapter segments and
//! base rows and both head shapes, so the JIT compiles those kernels before serving. The LoRA
//! shrink/expand kernels specialise on the batch's longest adapter segment as well, so a step
//! whose segment lengths start-up did not see still compiles a kernel the first time (no
//! device allocation, a one-off latency).

mod activations;
mod error;
mod metadata;
mod model;
mod weights;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use cubecl::prelude::*;
use lorac_adapters::{HostPool, LoadedAdapter};
use lorac_plan::{DType, Plan, RopeScaling as PlanRopeScaling};

use activations::{Activations, HeadViews, TokenViews};
use error::Context;
pub use error::{ExecResult, ExecutorError};
use metadata::{MetadataLimits, Region, StepMetadata};
use model::{LAYER_PROJECTIONS, ModelDesc};
use weights::Checkpoint;

use crate::batch::Segments;
use crate::buffer::{DeviceBuffer, VIEW_ALIGN};
use crate::ops::attention::{AttentionBatch, DeviceAttentionBatch, KvCacheShape, PagedKvCache, SeqSlice};
use crate::ops::rope::{RopeParams, RopeScaling};
use crate::ops::{HeadView, add, argmax, attention, gather, matmul, rms_norm, rope, silu_mul};
use crate::pool::AdapterPool;
use crate::{DeviceSegments, embedding, expand, gemm_expand, shrink};

/// Longest step whose attention is split over the sequence (decode batches, where one cube per
/// (head, token) leaves most multiprocessors idle), and the most chunks per token.
const ATTENTION_SPLIT_MAX_TOKENS: usize = 64;
const ATTENTION_MAX_SPLITS: u32 = 16;
/// Fewer chunks than this run unsplit: the merge is one more launch per layer, and on the H100
/// two chunks at batch 32 (1024 cubes already) gave no measurable gain (runtime/BENCHMARKS.md,
/// run 7).
const ATTENTION_MIN_SPLITS: u32 = 4;

/// Storage types the executor runs in (f32 accumulation for both).
pub trait EngineElem: Float + CubeElement + Copy {
    const DTYPE: DType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Little-endian bytes of this dtype (the adapter pool's host copy) to values.
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self>;
}

impl EngineElem for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

impl EngineElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self> {
        bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect()
    }
}

/// Where a projection's LoRA shrink runs.
///
/// Folded into the base GEMM, a site's adapter pool A `[S, c·R, K]` is stored right after its
/// weight W `[N, K]` in one allocation and one GEMM against `[W; A]` yields the base output and
/// every slot's intermediate; [`crate::gemm_expand`] then writes y in one pass. That turns a
/// site's three launches (GEMM, shrink, expand) into two, which is what a decode step is bound
/// by, at the price of reading every slot's A (not only the batch's adapters) and of a GEMM
/// output `S·c·R` columns wider. Longer steps keep the separate shrink (its tensor-core kernel
/// reads each adapter's A once per segment and needs no wider scratch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraShrink {
    /// A separate shrink launch at every site.
    Kernel,
    /// Folded in for steps of at most `max_tokens` tokens, at the sites where the pool's A
    /// adds at most an eighth to the weight's rows.
    Auto { max_tokens: u32 },
    /// Folded in at every site whose layout allows it, for steps of at most `max_tokens`
    /// tokens (tests of the folded path on small models).
    InGemm { max_tokens: u32 },
}

impl LoraShrink {
    /// The serving default: folded in for decode-sized steps.
    pub const DEFAULT: LoraShrink = LoraShrink::Auto { max_tokens: 64 };

    fn max_tokens(self) -> usize {
        match self {
            LoraShrink::Kernel => 0,
            LoraShrink::Auto { max_tokens } | LoraShrink::InGemm { max_tokens } => max_tokens as usize,
        }
    }

    /// Extra weight rows of a site with `base_rows` rows and `pool_rows` A rows (0: not folded).
    fn folded_rows(self, base_rows: usize, pool_rows: usize) -> usize {
        let fold = match self {
            LoraShrink::Kernel => false,
            LoraShrink::Auto { max_tokens } => max_tokens > 0 && pool_rows * 8 <= base_rows,
            LoraShrink::InGemm { max_tokens } => max_tokens > 0,
        };
        if fold { pool_rows } else { 0 }
    }
}

/// Runtime choices the plan leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Tokens per KV-cache page (the plan's `kv_page_size` unless overridden).
    pub page_size: u32,
    /// Longest sequence (prompt + generated); sizes the rotary table and the block tables.
    pub max_seq_len: u32,
    /// Where the LoRA shrink of the layer projections runs.
    pub lora_shrink: LoraShrink,
}

impl EngineOptions {
    /// The plan's page size; sequences up to the model's `max_position_embeddings` (8192 when
    /// the config has none) and at most the KV cache's size.
    pub fn for_plan(plan: &Plan) -> Self {
        let positions = u64::from(plan.model.max_position_embeddings.unwrap_or(8192));
        let max_seq_len = plan.limits.kv_cache_tokens.min(positions).min(u64::from(u32::MAX)) as u32;
        EngineOptions { page_size: plan.limits.kv_page_size, max_seq_len, lora_shrink: LoraShrink::DEFAULT }
    }
}

/// Weight loading progress: reported after each checkpoint tensor reached the device.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress<'a> {
    /// The tensor just uploaded.
    pub tensor: &'a str,
    /// Checkpoint bytes uploaded so far, of `bytes_total` (the tensors the plan reads).
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A sequence whose KV cache the engine holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInput {
    pub seq: SeqId,
    /// Position of `tokens[0]`: at most the tokens already cached for `seq` (a smaller value
    /// drops the cached tail and recomputes from there).
    pub position: u32,
    pub tokens: Vec<u32>,
    /// Adapter slot, or none for the base model.
    pub adapter: Option<u32>,
}

/// Which rows reach lm_head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every sequence's last new token (generation).
    Last,
    /// Every new token (scoring; references). lm_head runs over at most `max_seqs` rows at a
    /// time (the plan sizes its rows by `max_seqs`), so a long step takes several head passes.
    All,
    /// Like `Last`, but only the next tokens come back: the logits stay on the device
    /// (`StepOutput::logits` holds one empty vector per sequence). For generation loops and
    /// benchmarks.
    NextTokens,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Per sequence of the batch, row-major `[rows, vocab]` (rows = 1 for `Last`, its new
    /// tokens for `All`, 0 for `NextTokens`).
    pub logits: Vec<Vec<f32>>,
    /// Per sequence, the greedy next token (argmax of its last row).
    pub next_tokens: Vec<u32>,
}

/// Device buffers the engine owns, for checking that steps allocate nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub buffers: usize,
    pub bytes: u64,
}

struct LayerWeights<F> {
    input_norm: DeviceBuffer<F>,
    post_norm: DeviceBuffer<F>,
    q_norm: Option<DeviceBuffer<F>>,
    k_norm: Option<DeviceBuffer<F>>,
    /// [`LAYER_PROJECTIONS`] order: fused qkv, o, fused gate_up, down.
    linears: [Linear<F>; 4],
}

/// A projection's weight (its parts fused by rows).
struct Linear<F> {
    /// W `[N, K]`.
    base: DeviceBuffer<F>,
    /// `[W; A]` `[N + S·c·R, K]` where the LoRA shrink is folded into the GEMM ([`LoraShrink`]):
    /// the allocation `base` and the adapter pool's A are views of.
    folded: Option<DeviceBuffer<F>>,
}

struct Weights<F> {
    embed: DeviceBuffer<F>,
    final_norm: DeviceBuffer<F>,
    /// The embedding table's handle when the embeddings are tied.
    lm_head: DeviceBuffer<F>,
    layers: Vec<LayerWeights<F>>,
}

/// One LoRA buffer of the plan on the device.
struct LoraDevice<F> {
    pool: AdapterPool<F>,
    /// The pool's A is a view of its projection's folded weight allocation.
    a_in_weights: bool,
}

struct SeqState {
    pages: Vec<u32>,
    cached: u32,
}

pub struct Engine<R: Runtime, F: EngineElem> {
    client: ComputeClient<R>,
    plan: Plan,
    desc: ModelDesc,
    options: EngineOptions,
    eps: f32,
    weights: Weights<F>,
    caches: Vec<PagedKvCache<F>>,
    kv_shape: KvCacheShape,
    max_pages_per_seq: u32,
    rope: RopeParams,
    rope_table: DeviceBuffer<f32>,
    host_pool: HostPool,
    lora: Vec<LoraDevice<F>>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: u64,
    free_pages: Vec<u32>,
    /// Every activation of a step, views of one allocation.
    activations: Activations,
    /// Every per-step index buffer, views of one allocation written in place.
    meta: StepMetadata,
    /// Longest step whose folded sites run the folded GEMM (`LoraShrink`); at most the rows of
    /// the arena's folded-GEMM buffer.
    fold_tokens: usize,
    /// Whether LoRA shrinks may split K ([`Engine::set_lora_split_k`]).
    split_k: bool,
    /// Shrinks launched with K split across cubes since start-up ([`Engine::split_k_shrinks`]).
    split_k_shrinks: Cell<u64>,
}

fn nonzero(v: u32, what: &str) -> ExecResult<u32> {
    if v == 0 {
        return Err(ExecutorError::Batch(format!("{what} must be positive")));
    }
    Ok(v)
}

impl<R: Runtime, F: EngineElem> Engine<R, F> {
    pub fn new(client: ComputeClient<R>, plan: Plan, model_dir: &Path) -> ExecResult<Self> {
        let options = EngineOptions::for_plan(&plan);
        Self::with_options(client, plan, model_dir, options)
    }

    pub fn with_options(client: ComputeClient<R>, plan: Plan, model_dir: &Path, options: EngineOptions) -> ExecResult<Self> {
        Self::with_progress(client, plan, model_dir, options, &mut |_| {})
    }

    /// As [`Engine::with_options`], calling `progress` after each weight tensor's upload
    /// (for a progress bar: the upload is most of start-up).
    pub fn with_progress(
        client: ComputeClient<R>,
        plan: Plan,
        model_dir: &Path,
        options: EngineOptions,
        progress: &mut dyn FnMut(LoadProgress<'_>),
    ) -> ExecResult<Self> {
        let config = model_dir.join("config.json");
        let bytes = std::fs::read(&config).map_err(|source| ExecutorError::Io { path: config.clone(), source })?;
        plan.check_config(&bytes)?;
        plan.check_consistency().map_err(ExecutorError::Plan)?;
        let desc = model::describe(&plan)?;
        for (what, dtype) in [("model", plan.model.dtype.activation()), ("LoRA", plan.lora.dtype)] {
            if dtype != F::DTYPE {
                return Err(ExecutorError::Unsupported(format!("{what} dtype {dtype} in an engine built for {}", F::DTYPE)));
            }
        }
        let page_size = nonzero(options.page_size, "page_size")?;
        let max_seq_len = nonzero(options.max_seq_len, "max_seq_len")?;
        let eps = plan.model.norm.eps as f32;

        let ckpt = Checkpoint::open(model_dir)?;
        // Sites whose shrink is folded into the GEMM get the pool's A rows after W.
        let buffers = &plan.ranks[0].lora_buffers;
        let folded_rows = |l: usize, i: usize| -> usize {
            let Some(layout) = desc.layer_lora[l][i].map(|b| &buffers[b].layout) else { return 0 };
            let (n, k) = desc.linear_shape(i);
            let pool_rows = (layout.slots() * layout.intermediate_width()) as usize;
            // A's view must start at an aligned byte offset of the allocation.
            let aligned = ((n * k * size_of::<F>()) as u64).is_multiple_of(VIEW_ALIGN);
            let fits = layout.experts().is_none() && layout.in_features() as usize == k && layout.out_features() as usize == n;
            if aligned && fits { options.lora_shrink.folded_rows(n, pool_rows) } else { 0 }
        };
        let bytes_total = desc.tensors.names().map(|n| ckpt.stored_bytes(n)).sum();
        let mut bytes_done = 0;
        let mut uploaded = |tensor: &str| {
            bytes_done += ckpt.stored_bytes(tensor);
            progress(LoadProgress { tensor, bytes_done, bytes_total });
        };
        let weights = load_weights::<R, F>(&client, &plan, &desc, &ckpt, &folded_rows, &mut uploaded)?;

        // Paged KV cache: the plan's token budget, split evenly over pages.
        let num_pages = (plan.limits.kv_cache_tokens / u64::from(page_size)).min(u64::from(u32::MAX)) as u32;
        let kv_shape = KvCacheShape { num_pages, page_size, kv_heads: desc.kv_heads, head_dim: desc.head_dim };
        let caches = (0..desc.layers)
            .map(|l| PagedKvCache::empty(&client, kv_shape).ctx(|| format!("KV cache of layer {l}")))
            .collect::<ExecResult<Vec<_>>>()?;
        let max_pages_per_seq = max_seq_len.div_ceil(page_size);

        let rope_plan = plan.model.rope.as_ref().ok_or_else(|| ExecutorError::Unsupported("a model without rotary embedding".into()))?;
        let scaling = match &rope_plan.scaling {
            PlanRopeScaling::None => RopeScaling::Default,
            PlanRopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                RopeScaling::Llama3 {
                    factor: *factor,
                    low_freq_factor: *low_freq_factor,
                    high_freq_factor: *high_freq_factor,
                    original_max_position_embeddings: *original_max_position_embeddings,
                }
            }
            other => return Err(ExecutorError::Unsupported(format!("rope scaling {other:?}"))),
        };
        let rope = RopeParams {
            head_dim: desc.head_dim,
            rotary_dim: rope_plan.rotary_dim,
            theta: rope_plan.theta,
            scaling,
            max_positions: max_seq_len,
        };
        rope.check().ctx(|| "rotary parameters".into())?;
        let table = if F::DTYPE == DType::BF16 { rope.cos_sin_table_bf16() } else { rope.cos_sin_table() };
        let rope_table = DeviceBuffer::upload(&client, &table);

        let host_pool = HostPool::new(&plan)?;
        let limits = plan.limits;
        let max_tokens = nonzero(limits.max_batch_tokens, "max_batch_tokens")? as usize;
        let max_seqs = nonzero(limits.max_seqs, "max_seqs")? as usize;
        // LoRA intermediates, one buffer per width (groups · max_rank) shared by the sites of
        // that width, with room for the copies of a K-split shrink where one applies.
        let lora_width = |b: usize| plan.ranks[0].lora_buffers[b].layout.intermediate_width() as usize;
        let lora_len =
            |b: usize, rows: usize| shrink::ShrinkKernel::intermediate_len::<R, F>(&client, &plan.ranks[0].lora_buffers[b].layout, rows);
        let mut lora_buffers: Vec<(usize, usize)> = desc
            .layer_lora
            .iter()
            .flatten()
            .flatten()
            .map(|&b| (lora_width(b), lora_len(b, max_tokens)))
            .chain(desc.embed_lora.map(|b| (lora_width(b), lora_width(b) * max_tokens)))
            .collect();
        // Longest first, so that dedup keeps each width's longest.
        lora_buffers.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        lora_buffers.dedup_by_key(|(width, _)| *width);
        // lm_head rows: one per sequence (the plan's `Rows::Seqs`); `LogitsMode::All` runs
        // several head passes of at most this many rows.
        // The folded GEMM's output `[t, N + S·c·R]`, for steps up to the folding threshold.
        let folded_width = desc
            .layer_lora
            .iter()
            .zip(&weights.layers)
            .flat_map(|(lora, w)| lora.iter().zip(&w.linears))
            .filter(|(_, lin)| lin.folded.is_some())
            .filter_map(|(b, _)| b.map(|b| gemm_expand::gemm_width(&plan.ranks[0].lora_buffers[b].layout) as usize))
            .max();
        let fold_capacity = if folded_width.is_some() { options.lora_shrink.max_tokens().min(max_tokens) } else { 0 };
        let gemm_scratch = folded_width.map(|w| (fold_capacity, w));
        // Decode-sized steps split attention over the sequence (the partials live in the arena).
        let split_rows = ATTENTION_SPLIT_MAX_TOKENS.min(max_tokens);
        let split_floats = attention::split_partial_len(1, desc.q_heads, desc.head_dim, ATTENTION_MAX_SPLITS);
        let activations = Activations::new::<R, F>(
            &client,
            &desc,
            max_tokens,
            max_seqs,
            &lora_buffers,
            desc.lm_head_lora.map(|b| lora_len(b, max_seqs)),
            gemm_scratch,
            Some((split_rows, split_floats)),
        )?;
        let meta_limits = MetadataLimits {
            tokens: max_tokens,
            seqs: max_seqs,
            pages_per_seq: max_pages_per_seq as usize,
            head_rows: max_seqs,
            slots: plan.lora.max_loras as usize,
        };
        let meta = StepMetadata::new(&client, meta_limits)?;
        let mut engine = Engine {
            client,
            desc,
            options: EngineOptions { page_size, max_seq_len, lora_shrink: options.lora_shrink },
            eps,
            weights,
            caches,
            kv_shape,
            max_pages_per_seq,
            rope,
            rope_table,
            host_pool,
            lora: Vec::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            free_pages: (0..num_pages).rev().collect(),
            activations,
            meta,
            plan,
            fold_tokens: fold_capacity,
            split_k: true,
            split_k_shrinks: Cell::new(0),
        };
        // Folded sites: the pool's A lives in the weight allocation, after W.
        let mut a_views: HashMap<usize, DeviceBuffer<F>> = HashMap::new();
        for (lora, w) in engine.desc.layer_lora.iter().zip(&engine.weights.layers) {
            for (i, (b, lin)) in lora.iter().zip(&w.linears).enumerate() {
                if let (Some(b), Some(folded)) = (b, &lin.folded) {
                    let (n, k) = engine.desc.linear_shape(i);
                    let a_len = engine.plan.ranks[0].lora_buffers[*b].layout.a_elements() as usize;
                    let view = folded.slice(n * k, a_len).ctx(|| format!("adapter pool A of LoRA buffer {b} in its weight"))?;
                    a_views.insert(*b, view);
                }
            }
        }
        engine.lora =
            (0..engine.plan.ranks[0].lora_buffers.len()).map(|b| engine.upload_lora(b, a_views.remove(&b))).collect::<ExecResult<_>>()?;
        engine.warm_up()?;
        Ok(engine)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Lowers the longest step whose folded sites run the folded GEMM (0: the shrink kernel
    /// everywhere), up to what start-up sized the arena for; benchmarks compare both paths on
    /// one engine this way.
    pub fn set_folded_shrink_max_tokens(&mut self, max_tokens: u32) -> ExecResult<()> {
        let capacity = self.folded_shrink_capacity();
        if max_tokens as usize > capacity {
            return Err(ExecutorError::Batch(format!("folded shrink up to {max_tokens} tokens: start-up sized its buffer for {capacity}")));
        }
        self.fold_tokens = max_tokens as usize;
        Ok(())
    }

    /// Longest step start-up sized the folded GEMM's buffer for (0: no site is folded).
    pub fn folded_shrink_capacity(&self) -> usize {
        self.activations.gemm_rows()
    }

    /// Layer projections whose LoRA shrink is folded into the GEMM ([`LoraShrink`]) and those
    /// with LoRA in all.
    pub fn lora_sites_in_gemm(&self) -> (usize, usize) {
        let sites = self.desc.layer_lora.iter().zip(&self.weights.layers).flat_map(|(lora, w)| lora.iter().zip(&w.linears));
        sites.filter(|(b, _)| b.is_some()).fold((0, 0), |(folded, all), (_, lin)| (folded + usize::from(lin.folded.is_some()), all + 1))
    }

    /// Whether LoRA shrinks may split K across cubes (on by default; start-up sizes the LoRA
    /// intermediates for the copies either way): benchmarks compare both on one engine.
    pub fn set_lora_split_k(&mut self, on: bool) {
        self.split_k = on;
    }

    /// LoRA shrinks launched with K split across cubes since start-up: where the device has
    /// tensor cores for the engine's dtype, a step whose segments are too few 16-token tiles
    /// to fill it splits K on sites whose K splits into four 128-wide shares
    /// (`MmaShrinkConfig::split_k_for`), writing partial sums
    /// into copies of the intermediate that the expand adds up.
    pub fn split_k_shrinks(&self) -> u64 {
        self.split_k_shrinks.get()
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    /// LoRA buffer `b`'s A and B from the host pool, with each slot's rank. `a_in_weights`:
    /// the view of a folded weight allocation that holds A (written in place).
    fn upload_lora(&self, b: usize, a_in_weights: Option<DeviceBuffer<F>>) -> ExecResult<LoraDevice<F>> {
        let buf = &self.plan.ranks[0].lora_buffers[b];
        let size = F::DTYPE.size_bytes();
        let bytes = self.host_pool.rank_bytes(0);
        let region = |offset: u64, elements: u64| -> ExecResult<Vec<F>> {
            let (start, end) = (offset as usize, (offset + elements * size) as usize);
            let slice =
                bytes.get(start..end).ok_or_else(|| ExecutorError::Plan(format!("LoRA buffer {b} lies outside the adapter pool")))?;
            Ok(F::from_le_bytes(slice))
        };
        let a_host = region(buf.a_offset, buf.layout.a_elements())?;
        let folded = a_in_weights.is_some();
        let a = match a_in_weights {
            Some(view) => {
                view.write_at(&self.client, 0, &a_host).ctx(|| format!("adapter pool A of LoRA buffer {b} ({})", buf.module))?;
                view
            }
            None => DeviceBuffer::upload(&self.client, &a_host),
        };
        let bb = DeviceBuffer::upload(&self.client, &region(buf.b_offset, buf.layout.b_elements())?);
        let slots = buf.layout.slots() as usize;
        let ranks: Vec<u32> = (0..slots).map(|s| self.host_pool.slot_rank(s, b)).collect();
        // The pool folds each adapter's scale into B.
        let scales = vec![1.0f32; slots];
        let pool = AdapterPool::new(&buf.layout, a, bb, &ranks, &scales, &self.client)
            .ctx(|| format!("adapter pool of LoRA buffer {b} ({})", buf.module))?;
        Ok(LoraDevice { pool, a_in_weights: folded })
    }

    /// Copies `slot`'s region of every LoRA buffer from the host pool into the device pool in
    /// place (other slots untouched, nothing reallocated) and rewrites the per-slot ranks in
    /// place. Each region travels through one temporary pool slice ([`DeviceBuffer::write_at`])
    /// whose size start-up has already seen, so the device memory reserved does not grow.
    fn sync_slot(&mut self, slot: usize) -> ExecResult<()> {
        let size = F::DTYPE.size_bytes();
        for b in 0..self.lora.len() {
            let buf = &self.plan.ranks[0].lora_buffers[b];
            let layout = &buf.layout;
            let slots = u64::from(layout.slots());
            let bytes = self.host_pool.rank_bytes(0);
            let pool = &self.lora[b].pool;
            for (offset, total, dst) in [(buf.a_offset, layout.a_elements(), &pool.a), (buf.b_offset, layout.b_elements(), &pool.b)] {
                let per_slot = total / slots;
                let start = offset + slot as u64 * per_slot * size;
                let region = bytes
                    .get(start as usize..(start + per_slot * size) as usize)
                    .ok_or_else(|| ExecutorError::Plan(format!("LoRA buffer {b} lies outside the adapter pool")))?;
                dst.write_at(&self.client, (slot as u64 * per_slot) as usize, &F::from_le_bytes(region))
                    .ctx(|| format!("LoRA buffer {b} ({})", buf.module))?;
            }
            let ranks: Vec<u32> = (0..slots as usize).map(|s| self.host_pool.slot_rank(s, b)).collect();
            self.lora[b].pool.write_ranks(&self.client, &ranks).ctx(|| format!("adapter ranks of LoRA buffer {b} ({})", buf.module))?;
        }
        Ok(())
    }

    /// Validates the PEFT adapter in `dir` against the plan and loads it into free slot `slot`.
    /// A refused adapter leaves every slot as it was.
    pub fn load_adapter(&mut self, slot: u32, dir: &Path) -> ExecResult<()> {
        let adapter = LoadedAdapter::load(dir, &self.plan)?;
        self.host_pool.write_slot(slot as usize, &adapter)?;
        self.sync_slot(slot as usize)
    }

    /// As [`Engine::load_adapter`], registered in the pool under `name` rather than the
    /// directory's last component (a server's adapter names are unique; directory names
    /// such as `checkpoint-500/adapter` need not be).
    pub fn load_adapter_named(&mut self, slot: u32, dir: &Path, name: &str) -> ExecResult<()> {
        let adapter = LoadedAdapter::load(dir, &self.plan)?.with_name(name);
        self.host_pool.write_slot(slot as usize, &adapter)?;
        self.sync_slot(slot as usize)
    }

    /// Frees `slot`; returns the name of the adapter it held.
    pub fn unload_adapter(&mut self, slot: u32) -> ExecResult<Option<String>> {
        let name = self.host_pool.clear_slot(slot as usize)?;
        self.sync_slot(slot as usize)?;
        Ok(name)
    }

    /// Starts a sequence with an empty KV cache.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, SeqState { pages: Vec::new(), cached: 0 });
        id
    }

    /// Ends a sequence and returns its pages to the cache.
    pub fn release_sequence(&mut self, seq: SeqId) -> ExecResult<()> {
        let state = self.seqs.remove(&seq).ok_or_else(|| ExecutorError::Batch(format!("unknown sequence {seq:?}")))?;
        self.free_pages.extend(state.pages.into_iter().rev());
        Ok(())
    }

    /// Bytes of the paged KV cache over all layers (the plan's `memory.kv_cache` when
    /// `kv_cache_tokens` is a multiple of the page size).
    pub fn kv_cache_bytes(&self) -> u64 {
        self.caches.iter().map(|c| ((c.k.len() + c.v.len()) * size_of::<F>()) as u64).sum()
    }

    /// Tokens cached for `seq`.
    pub fn cached_tokens(&self, seq: SeqId) -> Option<u32> {
        self.seqs.get(&seq).map(|s| s.cached)
    }

    /// Every device buffer the engine holds (weights, caches, rope table, adapter pools, the
    /// activation arena and the metadata block), counted by handle. Fixed at start-up.
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint { buffers: 0, bytes: 0 };
        let mut add = |bytes: u64| {
            f.buffers += 1;
            f.bytes += bytes;
        };
        let w = &self.weights;
        for b in [&w.embed, &w.final_norm, &w.lm_head] {
            add(b.size_bytes());
        }
        for l in &w.layers {
            let linears = l.linears.iter().map(|lin| lin.folded.as_ref().unwrap_or(&lin.base));
            for b in [&l.input_norm, &l.post_norm].into_iter().chain(linears).chain(l.q_norm.iter()).chain(l.k_norm.iter()) {
                add(b.size_bytes());
            }
        }
        for c in &self.caches {
            add(c.k.size_bytes());
            add(c.v.size_bytes());
        }
        add(self.rope_table.size_bytes());
        for p in &self.lora {
            // A folded into a weight allocation is counted with that weight.
            if !p.a_in_weights {
                add(p.pool.a.size_bytes());
            }
            add(p.pool.b.size_bytes());
            add(p.pool.ranks.size_bytes());
            add(p.pool.scales.size_bytes());
            add(p.pool.slice_table.size_bytes());
        }
        add(self.activations.bytes());
        add(self.meta.bytes());
        f
    }

    /// Bytes of the activation arena (the executor's own layout; see `activations`) and of the
    /// per-step metadata block.
    pub fn step_buffer_bytes(&self) -> (u64, u64) {
        (self.activations.bytes(), self.meta.bytes())
    }

    /// Checks the batch against the plan's limits and the cache, and reserves the pages it
    /// needs (nothing changes when it is refused).
    /// `require_loaded: false` lets start-up's warm-up steps use empty adapter slots.
    fn admit(&mut self, batch: &[SeqInput], require_loaded: bool) -> ExecResult<Vec<SeqSlice>> {
        if batch.is_empty() {
            return Err(ExecutorError::Batch("no sequences".into()));
        }
        let limits = self.plan.limits;
        if batch.len() > limits.max_seqs as usize {
            return Err(ExecutorError::Batch(format!("{} sequences, the plan allows {}", batch.len(), limits.max_seqs)));
        }
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if tokens > limits.max_batch_tokens as usize {
            return Err(ExecutorError::Batch(format!("{tokens} tokens, the plan allows {}", limits.max_batch_tokens)));
        }
        let slots = self.plan.lora.max_loras;
        let mut needed_pages = 0usize;
        for (i, s) in batch.iter().enumerate() {
            let state = self.seqs.get(&s.seq).ok_or_else(|| ExecutorError::Batch(format!("entry {i}: unknown sequence {:?}", s.seq)))?;
            if batch[..i].iter().any(|o| o.seq == s.seq) {
                return Err(ExecutorError::Batch(format!("entry {i}: sequence {:?} appears twice", s.seq)));
            }
            if s.tokens.is_empty() {
                return Err(ExecutorError::Batch(format!("entry {i}: no tokens")));
            }
            if s.position > state.cached {
                return Err(ExecutorError::Batch(format!(
                    "entry {i}: position {} but only {} tokens are cached",
                    s.position, state.cached
                )));
            }
            let end = s.position as u64 + s.tokens.len() as u64;
            if end > u64::from(self.options.max_seq_len) {
                return Err(ExecutorError::Batch(format!("entry {i}: {end} tokens exceed max_seq_len {}", self.options.max_seq_len)));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= self.desc.vocab) {
                return Err(ExecutorError::Batch(format!("entry {i}: token {t} is outside the vocabulary of {}", self.desc.vocab)));
            }
            if let Some(slot) = s.adapter {
                if slot >= slots {
                    return Err(ExecutorError::Batch(format!("entry {i}: adapter slot {slot}, the plan has {slots}")));
                }
                if require_loaded && self.host_pool.slot(slot as usize).is_none() {
                    return Err(ExecutorError::Batch(format!("entry {i}: adapter slot {slot} holds no adapter")));
                }
            }
            needed_pages += (end as usize).div_ceil(self.kv_shape.page_size as usize).saturating_sub(state.pages.len());
        }
        if needed_pages > self.free_pages.len() {
            return Err(ExecutorError::Batch(format!("the batch needs {needed_pages} KV pages, {} are free", self.free_pages.len())));
        }
        let page_size = self.kv_shape.page_size as usize;
        let mut slices = Vec::with_capacity(batch.len());
        for s in batch {
            let end = s.position as usize + s.tokens.len();
            let state = self.seqs.get_mut(&s.seq).expect("checked above");
            while state.pages.len() < end.div_ceil(page_size) {
                state.pages.push(self.free_pages.pop().expect("counted above"));
            }
            state.cached = s.position;
            slices.push(SeqSlice { pages: state.pages.clone(), cached: s.position, new_tokens: s.tokens.len() as u32 });
        }
        Ok(slices)
    }

    /// Start-up warm-up: every staging size of the metadata writes and of an adapter load goes
    /// through the pool once, and dummy steps run the kernels of the usual shapes (token counts
    /// 1..=8, one per decode GEMV specialisation, then a 32-token and a `max_batch_tokens`
    /// prefill, with and without adapter segments, `Last` and `All` heads) so the JIT compiles
    /// them now. The dummy sequences are released; their KV pages go back unread.
    fn warm_up(&mut self) -> ExecResult<()> {
        self.meta.warm_up(&self.client)?;
        // Slot 0 is empty at start-up: rewriting it exercises an adapter load's staging sizes.
        if !self.lora.is_empty() {
            self.sync_slot(0)?;
        }
        let limits = self.plan.limits;
        let (max_tokens, max_seqs) = (limits.max_batch_tokens as usize, limits.max_seqs as usize);
        let adapter = (self.plan.lora.max_loras > 0 && !self.lora.is_empty()).then_some(0u32);
        let mut shapes: Vec<(usize, LogitsMode)> = (1..=matmul::GEMV_MAX_M.min(max_tokens)).map(|t| (t, LogitsMode::Last)).collect();
        shapes.extend([32, max_tokens].into_iter().filter(|&t| t > matmul::GEMV_MAX_M && t <= max_tokens).map(|t| (t, LogitsMode::All)));
        shapes.dedup();
        for (i, &(tokens, mode)) in shapes.iter().enumerate() {
            // Decode shapes: one token per sequence; prefill shapes: as few sequences as the
            // sequence length allows.
            let per_seq = if tokens <= max_seqs && mode == LogitsMode::Last { 1 } else { tokens.min(self.options.max_seq_len as usize) };
            let seqs = tokens.div_ceil(per_seq);
            let pages = seqs * per_seq.div_ceil(self.kv_shape.page_size as usize);
            if seqs > max_seqs || pages > self.free_pages.len() {
                continue;
            }
            let batch: Vec<SeqInput> = (0..seqs)
                .map(|s| SeqInput {
                    seq: self.add_sequence(),
                    position: 0,
                    tokens: vec![0; per_seq.min(tokens - s * per_seq)],
                    // Alternate base rows and adapter segments (within a step and across steps).
                    adapter: if (i + s) % 2 == 0 { adapter } else { None },
                })
                .collect();
            let result = self.run_step(&batch, mode, false);
            for s in &batch {
                self.release_sequence(s.seq)?;
            }
            result.map_err(|e| ExecutorError::Plan(format!("start-up warm-up step of {tokens} tokens: {e}")))?;
        }
        Ok(())
    }

    /// One forward over `batch`: every sequence's new tokens are written to its KV cache and
    /// attend to everything cached before them.
    pub fn step(&mut self, batch: &[SeqInput], mode: LogitsMode) -> ExecResult<StepOutput> {
        self.run_step(batch, mode, true)
    }

    fn run_step(&mut self, batch: &[SeqInput], mode: LogitsMode, require_loaded: bool) -> ExecResult<StepOutput> {
        let slices = self.admit(batch, require_loaded)?;
        let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let (ids, attn_batch, segs) = self.write_token_metadata(batch, &slices)?;
        let tokens = self.activations.tokens::<F>(t)?;
        self.forward(t, &tokens, &ids, &attn_batch, &segs)?;

        // The rows that reach lm_head and the adapter of each.
        let (rows, row_slots): (Vec<u32>, Vec<Option<u32>>) = match mode {
            LogitsMode::Last | LogitsMode::NextTokens => {
                let mut end = 0u32;
                batch
                    .iter()
                    .map(|s| {
                        end += s.tokens.len() as u32;
                        (end - 1, s.adapter)
                    })
                    .unzip()
            }
            LogitsMode::All => {
                batch.iter().flat_map(|s| std::iter::repeat_n(s.adapter, s.tokens.len())).enumerate().map(|(r, a)| (r as u32, a)).unzip()
            }
        };
        let read_logits = mode != LogitsMode::NextTokens;
        let v = self.desc.vocab;
        let mut logits: Vec<f32> = Vec::with_capacity(if read_logits { rows.len() * v } else { 0 });
        let mut next: Vec<i32> = Vec::with_capacity(rows.len());
        let pass = self.activations.max_head_rows();
        for (chunk, chunk_slots) in rows.chunks(pass).zip(row_slots.chunks(pass)) {
            let (idx, head_segs) = self.write_head_metadata(chunk, chunk_slots)?;
            let head = self.activations.head::<F>(chunk.len())?;
            self.head(t, &tokens.h, &idx, &head_segs, &head)?;
            if read_logits {
                logits.extend(head.logits.read(&self.client).into_iter().map(EngineElem::to_f32));
            }
            next.extend(head.next.read(&self.client));
        }

        for (s, slice) in batch.iter().zip(&slices) {
            if let Some(state) = self.seqs.get_mut(&s.seq) {
                state.cached = slice.cached + slice.new_tokens;
            }
        }
        let mut out = StepOutput { logits: Vec::with_capacity(batch.len()), next_tokens: Vec::with_capacity(batch.len()) };
        let mut row = 0usize;
        for s in batch {
            let n = match mode {
                LogitsMode::Last | LogitsMode::NextTokens => 1,
                LogitsMode::All => s.tokens.len(),
            };
            out.logits.push(if read_logits { logits[row * v..(row + n) * v].to_vec() } else { Vec::new() });
            let tok = next[row + n - 1];
            out.next_tokens.push(u32::try_from(tok).map_err(|_| ExecutorError::Batch(format!("argmax found no finite logit ({tok})")))?);
            row += n;
        }
        Ok(out)
    }

    /// Writes the step's token ids, attention metadata and adapter segments into their regions
    /// of the metadata block (one scatter) and returns the views the kernels read.
    fn write_token_metadata(
        &self,
        batch: &[SeqInput],
        slices: &[SeqSlice],
    ) -> ExecResult<(DeviceBuffer<u32>, DeviceAttentionBatch, DeviceSegments)> {
        let attn = AttentionBatch::new(&self.kv_shape, self.max_pages_per_seq, slices).ctx(|| "attention metadata".into())?;
        let token_slots: Vec<Option<u32>> = batch.iter().flat_map(|s| std::iter::repeat_n(s.adapter, s.tokens.len())).collect();
        let segs = Segments::from_token_slots(&token_slots, self.plan.lora.max_loras).ctx(|| "token segments".into())?;
        let t = attn.tokens();
        let mut w = self.meta.write();
        w.put(Region::TokenIds, batch.iter().flat_map(|s| s.tokens.iter().copied()))?;
        // i32 metadata travels as its bit pattern.
        w.put(Region::Positions, attn.positions.iter().map(|&p| p as u32))?;
        w.put(Region::SlotMapping, attn.slot_mapping.iter().map(|&p| p as u32))?;
        w.put(Region::TokenSeq, attn.token_seq.iter().copied())?;
        w.put(Region::BlockTables, attn.block_tables.iter().copied())?;
        let regions = [Region::SegIndptr, Region::WeightIndices, Region::TokenPerm, Region::TokenSlots];
        put_segments(&mut w, &segs, regions)?;
        w.flush(&self.client)?;
        let m = &self.meta;
        let dev_attn = DeviceAttentionBatch {
            slot_mapping: m.view_i32(Region::SlotMapping, t)?,
            token_seq: m.view(Region::TokenSeq, t)?,
            positions: m.view_i32(Region::Positions, t)?,
            block_tables: m.view(Region::BlockTables, attn.block_tables.len())?,
            max_pages_per_seq: attn.max_pages_per_seq,
        };
        Ok((m.view(Region::TokenIds, t)?, dev_attn, self.segment_views(&segs, regions)?))
    }

    /// Writes the rows of one head pass (indices into the step's tokens) and their adapter
    /// segments; returns their views.
    fn write_head_metadata(&self, rows: &[u32], slots: &[Option<u32>]) -> ExecResult<(DeviceBuffer<u32>, DeviceSegments)> {
        let segs = Segments::from_token_slots(slots, self.plan.lora.max_loras).ctx(|| "lm_head segments".into())?;
        let regions = [Region::HeadSegIndptr, Region::HeadWeightIndices, Region::HeadTokenPerm, Region::HeadTokenSlots];
        let mut w = self.meta.write();
        w.put(Region::HeadRows, rows.iter().copied())?;
        put_segments(&mut w, &segs, regions)?;
        w.flush(&self.client)?;
        Ok((self.meta.view(Region::HeadRows, rows.len())?, self.segment_views(&segs, regions)?))
    }

    /// Device segments over the metadata regions `put_segments` wrote.
    fn segment_views(&self, segs: &Segments, [indptr, weights, perm, slots]: [Region; 4]) -> ExecResult<DeviceSegments> {
        let m = &self.meta;
        Ok(DeviceSegments {
            tokens: segs.tokens(),
            slots: self.plan.lora.max_loras,
            num_segments: segs.num_segments(),
            max_segment_len: segs.max_segment_len(),
            seg_indptr: m.view(indptr, segs.seg_indptr().len())?,
            weight_indices: m.view(weights, segs.weight_indices().len())?,
            token_perm: m.view(perm, segs.token_perm().len())?,
            token_slots: m.view(slots, segs.tokens() as usize)?,
            written_by_kernels: false,
        })
    }

    /// Embedding and every decoder layer; leaves the residual stream in `ws.h`.
    fn forward(
        &mut self,
        t: usize,
        ws: &TokenViews<F>,
        ids: &DeviceBuffer<u32>,
        batch: &DeviceAttentionBatch,
        segs: &DeviceSegments,
    ) -> ExecResult<()> {
        let Engine { client, desc, weights, caches, lora, rope, rope_table, eps, plan, fold_tokens, split_k, split_k_shrinks, .. } = self;
        let split_k = *split_k;
        let buffers = &plan.ranks[0].lora_buffers;
        let (h, eps) = (desc.hidden, *eps);
        // Views are handles: the `mut` copies write the arena's memory.
        let (mut hs, mut x, mut qkv, mut attn, mut o, mut gate_up, mut act) =
            (ws.h.clone(), ws.x.clone(), ws.qkv.clone(), ws.attn.clone(), ws.o.clone(), ws.gate_up.clone(), ws.act.clone());
        let lora_a = |width: usize| -> ExecResult<DeviceBuffer<f32>> {
            ws.lora_a.get(&width).cloned().ok_or_else(|| ExecutorError::Plan(format!("no LoRA intermediate of width {width}")))
        };
        let width = |b: usize| buffers[b].layout.intermediate_width() as usize;
        gather::launch_embedding_lookup(client, &weights.embed, ids, &mut hs, desc.vocab, h).ctx(|| "embedding lookup".into())?;
        if let Some(b) = desc.embed_lora {
            let mut a = lora_a(width(b))?.prefix(t * width(b)).ctx(|| "embedding LoRA".into())?;
            embedding::launch_embedding(client, &buffers[b].layout, &lora[b].pool, segs, ids, &mut a, &mut hs, None)
                .ctx(|| "embedding LoRA".into())?;
        }
        let total = desc.q_heads + 2 * desc.kv_heads;
        let q_view = HeadView::slice(total, 0, desc.q_heads, desc.head_dim);
        let k_view = HeadView::slice(total, desc.q_heads, desc.kv_heads, desc.head_dim);
        let v_view = HeadView::slice(total, desc.q_heads + desc.kv_heads, desc.kv_heads, desc.head_dim);
        let scale = desc.softmax_scale;
        // Split-sequence attention for decode-sized steps that leave the GPU idle otherwise.
        let splits = attention::decode_splits(client, t, desc.q_heads, ATTENTION_MIN_SPLITS, ATTENTION_MAX_SPLITS);
        let mut attn_partial =
            ws.attn_partial(t, attention::split_partial_len(t, desc.q_heads, desc.head_dim, splits)).filter(|_| splits > 1);

        // Projection `i` of layer `l`, `y = x·Wᵀ` plus its LoRA. Folded sites in short steps:
        // one GEMM against [W; A] and the GEMM-expand (two launches); otherwise the GEMM, then
        // shrink and expand (the fused one-launch kernel measured slower inside a decode step
        // than these two on the H100, although faster alone: runtime/BENCHMARKS.md, run 4).
        // A step without adapter rows runs the GEMM alone.
        let fold_tokens = *fold_tokens;
        let project = |l: usize, i: usize, x: &DeviceBuffer<F>, y: &mut DeviceBuffer<F>| -> ExecResult<()> {
            let lin = &weights.layers[l].linears[i];
            let (n, k) = desc.linear_shape(i);
            let what = || format!("layer {l} {:?}", LAYER_PROJECTIONS[i]);
            let lora_b = desc.layer_lora[l][i].filter(|_| segs.num_segments() > 0);
            match (lora_b, &lin.folded) {
                (Some(b), Some(folded)) if t <= fold_tokens => {
                    let layout = &buffers[b].layout;
                    let g_width = gemm_expand::gemm_width(layout) as usize;
                    let mut g = ws.gemm_scratch(t, g_width)?;
                    matmul::launch_matmul(client, x, folded, &mut g, t, g_width, k, None).ctx(what)?;
                    gemm_expand::launch_gemm_expand(client, layout, &lora[b].pool, segs, &g, y, None).ctx(what)
                }
                _ => {
                    matmul::launch_matmul(client, x, &lin.base, y, t, n, k, None).ctx(what)?;
                    let Some(b) = lora_b else { return Ok(()) };
                    let a_room = lora_a(width(b))?;
                    lora_pair(client, &buffers[b].layout, &lora[b].pool, segs, x, &a_room, split_k, y, split_k_shrinks).ctx(what)
                }
            }
        };

        let layers = weights.layers.len();
        rms_norm::launch_rms_norm(client, &hs, &weights.layers[0].input_norm, &mut x, t, h, eps).ctx(|| "layer 0 input norm".into())?;
        for (l, (w, cache)) in weights.layers.iter().zip(caches.iter_mut()).enumerate() {
            let what = |op: &str| format!("layer {l} {op}");
            project(l, 0, &x, &mut qkv)?;
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                rms_norm::launch_rms_norm_heads(client, &mut qkv, q_view, qn, t, eps).ctx(|| what("q_norm"))?;
                rms_norm::launch_rms_norm_heads(client, &mut qkv, k_view, kn, t, eps).ctx(|| what("k_norm"))?;
            }
            rope::launch_rope(client, &mut qkv, q_view, &batch.positions, rope_table, rope, t).ctx(|| what("rope q"))?;
            rope::launch_rope(client, &mut qkv, k_view, &batch.positions, rope_table, rope, t).ctx(|| what("rope k"))?;
            attention::launch_kv_write(client, &qkv, k_view, &qkv, v_view, cache, batch, t).ctx(|| what("kv write"))?;
            match attn_partial.as_mut() {
                Some(partial) => {
                    attention::launch_attention_split(client, &qkv, q_view, cache, batch, &mut attn, t, scale, partial, splits)
                }
                None => attention::launch_attention(client, &qkv, q_view, cache, batch, &mut attn, t, scale),
            }
            .ctx(|| what("attention"))?;
            project(l, 1, &attn, &mut o)?;
            rms_norm::launch_add_rms_norm(client, &mut hs, &o, &w.post_norm, &mut x, t, h, eps).ctx(|| what("post-attention norm"))?;
            project(l, 2, &x, &mut gate_up)?;
            silu_mul::launch_silu_mul(client, &gate_up, &mut act, t, desc.inter).ctx(|| what("silu_mul"))?;
            project(l, 3, &act, &mut o)?;
            if l + 1 < layers {
                let next = &weights.layers[l + 1].input_norm;
                rms_norm::launch_add_rms_norm(client, &mut hs, &o, next, &mut x, t, h, eps)
                    .ctx(|| format!("layer {} input norm", l + 1))?;
            } else {
                add::launch_add_inplace(client, &mut hs, &o).ctx(|| what("residual add"))?;
            }
        }
        Ok(())
    }

    /// One head pass: gathers the `idx` rows of the step's residual stream `h` (`t` rows), then
    /// the final norm, lm_head (+LoRA) and argmax into `hw`.
    fn head(&self, t: usize, h: &DeviceBuffer<F>, idx: &DeviceBuffer<u32>, segs: &DeviceSegments, hw: &HeadViews<F>) -> ExecResult<()> {
        let Engine { client, desc, weights, lora, eps, plan, split_k, split_k_shrinks, .. } = self;
        let (width, v, rows) = (desc.hidden, desc.vocab, idx.len());
        let (mut last, mut x, mut logits, mut next) = (hw.last.clone(), hw.x.clone(), hw.logits.clone(), hw.next.clone());
        gather::launch_gather_rows(client, h, idx, &mut last, t, width).ctx(|| "lm_head row gather".into())?;
        rms_norm::launch_rms_norm(client, &last, &weights.final_norm, &mut x, rows, width, *eps).ctx(|| "final norm".into())?;
        matmul::launch_matmul(client, &x, &weights.lm_head, &mut logits, rows, v, width, None).ctx(|| "lm_head".into())?;
        if let (Some(b), Some(a)) = (desc.lm_head_lora, hw.lora_a.as_ref()) {
            let layout = &plan.ranks[0].lora_buffers[b].layout;
            lora_pair(client, layout, &lora[b].pool, segs, &x, a, *split_k, &mut logits, split_k_shrinks).ctx(|| "lm_head LoRA".into())?;
        }
        argmax::launch_argmax(client, &logits, &mut next, rows, v).ctx(|| "argmax".into())
    }
}

/// The shrink and expand of one LoRA site. The shrink's kernel is chosen for the room in
/// `a_room` (the site's intermediate at full capacity): with `split_k`, a K split where it
/// holds the copies, counted in `split_k_shrinks`. The expand reads the copies the shrink wrote.
#[allow(clippy::too_many_arguments)]
fn lora_pair<R: Runtime, F: EngineElem>(
    client: &ComputeClient<R>,
    layout: &lorac_plan::LoraLayout,
    pool: &AdapterPool<F>,
    segs: &DeviceSegments,
    x: &DeviceBuffer<F>,
    a_room: &DeviceBuffer<f32>,
    split_k: bool,
    y: &mut DeviceBuffer<F>,
    split_k_shrinks: &Cell<u64>,
) -> crate::error::Result<()> {
    let one_copy = segs.tokens as usize * layout.intermediate_width() as usize;
    let room = if split_k { a_room.len() } else { one_copy };
    let kernel = shrink::ShrinkKernel::choose_for_room::<R, F>(client, layout, segs.num_segments, segs.max_segment_len, segs.tokens, room);
    let copies = kernel.intermediate_copies();
    let mut a = a_room.prefix(copies as usize * one_copy)?;
    shrink::launch_shrink(client, layout, pool, segs, x, &mut a, Some(kernel))?;
    split_k_shrinks.set(split_k_shrinks.get() + u64::from(copies > 1));
    expand::launch_pair_expand(client, layout, pool, segs, &a, y, None)
}

/// Queues a validated [`Segments`] into the four regions of its kind.
fn put_segments(w: &mut metadata::MetadataWrite<'_>, segs: &Segments, [indptr, weights, perm, slots]: [Region; 4]) -> ExecResult<()> {
    w.put(indptr, segs.seg_indptr().iter().copied())?;
    w.put(weights, segs.weight_indices().iter().copied())?;
    w.put(perm, segs.token_perm().iter().copied())?;
    w.put(slots, segs.token_slots())?;
    Ok(())
}

fn upload_tensor<R: Runtime, F: EngineElem>(client: &ComputeClient<R>, values: &[f32]) -> DeviceBuffer<F> {
    let host: Vec<F> = values.iter().map(|&v| F::from_f32(v)).collect();
    DeviceBuffer::upload(client, &host)
}

/// Uploads every weight under the checkpoint names the plan's nodes list (`desc.tensors`):
/// each projection's parts fused by rows, norms with the plan's unit offset folded in, and
/// lm_head sharing the embedding's handle when it reads the same table (tied embeddings).
/// `folded_rows(l, i)`: zero rows to append after projection `i` of layer `l` for its adapter
/// pool's A (0: none; see [`LoraShrink`]). `uploaded(name)` follows each tensor's upload.
fn load_weights<R: Runtime, F: EngineElem>(
    client: &ComputeClient<R>,
    plan: &Plan,
    desc: &ModelDesc,
    ckpt: &Checkpoint,
    folded_rows: &dyn Fn(usize, usize) -> usize,
    uploaded: &mut dyn FnMut(&str),
) -> ExecResult<Weights<F>> {
    let (h, v) = (desc.hidden, desc.vocab);
    let names = &desc.tensors;
    let unit = plan.model.norm.unit_offset;
    // Shared by the closures below, each reporting the tensors it uploads.
    let uploaded = std::cell::RefCell::new(uploaded);
    let report = |name: &str| (uploaded.borrow_mut())(name);
    let norm = |name: &str, width: usize| -> ExecResult<DeviceBuffer<F>> {
        let mut w = ckpt.tensor_f32(name, &[width])?;
        if unit {
            w.iter_mut().for_each(|x| *x += 1.0);
        }
        let buffer = upload_tensor(client, &w);
        report(name);
        Ok(buffer)
    };
    let final_norm = norm(&names.final_norm, h)?;
    let matrix = |name: &str, rows: usize| -> ExecResult<DeviceBuffer<F>> {
        let buffer = DeviceBuffer::upload(client, &ckpt.tensor::<F>(name, &[rows, h])?);
        report(name);
        Ok(buffer)
    };
    let embed = matrix(&names.embed, v)?;
    let lm_head = if names.lm_head == names.embed { embed.clone() } else { matrix(&names.lm_head, v)? };
    let d = desc.head_dim as usize;
    let mut layers = Vec::with_capacity(desc.layers);
    for (l, tensors) in names.layers.iter().enumerate() {
        let mut linears = Vec::with_capacity(LAYER_PROJECTIONS.len());
        for (i, parts) in tensors.linears.iter().enumerate() {
            let (_, inp) = desc.linear_shape(i);
            let mut fused = Vec::new();
            for (name, rows) in parts.iter().zip(desc.part_rows(i)) {
                // The plan lists no bias, so a checkpoint that holds one is not this plan's model.
                if let Some(bias) = name.strip_suffix(".weight").map(|module| format!("{module}.bias"))
                    && ckpt.contains(&bias)
                {
                    return Err(ExecutorError::Unsupported(format!("projection biases (layer {l}: {bias})")));
                }
                fused.extend(ckpt.tensor::<F>(name, &[rows, inp])?);
            }
            let base_len = fused.len();
            let extra = folded_rows(l, i);
            let linear = if extra == 0 {
                Linear { base: DeviceBuffer::upload(client, &fused), folded: None }
            } else {
                fused.resize(base_len + extra * inp, F::from_f32(0.0));
                let folded = DeviceBuffer::upload(client, &fused);
                let base = folded.prefix(base_len).ctx(|| format!("layer {l} projection {i}"))?;
                Linear { base, folded: Some(folded) }
            };
            parts.iter().for_each(|name| report(name));
            linears.push(linear);
        }
        let (q_norm, k_norm) = match &tensors.qk_norm {
            Some((q, k)) => (Some(norm(q, d)?), Some(norm(k, d)?)),
            None => (None, None),
        };
        let linears: [Linear<F>; 4] = linears.try_into().map_err(|_| ExecutorError::Plan("four projections per layer".into()))?;
        layers.push(LayerWeights {
            input_norm: norm(&tensors.input_norm, h)?,
            post_norm: norm(&tensors.post_norm, h)?,
            q_norm,
            k_norm,
            linears,
        });
    }
    Ok(Weights { embed, final_norm, lm_head, layers })
}
