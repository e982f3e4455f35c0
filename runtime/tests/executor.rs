//! The plan executor against the HF + PEFT references of the tiny fixtures (tests/fixtures/tiny),
//! on wgpu (lavapipe in CI), f32: the mixed-adapter batch's full-sequence logits, greedy
//! generation over the paged KV cache, each row alone against the mixed batch, the per-adapter
//! last-position logits, and the refusals.

use std::path::{Path, PathBuf};

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use lorac_runtime::executor::{Engine, ExecutorError, LogitsMode, SeqInput};
use safetensors::SafeTensors;

type Rt = WgpuRuntime;

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny").join(model)
}

fn plan_for(dir: &Path, tp: u32) -> lorac_plan::Plan {
    let mut opts = lorac_compiler::CompileOptions::new(tp, 16, 4, &["all"]).expect("options");
    opts.max_batch_tokens = std::num::NonZeroU32::new(256).unwrap();
    opts.max_seqs = std::num::NonZeroU32::new(8).unwrap();
    opts.kv_cache_tokens = 2048;
    lorac_compiler::compile(dir, &opts).expect("compile")
}

fn client() -> ComputeClient<Rt> {
    Rt::client(&Default::default())
}

struct Row {
    input_ids: Vec<u32>,
    adapter: Option<String>,
    generated: Vec<u32>,
    margins: Vec<f64>,
}

struct Reference {
    rows: Vec<Row>,
    tensors: Vec<u8>,
}

