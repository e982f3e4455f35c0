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
//! when tied) and argmax. The embedding runs a lookup plus the embedding LoRA.
//!
//! Activations live in per-shape workspaces: the ops check exact buffer lengths and
//! `DeviceBuffer` offers no prefix view of a larger buffer, so a workspace is allocated the
//! first time a token count (or logits row count) is seen and reused by every later step of
//! that shape; the [`EngineOptions::workspaces`] most recently used shapes are kept. Weights,
//! KV cache, rope table and adapter pool are allocated once in `new`; an adapter load or
//! unload copies only its slot's A/B regions into the device pool in place (through a staging
//! upload) and re-uploads the small per-slot rank table. Each step still uploads its small
//! metadata (token ids, attention slots/positions/block tables, adapter segments) into fresh
//! buffers: those APIs (`AttentionBatch::upload`, `Segments::upload`) allocate by design.

mod error;
mod model;
mod weights;

use std::collections::HashMap;
use std::path::Path;

use cubecl::prelude::*;
use lorac_adapters::{HostPool, LoadedAdapter};
use lorac_plan::{DType, Plan, RopeScaling as PlanRopeScaling};

use error::Context;
pub use error::{ExecResult, ExecutorError};
use model::{LAYER_LINEARS, ModelDesc};
use weights::Checkpoint;

use crate::batch::Segments;
use crate::buffer::DeviceBuffer;
use crate::ops::attention::{AttentionBatch, DeviceAttentionBatch, KvCacheShape, PagedKvCache, SeqSlice};
use crate::ops::rope::{RopeParams, RopeScaling};
use crate::ops::{HeadView, add, argmax, attention, gather, matmul, rms_norm, rope, silu_mul};
use crate::pool::AdapterPool;
use crate::{DeviceSegments, embedding, expand, shrink};

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

/// Runtime choices the plan leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Tokens per KV-cache page.
    pub page_size: u32,
    /// Longest sequence (prompt + generated); sizes the rotary table and the block tables.
    pub max_seq_len: u32,
    /// Activation workspaces kept (one per recent token count, one per recent logits row
    /// count); the least recently used is dropped past this, its memory going back to the
    /// device allocator's pool.
    pub workspaces: usize,
}

