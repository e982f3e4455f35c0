//! Shared helpers: fixtures, plans, an independent decoder of the pool bytes and an
//! independent reader of adapter files, so the tests do not check the loader against itself.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lorac_adapters::HostPool;
use lorac_compiler::{CompileOptions, compile};
use lorac_plan::{DType, MoeLoraMode, Plan};

/// A named tensor: (name, shape, f32 values).
pub type Tensor = (String, Vec<usize>, Vec<f32>);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

pub fn tiny(model: &str) -> PathBuf {
    repo().join("tests/fixtures/tiny").join(model)
}

#[allow(clippy::too_many_arguments)]
pub fn plan_with(
    model: &str,
    tp: u32,
    ep: u32,
    max_rank: u32,
    slots: u32,
    targets: &[&str],
    dtype: Option<DType>,
    moe: MoeLoraMode,
) -> Plan {
    let mut opts = CompileOptions::new(tp, max_rank, slots, targets).expect("options");
    opts.ep = std::num::NonZeroU32::new(ep).expect("ep");
    opts.lora_dtype = dtype;
    opts.moe_lora = moe;
    compile(&tiny(model), &opts).expect("tiny model compiles")
}

pub fn plan(model: &str, tp: u32, max_rank: u32, slots: u32, targets: &[&str], dtype: Option<DType>) -> Plan {
    plan_with(model, tp, 1, max_rank, slots, targets, dtype, MoeLoraMode::PerExpert)
}

/// One rank's pool decoded to f32, read straight from the bytes.
pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => panic!("test decoder does not handle {other}"),
    }
}

/// An adapter file read with the safetensors crate directly: name → (shape, f32 values).
pub fn read_tensors(file: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).expect("adapter file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "fixtures are f32");
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// PEFT's scale from adapter_config.json (fixtures have no rank/alpha patterns).
pub fn peft_scale(dir: &Path) -> f32 {
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).expect("config")).expect("json");
    let r = cfg["r"].as_f64().expect("r");
    let alpha = cfg["lora_alpha"].as_f64().expect("alpha");
    (if cfg["use_rslora"].as_bool().unwrap_or(false) { alpha / r.sqrt() } else { alpha / r }) as f32
}

/// `scale · B · A` of one module as `[out, in]`, plus per element `Σ_q |scale·B·A|` (the
/// bf16 error bound scales with it).
pub fn expected_delta(a: &(Vec<usize>, Vec<f32>), b: &(Vec<usize>, Vec<f32>), scale: f32) -> (Vec<f32>, Vec<f32>, usize, usize) {
    let (r, n_in) = (a.0[0], a.0[1]);
    let n_out = b.0[0];
    assert_eq!(b.0[1], r);
    let mut delta = vec![0f32; n_out * n_in];
    let mut magnitude = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        for i in 0..n_in {
            for q in 0..r {
                let t = scale * b.1[o * r + q] * a.1[q * n_in + i];
                delta[o * n_in + i] += t;
                magnitude[o * n_in + i] += t.abs();
            }
        }
    }
    (delta, magnitude, n_out, n_in)
}

/// Where `path` (a concrete HF module path; routed experts with their index) sits in the plan.
pub fn locate(plan: &Plan, path: &str) -> (usize, usize, Option<u32>) {
    for (i, b) in plan.ranks[0].lora_buffers.iter().enumerate() {
        for (g, p) in b.hf_paths.iter().enumerate() {
            if p == path {
                return (i, g, None);
            }
            if let Some((pre, post)) = p.split_once("{expert}")
                && let Some(e) = path.strip_prefix(pre).and_then(|s| s.strip_suffix(post)).and_then(|s| s.parse().ok())
            {
                return (i, g, Some(e));
            }
        }
    }
    panic!("{path} is not in the plan");
}

