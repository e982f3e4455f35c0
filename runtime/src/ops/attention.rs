//! Paged KV cache and causal GQA attention over a batch mixing prefill and decode tokens.
//!
//! Cache layout: K and V each `[num_pages, page_size, kv_heads, head_dim]`; the slot of a token
//! is `page · page_size + offset`. Per launch the executor supplies, as device buffers:
//! * `slot_mapping[t]` (i32): where token t's k/v go; negative = padding token, not written;
//! * `token_seq[t]` (u32): the sequence of token t;
//! * `positions[t]` (i32): the position of token t in its sequence (the rotary position);
//! * `block_tables[s · max_pages_per_seq + j]` (u32): the j-th page of sequence s.
//!
//! [`launch_kv_write`] (kernel A) stores the new tokens' k and v, then [`launch_attention`]
//! (kernel B) computes, for token t of sequence s at position p and q head h,
//! `softmax(q·Kᵀ / sqrt(d))·V` over positions `0..=p` of s, read through its block table with kv
//! head `h / (Hq / Hkv)`. A prefill chunk therefore attends causally to itself (its k/v were
//! written by kernel A) and to the sequence's cached prefix, and a decode token to its whole
//! history, in one launch.
//!
//! Kernel B: one cube per (q head, token), flash-decoding style ([`launch_attention_split`]
//! also cuts each token's keys into chunks, one cube each, and merges them in a second launch). Keys go in blocks of `threads`:
//! each thread scores one key (q staged in shared memory, f32 dot over d with vector loads of
//! the key row), the block's scores
//! update a running max / denominator (online softmax, f32), and each thread accumulates its
//! own output dimensions over the block's values. Pages past `num_pages` or positions past the
//! block table's capacity are skipped rather than read, so malformed metadata cannot read out
//! of bounds.

use cubecl::prelude::*;

use super::{HeadView, OpError, OpResult, check_len};
use crate::buffer::DeviceBuffer;

/// Geometry of the paged cache (host side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheShape {
    pub num_pages: u32,
    pub page_size: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
}

impl KvCacheShape {
    /// Elements of each of the K and V caches.
    pub fn elements(&self) -> usize {
        self.num_pages as usize * self.page_size as usize * self.kv_heads as usize * self.head_dim as usize
    }

    pub fn slots(&self) -> usize {
        self.num_pages as usize * self.page_size as usize
    }

    fn check(&self) -> OpResult<()> {
        let ok =
            self.num_pages > 0 && self.page_size > 0 && self.kv_heads > 0 && self.head_dim > 0 && (self.elements() as u64) < (1u64 << 31);
        if !ok {
            return Err(OpError::Shape(format!("kv cache shape {self:?} is not valid")));
        }
        Ok(())
    }
}

/// A K and a V cache of one layer.
#[derive(Debug, Clone)]
pub struct PagedKvCache<F> {
    pub shape: KvCacheShape,
    pub k: DeviceBuffer<F>,
    pub v: DeviceBuffer<F>,
}

impl<F: CubeElement> PagedKvCache<F> {
    /// Wraps existing buffers (checked against the shape).
    pub fn new(shape: KvCacheShape, k: DeviceBuffer<F>, v: DeviceBuffer<F>) -> OpResult<Self> {
        shape.check()?;
        check_len(&k, "k cache", shape.elements())?;
        check_len(&v, "v cache", shape.elements())?;
        Ok(PagedKvCache { shape, k, v })
    }

    /// Uninitialised cache storage.
    pub fn empty<R: Runtime>(client: &ComputeClient<R>, shape: KvCacheShape) -> OpResult<Self> {
        shape.check()?;
        Ok(PagedKvCache { shape, k: DeviceBuffer::empty(client, shape.elements()), v: DeviceBuffer::empty(client, shape.elements()) })
    }
}

/// Per-batch attention metadata on the host (built by the scheduler / executor each step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionBatch {
    pub slot_mapping: Vec<i32>,
    pub token_seq: Vec<u32>,
    pub positions: Vec<i32>,
    /// `[num_seqs, max_pages_per_seq]`.
    pub block_tables: Vec<u32>,
    pub max_pages_per_seq: u32,
}

/// One sequence of a batch: its pages, the positions already cached and the new tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    pub pages: Vec<u32>,
    /// Tokens already in the cache (the first new token's position).
    pub cached: u32,
    /// New tokens of this step (1 for decode, the chunk length for prefill).
    pub new_tokens: u32,
}

