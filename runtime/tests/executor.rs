//! The plan executor against the HF + PEFT references of the tiny fixtures (tests/fixtures/tiny),
//! on wgpu (lavapipe in CI), f32: the mixed-adapter batch's full-sequence logits, greedy
//! generation over the paged KV cache, each row alone against the mixed batch, the per-adapter
//! last-position logits, and the refusals.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use lorac_runtime::executor::{Engine, EngineOptions, ExecutorError, LogitsMode, LoraShrink, SeqInput};

mod common;

use common::{FOLDED, Reference, Row, compare, fixture, greedy_decode, plan_for, prefill_batch, slot_of};

type Rt = WgpuRuntime;

fn client() -> ComputeClient<Rt> {
    Rt::client(&Default::default())
}

fn engine(model: &str) -> Engine<Rt, f32> {
    engine_with(model, LoraShrink::DEFAULT)
}

fn engine_with(model: &str, lora_shrink: LoraShrink) -> Engine<Rt, f32> {
    common::engine_with(client(), model, None, lora_shrink)
}

const KL_TOL: f64 = 1e-3;
const DELTA_TOL: f64 = 1e-3;

/// The mixed batch [A, B, C, base, A] as one prefill step: every row's full-sequence logits
/// against HF + PEFT; then 8 greedy tokens per row by decode steps over the KV cache.
fn mixed_batch_matches_reference(model: &str, lora_shrink: LoraShrink) {
    let dir = fixture(model);
    let reference = Reference::load(&dir);
    let mut e = engine_with(model, lora_shrink);
    let seqs: Vec<_> = reference.rows.iter().map(|_| e.add_sequence()).collect();
    let batch = prefill_batch(&reference, &seqs);
    let out = e.step(&batch, LogitsMode::All).expect("prefill step");
    let vocab = e.plan().model.vocab_size as usize;
    let mut worst_delta = 0.0f64;
    for (i, row) in reference.rows.iter().enumerate() {
        let (shape, want) = reference.tensor(&format!("row{i}.logits"));
        assert_eq!(shape, vec![row.input_ids.len(), vocab]);
        let (delta, kl) = compare(&out.logits[i], &want, vocab);
        println!("{model} row {i} (adapter {:?}): max |Δlogit| {delta:.3e}, max KL/token {kl:.3e}", row.adapter);
        assert!(kl < KL_TOL, "{model} row {i}: KL {kl:e}");
        assert!(delta < DELTA_TOL, "{model} row {i}: max |Δlogit| {delta:e}");
        worst_delta = worst_delta.max(delta);
    }

    // Greedy generation: the prefill's argmax, then decode steps of all five rows at once.
    let generated = greedy_decode(&mut e, &reference, &seqs, &out.next_tokens);
    for (i, (row, got)) in reference.rows.iter().zip(&generated).enumerate() {
        println!("{model} row {i}: generated {got:?}, reference {:?}", row.generated);
        if let Some(p) = got.iter().zip(&row.generated).position(|(a, b)| a != b) {
            // A flip is only excusable where HF's own top-2 margin is within our logit error.
            let margin = row.margins[p];
            println!("{model} row {i}: first divergence at token {p}, reference margin {margin:.3e}");
            assert!(margin < 10.0 * worst_delta, "{model} row {i}: greedy token {p} differs with a reference margin of {margin:e}");
        }
    }
}

#[test]
fn llama_mixed_batch_matches_reference() {
    mixed_batch_matches_reference("llama", LoraShrink::Kernel);
}

#[test]
fn qwen3_mixed_batch_matches_reference() {
    mixed_batch_matches_reference("qwen3", LoraShrink::Kernel);
}

/// The fixture with hidden 1024 and rank-64 sites (bf16 checkpoint, run in f32 here).
#[test]
fn llama_wide_mixed_batch_matches_reference() {
    mixed_batch_matches_reference(common::WIDE, LoraShrink::Kernel);
}

#[test]
fn llama_mixed_batch_matches_reference_shrink_in_gemm() {
    mixed_batch_matches_reference("llama", FOLDED);
}