/// ΔW of one module reassembled from every rank's pool bytes: each rank contributes
/// `B_rank · A_rank` (summed over the full max rank, padding included) at the rows
/// (`slice_rows`) and columns (`input_cols`) it holds. Every element of the full `[out, in]`
/// must be covered, and where ranks overlap they must agree.
pub fn pool_delta(plan: &Plan, pool: &HostPool, slot: usize, path: &str) -> (Vec<f32>, usize, usize) {
    let (i, g, expert) = locate(plan, path);
    let size = plan.lora.dtype.size_bytes() as usize;
    let bufs: Vec<_> = plan.ranks.iter().map(|r| &r.lora_buffers[i]).collect();
    let full_in = bufs.iter().map(|b| b.input_cols.1).max().expect("ranks") as usize;
    let slices = bufs[0].layout.slices();
    let slice_full: Vec<usize> = (0..slices.len()).map(|s| bufs.iter().map(|b| b.slice_rows[s].1).max().expect("ranks") as usize).collect();
    let mut module_offset = vec![0usize; slices.len()];
    let mut out = 0;
    for (s, slice) in slices.iter().enumerate() {
        if slice.group as usize == g {
            module_offset[s] = out;
            out += slice_full[s];
        }
    }
    let mut full = vec![f32::NAN; out * full_in];
    for (k, b) in bufs.iter().enumerate() {
        let l = &b.layout;
        let (jr, jb) = match (l.experts(), b.experts, expert) {
            (None, _, _) => (0, 0),
            (Some(dims), Some((e0, e1)), Some(e)) => {
                if e < e0 || e >= e1 {
                    continue;
                }
                (if dims.a.get() == 1 { 0 } else { e - e0 } as usize, if dims.b.get() == 1 { 0 } else { e - e0 } as usize)
            }
            other => panic!("inconsistent expert info {other:?}"),
        };
        let values = decode(pool.rank_bytes(k), plan.lora.dtype);
        let (rr, in_l, out_l, cr) =
            (l.max_rank() as usize, l.in_features() as usize, l.out_features() as usize, l.intermediate_width() as usize);
        let slots = l.slots() as u64;
        let a_base = b.a_offset as usize / size + slot * (l.a_elements() / slots) as usize;
        let b_base = b.b_offset as usize / size + slot * (l.b_elements() / slots) as usize;
        let a_at = |q: usize, x: usize| values[a_base + (jr * cr + g * rr + q) * in_l + x];
        let b_at = |row: usize, q: usize| values[b_base + (jb * out_l + row) * rr + q];
        let offsets = l.slice_offsets();
        let (c0, c1) = (b.input_cols.0 as usize, b.input_cols.1 as usize);
        for (s, slice) in slices.iter().enumerate().filter(|(_, s)| s.group as usize == g) {
            let (r0, r1) = (b.slice_rows[s].0 as usize, b.slice_rows[s].1 as usize);
            assert!(r1 - r0 <= slice.width as usize);
            for y in 0..r1 - r0 {
                for x in 0..c1 - c0 {
                    let v: f32 = (0..rr).map(|q| b_at(offsets[s] as usize + y, q) * a_at(q, x)).sum();
                    let at = (module_offset[s] + r0 + y) * full_in + c0 + x;
                    assert!(full[at].is_nan() || full[at] == v, "{path}: ranks disagree at {at}");
                    full[at] = v;
                }
            }
        }
    }
    assert!(full.iter().all(|v| !v.is_nan()), "{path}: some of ΔW is held by no rank");
    (full, out, full_in)
}

