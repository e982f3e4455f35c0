//! Weights: the tensors a checkpoint must hold (full shapes), what each rank stores, and the
//! check of a model directory's safetensors against the graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lorac_models::ModelSpec;
use lorac_models::spec::{LinearKind, LinearSpec, ParamShard, ParamSpec, WeightFormat};
use lorac_plan::DType;

use crate::error::CompileError;
use crate::ir::*;
use crate::passes::shard::split;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<u64>,
}

/// The checkpoint tensors of one linear layer with their full shapes; routed experts keep the
/// `{expert}` placeholder in their names.
pub fn linear_tensors(spec: &LinearSpec) -> Vec<ExpectedTensor> {
    let mut out = Vec::new();
    for module in &spec.modules {
        let (out_f, in_f) = match spec.kind {
            // The embedding table is [vocab, hidden]: its "input" is the vocabulary.
            LinearKind::Embedding => (u64::from(spec.in_features), u64::from(module.out_features())),
            _ => (u64::from(module.out_features()), u64::from(spec.in_features)),
        };
        out.push(ExpectedTensor { name: format!("{}.weight", module.path), shape: vec![out_f, in_f] });
        if spec.bias {
            out.push(ExpectedTensor { name: format!("{}.bias", module.path), shape: vec![out_f] });
        }
        if let WeightFormat::Fp8Block { block } = spec.format {
            let b = u64::from(block);
            out.push(ExpectedTensor {
                name: format!("{}.weight_scale_inv", module.path),
                shape: vec![out_f.div_ceil(b), in_f.div_ceil(b)],
            });
        }
    }
    out
}

/// Full (unsharded) shapes of every tensor the graph reads, under checkpoint names.
pub fn expected_tensors(spec: &ModelSpec, g: &Graph) -> Vec<ExpectedTensor> {
    let mut out = Vec::new();
    for linear in g.linears.values() {
        if linear.spec.kind == LinearKind::LmHead && spec.tie_word_embeddings {
            continue;
        }
        let experts = linear.spec.experts.map_or(1, |e| e.count);
        for t in linear_tensors(&linear.spec) {
            for e in 0..experts {
                out.push(ExpectedTensor { name: t.name.replace("{expert}", &e.to_string()), shape: t.shape.clone() });
            }
        }
    }
    for p in spec.params() {
        out.push(ExpectedTensor { name: p.path.clone(), shape: p.shape.iter().map(|d| u64::from(*d)).collect() });
    }
    out
}

fn param_rank_bytes(p: &ParamSpec, tp: u32, dtype: DType) -> Result<u64, CompileError> {
    let mut shape: Vec<u64> = p.shape.iter().map(|d| u64::from(*d)).collect();
    if let ParamShard::Split { dim, parts } = &p.shard {
        shape[*dim] = parts.iter().map(|u| split(u, tp, &p.path).map(|s| u64::from(s.width))).sum::<Result<u64, _>>()?;
    }
    Ok(shape.iter().product::<u64>() * p.dtype.unwrap_or(dtype).size_bytes())
}

/// Bytes of weights one rank holds (all ranks hold the same amount).
pub fn rank_weight_bytes(spec: &ModelSpec, g: &Graph, tp: u32) -> Result<u64, CompileError> {
    let dtype = spec.dtype;
    let mut total = 0;
    for linear in g.linears.values() {
        if linear.spec.kind == LinearKind::LmHead && spec.tie_word_embeddings {
            continue;
        }
        let shard = linear.shard.as_ref().ok_or(CompileError::Verify { pass: "weights", message: "linear without shard".into() })?;
        let (out_f, in_f) = (u64::from(shard.out_features()), u64::from(shard.in_features));
        let experts = shard.experts.as_ref().map_or(1, |(local, _)| u64::from(*local));
        let per_expert = match linear.spec.format {
            WeightFormat::Plain => out_f * in_f * dtype.size_bytes(),
            WeightFormat::Fp8Block { block } => out_f * in_f + out_f.div_ceil(u64::from(block)) * in_f.div_ceil(u64::from(block)) * 4,
        };
        let bias = if linear.spec.bias { out_f * dtype.size_bytes() } else { 0 };
        total += experts * (per_expert + bias);
    }
    for p in spec.params() {
        total += param_rank_bytes(p, tp, dtype)?;
    }
    Ok(total)
}

/// The checkpoint files of a model directory: the index's shards when there is an index,
/// otherwise `model.safetensors` or `model-*.safetensors` shards (other safetensors files,
/// such as adapters or saved references, are not the model). Empty when there are none.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, CompileError> {
    let io = |path: &Path, e: std::io::Error| CompileError::Weights { path: path.to_path_buf(), message: e.to_string() };
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| CompileError::Weights { path: index.clone(), message: e.to_string() })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CompileError::Weights { path: index.clone(), message: "no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "model.safetensors" || (name.starts_with("model-") && name.ends_with(".safetensors")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every safetensors header in `dir` (memory-mapped; no tensor data is read).
pub fn read_checkpoint_shapes(dir: &Path) -> Result<Option<BTreeMap<String, Vec<u64>>>, CompileError> {
    let files = safetensors_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let mut shapes = BTreeMap::new();
    for file in files {
        let bad = |message: String| CompileError::Weights { path: file.clone(), message };
        let handle = std::fs::File::open(&file).map_err(|e| bad(e.to_string()))?;
        // SAFETY: the map is read-only and lives only while the header is parsed; a file
        // changed underneath would at worst give a parse error.
        let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| bad(e.to_string()))?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        for (name, info) in metadata.tensors() {
            shapes.insert(name, info.shape.iter().map(|d| *d as u64).collect());
        }
    }
    Ok(Some(shapes))
}

/// Compares a checkpoint with the tensors the graph expects; lists every difference.
pub fn check_checkpoint(spec: &ModelSpec, g: &Graph, found: &BTreeMap<String, Vec<u64>>) -> Result<(), CompileError> {
    const SHOWN: usize = 20;
    let expected = expected_tensors(spec, g);
    let mut problems = Vec::new();
    for t in &expected {
        match found.get(&t.name) {
            None => problems.push(format!("missing tensor {} (expected shape {:?})", t.name, t.shape)),
            Some(shape) if *shape != t.shape => {
                problems.push(format!("tensor {} has shape {:?}, config.json implies {:?}", t.name, shape, t.shape))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    for name in found.keys() {
        let ignored = spec.ignored_weight_prefixes.iter().any(|p| name.starts_with(p.as_str()));
        if !known.contains(name.as_str()) && !ignored {
            problems.push(format!("unexpected tensor {name} (not part of the model config.json describes)"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    let extra = total.saturating_sub(SHOWN);
    problems.truncate(SHOWN);
    if extra > 0 {
        problems.push(format!("... and {extra} more"));
    }
    Err(CompileError::WeightMismatch { total, problems })
}