impl EngineOptions {
    /// Pages of 16 tokens; sequences up to the KV cache's size, at most 8192 tokens (the plan
    /// does not carry the model's `max_position_embeddings`).
    pub fn for_plan(plan: &Plan) -> Self {
        EngineOptions { page_size: 16, max_seq_len: plan.limits.kv_cache_tokens.min(8192) as u32, workspaces: 8 }
    }
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
    /// Every new token (scoring; references).
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Per sequence of the batch, row-major `[rows, vocab]` (rows = 1 for `Last`, its new
    /// tokens for `All`).
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
    /// [`LAYER_LINEARS`] order: fused qkv, o, fused gate_up, down.
    linears: [DeviceBuffer<F>; 4],
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
}

struct SeqState {
    pages: Vec<u32>,
    cached: u32,
}

/// Activations of a T-token step.
struct TokenWorkspace<F> {
    h: DeviceBuffer<F>,
    x: DeviceBuffer<F>,
    qkv: DeviceBuffer<F>,
    attn: DeviceBuffer<F>,
    o: DeviceBuffer<F>,
    gate_up: DeviceBuffer<F>,
    act: DeviceBuffer<F>,
    /// LoRA intermediates by width (groups · max_rank).
    lora_a: HashMap<usize, DeviceBuffer<f32>>,
}

/// The rows that reach lm_head.
struct HeadWorkspace<F> {
    last: DeviceBuffer<F>,
    x: DeviceBuffer<F>,
    logits: DeviceBuffer<F>,
    next: DeviceBuffer<i32>,
    lora_a: Option<DeviceBuffer<f32>>,
}

/// Workspaces by shape, least recently used dropped past `cap`.
struct ShapeCache<W> {
    map: HashMap<usize, (u64, W)>,
    clock: u64,
    cap: usize,
}

impl<W> ShapeCache<W> {
    fn new(cap: usize) -> Self {
        ShapeCache { map: HashMap::new(), clock: 0, cap: cap.max(1) }
    }
    /// Marks `key` used; false when it is not cached.
    fn touch(&mut self, key: usize) -> bool {
        self.clock += 1;
        match self.map.get_mut(&key) {
            Some(entry) => {
                entry.0 = self.clock;
                true
            }
            None => false,
        }
    }
    fn insert(&mut self, key: usize, value: W) {
        while self.map.len() >= self.cap {
            let Some(oldest) = self.map.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| *k) else { break };
            self.map.remove(&oldest);
        }
        self.map.insert(key, (self.clock, value));
    }
    fn get(&self, key: usize) -> Option<&W> {
        self.map.get(&key).map(|(_, w)| w)
    }
    fn get_mut(&mut self, key: usize) -> Option<&mut W> {
        self.map.get_mut(&key).map(|(_, w)| w)
    }
    fn values(&self) -> impl Iterator<Item = &W> {
        self.map.values().map(|(_, w)| w)
    }
    fn len(&self) -> usize {
        self.map.len()
    }
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
    lora_widths: Vec<usize>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: u64,
    free_pages: Vec<u32>,
    token_ws: ShapeCache<TokenWorkspace<F>>,
    head_ws: ShapeCache<HeadWorkspace<F>>,
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
        let weights = load_weights::<R, F>(&client, &plan, &desc, &ckpt)?;

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
        let mut lora_widths: Vec<usize> =
            plan.ranks[0].lora_buffers.iter().map(|b| (b.layout.groups() * b.layout.max_rank()) as usize).collect();
        lora_widths.sort_unstable();
        lora_widths.dedup();
        let mut engine = Engine {
            client,
            desc,
            options: EngineOptions { page_size, max_seq_len, workspaces: options.workspaces.max(1) },
            eps,
            weights,
            caches,
            kv_shape,
            max_pages_per_seq,
            rope,
            rope_table,
            host_pool,
            lora: Vec::new(),
            lora_widths,
            seqs: HashMap::new(),
            next_seq: 0,
            free_pages: (0..num_pages).rev().collect(),
            token_ws: ShapeCache::new(options.workspaces),
            head_ws: ShapeCache::new(options.workspaces),
            plan,
        };
        engine.lora = (0..engine.plan.ranks[0].lora_buffers.len()).map(|b| engine.upload_lora(b)).collect::<ExecResult<_>>()?;
        Ok(engine)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    /// LoRA buffer `b`'s A and B from the host pool, with each slot's rank.
    fn upload_lora(&self, b: usize) -> ExecResult<LoraDevice<F>> {
        let buf = &self.plan.ranks[0].lora_buffers[b];
        let size = F::DTYPE.size_bytes();
        let bytes = self.host_pool.rank_bytes(0);
        let region = |offset: u64, elements: u64| -> ExecResult<Vec<F>> {
            let (start, end) = (offset as usize, (offset + elements * size) as usize);
            let slice =
                bytes.get(start..end).ok_or_else(|| ExecutorError::Plan(format!("LoRA buffer {b} lies outside the adapter pool")))?;
            Ok(F::from_le_bytes(slice))
        };
        let a = DeviceBuffer::upload(&self.client, &region(buf.a_offset, buf.layout.a_elements())?);
        let bb = DeviceBuffer::upload(&self.client, &region(buf.b_offset, buf.layout.b_elements())?);
        let slots = buf.layout.slots() as usize;
        let ranks: Vec<u32> = (0..slots).map(|s| self.host_pool.slot_rank(s, b)).collect();
        // The pool folds each adapter's scale into B.
        let scales = vec![1.0f32; slots];
        let pool = AdapterPool::new(&buf.layout, a, bb, &ranks, &scales, &self.client)
            .ctx(|| format!("adapter pool of LoRA buffer {b} ({})", buf.module))?;
        Ok(LoraDevice { pool })
    }

