//! Reading one PEFT adapter directory and validating it, completely, against a plan.
//!
//! [`LoadedAdapter::load`] reads `adapter_config.json` and `adapter_model.safetensors`, maps
//! every tensor to a plan buffer and checks names, pairs, shapes, ranks and dtypes. Nothing
//! here touches a pool: a refused adapter cannot leave anything half written, and an accepted
//! one can be written into any free slot by [`crate::HostPool::write_slot`] without further
//! checks on its content.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use lorac_plan::Plan;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::config::AdapterConfig;
use crate::error::AdapterError;
use crate::layout::PoolLayout;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// One module's factors, in f32, unsharded: `a` is `[rank, full_in]`, `b` is
/// `[full_out, rank]` with the PEFT scale already multiplied in (see [`crate::HostPool`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Factors {
    pub rank: u32,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The adapter's LoRA on one HF module of one plan buffer (one group of a fused buffer).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModuleDelta {
    pub buffer: usize,
    pub group: usize,
    /// Expert index (0 for a module without experts) → its factors.
    pub experts: BTreeMap<u32, Factors>,
}

/// What the adapter does to one HF module, for reports and for the runtime's bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleInfo {
    /// Checkpoint path of the module (`model.layers.0.self_attn.q_proj`; routed experts with
    /// their index).
    pub module: String,
    /// Index into each rank's `lora_buffers`, and the group (A block) inside it.
    pub buffer: usize,
    pub group: usize,
    pub rank: u32,
    /// PEFT's scaling for this module (already folded into the pool's B).
    pub scale: f32,
}

/// A fully validated adapter, ready to be written into any free slot of a pool built from the
/// same plan.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    name: String,
    dir: PathBuf,
    pub(crate) layout: PoolLayout,
    pub(crate) modules: Vec<ModuleDelta>,
    infos: Vec<ModuleInfo>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

#[derive(Default)]
struct Pair<'a> {
    a: Option<&'a str>,
    b: Option<&'a str>,
    embedding: bool,
}

/// Splits a tensor name into (module path, A/B, embedding form), or says why it is refused.
fn classify(name: &str) -> Result<(&str, Side, bool), String> {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return Err(format!("does not start with `{PREFIX}`, so it is not a PEFT LoRA tensor"));
    };
    const FORMS: [(&str, Side, bool); 4] = [
        (".lora_A.weight", Side::A, false),
        (".lora_B.weight", Side::B, false),
        (".lora_embedding_A", Side::A, true),
        (".lora_embedding_B", Side::B, true),
    ];
    for (suffix, side, embedding) in FORMS {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((module, side, embedding));
        }
    }
    Err(if rest.contains("lora_magnitude_vector") {
        "is a DoRA magnitude vector; DoRA is not supported by lorac".into()
    } else if rest.contains("trainable_tokens") || rest.contains("token_adapter") {
        "holds trained embeddings for added tokens; added tokens are not supported by lorac".into()
    } else if rest.ends_with(".lora_B.bias") {
        "is a bias on lora_B (lora_bias); LoRA biases are not supported by lorac".into()
    } else if rest.ends_with(".weight") || rest.ends_with(".bias") {
        "is a full module weight (modules_to_save?); only LoRA A/B tensors can be served".into()
    } else {
        "is not a LoRA A/B tensor (`.lora_A.weight`, `.lora_B.weight`, `.lora_embedding_A`, `.lora_embedding_B`)".into()
    })
}

/// Where a module path lands in the plan: buffer, group and, for routed experts, the expert.
struct Targets {
    exact: BTreeMap<String, (usize, usize)>,
    /// (prefix, suffix, buffer, group) of `{expert}` paths.
    experts: Vec<(String, String, usize, usize)>,
}

impl Targets {
    fn of(layout: &PoolLayout) -> Targets {
        let mut exact = BTreeMap::new();
        let mut experts = Vec::new();
        for (i, b) in layout.ranks[0].0.iter().enumerate() {
            for (g, path) in b.hf_paths.iter().enumerate() {
                match path.split_once("{expert}") {
                    Some((pre, post)) => experts.push((pre.to_string(), post.to_string(), i, g)),
                    None => {
                        exact.insert(path.clone(), (i, g));
                    }
                }
            }
        }
        Targets { exact, experts }
    }

    fn find(&self, module: &str) -> Option<(usize, usize, Option<u32>)> {
        if let Some(&(b, g)) = self.exact.get(module) {
            return Some((b, g, None));
        }
        self.experts.iter().find_map(|(pre, post, b, g)| {
            let index = module.strip_prefix(pre.as_str())?.strip_suffix(post.as_str())?;
            if index.is_empty() || !index.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            index.parse().ok().map(|e| (*b, *g, Some(e)))
        })
    }
}

