//! What `lorac inspect` shows: human tables and the `--json` contract.

use comfy_table::{Table, presets::ASCII_MARKDOWN};
use lorac_plan::{LoraBuffer, Memory, Plan, RankPlan};
use serde_json::{Value, json};

/// The machine-readable contract of `lorac inspect --json`.
pub fn json(plan: &Plan) -> Value {
    json!({
        "format_version": lorac_plan::FORMAT_VERSION,
        "model": {
            "model_type": plan.model.model_type,
            "num_layers": plan.model.num_layers,
            "hidden_size": plan.model.hidden_size,
            "vocab_size": plan.model.vocab_size,
            "dtype": plan.model.dtype.name(),
            "tie_word_embeddings": plan.model.tie_word_embeddings,
            "rms_norm_eps": plan.model.norm.eps,
            "norm_unit_offset": plan.model.norm.unit_offset,
            "rope": plan.model.rope.as_ref().map(|r| json!({
                "theta": r.theta,
                "rotary_dim": r.rotary_dim,
                "scaling": format!("{:?}", r.scaling),
            })),
            "softmax_scale": plan.model.softmax_scale,
        },
        "source": {
            "model_dir": plan.source.model_dir,
            "config_sha256": hex(&plan.source.config_sha256),
            "compiler_version": plan.source.compiler_version,
        },
        "parallel": { "tp": plan.parallel.tp, "ep": plan.parallel.ep },
        "lora": {
            "max_rank": plan.lora.max_rank,
            "max_loras": plan.lora.max_loras,
            "targets": plan.lora.targets,
            "requested": plan.lora.requested,
            "moe_lora": format!("{:?}", plan.lora.moe_lora),
            "dtype": plan.lora.dtype.name(),
        },
        "limits": {
            "max_batch_tokens": plan.limits.max_batch_tokens,
            "max_seqs": plan.limits.max_seqs,
            "kv_cache_tokens": plan.limits.kv_cache_tokens,
            "kv_page_size": plan.limits.kv_page_size,
        },
        "kernels": plan.kernels.len(),
        "ranks": plan.ranks.iter().map(rank_json).collect::<Vec<_>>(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn rank_json(rank: &RankPlan) -> Value {
    json!({
        "rank": rank.rank,
        "lora_buffers": rank.lora_buffers.iter().map(|b| json!({
            "layer": b.layer,
            "module": b.module,
            "parallel": b.parallel.name(),
            "experts": b.layout.experts().map(|e| e.a.get().max(e.b.get())),
            "a_shape": b.layout.a_shape(),
            "b_shape": b.layout.b_shape(),
            "slices": b.layout.slices().iter().map(|s| json!({"name": s.name, "width": s.width})).collect::<Vec<_>>(),
            "hf_modules": b.hf_modules,
            "hf_paths": b.hf_paths,
            "slice_rows": b.slice_rows,
            "input_cols": b.input_cols,
            "expert_range": b.experts,
        })).collect::<Vec<_>>(),
        "memory": memory_json(&rank.memory),
    })
}

fn memory_json(m: &Memory) -> Value {
    json!({
        "weights": m.weights,
        "lora_pool": m.lora_pool,
        "activations": m.activations,
        "kv_cache": m.kv_cache,
        "state_cache": m.state_cache,
        "total": m.total,
    })
}

/// "0-2, 5, 7-60"
fn layer_ranges(layers: &[Option<u32>]) -> String {
    let numbers: Vec<u32> = layers.iter().filter_map(|l| *l).collect();
    if numbers.is_empty() {
        return "-".into();
    }
    let mut parts = Vec::new();
    let mut start = numbers[0];
    let mut prev = numbers[0];
    for &n in &numbers[1..] {
        if n != prev + 1 {
            parts.push(if start == prev { start.to_string() } else { format!("{start}-{prev}") });
            start = n;
        }
        prev = n;
    }
    parts.push(if start == prev { start.to_string() } else { format!("{start}-{prev}") });
    parts.join(", ")
}

fn shape(s: &[u64]) -> String {
    format!("[{}]", s.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
}

/// A buffer's shape signature: layers whose buffers share it are shown on one row.
fn signature(b: &LoraBuffer) -> String {
    let slices: Vec<String> = b.layout.slices().iter().map(|s| format!("{} {}", s.name, s.width)).collect();
    format!("{}|{}|{}|{}|{}", b.module, b.parallel.name(), shape(&b.layout.a_shape()), shape(&b.layout.b_shape()), slices.join(", "))
}

/// One rank's LoRA buffers, layers with identical buffers folded into one row.
pub fn buffer_table(rank: &RankPlan) -> String {
    let mut rows: Vec<(String, Vec<Option<u32>>, &LoraBuffer)> = Vec::new();
    for b in &rank.lora_buffers {
        let sig = signature(b);
        match rows.iter_mut().find(|(s, _, _)| *s == sig) {
            Some((_, layers, _)) => layers.push(b.layer),
            None => rows.push((sig, vec![b.layer], b)),
        }
    }
    let mut table = Table::new();
    table.load_preset(ASCII_MARKDOWN);
    table.set_header(["layers", "module", "parallel", "experts", "A shape", "B shape", "slices (per rank)"]);
    for (_, layers, b) in rows {
        let slices: Vec<String> = b.layout.slices().iter().map(|s| format!("{} {}", s.name, s.width)).collect();
        let experts = b.layout.experts().map_or("-".to_string(), |e| format!("{}/{}", e.a, e.b));
        table.add_row([
            layer_ranges(&layers),
            b.module.clone(),
            b.parallel.name().to_string(),
            experts,
            shape(&b.layout.a_shape()),
            shape(&b.layout.b_shape()),
            slices.join(", "),
        ]);
    }
    table.to_string()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

pub fn memory_table(plan: &Plan) -> String {
    let mut table = Table::new();
    table.load_preset(ASCII_MARKDOWN);
    table.set_header(["rank", "weights", "lora_pool", "activations", "kv_cache", "state_cache", "total"]);
    let mut shown: Vec<(Vec<u32>, Memory)> = Vec::new();
    for r in &plan.ranks {
        match shown.iter_mut().find(|(_, m)| *m == r.memory) {
            Some((ranks, _)) => ranks.push(r.rank),
            None => shown.push((vec![r.rank], r.memory)),
        }
    }
    for (ranks, m) in shown {
        let label = layer_ranges(&ranks.iter().map(|r| Some(*r)).collect::<Vec<_>>());
        table.add_row([label, mib(m.weights), mib(m.lora_pool), mib(m.activations), mib(m.kv_cache), mib(m.state_cache), mib(m.total)]);
    }
    table.to_string()
}

/// Ranks whose buffers have exactly rank 0's shapes (they differ only in which rows,
/// columns and experts of the full weights they hold).
fn same_shapes(a: &RankPlan, b: &RankPlan) -> bool {
    a.lora_buffers.len() == b.lora_buffers.len()
        && a.lora_buffers.iter().zip(&b.lora_buffers).all(|(x, y)| x.layer == y.layer && x.module == y.module && x.layout == y.layout)
}

/// "gemm ×6, lora_shrink ×4, ..." in first-use order.
fn kernel_families(plan: &Plan) -> String {
    let mut families: Vec<(&str, usize)> = Vec::new();
    for k in &plan.kernels {
        match families.iter_mut().find(|(f, _)| *f == k.family()) {
            Some((_, n)) => *n += 1,
            None => families.push((k.family(), 1)),
        }
    }
    families.iter().map(|(f, n)| format!("{f} ×{n}")).collect::<Vec<_>>().join(", ")
}

/// The full human report of `lorac inspect`.
pub fn human(plan: &Plan) -> String {
    let m = &plan.model;
    let mut out = String::new();
    out.push_str(&format!(
        "model: {} ({} layers, hidden {}, vocab {}, {})\nparallel: tp {}, ep {}\nlora: max rank {}, max loras {}, {:?}, pool {}\n  targets: {}\nlimits: max batch tokens {}, max seqs {}, kv cache tokens {} (pages of {})\nkernels: {} distinct specialisations, {} nodes\n\n",
        m.model_type, m.num_layers, m.hidden_size, m.vocab_size, m.dtype,
        plan.parallel.tp, plan.parallel.ep,
        plan.lora.max_rank, plan.lora.max_loras, plan.lora.moe_lora, plan.lora.dtype,
        plan.lora.targets.join(" "),
        plan.limits.max_batch_tokens, plan.limits.max_seqs, plan.limits.kv_cache_tokens, plan.limits.kv_page_size,
        plan.kernels.len(), plan.nodes.len(),
    ));
    out.push_str(&format!("kernel families: {}\n", kernel_families(plan)));
    let norm = if m.norm.unit_offset { "rms_norm (1 + w)" } else { "rms_norm" };
    let rope = match &m.rope {
        Some(r) => format!("rope theta {}, rotary dim {}, {:?}", r.theta, r.rotary_dim, r.scaling),
        None => "no rope".into(),
    };
    let attention = match m.softmax_scale {
        Some(scale) => format!(", softmax scale {scale}"),
        None => String::new(),
    };
    out.push_str(&format!("constants: {norm} eps {:e}, {rope}{attention}\n\n", m.norm.eps));
    let mut groups: Vec<Vec<&RankPlan>> = Vec::new();
    for r in &plan.ranks {
        match groups.iter_mut().find(|g| same_shapes(g[0], r)) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    for group in groups {
        let ranks = layer_ranges(&group.iter().map(|r| Some(r.rank)).collect::<Vec<_>>());
        out.push_str(&format!("LoRA buffers, ranks {ranks} (same shapes):\n{}\n\n", buffer_table(group[0])));
    }
    out.push_str(&format!("memory per rank:\n{}\n", memory_table(plan)));
    out
}