    /// Copies `slot`'s region of every LoRA buffer from the host pool into the device pool in
    /// place (other slots untouched, nothing reallocated) and refreshes the per-slot ranks.
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
                copy_into(&self.client, &F::from_le_bytes(region), dst, slot as u64 * per_slot)
                    .map_err(|e| ExecutorError::Plan(format!("LoRA buffer {b} ({}): {e}", buf.module)))?;
            }
            let ranks: Vec<u32> = (0..slots as usize).map(|s| self.host_pool.slot_rank(s, b)).collect();
            let scales = vec![1.0f32; slots as usize];
            let (a, bb) = (pool.a.clone(), pool.b.clone());
            self.lora[b].pool = AdapterPool::new(layout, a, bb, &ranks, &scales, &self.client)
                .ctx(|| format!("adapter pool of LoRA buffer {b} ({})", buf.module))?;
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

    /// Workspaces currently held: (token-count shapes, logits-row shapes).
    pub fn workspace_shapes(&self) -> (usize, usize) {
        (self.token_ws.len(), self.head_ws.len())
    }

    /// Tokens cached for `seq`.
    pub fn cached_tokens(&self, seq: SeqId) -> Option<u32> {
        self.seqs.get(&seq).map(|s| s.cached)
    }

    /// Every device buffer the engine holds (weights, caches, rope table, adapter pools,
    /// workspaces), counted by handle.
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint { buffers: 0, bytes: 0 };
        let mut add = |len: usize, elem: usize| {
            f.buffers += 1;
            f.bytes += (len * elem) as u64;
        };
        let e = size_of::<F>();
        let w = &self.weights;
        for b in [&w.embed, &w.final_norm, &w.lm_head] {
            add(b.len(), e);
        }
        for l in &w.layers {
            for b in [&l.input_norm, &l.post_norm].into_iter().chain(&l.linears).chain(l.q_norm.iter()).chain(l.k_norm.iter()) {
                add(b.len(), e);
            }
        }
        for c in &self.caches {
            add(c.k.len(), e);
            add(c.v.len(), e);
        }
        add(self.rope_table.len(), 4);
        for p in &self.lora {
            add(p.pool.a.len(), e);
            add(p.pool.b.len(), e);
            add(p.pool.ranks.len(), 4);
            add(p.pool.scales.len(), 4);
            add(p.pool.slice_table.len(), 4);
        }
        for ws in self.token_ws.values() {
            for b in [&ws.h, &ws.x, &ws.qkv, &ws.attn, &ws.o, &ws.gate_up, &ws.act] {
                add(b.len(), e);
            }
            for b in ws.lora_a.values() {
                add(b.len(), 4);
            }
        }
        for ws in self.head_ws.values() {
            for b in [&ws.last, &ws.x, &ws.logits] {
                add(b.len(), e);
            }
            add(ws.next.len(), 4);
            if let Some(b) = &ws.lora_a {
                add(b.len(), 4);
            }
        }
        f
    }

    /// Checks the batch against the plan's limits and the cache, and reserves the pages it
    /// needs (nothing changes when it is refused).
    fn admit(&mut self, batch: &[SeqInput]) -> ExecResult<Vec<SeqSlice>> {
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
                if self.host_pool.slot(slot as usize).is_none() {
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

    fn token_workspace(&mut self, t: usize) {
        if self.token_ws.touch(t) {
            return;
        }
        let (c, d) = (&self.client, &self.desc);
        let ws = TokenWorkspace {
            h: DeviceBuffer::empty(c, t * d.hidden),
            x: DeviceBuffer::empty(c, t * d.hidden),
            qkv: DeviceBuffer::empty(c, t * d.qkv_width()),
            attn: DeviceBuffer::empty(c, t * d.attn_width()),
            o: DeviceBuffer::empty(c, t * d.hidden),
            gate_up: DeviceBuffer::empty(c, t * 2 * d.inter),
            act: DeviceBuffer::empty(c, t * d.inter),
            lora_a: self.lora_widths.iter().map(|&w| (w, DeviceBuffer::empty(c, t * w))).collect(),
        };
        self.token_ws.insert(t, ws);
    }

    fn head_workspace(&mut self, rows: usize) {
        if self.head_ws.touch(rows) {
            return;
        }
        let (c, d) = (&self.client, &self.desc);
        let lora_a = self.desc.lm_head_lora.map(|b| {
            let l = &self.plan.ranks[0].lora_buffers[b].layout;
            DeviceBuffer::empty(c, rows * (l.groups() * l.max_rank()) as usize)
        });
        let ws = HeadWorkspace {
            last: DeviceBuffer::empty(c, rows * d.hidden),
            x: DeviceBuffer::empty(c, rows * d.hidden),
            logits: DeviceBuffer::empty(c, rows * d.vocab),
            next: DeviceBuffer::empty(c, rows),
            lora_a,
        };
        self.head_ws.insert(rows, ws);
    }

    /// One forward over `batch`: every sequence's new tokens are written to its KV cache and
    /// attend to everything cached before them.
    pub fn step(&mut self, batch: &[SeqInput], mode: LogitsMode) -> ExecResult<StepOutput> {
        let slices = self.admit(batch)?;
        let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let rows = match mode {
            LogitsMode::Last => batch.len(),
            LogitsMode::All => t,
        };
        if rows > self.plan.limits.max_batch_tokens as usize {
            return Err(ExecutorError::Batch(format!("{rows} logits rows exceed the plan's {} tokens", self.plan.limits.max_batch_tokens)));
        }
        let attn_batch = AttentionBatch::new(&self.kv_shape, self.max_pages_per_seq, &slices).ctx(|| "attention metadata".into())?;
        let dev_batch = attn_batch.upload(&self.client);

        let slots = self.plan.lora.max_loras;
        let token_slots: Vec<Option<u32>> = batch.iter().flat_map(|s| std::iter::repeat_n(s.adapter, s.tokens.len())).collect();
        let segs = Segments::from_token_slots(&token_slots, slots).ctx(|| "token segments".into())?.upload(&self.client);
        let ids: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let ids = DeviceBuffer::upload(&self.client, &ids);

        let mut last_rows = Vec::with_capacity(batch.len());
        let mut offset = 0u32;
        for s in batch {
            offset += s.tokens.len() as u32;
            last_rows.push(offset - 1);
        }
        let head_segs = match mode {
            LogitsMode::All => segs.clone(),
            LogitsMode::Last => {
                let slots_per_seq: Vec<Option<u32>> = batch.iter().map(|s| s.adapter).collect();
                Segments::from_token_slots(&slots_per_seq, slots).ctx(|| "lm_head segments".into())?.upload(&self.client)
            }
        };

        self.token_workspace(t);
        self.head_workspace(rows);
        self.forward(t, &ids, &dev_batch, &segs)?;
        let last_idx = match mode {
            LogitsMode::Last => Some(DeviceBuffer::upload(&self.client, &last_rows)),
            LogitsMode::All => None,
        };
        self.head(t, rows, last_idx.as_ref(), &head_segs)?;

        for (s, slice) in batch.iter().zip(&slices) {
            if let Some(state) = self.seqs.get_mut(&s.seq) {
                state.cached = slice.cached + slice.new_tokens;
            }
        }
        let ws = self.head_ws.get(rows).expect("workspace allocated above");
        let logits: Vec<f32> = ws.logits.read(&self.client).into_iter().map(EngineElem::to_f32).collect();
        let next = ws.next.read(&self.client);
        let v = self.desc.vocab;
        let mut out = StepOutput { logits: Vec::with_capacity(batch.len()), next_tokens: Vec::with_capacity(batch.len()) };
        let mut row = 0usize;
        for s in batch {
            let n = match mode {
                LogitsMode::Last => 1,
                LogitsMode::All => s.tokens.len(),
            };
            out.logits.push(logits[row * v..(row + n) * v].to_vec());
            let tok = next[row + n - 1];
            out.next_tokens.push(u32::try_from(tok).map_err(|_| ExecutorError::Batch(format!("argmax found no finite logit ({tok})")))?);
            row += n;
        }
        Ok(out)
    }

    /// Embedding and every decoder layer; leaves the residual stream in the workspace's `h`.
    fn forward(&mut self, t: usize, ids: &DeviceBuffer<u32>, batch: &DeviceAttentionBatch, segs: &DeviceSegments) -> ExecResult<()> {
        let Engine { client, desc, weights, caches, lora, token_ws, rope, rope_table, eps, plan, .. } = self;
        let ws = token_ws.get_mut(t).expect("workspace allocated by step");
        let buffers = &plan.ranks[0].lora_buffers;
        let (h, eps) = (desc.hidden, *eps);
        gather::launch_embedding_lookup(client, &weights.embed, ids, &mut ws.h, desc.vocab, h).ctx(|| "embedding lookup".into())?;
        if let Some(b) = desc.embed_lora {
            let layout = &buffers[b].layout;
            let a = ws.lora_a.get_mut(&((layout.groups() * layout.max_rank()) as usize)).expect("width registered");
            embedding::launch_embedding(client, layout, &lora[b].pool, segs, ids, a, &mut ws.h, None).ctx(|| "embedding LoRA".into())?;
        }
        let total = desc.q_heads + 2 * desc.kv_heads;
        let q_view = HeadView::slice(total, 0, desc.q_heads, desc.head_dim);
        let k_view = HeadView::slice(total, desc.q_heads, desc.kv_heads, desc.head_dim);
        let v_view = HeadView::slice(total, desc.q_heads + desc.kv_heads, desc.kv_heads, desc.head_dim);
        let scale = 1.0 / (desc.head_dim as f32).sqrt();

        // LoRA of projection `i` of layer `l`: shrink from `x`, expand into `y`.
        let apply_lora = |l: usize,
                          i: usize,
                          x: &DeviceBuffer<F>,
                          y: &mut DeviceBuffer<F>,
                          lora_a: &mut HashMap<usize, DeviceBuffer<f32>>|
         -> ExecResult<()> {
            let Some(b) = desc.layer_lora[l][i] else { return Ok(()) };
            let layout = &buffers[b].layout;
            let a = lora_a.get_mut(&((layout.groups() * layout.max_rank()) as usize)).expect("width registered");
            let what = || format!("layer {l} {} LoRA", LAYER_LINEARS[i]);
            shrink::launch_shrink(client, layout, &lora[b].pool, segs, x, a, None).ctx(what)?;
            expand::launch_expand(client, layout, &lora[b].pool, segs, a, y, None).ctx(what)
        };

        let layers = weights.layers.len();
        rms_norm::launch_rms_norm(client, &ws.h, &weights.layers[0].input_norm, &mut ws.x, t, h, eps)
            .ctx(|| "layer 0 input norm".into())?;
        for (l, (w, cache)) in weights.layers.iter().zip(caches.iter_mut()).enumerate() {
            let what = |op: &str| format!("layer {l} {op}");
            let (qkv_n, qkv_k) = desc.linear_shape(0);
            matmul::launch_matmul(client, &ws.x, &w.linears[0], &mut ws.qkv, t, qkv_n, qkv_k, None).ctx(|| what("qkv_proj"))?;
            apply_lora(l, 0, &ws.x, &mut ws.qkv, &mut ws.lora_a)?;
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                rms_norm::launch_rms_norm_heads(client, &mut ws.qkv, q_view, qn, t, eps).ctx(|| what("q_norm"))?;
                rms_norm::launch_rms_norm_heads(client, &mut ws.qkv, k_view, kn, t, eps).ctx(|| what("k_norm"))?;
            }
            rope::launch_rope(client, &mut ws.qkv, q_view, &batch.positions, rope_table, rope, t).ctx(|| what("rope q"))?;
            rope::launch_rope(client, &mut ws.qkv, k_view, &batch.positions, rope_table, rope, t).ctx(|| what("rope k"))?;
            attention::launch_kv_write(client, &ws.qkv, k_view, &ws.qkv, v_view, cache, batch, t).ctx(|| what("kv write"))?;
            attention::launch_attention(client, &ws.qkv, q_view, cache, batch, &mut ws.attn, t, scale).ctx(|| what("attention"))?;
            let (o_n, o_k) = desc.linear_shape(1);
            matmul::launch_matmul(client, &ws.attn, &w.linears[1], &mut ws.o, t, o_n, o_k, None).ctx(|| what("o_proj"))?;
            apply_lora(l, 1, &ws.attn, &mut ws.o, &mut ws.lora_a)?;
            rms_norm::launch_add_rms_norm(client, &mut ws.h, &ws.o, &w.post_norm, &mut ws.x, t, h, eps)
                .ctx(|| what("post-attention norm"))?;
            let (gu_n, gu_k) = desc.linear_shape(2);
            matmul::launch_matmul(client, &ws.x, &w.linears[2], &mut ws.gate_up, t, gu_n, gu_k, None).ctx(|| what("gate_up_proj"))?;
            apply_lora(l, 2, &ws.x, &mut ws.gate_up, &mut ws.lora_a)?;
            silu_mul::launch_silu_mul(client, &ws.gate_up, &mut ws.act, t, desc.inter).ctx(|| what("silu_mul"))?;
            let (d_n, d_k) = desc.linear_shape(3);
            matmul::launch_matmul(client, &ws.act, &w.linears[3], &mut ws.o, t, d_n, d_k, None).ctx(|| what("down_proj"))?;
            apply_lora(l, 3, &ws.act, &mut ws.o, &mut ws.lora_a)?;
            if l + 1 < layers {
                let next = &weights.layers[l + 1].input_norm;
                rms_norm::launch_add_rms_norm(client, &mut ws.h, &ws.o, next, &mut ws.x, t, h, eps)
                    .ctx(|| format!("layer {} input norm", l + 1))?;
            } else {
                add::launch_add_inplace(client, &mut ws.h, &ws.o).ctx(|| what("residual add"))?;
            }
        }
        Ok(())
    }

    /// Final norm, lm_head (+LoRA) and argmax over the rows that reach the head.
    fn head(&mut self, t: usize, rows: usize, last_idx: Option<&DeviceBuffer<u32>>, segs: &DeviceSegments) -> ExecResult<()> {
        let Engine { client, desc, weights, lora, token_ws, head_ws, eps, plan, .. } = self;
        let tw = token_ws.get(t).expect("workspace allocated by step");
        let hw = head_ws.get_mut(rows).expect("workspace allocated by step");
        let (h, v) = (desc.hidden, desc.vocab);
        match last_idx {
            Some(idx) => {
                gather::launch_gather_rows(client, &tw.h, idx, &mut hw.last, t, h).ctx(|| "last-token gather".into())?;
                rms_norm::launch_rms_norm(client, &hw.last, &weights.final_norm, &mut hw.x, rows, h, *eps).ctx(|| "final norm".into())?;
            }
            None => rms_norm::launch_rms_norm(client, &tw.h, &weights.final_norm, &mut hw.x, rows, h, *eps).ctx(|| "final norm".into())?,
        }
        matmul::launch_matmul(client, &hw.x, &weights.lm_head, &mut hw.logits, rows, v, h, None).ctx(|| "lm_head".into())?;
        if let (Some(b), Some(a)) = (desc.lm_head_lora, hw.lora_a.as_mut()) {
            let layout = &plan.ranks[0].lora_buffers[b].layout;
            shrink::launch_shrink(client, layout, &lora[b].pool, segs, &hw.x, a, None).ctx(|| "lm_head LoRA".into())?;
            expand::launch_expand(client, layout, &lora[b].pool, segs, a, &mut hw.logits, None).ctx(|| "lm_head LoRA".into())?;
        }
        argmax::launch_argmax(client, &hw.logits, &mut hw.next, rows, v).ctx(|| "argmax".into())
    }
}