#[test]
fn qwen3_mixed_batch_matches_reference_shrink_in_gemm() {
    mixed_batch_matches_reference("qwen3", FOLDED);
}

/// Each row alone gives the mixed batch's logits (segmenting by adapter changes nothing).
fn rows_alone_match_mixed_batch(model: &str, lora_shrink: LoraShrink) {
    let reference = Reference::load(&fixture(model));
    let mut e = engine_with(model, lora_shrink);
    let seqs: Vec<_> = reference.rows.iter().map(|_| e.add_sequence()).collect();
    let batch = prefill_batch(&reference, &seqs);
    let mixed = e.step(&batch, LogitsMode::All).expect("mixed step");
    let vocab = e.plan().model.vocab_size as usize;
    for (i, input) in batch.iter().enumerate() {
        let seq = e.add_sequence();
        let alone = e.step(&[SeqInput { seq, ..input.clone() }], LogitsMode::All).expect("single-row step");
        let (delta, _) = compare(&alone.logits[0], &mixed.logits[i], vocab);
        println!("{model} row {i}: alone vs mixed max |Δlogit| {delta:.3e}");
        assert!(delta < 1e-5, "{model} row {i}: alone vs mixed differ by {delta:e}");
        assert_eq!(alone.next_tokens[0], mixed.next_tokens[i]);
    }
}

#[test]
fn llama_rows_alone_match_mixed_batch() {
    rows_alone_match_mixed_batch("llama", LoraShrink::Kernel);
}

#[test]
fn qwen3_rows_alone_match_mixed_batch() {
    rows_alone_match_mixed_batch("qwen3", FOLDED);
}

/// Prefill in two chunks per sequence, the second chunk of some rows sharing a step with
/// the first chunk of others (mixed prefill at nonzero positions over the KV cache): the
/// logits of every position still match the single-pass references.
fn chunked_prefill_matches_reference(model: &str, lora_shrink: LoraShrink) {
    let reference = Reference::load(&fixture(model));
    let mut e = engine_with(model, lora_shrink);
    let vocab = e.plan().model.vocab_size as usize;
    let seqs: Vec<_> = reference.rows.iter().map(|_| e.add_sequence()).collect();
    let split = |r: &Row, i: usize| (r.input_ids.len() * (i + 1)) / 7 + 1;
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); reference.rows.len()];
    // Step 1: the first chunk of rows 0..3. Step 2: the rest of rows 0..3 and the first chunk
    // of rows 3..5. Step 3: the rest of rows 3..5.
    let chunk = |lo: bool, i: usize| -> SeqInput {
        let r = &reference.rows[i];
        let cut = split(r, i);
        let (position, tokens) = if lo { (0, r.input_ids[..cut].to_vec()) } else { (cut as u32, r.input_ids[cut..].to_vec()) };
        SeqInput { seq: seqs[i], position, tokens, adapter: slot_of(&r.adapter) }
    };
    let steps: [Vec<(bool, usize)>; 3] = [
        vec![(true, 0), (true, 1), (true, 2)],
        vec![(false, 0), (true, 3), (false, 1), (true, 4), (false, 2)],
        vec![(false, 3), (false, 4)],
    ];
    for step in steps {
        let batch: Vec<SeqInput> = step.iter().map(|&(lo, i)| chunk(lo, i)).collect();
        let out = e.step(&batch, LogitsMode::All).expect("chunk step");
        for (&(_, i), logits) in step.iter().zip(out.logits) {
            got[i].extend(logits);
        }
    }
    for (i, row) in reference.rows.iter().enumerate() {
        let (_, want) = reference.tensor(&format!("row{i}.logits"));
        let (delta, kl) = compare(&got[i], &want, vocab);
        println!("{model} row {i} chunked at {}: max |Δlogit| {delta:.3e}, max KL {kl:.3e}", split(row, i));
        assert!(kl < KL_TOL && delta < DELTA_TOL, "{model} row {i}: Δ {delta:e}, KL {kl:e}");
    }
}

#[test]
fn llama_chunked_prefill_matches_reference() {
    chunked_prefill_matches_reference("llama", LoraShrink::Kernel);
}

