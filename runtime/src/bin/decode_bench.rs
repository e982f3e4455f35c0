//! Decode benchmark of the plan executor: a bf16 engine on cubecl's CUDA runtime built from a
//! model directory and a compiled plan, PEFT adapters loaded into the pool, then for every
//! (batch, distinct adapters) case:
//!
//! * one prefill step of `batch` prompts of `--prompt-len` random tokens (logits of each last
//!   token), timed after a warm-up round of the same shapes (kernels compiled, workspaces
//!   allocated);
//! * `--warmup` untimed decode steps, then `--steps` timed decode steps (one new token per
//!   sequence each), each step timed alone on the host clock: `Engine::step` returns after it
//!   has read the logits back, so every step is synchronised. Reported: median, p10 and p90
//!   step time and tokens/s = batch / median step time.
//!
//! Row i of a case with n adapters uses slot `i % n` (n = 0: the base model, no adapter). The
//! same plan and engine serve every case, so the 0-adapter case runs the LoRA-enabled plan
//! with no adapter rows (a step without adapter rows launches no LoRA kernel). Where the
//! engine folded LoRA shrinks into the projection GEMMs (`LoraShrink`), every case with
//! adapters runs twice on the same engine: folded ("gemm") and with the shrink kernel. With
//! `--split-k-ab` every case with adapters runs once more with the K-split shrink turned off
//! ("kernel-nosplit"); each row says how many shrinks split K.
//!
//! Also measured: the read-back the step does ([rows, vocab] logits to the host and to f32),
//! and with `--ops` each base op of one decode step on its own (the four projections, lm_head
//! and paged attention at the cases' mean context), back-to-back launches, synchronised, L2
//! defeated by rotating weight copies; per layer and per step totals show which op dominates.
//!
//! Usage: `decode_bench --model DIR --plan PLAN [--adapters DIR...] [--batches 1,8,32]
//! [--adapter-counts 0,1,8] [--prompt-len 128] [--steps 64] [--warmup 8] [--ops] [--csv FILE]
//! [--matmul-sweep] [--wgpu-f32] [--split-k-ab]`. `--adapters` takes the adapter directories
//! (slot order); `--wgpu-f32` runs an f32 engine on wgpu instead (a plumbing check on the tiny fixtures, no
//! GPU needed). `--matmul-sweep` (with `--ops`) also times every matmul path at the decode
//! projections: our dispatcher, the tiled kernel and cubek-matmul's strategies.
//! `decode_bench --ops-only [--matmul-sweep] [--batches ...]` runs only those op timings, at
//! Meta-Llama-3-8B's shapes, with no model, plan or engine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use cubecl::prelude::*;
use lorac_runtime::DeviceBuffer;
use lorac_runtime::executor::{Engine, EngineElem, LogitsMode, SeqInput};
use lorac_runtime::ops::attention::{AttentionBatch, KvCacheShape, PagedKvCache, SeqSlice, launch_attention};
use lorac_runtime::ops::{HeadView, matmul};
use lorac_runtime::testing::Rng;

const L2_BYTES: usize = 50 << 20;

struct Args {
    model: PathBuf,
    plan: PathBuf,
    adapters: Vec<PathBuf>,
    batches: Vec<usize>,
    adapter_counts: Vec<usize>,
    prompt_len: usize,
    steps: usize,
    warmup: usize,
    ops: bool,
    /// Only the op breakdown (and the matmul sweep), at Llama-3-8B's shapes: no model, plan or
    /// engine.
    ops_only: bool,
    /// Every matmul path (our dispatcher, the tiled kernel, cubek-matmul's strategies) at the
    /// decode projections.
    matmul_sweep: bool,
    csv: Option<PathBuf>,
    wgpu_f32: bool,
    /// Every case with adapters also with the K-split shrink turned off ("kernel-nosplit").
    split_k_ab: bool,
}