fn read_f32(file: &Path, name: &str, view: &TensorView) -> Result<Vec<f32>, AdapterError> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(AdapterError::Dtype { file: file.to_path_buf(), tensor: name.to_string(), dtype: format!("{other:?}") }),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err(AdapterError::NonFinite { file: file.to_path_buf(), tensor: name.to_string() });
    }
    Ok(values)
}

fn map_file(file: &Path) -> Result<memmap2::Mmap, AdapterError> {
    let io = |source| AdapterError::Io { file: file.to_path_buf(), source };
    let handle = File::open(file).map_err(|source| {
        let bin = file.with_file_name("adapter_model.bin");
        if source.kind() == std::io::ErrorKind::NotFound && bin.exists() {
            AdapterError::Unreadable {
                file: file.to_path_buf(),
                message: format!("missing; {} exists but pickle checkpoints are not read (convert it to safetensors)", bin.display()),
            }
        } else {
            io(source)
        }
    })?;
    let len = handle.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(AdapterError::Unreadable { file: file.to_path_buf(), message: "the file is empty".into() });
    }
    // SAFETY: the map is read-only and lives only while this adapter is being loaded; every
    // value is copied out before it is dropped. A file truncated by another process while
    // mapped is outside what this loader defends against (as for every mmap-based loader).
    unsafe { memmap2::Mmap::map(&handle) }.map_err(io)
}

impl LoadedAdapter {
    /// Reads and validates the adapter in `dir` against `plan`; its name is the directory's
    /// last component (see [`LoadedAdapter::with_name`]).
    pub fn load(dir: &Path, plan: &Plan) -> Result<LoadedAdapter, AdapterError> {
        let layout = PoolLayout::of(plan)?;
        let config = AdapterConfig::read(dir)?;
        let file = dir.join(WEIGHTS_FILE);
        let map = map_file(&file)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| AdapterError::Unreadable { file: file.clone(), message: e.to_string() })?;
        let unexpected =
            |tensor: &str, reason: String| AdapterError::UnexpectedTensor { file: file.clone(), tensor: tensor.to_string(), reason };

        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        let mut pairs: BTreeMap<&str, Pair> = BTreeMap::new();
        for name in &names {
            let (module, side, embedding) = classify(name).map_err(|reason| unexpected(name, reason))?;
            let pair = pairs.entry(module).or_default();
            if (pair.a.is_some() || pair.b.is_some()) && pair.embedding != embedding {
                return Err(unexpected(name, format!("mixes `lora_A/B.weight` and `lora_embedding_A/B` names for module `{module}`")));
            }
            pair.embedding = embedding;
            match side {
                Side::A => pair.a = Some(name),
                Side::B => pair.b = Some(name),
            }
        }
        if pairs.is_empty() {
            return Err(AdapterError::Empty { file });
        }