/// Steps of up to 16 tokens folded, longer ones through the shrink kernel: both kinds of step
/// share one engine (and the chunks straddle the threshold).
#[test]
fn qwen3_chunked_prefill_matches_reference() {
    chunked_prefill_matches_reference("qwen3", LoraShrink::InGemm { max_tokens: 16 });
}

/// Every prompt under every adapter (and the base model) in one `Last` step per adapter,
/// against `adapter_X.last_logits` / `base.last_logits`.
#[test]
fn qwen3_last_logits_per_adapter() {
    let model = "qwen3";
    let reference = Reference::load(&fixture(model));
    let mut e = engine(model);
    let vocab = e.plan().model.vocab_size as usize;
    for (name, slot) in [("adapter_A", Some(0)), ("adapter_B", Some(1)), ("adapter_C", Some(2)), ("base", None)] {
        let batch: Vec<SeqInput> = reference
            .rows
            .iter()
            .map(|r| SeqInput { seq: e.add_sequence(), position: 0, tokens: r.input_ids.clone(), adapter: slot })
            .collect();
        let out = e.step(&batch, LogitsMode::Last).expect("step");
        let (shape, want) = reference.tensor(&format!("{name}.last_logits"));
        assert_eq!(shape, vec![reference.rows.len(), vocab]);
        let (delta, kl) = compare(&out.logits.concat(), &want, vocab);
        println!("{model} {name}: last-position max |Δlogit| {delta:.3e}, max KL {kl:.3e}");
        assert!(kl < KL_TOL && delta < DELTA_TOL, "{model} {name}: Δ {delta:e}, KL {kl:e}");
    }
}

/// `n` token ids of the tiny vocabulary (512), different for each `seed`.
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (seed * 131 + i * 37 + 1) % 512).collect()
}

/// After start-up the engine allocates nothing on the device while it serves a mixed workload:
/// prefills of different lengths, chunked prefill beside decode, batches of 1..=max_seqs
/// sequences and up to max_batch_tokens tokens, adapter rows beside base rows, `All` (several
/// lm_head passes), `Last` and `NextTokens`, adapters unloaded and loaded between steps,
/// sequences released and new ones added.
///
/// What is compared, from cubecl 0.10's `ComputeClient::memory_usage` (the wgpu runtime reports
/// its main storage pool, per stream, i.e. this test's thread; read-back staging and uniform
/// buffers live in other pools that it does not report):
/// * `bytes_reserved`: device memory the pool holds (its pages). Any allocation the pool could
///   not serve from memory it already had would raise it.
/// * `number_allocs` / `bytes_in_use` / `bytes_padding`: the slices handed out and alive. The
///   engine's buffers are fixed at start-up; each metadata or adapter write borrows one
///   temporary slice (cubecl's client has no in-place host write) that is back in the pool
///   when the call returns, so between steps these must equal their start-up values too.
///
/// The engine's own `footprint()` (its buffers by handle) must not change either.
///
/// Decode-sized steps (up to 8 tokens) fold the LoRA shrink into the GEMM, longer ones run the
/// shrink kernel, so both paths serve the workload.
#[test]
fn serving_allocates_nothing_after_start_up() {
    serve_mixed_workload(client());
}

/// The same on CUDA (`--features cuda-tests`): cubecl's CUDA pool and its views.
#[cfg(feature = "cuda-tests")]
#[test]
fn serving_allocates_nothing_after_start_up_cuda() {
    serve_mixed_workload(cubecl::cuda::CudaRuntime::client(&Default::default()));
}