impl AttentionBatch {
    /// Lays out the batch's tokens sequence after sequence and checks every sequence's pages
    /// against the cache and its total length against its pages.
    pub fn new(shape: &KvCacheShape, max_pages_per_seq: u32, seqs: &[SeqSlice]) -> OpResult<Self> {
        shape.check()?;
        if max_pages_per_seq == 0 {
            return Err(OpError::Shape("max_pages_per_seq must be positive".into()));
        }
        let mut b = AttentionBatch { slot_mapping: vec![], token_seq: vec![], positions: vec![], block_tables: vec![], max_pages_per_seq };
        for (s, seq) in seqs.iter().enumerate() {
            if seq.pages.len() > max_pages_per_seq as usize {
                return Err(OpError::Shape(format!("sequence {s} has {} pages, more than {max_pages_per_seq}", seq.pages.len())));
            }
            if let Some(p) = seq.pages.iter().find(|p| **p >= shape.num_pages) {
                return Err(OpError::Shape(format!("sequence {s} uses page {p} of {}", shape.num_pages)));
            }
            let len = seq.cached as u64 + seq.new_tokens as u64;
            if len > seq.pages.len() as u64 * shape.page_size as u64 {
                return Err(OpError::Shape(format!("sequence {s} holds {len} tokens in {} pages of {}", seq.pages.len(), shape.page_size)));
            }
            for p in seq.cached..seq.cached + seq.new_tokens {
                let page = seq.pages[(p / shape.page_size) as usize];
                b.slot_mapping.push((page * shape.page_size + p % shape.page_size) as i32);
                b.token_seq.push(s as u32);
                b.positions.push(p as i32);
            }
            b.block_tables.extend(&seq.pages);
            b.block_tables.extend(std::iter::repeat_n(0, max_pages_per_seq as usize - seq.pages.len()));
        }
        Ok(b)
    }

    pub fn tokens(&self) -> usize {
        self.positions.len()
    }

    pub fn upload<R: Runtime>(&self, client: &ComputeClient<R>) -> DeviceAttentionBatch {
        DeviceAttentionBatch {
            slot_mapping: DeviceBuffer::upload(client, &self.slot_mapping),
            token_seq: DeviceBuffer::upload(client, &self.token_seq),
            positions: DeviceBuffer::upload(client, &self.positions),
            block_tables: DeviceBuffer::upload(client, &self.block_tables),
            max_pages_per_seq: self.max_pages_per_seq,
        }
    }
}

/// The metadata buffers the kernels read (the executor may also fill them itself).
#[derive(Debug, Clone)]
pub struct DeviceAttentionBatch {
    pub slot_mapping: DeviceBuffer<i32>,
    pub token_seq: DeviceBuffer<u32>,
    pub positions: DeviceBuffer<i32>,
    pub block_tables: DeviceBuffer<u32>,
    pub max_pages_per_seq: u32,
}

impl DeviceAttentionBatch {
    fn check(&self, tokens: usize) -> OpResult<()> {
        check_len(&self.slot_mapping, "slot_mapping", tokens)?;
        check_len(&self.token_seq, "token_seq", tokens)?;
        check_len(&self.positions, "positions", tokens)?;
        if self.max_pages_per_seq == 0 || self.block_tables.len() % self.max_pages_per_seq as usize != 0 {
            return Err(OpError::Shape(format!(
                "block_tables ({} entries) is not [seqs, {}]",
                self.block_tables.len(),
                self.max_pages_per_seq
            )));
        }
        Ok(())
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn kv_write_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    slot_mapping: &Array<i32>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    k_offset: u32,
    k_stride: u32,
    v_offset: u32,
    v_stride: u32,
    slots: u32,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] threads: usize,
) {
    let t = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let slot = slot_mapping[t];
    if slot < 0 || slot >= slots as i32 {
        terminate!();
    }
    let dst = (slot as usize * kv_heads + h) * head_dim;
    let ks = k_offset as usize + t * k_stride as usize + h * head_dim;
    let vs = v_offset as usize + t * v_stride as usize + h * head_dim;
    let mut i = UNIT_POS as usize;
    while i < head_dim {
        k_cache[dst + i] = k[ks + i];
        v_cache[dst + i] = v[vs + i];
        i += threads;
    }
}