#[cube(launch_unchecked)]
fn copy_into_kernel<F: Float>(src: &Array<F>, dst: &mut Array<F>, offset: u32, len: u32) {
    let i = crate::ops::linear_cube() * COPY_THREADS as usize + UNIT_POS as usize;
    if i >= len as usize {
        terminate!();
    }
    dst[offset as usize + i] = src[i];
}

const COPY_THREADS: u32 = 256;

/// `dst[offset..offset + src.len()] = src` on the device (one staging upload, one copy launch).
fn copy_into<R: Runtime, F: EngineElem>(client: &ComputeClient<R>, src: &[F], dst: &DeviceBuffer<F>, offset: u64) -> Result<(), String> {
    let end = offset + src.len() as u64;
    if end > dst.len() as u64 || end >= u64::from(u32::MAX) {
        return Err(format!("copy of {} elements at {offset} into a buffer of {}", src.len(), dst.len()));
    }
    if src.is_empty() {
        return Ok(());
    }
    let staging = DeviceBuffer::upload(client, src);
    // Safety: `offset + len ≤ dst.len()` was checked above and the kernel stops at `len`.
    unsafe {
        copy_into_kernel::launch_unchecked::<F, R>(
            client,
            crate::ops::grid_1d(src.len().div_ceil(COPY_THREADS as usize)),
            CubeDim::new_1d(COPY_THREADS),
            staging.arg(1),
            dst.arg(1),
            offset as u32,
            src.len() as u32,
        );
    }
    Ok(())
}