fn serve_mixed_workload<R: Runtime>(client: ComputeClient<R>) {
    let dir = fixture("llama");
    let reference = Reference::load(&dir);
    let plan = plan_for(&dir, 1, None);
    let (max_tokens, max_seqs) = (plan.limits.max_batch_tokens as usize, plan.limits.max_seqs as usize);
    let plan_activations = plan.ranks[0].memory.activations;
    let options = EngineOptions { lora_shrink: LoraShrink::InGemm { max_tokens: 8 }, ..EngineOptions::for_plan(&plan) };
    let mut e = Engine::<R, f32>::with_options(client, plan, &dir, options).expect("engine");
    let client = e.client().clone();
    let start = client.memory_usage().expect("memory usage");
    let footprint = e.footprint();
    println!(
        "after start-up: {start:?}; engine footprint {footprint:?}, arena + metadata bytes {:?} (plan's activations {plan_activations})",
        e.step_buffer_bytes()
    );
    let mut checks = 0usize;
    let mut check = |e: &Engine<R, f32>, what: &str| {
        let now = client.memory_usage().expect("memory usage");
        assert_eq!(now, start, "device memory changed after {what}");
        assert_eq!(e.footprint(), footprint, "engine buffers changed after {what}");
        checks += 1;
    };

    for (slot, name) in ["A", "B", "C"].iter().enumerate() {
        e.load_adapter(slot as u32, &dir.join("adapters").join(name)).unwrap();
        check(&e, &format!("loading adapter {name}"));
    }

    // The reference prompts under their adapters, one `All` step (more rows than max_seqs:
    // several lm_head passes).
    let mut live: Vec<(lorac_runtime::executor::SeqId, u32, Option<u32>)> = Vec::new();
    let batch: Vec<SeqInput> = reference
        .rows
        .iter()
        .map(|r| SeqInput { seq: e.add_sequence(), position: 0, tokens: r.input_ids.clone(), adapter: slot_of(&r.adapter) })
        .collect();
    assert!(batch.iter().map(|s| s.tokens.len()).sum::<usize>() > max_seqs);
    let out = e.step(&batch, LogitsMode::All).unwrap();
    check(&e, "the mixed prefill");
    // Served from the arena's views, in several lm_head passes: still the reference logits.
    for (i, logits) in out.logits.iter().enumerate() {
        let (_, want) = reference.tensor(&format!("row{i}.logits"));
        let (delta, kl) = compare(logits, &want, 512);
        assert!(kl < KL_TOL && delta < DELTA_TOL, "row {i}: Δ {delta:e}, KL {kl:e}");
    }
    live.extend(batch.iter().map(|s| (s.seq, s.tokens.len() as u32, s.adapter)));

    // Decode steps of every live sequence, in the three logits modes.
    let decode = |e: &mut Engine<R, f32>, live: &mut Vec<(lorac_runtime::executor::SeqId, u32, Option<u32>)>, mode, seed| {
        let batch: Vec<SeqInput> = live
            .iter()
            .enumerate()
            .map(|(i, &(seq, cached, adapter))| SeqInput { seq, position: cached, tokens: tokens(seed + i as u32, 1), adapter })
            .collect();
        let out = e.step(&batch, mode).unwrap();
        assert_eq!(out.next_tokens.len(), batch.len());
        for entry in live.iter_mut() {
            entry.1 += 1;
        }
    };
    for (i, mode) in [LogitsMode::Last, LogitsMode::NextTokens, LogitsMode::All].into_iter().enumerate() {
        decode(&mut e, &mut live, mode, 100 + i as u32);
        check(&e, &format!("decode step {i} ({mode:?})"));
    }

    // A long prompt prefilled in chunks of different lengths beside the decode of the others.
    let long = e.add_sequence();
    let prompt = tokens(7, 180);
    let mut done = 0usize;
    for (i, chunk) in [64usize, 17, 99].into_iter().enumerate() {
        let mut batch: Vec<SeqInput> = live
            .iter()
            .map(|&(seq, cached, adapter)| SeqInput { seq, position: cached, tokens: tokens(200 + i as u32, 1), adapter })
            .collect();
        batch.push(SeqInput { seq: long, position: done as u32, tokens: prompt[done..done + chunk].to_vec(), adapter: Some(2) });
        let mode = if i == 1 { LogitsMode::All } else { LogitsMode::NextTokens };
        e.step(&batch, mode).unwrap();
        done += chunk;
        for entry in live.iter_mut() {
            entry.1 += 1;
        }
        check(&e, &format!("chunk {i} of the chunked prefill ({chunk} tokens)"));
    }
    live.push((long, done as u32, Some(2)));

    // Move B between steps: out of slot 1, into slot 3; its rows follow it.
    assert_eq!(e.unload_adapter(1).unwrap().as_deref(), Some("B"));
    check(&e, "unloading B");
    e.load_adapter(3, &dir.join("adapters/B")).unwrap();
    check(&e, "loading B into slot 3");
    for entry in live.iter_mut() {
        if entry.2 == Some(1) {
            entry.2 = Some(3);
        }
    }
    decode(&mut e, &mut live, LogitsMode::Last, 300);
    check(&e, "decode after the adapter swap");

    // Release three sequences, start new ones up to max_seqs, with new adapters and base rows.
    for (seq, _, _) in live.drain(..3) {
        e.release_sequence(seq).unwrap();
    }
    let mut new_batch = Vec::new();
    for i in 0..max_seqs - live.len() {
        let adapter = [Some(3), None, Some(0), Some(2)][i % 4];
        let seq = e.add_sequence();
        let n = 3 + 11 * i;
        new_batch.push(SeqInput { seq, position: 0, tokens: tokens(400 + i as u32, n), adapter });
        live.push((seq, n as u32, adapter));
    }
    e.step(&new_batch, LogitsMode::Last).unwrap();
    check(&e, "prefill of new sequences");
    decode(&mut e, &mut live, LogitsMode::NextTokens, 500);
    check(&e, &format!("a decode batch of max_seqs ({max_seqs})"));

    // The largest step: max_batch_tokens tokens over max_seqs sequences (decode rows plus one
    // prefill filling the rest).
    // The prefill is a new sequence: a long-lived one would pass the model's 256 positions.
    let (old, _, adapter) = live.pop().unwrap();
    e.release_sequence(old).unwrap();
    let seq = e.add_sequence();
    let rest = max_tokens - live.len();
    let mut batch: Vec<SeqInput> =
        live.iter().map(|&(seq, cached, adapter)| SeqInput { seq, position: cached, tokens: tokens(600, 1), adapter }).collect();
    batch.push(SeqInput { seq, position: 0, tokens: tokens(601, rest), adapter });
    assert_eq!(batch.iter().map(|s| s.tokens.len()).sum::<usize>(), max_tokens);
    e.step(&batch, LogitsMode::Last).unwrap();
    check(&e, "a step of max_batch_tokens");

    // One token of one sequence, base and adapter.
    for adapter in [None, Some(0)] {
        let seq = e.add_sequence();
        e.step(&[SeqInput { seq, position: 0, tokens: tokens(700, 1), adapter }], LogitsMode::Last).unwrap();
        e.release_sequence(seq).unwrap();
        check(&e, &format!("a single-token step ({adapter:?})"));
    }
    // Refused steps change nothing either.
    let seq = e.add_sequence();
    assert!(e.step(&[SeqInput { seq, position: 0, tokens: tokens(800, max_tokens + 1), adapter: None }], LogitsMode::Last).is_err());
    assert!(e.step(&[SeqInput { seq, position: 0, tokens: tokens(801, 4), adapter: Some(1) }], LogitsMode::Last).is_err());
    check(&e, "refused steps");
    println!("{checks} checks: device memory {start:?} throughout");
    assert_eq!(e.kv_cache_bytes(), e.plan().ranks[0].memory.kv_cache);
}