        let targets = Targets::of(&layout);
        let mut deltas: BTreeMap<(usize, usize), ModuleDelta> = BTreeMap::new();
        let mut infos = Vec::new();
        for (module, pair) in &pairs {
            let any = pair.a.or(pair.b).unwrap_or(module);
            let hf_module = module.rsplit('.').next().unwrap_or(module).to_string();
            let Some((buffer, group, expert)) = targets.find(module) else {
                if layout.targets.contains(&hf_module) {
                    let plan_paths = layout.ranks[0]
                        .0
                        .iter()
                        .flat_map(|b| b.hf_modules.iter().zip(&b.hf_paths))
                        .filter(|(m, _)| **m == hf_module)
                        .map(|(_, p)| p.clone())
                        .collect();
                    return Err(AdapterError::UnknownModule { file, tensor: any.to_string(), module: module.to_string(), plan_paths });
                }
                return Err(AdapterError::OutsidePlan {
                    file,
                    tensor: any.to_string(),
                    module: module.to_string(),
                    plan_targets: layout.targets.clone(),
                });
            };
            let info = &layout.info[buffer];
            if let (Some(e), Some(total)) = (expert, info.total_experts)
                && e >= total
            {
                return Err(unexpected(any, format!("names expert {e} but the model has {total} routed experts")));
            }
            let (a_suffix, b_suffix) =
                if pair.embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
            let (a_name, b_name) = match (pair.a, pair.b) {
                (Some(a), Some(b)) => (a, b),
                (Some(a), None) => {
                    return Err(AdapterError::MissingTensor { file, missing: format!("{PREFIX}{module}.{b_suffix}"), present: a.into() });
                }
                (None, Some(b)) => {
                    return Err(AdapterError::MissingTensor { file, missing: format!("{PREFIX}{module}.{a_suffix}"), present: b.into() });
                }
                (None, None) => return Err(AdapterError::Empty { file }),
            };
            if pair.embedding != info.embedding {
                let wanted = if info.embedding { "`lora_embedding_A` / `lora_embedding_B`" } else { "`lora_A.weight` / `lora_B.weight`" };
                return Err(unexpected(
                    any,
                    format!(
                        "the plan's `{module}` is {}, whose LoRA tensors are {wanted}",
                        if info.embedding { "an embedding" } else { "a linear layer" }
                    ),
                ));
            }
            let tensor = |name: &str| {
                st.tensor(name).map_err(|e| AdapterError::Unreadable { file: file.clone(), message: format!("tensor `{name}`: {e}") })
            };
            let (a_view, b_view) = (tensor(a_name)?, tensor(b_name)?);
            let full_in = u64::from(info.full_in);
            let full_out = u64::from(info.group_out[group]);
            let a_shape: Vec<u64> = a_view.shape().iter().map(|d| *d as u64).collect();
            let b_shape: Vec<u64> = b_view.shape().iter().map(|d| *d as u64).collect();
            let shape_err = |tensor: &str, expected: Vec<u64>, found: &[u64], why: String| AdapterError::ShapeMismatch {
                file: file.clone(),
                tensor: tensor.to_string(),
                expected,
                found: found.to_vec(),
                why,
            };
            let (in_what, out_what) = if info.embedding { ("vocab_size", "hidden size") } else { ("input features", "output features") };
            if a_shape.len() != 2 || a_shape[0] == 0 {
                return Err(shape_err(a_name, vec![u64::from(config.r), full_in], &a_shape, format!("[rank, {in_what}] with rank ≥ 1")));
            }
            let rank = a_shape[0];
            if rank > u64::from(layout.max_rank) {
                return Err(AdapterError::RankTooLarge {
                    file,
                    module: module.to_string(),
                    rank: u32::try_from(rank).unwrap_or(u32::MAX),
                    max_rank: layout.max_rank,
                });
            }
            let rank = rank as u32;
            if a_shape[1] != full_in {
                return Err(shape_err(a_name, vec![u64::from(rank), full_in], &a_shape, format!("[rank, {in_what}] of `{module}`")));
            }
            if b_shape != [full_out, u64::from(rank)] {
                return Err(shape_err(b_name, vec![full_out, u64::from(rank)], &b_shape, format!("[{out_what} of `{module}`, rank]")));
            }
            let (config_rank, field) = config.rank_of(module)?;
            if config_rank != rank {
                return Err(AdapterError::RankMismatch { file, module: module.to_string(), found: rank, config: config_rank, field });
            }
            let scale = config.scale_of(module)? as f32;
            let a = read_f32(&file, a_name, &a_view)?;
            let mut b = read_f32(&file, b_name, &b_view)?;
            for v in &mut b {
                *v *= scale;
            }
            infos.push(ModuleInfo { module: module.to_string(), buffer, group, rank, scale });
            deltas
                .entry((buffer, group))
                .or_insert_with(|| ModuleDelta { buffer, group, experts: BTreeMap::new() })
                .experts
                .insert(expert.unwrap_or(0), Factors { rank, scale, a, b });
        }

        // Shared-outer MoE LoRA keeps one A (gate/up side) or one B (down side) for all of a
        // rank's experts. A per-expert PEFT adapter fits only when those factors are equal for
        // every expert it trains (experts it leaves out get zeros on the other side, so their
        // delta stays zero whatever the shared factor holds).
        for delta in deltas.values() {
            for (a_side, side) in [(true, "A"), (false, "B")] {
                if !layout.shared(delta.buffer, a_side) {
                    continue;
                }
                let mut experts = delta.experts.iter();
                if let Some((first, f0)) = experts.next()
                    && let Some((other, _)) = experts.find(|(_, f)| f.rank != f0.rank || if a_side { f.a != f0.a } else { f.b != f0.b })
                {
                    let buffer = &layout.ranks[0].0[delta.buffer];
                    return Err(AdapterError::SharedOuter {
                        file,
                        module: buffer.hf_paths[delta.group].clone(),
                        side,
                        first: *first,
                        other: *other,
                    });
                }
            }
        }

        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(LoadedAdapter { name, dir: dir.to_path_buf(), layout, modules: deltas.into_values().collect(), infos })
    }

    /// Renames the adapter (the name the server registers it under).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every module the adapter trains, sorted by module path.
    pub fn modules(&self) -> &[ModuleInfo] {
        &self.infos
    }

    /// The largest rank among the adapter's modules.
    pub fn max_rank(&self) -> u32 {
        self.infos.iter().map(|m| m.rank).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_are_classified() {
        assert_eq!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Ok(("model.layers.0.self_attn.q_proj", Side::A, false))
        );
        assert_eq!(classify("base_model.model.lm_head.lora_B.weight"), Ok(("lm_head", Side::B, false)));
        assert_eq!(classify("base_model.model.model.embed_tokens.lora_embedding_A"), Ok(("model.embed_tokens", Side::A, true)));
        assert!(classify("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector").unwrap_err().contains("DoRA"));
        assert!(classify("base_model.model.model.embed_tokens.weight").unwrap_err().contains("modules_to_save"));
        assert!(classify("model.layers.0.self_attn.q_proj.lora_A.weight").unwrap_err().contains("base_model.model."));
    }
}