/// The checkpoint path of each fused part of layer `l`'s projection `i`: the plan's `hf_paths`
/// where a LoRA buffer covers it, HF's naming otherwise.
fn linear_paths(plan: &Plan, desc: &ModelDesc, l: usize, i: usize) -> Vec<String> {
    if let Some(b) = desc.layer_lora[l][i] {
        let paths = &plan.ranks[0].lora_buffers[b].hf_paths;
        if paths.len() == ModelDesc::linear_parts(i).len() {
            return paths.clone();
        }
    }
    ModelDesc::linear_parts(i).iter().map(|p| format!("model.layers.{l}.{p}")).collect()
}

fn upload_tensor<R: Runtime, F: EngineElem>(client: &ComputeClient<R>, values: &[f32]) -> DeviceBuffer<F> {
    let host: Vec<F> = values.iter().map(|&v| F::from_f32(v)).collect();
    DeviceBuffer::upload(client, &host)
}

fn load_weights<R: Runtime, F: EngineElem>(
    client: &ComputeClient<R>,
    plan: &Plan,
    desc: &ModelDesc,
    ckpt: &Checkpoint,
) -> ExecResult<Weights<F>> {
    let (h, v) = (desc.hidden, desc.vocab);
    let unit = plan.model.norm.unit_offset;
    let norm = |name: &str, width: usize| -> ExecResult<DeviceBuffer<F>> {
        let mut w = ckpt.tensor_f32(name, &[width])?;
        if unit {
            w.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(upload_tensor(client, &w))
    };
    let embed_path = desc
        .embed_lora
        .and_then(|b| plan.ranks[0].lora_buffers[b].hf_paths.first().cloned())
        .unwrap_or_else(|| "model.embed_tokens".to_string());
    let embed = upload_tensor(client, &ckpt.tensor_f32(&format!("{embed_path}.weight"), &[v, h])?);
    let lm_head =
        if plan.model.tie_word_embeddings { embed.clone() } else { upload_tensor(client, &ckpt.tensor_f32("lm_head.weight", &[v, h])?) };
    let final_norm = norm("model.norm.weight", h)?;
    let d = desc.head_dim as usize;
    let mut layers = Vec::with_capacity(desc.layers);
    for l in 0..desc.layers {
        let mut linears = Vec::with_capacity(4);
        for i in 0..4 {
            let (_, inp) = desc.linear_shape(i);
            let mut fused = Vec::new();
            for (path, rows) in linear_paths(plan, desc, l, i).iter().zip(desc.part_rows(i)) {
                fused.extend(ckpt.tensor_f32(&format!("{path}.weight"), &[rows, inp])?);
            }
            linears.push(upload_tensor(client, &fused));
        }
        let prefix = format!("model.layers.{l}");
        let (q_norm, k_norm) = if desc.qk_norm {
            (Some(norm(&format!("{prefix}.self_attn.q_norm.weight"), d)?), Some(norm(&format!("{prefix}.self_attn.k_norm.weight"), d)?))
        } else {
            (None, None)
        };
        for bias in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            if ckpt.contains(&format!("{prefix}.self_attn.{bias}.bias")) {
                return Err(ExecutorError::Unsupported(format!("projection biases ({prefix}.self_attn.{bias}.bias)")));
            }
        }
        let linears: [DeviceBuffer<F>; 4] = linears.try_into().map_err(|_| ExecutorError::Plan("four projections per layer".into()))?;
        layers.push(LayerWeights {
            input_norm: norm(&format!("{prefix}.input_layernorm.weight"), h)?,
            post_norm: norm(&format!("{prefix}.post_attention_layernorm.weight"), h)?,
            q_norm,
            k_norm,
            linears,
        });
    }
    Ok(Weights { embed, final_norm, lm_head, layers })
}