#[test]
fn refusals() {
    let dir = fixture("llama");
    // tp > 1 is refused with a clear error.
    match Engine::<Rt, f32>::new(client(), plan_for(&dir, 2, None), &dir) {
        Err(ExecutorError::Unsupported(msg)) => assert!(msg.contains("tensor parallelism"), "{msg}"),
        other => panic!("tp 2: {:?}", other.err()),
    }
    // Plans of other shapes are refused by what their nodes hold, with the reason.
    for model in ["qwen3_moe", "deepseek_v3", "qwen3_next", "qwen3_5", "qwen3_5_moe", "nemotron_h"] {
        let other = fixture(model);
        match Engine::<Rt, f32>::new(client(), plan_for(&other, 1, None), &other) {
            Err(ExecutorError::Unsupported(msg)) => println!("{model}: {msg}"),
            other => panic!("{model}: {:?}", other.err()),
        }
    }
    // A plan compiled for another model directory.
    let qwen = fixture("qwen3");
    assert!(matches!(Engine::<Rt, f32>::new(client(), plan_for(&dir, 1, None), &qwen), Err(ExecutorError::Config(_))));

    let mut e = engine("llama");
    let seq = e.add_sequence();
    let bad = |e: &mut Engine<Rt, f32>, input: SeqInput| match e.step(&[input], LogitsMode::Last) {
        Err(ExecutorError::Batch(msg)) => msg,
        other => panic!("expected a batch refusal, got {:?}", other.map(|o| o.next_tokens)),
    };
    println!("{}", bad(&mut e, SeqInput { seq, position: 0, tokens: vec![1, 512], adapter: None }));
    println!("{}", bad(&mut e, SeqInput { seq, position: 0, tokens: vec![1], adapter: Some(3) }));
    println!("{}", bad(&mut e, SeqInput { seq, position: 0, tokens: vec![1], adapter: Some(4) }));
    println!("{}", bad(&mut e, SeqInput { seq, position: 2, tokens: vec![1], adapter: None }));
    println!("{}", bad(&mut e, SeqInput { seq, position: 0, tokens: vec![], adapter: None }));
    println!("{}", bad(&mut e, SeqInput { seq, position: 0, tokens: vec![1; 257], adapter: None }));
    // Nothing was reserved by the refused steps; a good one still runs.
    assert_eq!(e.cached_tokens(seq), Some(0));
    e.step(&[SeqInput { seq, position: 0, tokens: vec![1, 2, 3], adapter: None }], LogitsMode::Last).unwrap();
    // Positions end at the config's max_position_embeddings (256).
    let long = e.add_sequence();
    e.step(&[SeqInput { seq: long, position: 0, tokens: vec![5; 200], adapter: None }], LogitsMode::Last).unwrap();
    let msg = bad(&mut e, SeqInput { seq: long, position: 200, tokens: vec![5; 57], adapter: None });
    assert_eq!(msg, "entry 0: 257 tokens exceed max_seq_len 256");
    // An occupied slot and a bad adapter are refused by lorac-adapters.
    assert!(matches!(e.load_adapter(0, &dir.join("adapters/B")), Err(ExecutorError::Adapter(_))));
    assert!(matches!(e.load_adapter(3, &dir.join("bad_adapters/dora")), Err(ExecutorError::Adapter(_))));
    assert_eq!(e.unload_adapter(0).unwrap().as_deref(), Some("A"));
}