/// Kernel A: writes token t's k and v heads (views of `k_src`, `v_src`, e.g. both the fused qkv
/// buffer) into `cache` at `batch.slot_mapping[t]`.
pub fn launch_kv_write<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    k_src: &DeviceBuffer<F>,
    k_view: HeadView,
    v_src: &DeviceBuffer<F>,
    v_view: HeadView,
    cache: &mut PagedKvCache<F>,
    batch: &DeviceAttentionBatch,
    tokens: usize,
) -> OpResult<()> {
    let shape = cache.shape;
    shape.check()?;
    k_view.check("k", tokens, k_src.len())?;
    v_view.check("v", tokens, v_src.len())?;
    for view in [k_view, v_view] {
        if view.heads != shape.kv_heads || view.head_dim != shape.head_dim {
            return Err(OpError::Shape(format!("k/v view {view:?} does not match the cache {shape:?}")));
        }
    }
    check_len(&cache.k, "k cache", shape.elements())?;
    check_len(&cache.v, "v cache", shape.elements())?;
    batch.check(tokens)?;
    if tokens > super::MAX_GRID {
        return Err(OpError::Shape(format!("{tokens} tokens exceed the grid")));
    }
    if tokens == 0 {
        return Ok(());
    }
    let threads = super::threads_for(shape.head_dim as usize, 32, 128);
    unsafe {
        kv_write_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(tokens as u32, shape.kv_heads, 1),
            CubeDim::new_1d(threads),
            k_src.arg(1),
            v_src.arg(1),
            batch.slot_mapping.arg(1),
            cache.k.arg(1),
            cache.v.arg(1),
            k_view.offset,
            k_view.token_stride,
            v_view.offset,
            v_view.token_stride,
            shape.slots() as u32,
            shape.kv_heads as usize,
            shape.head_dim as usize,
            threads as usize,
        );
    }
    Ok(())
}