fn parse_list(name: &str, value: &str) -> Result<Vec<usize>, String> {
    value.split(',').map(|v| v.trim().parse::<usize>().map_err(|e| format!("{name}: `{v}` is not a count ({e})"))).collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        plan: PathBuf::new(),
        adapters: Vec::new(),
        batches: vec![1, 8, 32],
        adapter_counts: vec![0, 1, 8],
        prompt_len: 128,
        steps: 64,
        warmup: 8,
        ops: false,
        ops_only: false,
        matmul_sweep: false,
        csv: None,
        wgpu_f32: false,
        split_k_ab: false,
    };
    let mut it = std::env::args().skip(1).peekable();
    while let Some(flag) = it.next() {
        let value =
            |it: &mut std::iter::Peekable<std::iter::Skip<std::env::Args>>| it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value(&mut it)?),
            "--plan" => args.plan = PathBuf::from(value(&mut it)?),
            "--adapters" => {
                while let Some(dir) = it.next_if(|a| !a.starts_with("--")) {
                    args.adapters.push(PathBuf::from(dir));
                }
            }
            "--batches" => args.batches = parse_list("--batches", &value(&mut it)?)?,
            "--adapter-counts" => args.adapter_counts = parse_list("--adapter-counts", &value(&mut it)?)?,
            "--prompt-len" => args.prompt_len = parse_list("--prompt-len", &value(&mut it)?)?.first().copied().unwrap_or(0),
            "--steps" => args.steps = parse_list("--steps", &value(&mut it)?)?.first().copied().unwrap_or(0),
            "--warmup" => args.warmup = parse_list("--warmup", &value(&mut it)?)?.first().copied().unwrap_or(0),
            "--csv" => args.csv = Some(PathBuf::from(value(&mut it)?)),
            "--ops" => args.ops = true,
            "--ops-only" => args.ops_only = true,
            "--matmul-sweep" => args.matmul_sweep = true,
            "--wgpu-f32" => args.wgpu_f32 = true,
            "--split-k-ab" => args.split_k_ab = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if !args.ops_only && (args.model.as_os_str().is_empty() || args.plan.as_os_str().is_empty()) {
        return Err("--model DIR and --plan FILE are required (or --ops-only)".into());
    }
    if args.prompt_len == 0 || args.steps == 0 || args.batches.contains(&0) {
        return Err("--prompt-len, --steps and every batch must be positive".into());
    }
    if let Some(&n) = args.adapter_counts.iter().find(|&&n| !args.ops_only && n > args.adapters.len()) {
        return Err(format!("{n} distinct adapters asked for, {} given with --adapters", args.adapters.len()));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        if args.wgpu_f32 {
            let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
            run::<cubecl::wgpu::WgpuRuntime, f32>(client, &args)
        } else {
            let client = cubecl::cuda::CudaRuntime::client(&Default::default());
            run::<cubecl::cuda::CudaRuntime, half::bf16>(client, &args)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("decode_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sync<R: Runtime>(client: &ComputeClient<R>) -> Result<(), String> {
    cubecl::future::block_on(client.sync()).map_err(|e| format!("device sync: {e:?}"))
}

/// Sorted copy's value at quantile `q` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

struct CaseResult {
    batch: usize,
    adapters: usize,
    /// Where the LoRA shrink ran: "gemm" (folded into the projection GEMM), "kernel", or "-"
    /// (no adapter rows).
    shrink: &'static str,
    prefill_ms: f64,
    step_ms: Vec<f64>,
    readback_ms: f64,
}

/// Adapter slot of row `i` with `n` distinct adapters.
fn slot(i: usize, n: usize) -> Option<u32> {
    (n > 0).then(|| (i % n) as u32)
}

/// One prefill of `prompts` (row i on `slot(i, n)`), `warmup` + `steps` decode steps; returns
/// (prefill ms, per-step ms of the timed steps). The sequences are released at the end.
fn run_sequences<R: Runtime, F: EngineElem>(
    engine: &mut Engine<R, F>,
    prompts: &[Vec<u32>],
    n: usize,
    warmup: usize,
    steps: usize,
) -> Result<(f64, Vec<f64>), String> {
    let seqs: Vec<_> = prompts.iter().map(|_| engine.add_sequence()).collect();
    let batch: Vec<SeqInput> = prompts
        .iter()
        .zip(&seqs)
        .enumerate()
        .map(|(i, (p, &seq))| SeqInput { seq, position: 0, tokens: p.clone(), adapter: slot(i, n) })
        .collect();
    let t0 = Instant::now();
    let out = engine.step(&batch, LogitsMode::Last).map_err(|e| format!("prefill: {e}"))?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut next = out.next_tokens;
    let mut times = Vec::with_capacity(steps);
    let prompt_len = prompts[0].len();
    for step in 0..warmup + steps {
        let batch: Vec<SeqInput> = seqs
            .iter()
            .zip(&next)
            .enumerate()
            .map(|(i, (&seq, &tok))| SeqInput { seq, position: (prompt_len + step) as u32, tokens: vec![tok], adapter: slot(i, n) })
            .collect();
        let t0 = Instant::now();
        // Greedy decode as the server runs it: next tokens only, logits stay on the device.
        let out = engine.step(&batch, LogitsMode::NextTokens).map_err(|e| format!("decode step {step}: {e}"))?;
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        next = out.next_tokens;
    }
    for seq in seqs {
        engine.release_sequence(seq).map_err(|e| e.to_string())?;
    }
    Ok((prefill_ms, times))
}

/// What `Engine::step` does after the forward for `rows` logits rows: read `[rows, vocab]` back
/// and widen it to f32 (median ms of 10).
fn readback_ms<R: Runtime, F: EngineElem>(client: &ComputeClient<R>, rows: usize, vocab: usize) -> Result<f64, String> {
    let buf = DeviceBuffer::<F>::empty(client, rows * vocab);
    let mut times = Vec::new();
    for _ in 0..11 {
        sync(client)?;
        let t0 = Instant::now();
        let host: Vec<f32> = buf.read(client).into_iter().map(EngineElem::to_f32).collect();
        std::hint::black_box(&host);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(quantile(&times[1..], 0.5))
}

fn run<R: Runtime, F: EngineElem>(client: ComputeClient<R>, args: &Args) -> Result<(), String> {
    if args.ops_only {
        let shapes = OpShapes::LLAMA3_8B;
        let context = args.prompt_len + args.warmup + args.steps / 2;
        op_breakdown::<R, F>(&client, &shapes, &args.batches, context, 32)?;
        if args.matmul_sweep {
            matmul_sweep::<R, F>(&client, &shapes, &args.batches)?;
        }
        return Ok(());
    }
    let plan_bytes = std::fs::read(&args.plan).map_err(|e| format!("cannot read {}: {e}", args.plan.display()))?;
    let plan = lorac_plan::decode(&plan_bytes).map_err(|e| format!("{}: {e}", args.plan.display()))?;
    let vocab = plan.model.vocab_size as usize;
    println!(
        "# model {} ({} layers, hidden {}, vocab {vocab}), plan {} ({} LoRA buffers, rank {}, {} slots), engine dtype {}",
        args.model.display(),
        plan.model.num_layers,
        plan.model.hidden_size,
        args.plan.display(),
        plan.ranks[0].lora_buffers.len(),
        plan.lora.max_rank,
        plan.lora.max_loras,
        F::DTYPE
    );
    let t0 = Instant::now();
    let mut engine = Engine::<R, F>::new(client.clone(), plan.clone(), &args.model).map_err(|e| format!("engine: {e}"))?;
    sync(&client)?;
    println!("# engine load (weights converted and uploaded, KV cache, adapter pool): {:.1} s", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for (s, dir) in args.adapters.iter().enumerate() {
        engine.load_adapter(s as u32, dir).map_err(|e| format!("adapter {}: {e}", dir.display()))?;
    }
    sync(&client)?;
    println!("# {} adapters loaded in {:.2} s", args.adapters.len(), t0.elapsed().as_secs_f64());
    let (folded, sites) = engine.lora_sites_in_gemm();
    let fold_capacity = engine.folded_shrink_capacity() as u32;
    println!("# LoRA shrink folded into the GEMM at {folded} of {sites} layer projections, for steps up to {fold_capacity} tokens");

    let mut rng = Rng::new(7);
    let mut results = Vec::new();
    for &batch in &args.batches {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..args.prompt_len).map(|_| rng.range(0, vocab as u32 - 1)).collect()).collect();
        for &n in &args.adapter_counts {
            if n > batch {
                println!("# batch {batch}: skipping {n} distinct adapters (more than rows)");
                continue;
            }
            // With adapters, both places of the LoRA shrink on the same engine (when start-up
            // folded any site): folded into the GEMM, then the separate kernel.
            let mut modes: Vec<(&'static str, u32, bool)> = match (n, folded) {
                (0, _) => vec![("-", 0, true)],
                (_, 0) => vec![("kernel", 0, true)],
                _ => vec![("gemm", fold_capacity, true), ("kernel", 0, true)],
            };
            if args.split_k_ab && n > 0 {
                modes.push(("kernel-nosplit", 0, false));
            }
            for (shrink, fold_tokens, split_k) in modes {
                engine.set_folded_shrink_max_tokens(fold_tokens).map_err(|e| e.to_string())?;
                engine.set_lora_split_k(split_k);
                let splits_before = engine.split_k_shrinks();
                // Warm-up round: kernels compiled for these shapes, workspaces allocated.
                run_sequences(&mut engine, &prompts, n, 0, 2)?;
                let (prefill_ms, step_ms) = run_sequences(&mut engine, &prompts, n, args.warmup, args.steps)?;
                let split_k_shrinks = engine.split_k_shrinks() - splits_before;
                let readback_ms = readback_ms::<R, F>(&client, batch, vocab)?;
                let r = CaseResult { batch, adapters: n, shrink, prefill_ms, step_ms, readback_ms };
                let median = quantile(&r.step_ms, 0.5);
                println!(
                    "batch {batch:>3} adapters {n} shrink {shrink}: step median {median:.3} ms (p10 {:.3}, p90 {:.3}), {:.1} tok/s; prefill {batch}×{} tokens {prefill_ms:.1} ms; logits read-back {readback_ms:.3} ms; {split_k_shrinks} shrinks split K",
                    quantile(&r.step_ms, 0.1),
                    quantile(&r.step_ms, 0.9),
                    batch as f64 / median * 1e3,
                    args.prompt_len
                );
                results.push(r);
            }
            engine.set_folded_shrink_max_tokens(fold_capacity).map_err(|e| e.to_string())?;
            engine.set_lora_split_k(true);
        }
    }

    println!("\n| batch | adapters | shrink | step ms (median) | p10 | p90 | tok/s | vs 0 adapters | prefill ms | read-back ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut csv =
        String::from("batch,adapters,shrink,step_ms_median,step_ms_p10,step_ms_p90,tokens_per_s,overhead_vs_base,prefill_ms,readback_ms\n");
    for r in &results {
        let median = quantile(&r.step_ms, 0.5);
        let base = results.iter().find(|b| b.batch == r.batch && b.adapters == 0).map(|b| quantile(&b.step_ms, 0.5));
        let overhead = base.map(|b| median / b - 1.0);
        let overhead_text = overhead.map_or("-".to_string(), |o| format!("{:+.1}%", o * 100.0));
        let (p10, p90, tps) = (quantile(&r.step_ms, 0.1), quantile(&r.step_ms, 0.9), r.batch as f64 / median * 1e3);
        println!(
            "| {} | {} | {} | {median:.3} | {p10:.3} | {p90:.3} | {tps:.1} | {overhead_text} | {:.1} | {:.3} |",
            r.batch, r.adapters, r.shrink, r.prefill_ms, r.readback_ms
        );
        csv += &format!(
            "{},{},{},{median:.4},{p10:.4},{p90:.4},{tps:.2},{},{:.3},{:.4}\n",
            r.batch,
            r.adapters,
            r.shrink,
            overhead.map_or(String::new(), |o| format!("{o:.4}")),
            r.prefill_ms,
            r.readback_ms
        );
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    drop(engine);

    if args.ops {
        let shapes = OpShapes::read(&args.model, &plan)?;
        let context = args.prompt_len + args.warmup + args.steps / 2;
        op_breakdown::<R, F>(&client, &shapes, &args.batches, context, plan.model.num_layers as usize)?;
        if args.matmul_sweep {
            matmul_sweep::<R, F>(&client, &shapes, &args.batches)?;
        }
    }
    std::io::stdout().flush().ok();
    Ok(())
}

/// The decode step's op shapes, read off the checkpoint's safetensors headers and the plan.
struct OpShapes {
    hidden: usize,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    inter: usize,
    vocab: usize,
}

impl OpShapes {
    /// Meta-Llama-3-8B.
    const LLAMA3_8B: OpShapes = OpShapes { hidden: 4096, q_heads: 32, kv_heads: 8, head_dim: 128, inter: 14336, vocab: 128256 };

    /// `(name, out, in)` of the decode step's projections.
    fn linears(&self) -> [(&'static str, usize, usize); 5] {
        let d = self.head_dim as usize;
        let qkv = (self.q_heads as usize + 2 * self.kv_heads as usize) * d;
        [
            ("qkv_proj", qkv, self.hidden),
            ("o_proj", self.hidden, self.q_heads as usize * d),
            ("gate_up_proj", 2 * self.inter, self.hidden),
            ("down_proj", self.hidden, self.inter),
            ("lm_head", self.vocab, self.hidden),
        ]
    }

    fn read(dir: &Path, plan: &lorac_plan::Plan) -> Result<OpShapes, String> {
        let mut shapes = std::collections::HashMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
            let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // Safety: read only, for the header.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| format!("{}: {e}", path.display()))?;
            for (name, info) in meta.tensors() {
                shapes.insert(name, info.shape.clone());
            }
        }
        let rows = |name: &str| -> Result<usize, String> {
            shapes.get(name).and_then(|s| s.first().copied()).ok_or_else(|| format!("no tensor `{name}` in {}", dir.display()))
        };
        let head_dim = plan.model.rope.as_ref().map(|r| r.rotary_dim).ok_or("the plan has no rotary embedding")?;
        let q = rows("model.layers.0.self_attn.q_proj.weight")?;
        let k = rows("model.layers.0.self_attn.k_proj.weight")?;
        Ok(OpShapes {
            hidden: plan.model.hidden_size as usize,
            q_heads: (q / head_dim as usize) as u32,
            kv_heads: (k / head_dim as usize) as u32,
            head_dim,
            inter: rows("model.layers.0.mlp.gate_proj.weight")?,
            vocab: plan.model.vocab_size as usize,
        })
    }
}

/// Median over 7 repetitions of the mean µs per call of `iters` back-to-back calls (after one
/// warm-up call), synchronised.
fn time_us<R: Runtime>(client: &ComputeClient<R>, iters: usize, mut call: impl FnMut(usize) -> Result<(), String>) -> Result<f64, String> {
    call(0)?;
    sync(client)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        for i in 0..iters {
            call(i)?;
        }
        sync(client)?;
        times.push(t0.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    Ok(quantile(&times, 0.5))
}

/// Each base op of one decode step on its own, at the engine's shapes.
fn op_breakdown<R: Runtime, F: EngineElem>(
    client: &ComputeClient<R>,
    s: &OpShapes,
    batches: &[usize],
    context: usize,
    layers: usize,
) -> Result<(), String> {
    let d = s.head_dim as usize;
    let qkv = (s.q_heads as usize + 2 * s.kv_heads as usize) * d;
    let linears = s.linears().map(|(name, n, k)| (name, n, k, if name == "lm_head" { 1 } else { layers }));
    // One random host pool, sliced for every weight copy (distinct device buffers defeat L2).
    let largest = linears.iter().map(|(_, n, k, _)| n * k).max().unwrap_or(0);
    let mut rng = Rng::new(11);
    let pool: Vec<F> = (0..largest).map(|_| F::from_f32((rng.value() * 0.05) as f32)).collect();
    println!("\n# op breakdown of one decode step (context {context} tokens, {layers} layers): µs per launch, GB/s over the weight bytes");
    println!("| batch | op | µs | GB/s | per step ms |");
    println!("|---|---|---|---|---|");
    for &m in batches {
        let mut per_step_ms = 0.0;
        for &(name, n, k, count) in &linears {
            let bytes = n * k * size_of::<F>();
            let copies = (4 * L2_BYTES).div_ceil(bytes).clamp(1, 8);
            let weights: Vec<DeviceBuffer<F>> = (0..copies).map(|_| DeviceBuffer::upload(client, &pool[..n * k])).collect();
            let x = DeviceBuffer::upload(client, &pool[..m * k]);
            let mut y = DeviceBuffer::<F>::empty(client, m * n);
            let us = time_us(client, 50, |i| {
                matmul::launch_matmul(client, &x, &weights[i % copies], &mut y, m, n, k, None).map_err(|e| format!("{name}: {e}"))
            })?;
            per_step_ms += us * count as f64 / 1e3;
            println!("| {m} | {name} ({n}×{k}) | {us:.1} | {:.0} | {:.3} |", bytes as f64 / us / 1e3, us * count as f64 / 1e3);
        }
        // Paged attention: `m` sequences of `context` cached tokens, one new token each.
        let page = 16u32;
        let pages_per_seq = (context as u32 + 1).div_ceil(page);
        let shape = KvCacheShape { num_pages: pages_per_seq * m as u32, page_size: page, kv_heads: s.kv_heads, head_dim: s.head_dim };
        let kv: Vec<F> = pool.iter().cycle().take(shape.elements()).copied().collect();
        let cache =
            PagedKvCache::new(shape, DeviceBuffer::upload(client, &kv), DeviceBuffer::upload(client, &kv)).map_err(|e| e.to_string())?;
        let slices: Vec<SeqSlice> = (0..m as u32)
            .map(|i| SeqSlice { pages: (i * pages_per_seq..(i + 1) * pages_per_seq).collect(), cached: context as u32, new_tokens: 1 })
            .collect();
        let batch = AttentionBatch::new(&shape, pages_per_seq, &slices).map_err(|e| e.to_string())?.upload(client);
        let total_heads = s.q_heads + 2 * s.kv_heads;
        let q = DeviceBuffer::upload(client, &pool[..m * qkv]);
        let mut out = DeviceBuffer::<F>::empty(client, m * s.q_heads as usize * d);
        let view = HeadView::slice(total_heads, 0, s.q_heads, s.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let us = time_us(client, 50, |_| {
            launch_attention(client, &q, view, &cache, &batch, &mut out, m, scale).map_err(|e| format!("attention: {e}"))
        })?;
        let kv_bytes = 2 * m * (context + 1) * s.kv_heads as usize * d * size_of::<F>();
        per_step_ms += us * layers as f64 / 1e3;
        println!(
            "| {m} | attention ({m} seqs × {} ctx) | {us:.1} | {:.0} | {:.3} |",
            context + 1,
            kv_bytes as f64 / us / 1e3,
            us * layers as f64 / 1e3
        );
        println!("| {m} | **sum of the above per step** | | | {per_step_ms:.3} |");
    }
    Ok(())
}

/// One launch of a matmul path: the weight copy to use (by launch index) and the output.
type MatmulCall<'a, F> = dyn FnMut(usize, &mut DeviceBuffer<F>) -> Result<(), String> + 'a;

/// Every matmul path at the decode projections (lm_head left out): our dispatcher
/// (`launch_matmul`), the tiled kernel, and cubek-matmul's strategies, µs per launch (as in
/// [`op_breakdown`]) and the relative error against the tiled kernel's output. A strategy
/// cubek refuses, or that panics, is reported as such.
fn matmul_sweep<R: Runtime, F: EngineElem>(client: &ComputeClient<R>, s: &OpShapes, batches: &[usize]) -> Result<(), String> {
    use cubek_matmul::launch::Strategy;
    let strategies: Vec<(&str, Strategy)> = vec![
        ("simple_cyclic_cmma", Strategy::SimpleCyclicCmma(Default::default())),
        ("simple_cyclic_mma", Strategy::SimpleCyclicMma(Default::default())),
        ("simple_async_cyclic_cmma", Strategy::SimpleAsyncCyclicCmma(Default::default())),
        ("double_cyclic_cmma", Strategy::DoubleCyclicCmma(Default::default())),
        ("double_cyclic_mma", Strategy::DoubleCyclicMma(Default::default())),
        ("simple_tma_mma", Strategy::SimpleTmaMma(Default::default())),
        ("double_tma_mma", Strategy::DoubleTmaMma(Default::default())),
        ("specialized_tma_mma", Strategy::SpecializedTmaMma(Default::default())),
        ("ordered_double_mma", Strategy::OrderedDoubleMma(Default::default())),
        ("simple_unit", Strategy::SimpleUnit(Default::default())),
        ("double_unit", Strategy::DoubleUnit(Default::default())),
        ("simple_vecmat", Strategy::SimpleVecMat(Default::default())),
        ("double_vecmat", Strategy::DoubleVecMat(Default::default())),
        ("gemv_unit_perpendicular", Strategy::GemvUnitPerpendicular(Default::default())),
        ("gemv_plane_parallel", Strategy::GemvPlaneParallel(Default::default())),
        ("auto", Strategy::Auto),
    ];
    let mut rng = Rng::new(13);
    let largest = s.linears().iter().filter(|l| l.0 != "lm_head").map(|(_, n, k)| n * k).max().unwrap_or(0);
    let pool: Vec<F> = (0..largest).map(|_| F::from_f32((rng.value() * 0.05) as f32)).collect();
    println!("\n# matmul sweep: µs per launch (L2 defeated), relative error against the tiled kernel");
    println!("| batch | op | path | µs | GB/s | rel. err |");
    println!("|---|---|---|---|---|---|");
    for &m in batches {
        for (name, n, k) in s.linears().into_iter().filter(|l| l.0 != "lm_head") {
            let bytes = n * k * size_of::<F>();
            let copies = (4 * L2_BYTES).div_ceil(bytes).clamp(1, 8);
            let weights: Vec<DeviceBuffer<F>> = (0..copies).map(|_| DeviceBuffer::upload(client, &pool[..n * k])).collect();
            let x = DeviceBuffer::upload(client, &pool[pool.len() - m * k..]);
            let mut y = DeviceBuffer::<F>::empty(client, m * n);
            matmul::launch_matmul(client, &x, &weights[0], &mut y, m, n, k, Some(matmul::MatmulConfig::new(m)))
                .map_err(|e| e.to_string())?;
            let want: Vec<f64> = y.read(client).into_iter().map(|v| f64::from(EngineElem::to_f32(v))).collect();
            let report = |path: &str, call: &mut MatmulCall<'_, F>| {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(f64, f64), String> {
                    let mut out = DeviceBuffer::<F>::empty(client, m * n);
                    call(0, &mut out)?;
                    let got = out.read(client);
                    let (mut num, mut den) = (0.0f64, 0.0f64);
                    for (g, w) in got.iter().zip(&want) {
                        num += (f64::from(EngineElem::to_f32(*g)) - w).powi(2);
                        den += w * w;
                    }
                    let us = time_us(client, 50, |i| call(i, &mut out))?;
                    Ok((us, (num / den.max(1e-30)).sqrt()))
                }));
                match outcome {
                    Ok(Ok((us, err))) => {
                        println!("| {m} | {name} ({n}×{k}) | {path} | {us:.1} | {:.0} | {err:.1e} |", bytes as f64 / us / 1e3)
                    }
                    Ok(Err(e)) => println!(
                        "| {m} | {name} ({n}×{k}) | {path} | refused: {} | | |",
                        e.lines().next().unwrap_or("").chars().take(90).collect::<String>()
                    ),
                    Err(_) => println!("| {m} | {name} ({n}×{k}) | {path} | panicked | | |"),
                }
                std::io::stdout().flush().ok();
            };
            report("dispatch (launch_matmul)", &mut |i, out| {
                matmul::launch_matmul(client, &x, &weights[i % copies], out, m, n, k, None).map_err(|e| e.to_string())
            });
            report("tiled kernel", &mut |i, out| {
                matmul::launch_matmul(client, &x, &weights[i % copies], out, m, n, k, Some(matmul::MatmulConfig::new(m)))
                    .map_err(|e| e.to_string())
            });
            for (label, strategy) in &strategies {
                report(label, &mut |i, out| {
                    matmul::launch_matmul_cubek(client, &x, &weights[i % copies], out, m, n, k, strategy).map_err(|e| e.to_string())
                });
            }
        }
    }
    Ok(())
}
