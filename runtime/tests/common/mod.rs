//! What the executor tests share: the tiny fixtures, their HF + PEFT references, the test plan,
//! the fixture adapters' slots and the logit comparison.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use cubecl::prelude::*;
use lorac_plan::DType;
use lorac_runtime::executor::{Engine, EngineElem, EngineOptions, LogitsMode, LoraShrink, SeqId, SeqInput};
use safetensors::SafeTensors;

/// `LORAC_TINY_FIXTURES` overrides the fixture directory (a test binary run on another machine).
pub fn fixture(model: &str) -> PathBuf {
    let root = std::env::var_os("LORAC_TINY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny"));
    root.join(model)
}

/// The fixture whose LoRA sites are wide enough for the K-split shrink (hidden 1024, saved
/// in bf16); its plan's max rank is [`WIDE_MAX_RANK`].
pub const WIDE: &str = "llama_wide";

/// The wide fixture's plan rank: qkv (3 slices) and gate_up (2) are then 192 and 128 rows wide.
pub const WIDE_MAX_RANK: u32 = 64;

/// The executor tests' plan: rank 16 ([`WIDE_MAX_RANK`] for [`WIDE`]), 4 slots, every target,
/// 256 batch tokens, 8 sequences, 2048 cached tokens; `dtype` None: float32.
pub fn plan_for(dir: &Path, tp: u32, dtype: Option<DType>) -> lorac_plan::Plan {
    let max_rank = if dir.ends_with(WIDE) { WIDE_MAX_RANK } else { 16 };
    let mut opts = lorac_compiler::CompileOptions::new(tp, max_rank, 4, &["all"]).expect("options");
    opts.max_batch_tokens = std::num::NonZeroU32::new(256).unwrap();
    opts.max_seqs = std::num::NonZeroU32::new(8).unwrap();
    opts.kv_cache_tokens = 2048;
    opts.dtype = Some(dtype.unwrap_or(DType::F32));
    lorac_compiler::compile(dir, &opts).expect("compile")
}

/// Every LoRA shrink folded into its projection's GEMM, in steps of any length (the tiny
/// models' pools are too large next to their weights for `LoraShrink::DEFAULT` to fold).
pub const FOLDED: LoraShrink = LoraShrink::InGemm { max_tokens: u32::MAX };

/// An engine for fixture `model` under the test plan in `dtype` (None: float32) with the
/// fixture adapters loaded; asserts where `lora_shrink` put the shrinks (every site under
/// `InGemm`, none otherwise on these small models).
pub fn engine_with<R: Runtime, F: EngineElem>(
    client: ComputeClient<R>,
    model: &str,
    dtype: Option<DType>,
    lora_shrink: LoraShrink,
) -> Engine<R, F> {
    let dir = fixture(model);
    let plan = plan_for(&dir, 1, dtype);
    let options = EngineOptions { lora_shrink, ..EngineOptions::for_plan(&plan) };
    let mut e = Engine::<R, F>::with_options(client, plan, &dir, options).expect("engine");
    let (folded, sites) = e.lora_sites_in_gemm();
    assert!(sites > 0, "the test plan targets every projection");
    let expected = match lora_shrink {
        LoraShrink::InGemm { .. } => sites,
        _ => 0,
    };
    assert_eq!(folded, expected, "{model}: LoRA sites folded into the GEMM under {lora_shrink:?}");
    load_fixture_adapters(&mut e, &dir);
    e
}

/// Loads the fixture adapters A, B, C into slots 0, 1, 2 (see [`slot_of`]).
pub fn load_fixture_adapters<R: Runtime, F: EngineElem>(e: &mut Engine<R, F>, dir: &Path) {
    for (slot, name) in ["A", "B", "C"].iter().enumerate() {
        e.load_adapter(slot as u32, &dir.join("adapters").join(name)).unwrap_or_else(|err| panic!("adapter {name}: {err}"));
    }
}

pub struct Row {
    pub input_ids: Vec<u32>,
    pub adapter: Option<String>,
    pub generated: Vec<u32>,
    pub margins: Vec<f64>,
}

pub struct Reference {
    pub rows: Vec<Row>,
    tensors: Vec<u8>,
}

impl Reference {
    pub fn load(dir: &Path) -> Reference {
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

    pub fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// The reference's rows as one prefill batch, row i on sequence `seqs[i]`.
pub fn prefill_batch(reference: &Reference, seqs: &[SeqId]) -> Vec<SeqInput> {
    reference
        .rows
        .iter()
        .zip(seqs)
        .map(|(r, &seq)| SeqInput { seq, position: 0, tokens: r.input_ids.clone(), adapter: slot_of(&r.adapter) })
        .collect()
}

/// Greedy generation after [`prefill_batch`]: `first[i]` is row i's prefill argmax, then decode
/// steps of all rows at once until each has the reference's number of generated tokens.
pub fn greedy_decode<R: Runtime, F: EngineElem>(
    e: &mut Engine<R, F>,
    reference: &Reference,
    seqs: &[SeqId],
    first: &[u32],
) -> Vec<Vec<u32>> {
    let mut generated: Vec<Vec<u32>> = first.iter().map(|&t| vec![t]).collect();
    let new_tokens = reference.rows[0].generated.len();
    for _ in 1..new_tokens {
        let batch: Vec<SeqInput> = reference
            .rows
            .iter()
            .zip(seqs)
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
    generated
}

/// Slots of the fixture adapters: A → 0, B → 1, C → 2.
pub fn slot_of(adapter: &Option<String>) -> Option<u32> {
    adapter.as_deref().map(|a| match a {
        "A" => 0,
        "B" => 1,
        "C" => 2,
        other => panic!("unknown adapter {other}"),
    })
}

/// (max |Δlogit|, max per-token KL(ref ‖ ours)) over rows of `vocab`.
pub fn compare(ours: &[f32], reference: &[f32], vocab: usize) -> (f64, f64) {
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