/// Asserts that, in `slot`, buffer `i`'s A rows past `rank` in group `g`'s block and B columns
/// past `rank` in group `g`'s slices are zero on every rank (rank 0: the whole group is zero).
pub fn assert_group_padding_zero(plan: &Plan, pool: &HostPool, slot: usize, i: usize, g: usize, rank: usize) {
    let size = plan.lora.dtype.size_bytes() as usize;
    for (k, r) in plan.ranks.iter().enumerate() {
        let b = &r.lora_buffers[i];
        let l = &b.layout;
        let values = decode(pool.rank_bytes(k), plan.lora.dtype);
        let (rr, in_l, out_l, cr) =
            (l.max_rank() as usize, l.in_features() as usize, l.out_features() as usize, l.intermediate_width() as usize);
        let (ea, eb) = l.experts().map_or((1, 1), |d| (d.a.get() as usize, d.b.get() as usize));
        let slots = l.slots() as u64;
        let a_base = b.a_offset as usize / size + slot * (l.a_elements() / slots) as usize;
        let b_base = b.b_offset as usize / size + slot * (l.b_elements() / slots) as usize;
        for j in 0..ea {
            for q in rank..rr {
                let row = a_base + (j * cr + g * rr + q) * in_l;
                assert!(values[row..row + in_l].iter().all(|v| *v == 0.0), "{}: A row {q} of group {g} not zero on rank {k}", b.module);
            }
        }
        let offsets = l.slice_offsets();
        for j in 0..eb {
            for (s, slice) in l.slices().iter().enumerate().filter(|(_, s)| s.group as usize == g) {
                for y in 0..slice.width as usize {
                    let row = b_base + (j * out_l + offsets[s] as usize + y) * rr;
                    // Rows this rank's shard pads (past its slice_rows) are zero whole.
                    let first_zero = if y < (b.slice_rows[s].1 - b.slice_rows[s].0) as usize { rank } else { 0 };
                    assert!(
                        values[row + first_zero..row + rr].iter().all(|v| *v == 0.0),
                        "{}: B row {y} not zero-padded on rank {k}",
                        b.module
                    );
                }
            }
        }
    }
}

/// Byte → slot owner for one rank (None: alignment gaps between buffers).
pub fn slot_owner(plan: &Plan, rank: usize) -> Vec<Option<usize>> {
    let r = &plan.ranks[rank];
    let size = plan.lora.dtype.size_bytes();
    let mut owner = vec![None; r.memory.lora_pool as usize];
    for b in &r.lora_buffers {
        let slots = u64::from(b.layout.slots());
        for (offset, elements) in [(b.a_offset, b.layout.a_elements()), (b.b_offset, b.layout.b_elements())] {
            let per = elements / slots * size;
            for s in 0..slots {
                let start = (offset + s * per) as usize;
                owner[start..start + per as usize].fill(Some(s as usize));
            }
        }
    }
    owner
}

/// Deterministic values in [-0.1, 0.1) (an LCG; no extra dev-dependency).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// A scratch directory under the test target dir (removed first if left by an earlier run).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lorac-adapters").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes a PEFT-style adapter: `config` merged over a plain LoRA config, and f32 tensors.
pub fn write_adapter(name: &str, config: serde_json::Value, tensors: &[Tensor]) -> PathBuf {
    let dir = scratch(name);
    let mut cfg = serde_json::json!({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false, "use_dora": false, "bias": "none",
        "fan_in_fan_out": false, "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["q_proj"]
    });
    for (k, v) in config.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, shape, v)| (n.clone(), shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, shape, data)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).expect("view"))
        })
        .collect();
    let file = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.join("adapter_model.safetensors"), file).expect("write tensors");
    dir
}

/// A LoRA pair for `path` (`[r, n_in]`, `[n_out, r]`) with values from `seed`.
pub fn lora_pair(path: &str, r: usize, n_in: usize, n_out: usize, seed: u64) -> [Tensor; 2] {
    [
        (format!("base_model.model.{path}.lora_A.weight"), vec![r, n_in], values(seed, r * n_in)),
        (format!("base_model.model.{path}.lora_B.weight"), vec![n_out, r], values(seed + 1_000_000, n_out * r)),
    ]
}

/// Asserts ΔW of `path` in the pool equals `scale · B · A` of the given pair (f32 pools).
pub fn assert_delta(plan: &Plan, pool: &HostPool, slot: usize, path: &str, pair: &[Tensor], scale: f32) {
    let a = (pair[0].1.clone(), pair[0].2.clone());
    let b = (pair[1].1.clone(), pair[1].2.clone());
    let (want, _, n_out, n_in) = expected_delta(&a, &b, scale);
    let (got, out, inp) = pool_delta(plan, pool, slot, path);
    assert_eq!((out, inp), (n_out, n_in), "{path}");
    for (e, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!((w - g).abs() <= 1e-6 + 1e-5 * w.abs(), "{path}: ΔW[{}] is {g}, expected {w}", e);
    }
}