impl Reference {
    fn load(dir: &Path) -> Reference {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let rows = json["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Row {
                input_ids: ids(&r["input_ids"]),
                adapter: r["adapter"].as_str().map(str::to_string),
                generated: ids(&r["generated_ids"]),
                margins: r["greedy_top1_top2_margins"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            })
            .collect();
        Reference { rows, tensors: std::fs::read(dir.join("reference.safetensors")).unwrap() }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Slots of the fixture adapters: A → 0, B → 1, C → 2.
fn slot_of(adapter: &Option<String>) -> Option<u32> {
    adapter.as_deref().map(|a| match a {
        "A" => 0,
        "B" => 1,
        "C" => 2,
        other => panic!("unknown adapter {other}"),
    })
}

fn engine(model: &str) -> Engine<Rt, f32> {
    let dir = fixture(model);
    let mut e = Engine::<Rt, f32>::new(client(), plan_for(&dir, 1), &dir).expect("engine");
    for (slot, name) in ["A", "B", "C"].iter().enumerate() {
        e.load_adapter(slot as u32, &dir.join("adapters").join(name)).unwrap_or_else(|err| panic!("adapter {name}: {err}"));
    }
    e
}

/// (max |Δlogit|, max per-token KL(ref ‖ ours)) over rows of `vocab`.
fn compare(ours: &[f32], reference: &[f32], vocab: usize) -> (f64, f64) {
    assert_eq!(ours.len(), reference.len());
    let mut max_delta = 0.0f64;
    let mut max_kl = 0.0f64;
    for (o, r) in ours.chunks(vocab).zip(reference.chunks(vocab)) {
        let log_softmax = |x: &[f32]| {
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - lse).collect::<Vec<_>>()
        };
        let (lo, lr) = (log_softmax(o), log_softmax(r));
        let kl: f64 = lr.iter().zip(&lo).map(|(r, o)| r.exp() * (r - o)).sum();
        max_kl = max_kl.max(kl);
        for (a, b) in o.iter().zip(r) {
            assert!(a.is_finite(), "non-finite logit");
            max_delta = max_delta.max((*a as f64 - *b as f64).abs());
        }
    }
    (max_delta, max_kl)
}

const KL_TOL: f64 = 1e-3;
const DELTA_TOL: f64 = 1e-3;

/// The mixed batch [A, B, C, base, A] as one prefill step: every row's full-sequence logits
/// against HF + PEFT; then 8 greedy tokens per row by decode steps over the KV cache.
fn mixed_batch_matches_reference(model: &str) {
    let dir = fixture(model);
    let reference = Reference::load(&dir);
    let mut e = engine(model);
    let seqs: Vec<_> = reference.rows.iter().map(|_| e.add_sequence()).collect();
    let batch: Vec<SeqInput> = reference
        .rows
        .iter()
        .zip(&seqs)
        .map(|(r, &seq)| SeqInput { seq, position: 0, tokens: r.input_ids.clone(), adapter: slot_of(&r.adapter) })
        .collect();
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
    let mut generated: Vec<Vec<u32>> = out.next_tokens.iter().map(|&t| vec![t]).collect();
    let new_tokens = reference.rows[0].generated.len();
    for _ in 1..new_tokens {
        let batch: Vec<SeqInput> = reference
            .rows
            .iter()
            .zip(&seqs)
            .zip(&generated)
            .map(|((r, &seq), g)| SeqInput {
                seq,
                position: (r.input_ids.len() + g.len() - 1) as u32,
                tokens: vec![*g.last().unwrap()],
                adapter: slot_of(&r.adapter),
            })
            .collect();
        let out = e.step(&batch, LogitsMode::Last).expect("decode step");
        for (g, t) in generated.iter_mut().zip(out.next_tokens) {
            g.push(t);
        }
    }
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
    mixed_batch_matches_reference("llama");
}

#[test]
fn qwen3_mixed_batch_matches_reference() {
    mixed_batch_matches_reference("qwen3");
}

/// Each row alone gives the mixed batch's logits (segmenting by adapter changes nothing).
fn rows_alone_match_mixed_batch(model: &str) {
    let reference = Reference::load(&fixture(model));
    let mut e = engine(model);
    let seqs: Vec<_> = reference.rows.iter().map(|_| e.add_sequence()).collect();
    let batch: Vec<SeqInput> = reference
        .rows
        .iter()
        .zip(&seqs)
        .map(|(r, &seq)| SeqInput { seq, position: 0, tokens: r.input_ids.clone(), adapter: slot_of(&r.adapter) })
        .collect();
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
    rows_alone_match_mixed_batch("llama");
}

#[test]
fn qwen3_rows_alone_match_mixed_batch() {
    rows_alone_match_mixed_batch("qwen3");
}

/// Prefill in two chunks per sequence, the second chunk of some rows sharing a step with
/// the first chunk of others (mixed prefill at nonzero positions over the KV cache): the
/// logits of every position still match the single-pass references.
fn chunked_prefill_matches_reference(model: &str) {
    let reference = Reference::load(&fixture(model));
    let mut e = engine(model);
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
    chunked_prefill_matches_reference("llama");
}

#[test]
fn qwen3_chunked_prefill_matches_reference() {
    chunked_prefill_matches_reference("qwen3");
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

/// Decode steps of an already seen shape allocate nothing the engine holds.
#[test]
fn steps_reuse_their_buffers() {
    let mut e = engine("llama");
    let a = e.add_sequence();
    let b = e.add_sequence();
    let prompt = vec![1u32, 303, 225, 433];
    let out = e
        .step(
            &[
                SeqInput { seq: a, position: 0, tokens: prompt.clone(), adapter: Some(0) },
                SeqInput { seq: b, position: 0, tokens: prompt.clone(), adapter: None },
            ],
            LogitsMode::Last,
        )
        .unwrap();
    let mut next = out.next_tokens;
    let mut footprints = Vec::new();
    let mut reserved = Vec::new();
    for step in 0..4u32 {
        let out = e
            .step(
                &[
                    SeqInput { seq: a, position: 4 + step, tokens: vec![next[0]], adapter: Some(0) },
                    SeqInput { seq: b, position: 4 + step, tokens: vec![next[1]], adapter: Some(2) },
                ],
                LogitsMode::Last,
            )
            .unwrap();
        next = out.next_tokens;
        footprints.push(e.footprint());
        reserved.push(e.client().memory_usage().expect("memory usage").bytes_reserved);
    }
    println!("footprint after each decode step: {footprints:?}; device bytes reserved: {reserved:?}");
    assert!(footprints.windows(2).all(|w| w[0] == w[1]), "{footprints:?}");
    // The device allocator reserves nothing more once the shape has been seen.
    assert!(reserved[1..].windows(2).all(|w| w[0] == w[1]), "{reserved:?}");
    assert_eq!(e.workspace_shapes(), (2, 1));
    assert_eq!(e.cached_tokens(a), Some(8));
    assert_eq!(e.kv_cache_bytes(), e.plan().ranks[0].memory.kv_cache);
}

#[test]
fn refusals() {
    let dir = fixture("llama");
    // tp > 1 is refused with a clear error.
    match Engine::<Rt, f32>::new(client(), plan_for(&dir, 2), &dir) {
        Err(ExecutorError::Unsupported(msg)) => assert!(msg.contains("tensor parallelism"), "{msg}"),
        other => panic!("tp 2: {:?}", other.err()),
    }
    // A plan compiled for another model directory.
    let qwen = fixture("qwen3");
    assert!(matches!(Engine::<Rt, f32>::new(client(), plan_for(&dir, 1), &qwen), Err(ExecutorError::Config(_))));

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
    // An occupied slot and a bad adapter are refused by lorac-adapters.
    assert!(matches!(e.load_adapter(0, &dir.join("adapters/B")), Err(ExecutorError::Adapter(_))));
    assert!(matches!(e.load_adapter(3, &dir.join("bad_adapters/dora")), Err(ExecutorError::Adapter(_))));
    assert_eq!(e.unload_adapter(0).unwrap().as_deref(), Some("A"));
}

/// Past `workspaces` distinct token counts the least recently used workspace is dropped, and
/// a shape seen again (after its eviction) still computes the same logits.
#[test]
fn workspaces_are_bounded() {
    use lorac_runtime::executor::EngineOptions;
    let dir = fixture("llama");
    let plan = plan_for(&dir, 1);
    let options = EngineOptions { workspaces: 2, ..EngineOptions::for_plan(&plan) };
    let mut e = Engine::<Rt, f32>::with_options(client(), plan, &dir, options).expect("engine");
    let prompt = [1u32, 303, 225, 433, 309];
    let mut first = None;
    for n in [5usize, 2, 3, 4, 5] {
        let seq = e.add_sequence();
        let out = e.step(&[SeqInput { seq, position: 0, tokens: prompt[..n].to_vec(), adapter: None }], LogitsMode::Last).unwrap();
        assert!(e.workspace_shapes().0 <= 2, "{:?}", e.workspace_shapes());
        if n == 5 {
            match &first {
                None => first = Some(out.logits[0].clone()),
                Some(l) => assert_eq!(l, &out.logits[0]),
            }
        }
        e.release_sequence(seq).unwrap();
    }
    assert_eq!(e.workspace_shapes(), (2, 1));
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
/// embedding and lm_head come from HF's naming (the plan has no path for them); the base row
/// still matches the reference.
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