/// Comptime specialisation of the attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionConfig {
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub page_size: u32,
    /// Keys per block = threads per cube (a power of two).
    pub threads: u32,
    /// Vector width of the key loads (divides `head_dim`).
    pub k_vector: u32,
    /// Split-sequence mode: grid z cuts each token's keys into that many chunks and each cube
    /// writes its chunk's unnormalised partial (see [`launch_attention_split`]).
    pub split: bool,
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Float, N: Size>(
    q: &Array<F>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<F>,
    token_seq: &Array<u32>,
    positions: &Array<i32>,
    block_tables: &Array<u32>,
    out: &mut Array<F>,
    partial: &mut Array<f32>,
    q_offset: u32,
    q_stride: u32,
    max_pages_per_seq: u32,
    num_pages: u32,
    num_seqs: u32,
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let d = comptime!(cfg.head_dim as usize);
    let hq = comptime!(cfg.q_heads as usize);
    let hkv = comptime!(cfg.kv_heads as usize);
    let group = comptime!((cfg.q_heads / cfg.kv_heads) as usize);
    let page_size = comptime!(cfg.page_size as usize);
    let threads = comptime!(cfg.threads as usize);
    let per_thread = comptime!((cfg.head_dim as usize).div_ceil(cfg.threads as usize));

    // Heads of one token are neighbours in the grid, so a kv head's rows are read by its q
    // heads' cubes close together in time (L2 hits instead of one HBM pass per q head).
    // Scores use -1e30 as the sentinel of a key that must not count (finite: no inf − inf).
    let h = CUBE_POS_X as usize;
    let t = CUBE_POS_Y as usize;
    let kvh = h / group;
    let tid = UNIT_POS as usize;
    let out_base = (t * hq + h) * d;

    let mut q_s = SharedMemory::<f32>::new(d);
    let mut p_s = SharedMemory::<f32>::new(threads);
    let mut s_s = SharedMemory::<f32>::new(threads);
    let mut slot_s = SharedMemory::<u32>::new(threads);
    let mut acc = Array::<f32>::new(per_thread);
    #[unroll]
    for r in 0..per_thread {
        acc[r] = 0.0f32;
    }

    let seq = token_seq[t];
    let pos = positions[t];
    let q_base = q_offset as usize + t * q_stride as usize + h * d;
    let mut i = tid;
    while i < d {
        q_s[i] = f32::cast_from(q[q_base + i]);
        i += threads;
    }
    sync_cube();

    // Keys 0..=pos, limited to what the block table can address; none for a bad sequence.
    let capacity = max_pages_per_seq as usize * page_size;
    let mut keys = 0usize;
    if pos >= 0 && seq < num_seqs {
        keys = min(pos as usize + 1, capacity);
    }
    let table_base = seq as usize * max_pages_per_seq as usize;
    // This cube's keys: all of them, or its chunk in split-sequence mode.
    let mut k_begin = 0usize;
    let mut k_end = keys;
    if comptime!(cfg.split) {
        let chunk = keys.div_ceil(CUBE_COUNT_Z as usize);
        k_begin = min(CUBE_POS_Z as usize * chunk, keys);
        k_end = min(k_begin + chunk, keys);
    }
    let mut m = f32::new(-1.0e30);
    let mut l = 0.0f32;
    let mut b0 = k_begin;
    while b0 < k_end {
        let j = b0 + tid;
        let mut s = f32::new(-1.0e30);
        let mut slot = 0u32;
        if j < k_end {
            let page = block_tables[table_base + j / page_size];
            if page < num_pages {
                slot = page * comptime!(cfg.page_size) + (j % page_size) as u32;
                // The key row in vectors of N (one thread reads a whole row).
                let k_base = (slot as usize * hkv + kvh) * d / N::value();
                let mut dot = 0.0f32;
                for c in 0..comptime!(cfg.head_dim as usize / cfg.k_vector as usize) {
                    let kv = Vector::<f32, N>::cast_from(k_cache[k_base + c]);
                    #[unroll]
                    for l in 0..N::value() {
                        dot += q_s[c * N::value() + l] * kv[l];
                    }
                }
                s = dot * scale;
            }
        }
        s_s[tid] = s;
        slot_s[tid] = slot;
        sync_cube();
        let n = min(threads, k_end - b0);
        let mut blk = f32::new(-1.0e30);
        for jj in 0..n {
            blk = max(blk, s_s[jj]);
        }
        let m_new = max(m, blk);
        let mut p = 0.0f32;
        if s > f32::new(-1.0e30) {
            p = f32::exp(s - m_new);
        }
        p_s[tid] = p;
        sync_cube();
        let alpha = f32::exp(m - m_new);
        let mut psum = 0.0f32;
        for jj in 0..n {
            psum += p_s[jj];
        }
        l = l * alpha + psum;
        #[unroll]
        for r in 0..per_thread {
            let c = tid + r * threads;
            let mut a = acc[r] * alpha;
            if c < d {
                for jj in 0..n {
                    let pj = p_s[jj];
                    if pj > 0.0f32 {
                        a += pj * f32::cast_from(v_cache[(slot_s[jj] as usize * hkv + kvh) * d + c]);
                    }
                }
            }
            acc[r] = a;
        }
        m = m_new;
        sync_cube();
        b0 += threads;
    }
    if comptime!(cfg.split) {
        // Partial record of (token, head, chunk): d unnormalised sums, then max and denominator.
        let rec = ((t * hq + h) * CUBE_COUNT_Z as usize + CUBE_POS_Z as usize) * (d + 2);
        #[unroll]
        for r in 0..per_thread {
            let c = tid + r * threads;
            if c < d {
                partial[rec + c] = acc[r];
            }
        }
        if tid == 0 {
            partial[rec + d] = m;
            partial[rec + d + 1] = l;
        }
    } else {
        let mut inv = 0.0f32;
        if l > 0.0f32 {
            inv = 1.0f32 / l;
        }
        #[unroll]
        for r in 0..per_thread {
            let c = tid + r * threads;
            if c < d {
                out[out_base + c] = F::cast_from(acc[r] * inv);
            }
        }
    }
}

