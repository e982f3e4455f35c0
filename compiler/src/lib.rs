//! The lorac compiler: config.json → dataflow graph → sharding → LoRA insertion → kernel
//! selection → memory plan → `plan.bin`. The pipeline is the plain sequence in [`compile_spec`];
//! each pass lives in its own file under `passes/` with its contract at the top, and the
//! verifier runs after each pass in debug builds.

pub mod dot;
pub mod emit;
pub mod error;
pub mod ir;
pub mod lower;
pub mod options;
pub mod passes;
pub mod verify;
pub mod weights;

use std::path::Path;

use lorac_models::{ConfigFile, ModelSpec};
use lorac_plan::{Limits, LoraSettings, ModelSummary, Parallel, Plan, Source};

pub use error::CompileError;
pub use options::CompileOptions;

use crate::passes::{kernels, lora, memory, shard};

fn verify_if_debug(g: &ir::Graph, pass: &'static str) -> Result<(), CompileError> {
    if cfg!(debug_assertions) { verify::verify(g, pass) } else { Ok(()) }
}

/// The one QKᵀ scale the model's softmax-attention layers share (the plan carries a single
/// value, so layers that disagree are refused rather than silently given the first one's).
fn softmax_scale(spec: &ModelSpec) -> Result<Option<f64>, CompileError> {
    let mut scales = spec.layers.iter().filter_map(|l| l.mixer.as_ref()?.softmax_scale());
    let Some(first) = scales.next() else { return Ok(None) };
    match scales.find(|s| *s != first) {
        Some(other) => Err(CompileError::Verify {
            pass: "lower",
            message: format!("attention layers use different softmax scales ({first} and {other})"),
        }),
        None => Ok(Some(first)),
    }
}

/// Compiles a model directory (or a config file inside one). When the directory holds a
/// safetensors checkpoint, its tensor names and shapes are checked against the graph.
pub fn compile(model_path: &Path, opts: &CompileOptions) -> Result<Plan, CompileError> {
    let (cfg, spec) = lorac_models::load(model_path)?;
    let dir = if model_path.is_dir() { Some(model_path) } else { model_path.parent().filter(|p| p.is_dir()) };
    let checkpoint = match dir {
        Some(dir) => weights::read_checkpoint_shapes(dir)?,
        None => None,
    };
    compile_spec(&cfg, &spec, opts, checkpoint.as_ref())
}

/// The pipeline, on an already described model.
pub fn compile_spec(
    cfg: &ConfigFile,
    spec: &ModelSpec,
    opts: &CompileOptions,
    checkpoint: Option<&std::collections::BTreeMap<String, Vec<u64>>>,
) -> Result<Plan, CompileError> {
    opts.validate()?;
    // `--dtype` replaces the checkpoint's dtype everywhere the spec's is read (weight bytes,
    // kernel dtypes, activations, caches, the adapter pool's default).
    let converted;
    let spec = match opts.model_dtype(spec.dtype)? {
        dtype if dtype != spec.dtype => {
            converted = ModelSpec { dtype, ..spec.clone() };
            &converted
        }
        _ => spec,
    };
    let (tp, ep) = (opts.tp.get(), opts.ep.get());
    let lora_dtype = opts.lora_dtype.unwrap_or(spec.dtype.activation());

    let mut g = lower::lower(spec);
    verify_if_debug(&g, "lower")?;

    shard::run(&mut g, tp, ep).map_err(|e| e.in_config_section(&spec.config_section))?;
    verify_if_debug(&g, "shard")?;

    if let Some(found) = checkpoint {
        weights::check_checkpoint(spec, &g, found)?;
    }

    let selection = lora::select(&g, &opts.targets, &spec.model_type)?;
    let lora_opts =
        lora::LoraOptions { targets: &opts.targets, max_rank: opts.max_lora_rank, max_loras: opts.max_loras, moe_lora: opts.moe_lora };
    lora::run(&mut g, &lora_opts, &selection)?;
    verify_if_debug(&g, "lora")?;

    let (max_batch_tokens, max_seqs) = (opts.max_batch_tokens.get(), opts.max_seqs.get());
    let kernel_opts = kernels::KernelOptions { tp, max_batch_tokens, max_seqs, weight_dtype: spec.dtype, lora_dtype };
    kernels::run(&mut g, &kernel_opts)?;
    verify_if_debug(&g, "kernels")?;

    let cache_dtype = spec.dtype.activation();
    let mem_opts = memory::MemoryOptions { tp, max_batch_tokens, max_seqs, kv_cache_tokens: opts.kv_cache_tokens, cache_dtype };
    let activations = memory::plan_activations(&g, &mem_opts);
    let totals = emit::RankTotals {
        weights: weights::rank_weight_bytes(spec, &g, tp)?,
        kv_cache: memory::kv_cache_bytes(&g, &mem_opts)?,
        state_cache: memory::state_cache_bytes(&g, &mem_opts)?,
    };

    Ok(emit::emit(emit::EmitInput {
        graph: &g,
        activations: &activations,
        totals,
        source: Source {
            model_dir: cfg.path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
            config_sha256: lorac_plan::fingerprint(&cfg.bytes),
            compiler_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        model: ModelSummary {
            model_type: spec.model_type.clone(),
            num_layers: spec.num_layers(),
            hidden_size: spec.hidden_size,
            vocab_size: spec.vocab_size,
            dtype: spec.dtype,
            tie_word_embeddings: spec.tie_word_embeddings,
            norm: spec.norm,
            rope: spec.rope.clone(),
            max_position_embeddings: spec.max_position_embeddings,
            softmax_scale: softmax_scale(spec)?,
        },
        parallel: Parallel { tp, ep },
        lora: LoraSettings {
            max_rank: opts.max_lora_rank.get(),
            max_loras: opts.max_loras.get(),
            requested: opts.targets.clone(),
            targets: selection.modules,
            moe_lora: opts.moe_lora,
            dtype: lora_dtype,
        },
        limits: Limits { max_batch_tokens, max_seqs, kv_cache_tokens: opts.kv_cache_tokens, kv_page_size: opts.kv_page_size.get() },
    }))
}