/// Token counts and head shapes do not matter: the same prompt after steps of other sizes
/// (all served from the same arena views) computes the same logits, bit for bit.
#[test]
fn a_shape_seen_again_gives_the_same_logits() {
    let mut e = engine("llama");
    let prompt = [1u32, 303, 225, 433, 309];
    let mut first = None;
    for n in [5usize, 2, 3, 4, 5] {
        let seq = e.add_sequence();
        let out = e.step(&[SeqInput { seq, position: 0, tokens: prompt[..n].to_vec(), adapter: None }], LogitsMode::Last).unwrap();
        if n == 5 {
            match &first {
                None => first = Some(out.logits[0].clone()),
                Some(l) => assert_eq!(l, &out.logits[0]),
            }
        }
        e.release_sequence(seq).unwrap();
    }
}

/// Loading and unloading write only their slot of the device pool, in place: an adapter moved
/// to another slot gives the same logits, other slots keep theirs, no buffer is reallocated.
#[test]
fn adapters_move_between_slots_in_place() {
    let dir = fixture("llama");
    let reference = Reference::load(&dir);
    let mut e = engine("llama");
    let run = |e: &mut Engine<Rt, f32>, row: usize, slot: Option<u32>| {
        let seq = e.add_sequence();
        let out = e.step(&[SeqInput { seq, position: 0, tokens: reference.rows[row].input_ids.clone(), adapter: slot }], LogitsMode::All);
        e.release_sequence(seq).unwrap();
        out
    };
    let b_before = run(&mut e, 1, Some(1)).unwrap();
    let a_before = run(&mut e, 0, Some(0)).unwrap();
    run(&mut e, 2, Some(2)).unwrap();
    let footprint = e.footprint();
    assert_eq!(e.unload_adapter(1).unwrap().as_deref(), Some("B"));
    assert!(matches!(run(&mut e, 1, Some(1)), Err(ExecutorError::Batch(_))));
    e.load_adapter(3, &dir.join("adapters/B")).unwrap();
    assert_eq!(run(&mut e, 1, Some(3)).unwrap(), b_before);
    assert_eq!(run(&mut e, 0, Some(0)).unwrap(), a_before);
    // The freed slot holds zeros: reloading another adapter there behaves like a fresh load.
    e.load_adapter(1, &dir.join("adapters/C")).unwrap_err();
    e.unload_adapter(2).unwrap();
    e.load_adapter(1, &dir.join("adapters/C")).unwrap();
    let (_, want) = reference.tensor("row2.logits");
    let (delta, _) = compare(&run(&mut e, 2, Some(1)).unwrap().logits[0], &want, 512);
    assert!(delta < DELTA_TOL, "C reloaded into slot 1: {delta:e}");
    assert_eq!(e.footprint(), footprint);
}