/// Merges the chunks' partials of each (head, token) cube: rescales every chunk to the
/// common maximum and normalises by the summed denominators.
#[cube(launch_unchecked)]
fn attention_combine_kernel<F: Float>(
    partial: &Array<f32>,
    out: &mut Array<F>,
    splits: u32,
    #[comptime] head_dim: u32,
    #[comptime] q_heads: u32,
) {
    let d = comptime!(head_dim as usize);
    let (h, t) = (CUBE_POS_X as usize, CUBE_POS_Y as usize);
    let splits = splits as usize;
    let base = (t * comptime!(q_heads as usize) + h) * splits * (d + 2);
    let mut m = f32::new(-1.0e30);
    for z in 0..splits {
        m = max(m, partial[base + z * (d + 2) + d]);
    }
    let mut l = 0.0f32;
    for z in 0..splits {
        l += f32::exp(partial[base + z * (d + 2) + d] - m) * partial[base + z * (d + 2) + d + 1];
    }
    let mut inv = 0.0f32;
    if l > 0.0f32 {
        inv = 1.0f32 / l;
    }
    let mut c = UNIT_POS as usize;
    while c < d {
        let mut acc = 0.0f32;
        for z in 0..splits {
            acc += f32::exp(partial[base + z * (d + 2) + d] - m) * partial[base + z * (d + 2) + c];
        }
        out[(t * comptime!(q_heads as usize) + h) * d + c] = F::cast_from(acc * inv);
        c += CUBE_DIM_X as usize;
    }
}

/// Kernel B: `out[t, h, :]` (contiguous `[tokens, q_heads, head_dim]`, fully overwritten) for the
/// q heads of `q_view` inside `q_src`, attending through `cache` as `batch` describes. Run
/// [`launch_kv_write`] for the batch first. `scale` is the softmax scale (`1/sqrt(head_dim)`
/// for Llama and Qwen3).
#[allow(clippy::too_many_arguments)]
pub fn launch_attention<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q_src: &DeviceBuffer<F>,
    q_view: HeadView,
    cache: &PagedKvCache<F>,
    batch: &DeviceAttentionBatch,
    out: &mut DeviceBuffer<F>,
    tokens: usize,
    scale: f32,
) -> OpResult<()> {
    launch(client, q_src, q_view, cache, batch, out, tokens, scale, None)
}

/// Floats of the partials [`launch_attention_split`] needs for `tokens` tokens.
pub fn split_partial_len(tokens: usize, q_heads: u32, head_dim: u32, splits: u32) -> usize {
    tokens * q_heads as usize * splits as usize * (head_dim as usize + 2)
}

/// Chunks per token that fill the GPU for a decode batch of `tokens` tokens × `q_heads` heads
/// (about eight cubes per multiprocessor), at most `max_splits`; 1 (no split) where that is
/// fewer than `min_splits`, which would not repay the merge launch.
pub fn decode_splits<R: Runtime>(client: &ComputeClient<R>, tokens: usize, q_heads: u32, min_splits: u32, max_splits: u32) -> u32 {
    let cubes = u32::try_from(tokens * q_heads as usize).unwrap_or(u32::MAX);
    let splits = crate::config::splits_to_fill_on(client.properties(), cubes, max_splits);
    if splits < min_splits { 1 } else { splits }
}

/// Kernel B split over the sequence (flash-decoding): each (head, token) cube's keys are cut
/// into `splits` chunks, each chunk's cube writes its unnormalised output, max and denominator
/// into `partial` (at least [`split_partial_len`] floats), and a second launch merges them
/// into `out`. For decode batches, where one cube per (head, token) leaves most of the GPU
/// idle. Same result as [`launch_attention`] up to float rounding.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_split<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q_src: &DeviceBuffer<F>,
    q_view: HeadView,
    cache: &PagedKvCache<F>,
    batch: &DeviceAttentionBatch,
    out: &mut DeviceBuffer<F>,
    tokens: usize,
    scale: f32,
    partial: &mut DeviceBuffer<f32>,
    splits: u32,
) -> OpResult<()> {
    if splits == 0 || splits > u32::from(u16::MAX) {
        return Err(OpError::Shape(format!("{splits} sequence splits")));
    }
    let need = split_partial_len(tokens, q_view.heads, q_view.head_dim, splits);
    if partial.len() < need {
        return Err(OpError::Shape(format!("split attention partials: {} floats for {need}", partial.len())));
    }
    launch(client, q_src, q_view, cache, batch, out, tokens, scale, Some((partial, splits)))
}

#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q_src: &DeviceBuffer<F>,
    q_view: HeadView,
    cache: &PagedKvCache<F>,
    batch: &DeviceAttentionBatch,
    out: &mut DeviceBuffer<F>,
    tokens: usize,
    scale: f32,
    split: Option<(&mut DeviceBuffer<f32>, u32)>,
) -> OpResult<()> {
    let shape = cache.shape;
    shape.check()?;
    q_view.check("q", tokens, q_src.len())?;
    if q_view.head_dim != shape.head_dim || q_view.heads % shape.kv_heads != 0 {
        return Err(OpError::Shape(format!("q view {q_view:?} does not fit the cache {shape:?} (GQA needs Hq % Hkv == 0)")));
    }
    if !(scale.is_finite()) {
        return Err(OpError::Shape(format!("attention scale {scale} is not finite")));
    }
    check_len(&cache.k, "k cache", shape.elements())?;
    check_len(&cache.v, "v cache", shape.elements())?;
    batch.check(tokens)?;
    check_len(out, "out", tokens * q_view.heads as usize * q_view.head_dim as usize)?;
    if shape.head_dim > 1024 {
        return Err(OpError::Shape(format!("head_dim {} exceeds 1024", shape.head_dim)));
    }
    if tokens > super::MAX_GRID || q_view.heads as usize > super::MAX_GRID {
        return Err(OpError::Shape(format!("{tokens} tokens × {} heads exceed the grid", q_view.heads)));
    }
    if tokens == 0 {
        return Ok(());
    }
    let num_seqs = batch.block_tables.len() / batch.max_pages_per_seq as usize;
    let k_vector = client.io_optimized_vector_sizes(size_of::<F>()).filter(|v| shape.head_dim as usize % v == 0).max().unwrap_or(1).min(8);
    let cfg = AttentionConfig {
        head_dim: shape.head_dim,
        q_heads: q_view.heads,
        kv_heads: shape.kv_heads,
        page_size: shape.page_size,
        threads: 64,
        k_vector: k_vector as u32,
        split: split.is_some(),
    };
    let splits = split.as_ref().map_or(1, |(_, s)| *s);
    // The unsplit kernel never touches `partial` (comptime), but every argument needs storage
    // behind it and nothing may be allocated per step: it is bound to `out`'s.
    let partial_arg = match &split {
        Some((partial, _)) => partial.arg(1),
        None => out.arg(1),
    };
    unsafe {
        attention_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(q_view.heads, tokens as u32, splits),
            CubeDim::new_1d(cfg.threads),
            k_vector,
            q_src.arg(1),
            cache.k.arg(k_vector),
            cache.v.arg(1),
            batch.token_seq.arg(1),
            batch.positions.arg(1),
            batch.block_tables.arg(1),
            out.arg(1),
            partial_arg,
            q_view.offset,
            q_view.token_stride,
            batch.max_pages_per_seq,
            shape.num_pages,
            num_seqs as u32,
            scale,
            cfg,
        );
    }
    if let Some((partial, splits)) = split {
        let threads = shape.head_dim.min(128);
        unsafe {
            attention_combine_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(q_view.heads, tokens as u32, 1),
                CubeDim::new_1d(threads),
                partial.arg(1),
                out.arg(1),
                splits,
                shape.head_dim,
                q_view.heads,
            );
        }
    }
    Ok(())
}

/// Plain f64 reference of causal GQA attention for one batch, given every sequence's full
/// (cached + new) k and v as `[len, kv_heads, d]` and the new tokens' q as `[tokens, Hq, d]`
/// (contiguous). Returns `[tokens, Hq, d]`.
pub fn reference_attention(
    q: &[f64],
    seq_k: &[Vec<f64>],
    seq_v: &[Vec<f64>],
    token_seq: &[u32],
    positions: &[i32],
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f64,
) -> Vec<f64> {
    let group = q_heads / kv_heads;
    let mut out = vec![0.0; q.len()];
    for (t, (&s, &p)) in token_seq.iter().zip(positions).enumerate() {
        let (k, v) = (&seq_k[s as usize], &seq_v[s as usize]);
        for h in 0..q_heads {
            let kvh = h / group;
            let qv = &q[(t * q_heads + h) * d..][..d];
            let scores: Vec<f64> = (0..=p as usize)
                .map(|j| qv.iter().zip(&k[(j * kv_heads + kvh) * d..][..d]).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..d {
                out[(t * q_heads + h) * d + c] = (0..=p as usize).map(|j| w[j] * v[(j * kv_heads + kvh) * d + c]).sum::<f64>() / z;
            }
        }
    }
    out
}