/// A plan targeting only q_proj and v_proj: the weights of the untargeted projections, the
/// embedding and lm_head come from the plan's node weights as well (no LoRA buffer names them);
/// the base row still matches the reference.
#[test]
fn base_model_under_a_partial_target_plan() {
    let dir = fixture("llama");
    let reference = Reference::load(&dir);
    let mut opts = lorac_compiler::CompileOptions::new(1, 16, 4, &["q_proj", "v_proj"]).expect("options");
    opts.kv_cache_tokens = 2048;
    let plan = lorac_compiler::compile(&dir, &opts).expect("compile");
    assert!(plan.ranks[0].lora_buffers.iter().all(|b| b.module == "qkv_proj"));
    let mut e = Engine::<Rt, f32>::new(client(), plan, &dir).expect("engine");
    let seq = e.add_sequence();
    let out =
        e.step(&[SeqInput { seq, position: 0, tokens: reference.rows[3].input_ids.clone(), adapter: None }], LogitsMode::All).unwrap();
    let (_, want) = reference.tensor("row3.logits");
    let (delta, kl) = compare(&out.logits[0], &want, 512);
    println!("llama base row under a q/v plan: max |Δlogit| {delta:.3e}, max KL {kl:.3e}");
    assert!(kl < KL_TOL && delta < DELTA_TOL);
    // Adapter A trains modules this plan does not target.
    assert!(matches!(e.load_adapter(0, &dir.join("adapters/A")), Err(ExecutorError::Adapter(_))));
}

/// Weight loading reports each tensor the plan reads once, in increasing byte counts that end
/// at the total, and that total is every tensor of the tiny checkpoint (it holds nothing else).
#[test]
fn weight_loading_reports_progress() {
    let dir = fixture("llama");
    let plan = plan_for(&dir, 1, None);
    let options = EngineOptions::for_plan(&plan);
    let mut events: Vec<(String, u64, u64)> = Vec::new();
    Engine::<Rt, f32>::with_progress(client(), plan, &dir, options, &mut |p| {
        events.push((p.tensor.to_string(), p.bytes_done, p.bytes_total))
    })
    .expect("engine");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("checkpoint");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let stored: u64 = file.tensors().iter().map(|(_, t)| t.data().len() as u64).sum();
    let mut names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), events.len(), "a tensor was reported twice");
    assert_eq!(names.len(), file.len(), "every checkpoint tensor is read once");
    assert!(events.windows(2).all(|w| w[0].1 < w[1].1), "bytes uploaded must grow with each tensor");
    let &(_, done, total) = events.last().expect("progress reported");
    assert_eq!((done, total), (stored, stored));
}
