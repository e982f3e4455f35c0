//! Each compiler rule checked against numbers computed by hand.

use std::path::PathBuf;

use lorac_compiler::passes::shard::{split, vocab_split};
use lorac_compiler::{CompileError, CompileOptions, compile};
use lorac_models::spec::ShardUnit;
use lorac_plan::{MoeLoraMode, Plan};

fn config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/configs").join(name)
}

const LLAMA: &str = "meta-llama__Meta-Llama-3.1-8B.json";
const DEEPSEEK: &str = "deepseek-ai__DeepSeek-V3.json";

fn plan_with(name: &str, opts: CompileOptions) -> Plan {
    compile(&config(name), &opts).unwrap()
}

fn plan(name: &str, tp: u32, targets: &[&str]) -> Plan {
    plan_with(name, CompileOptions::new(tp, 16, 8, targets).unwrap())
}

fn modules(p: &Plan) -> Vec<String> {
    let mut m: Vec<String> = p.ranks[0].lora_buffers.iter().map(|b| b.module.clone()).collect();
    m.sort();
    m.dedup();
    m
}

#[test]
fn head_splits_divide_or_replicate() {
    let q = ShardUnit::Heads { count: 32, head_dim: 128, field: "num_attention_heads", replicate_when_short: false };
    let s = split(&q, 8, "q").unwrap();
    assert_eq!((s.width, s.ranges[3]), (512, (1536, 2048)));
    let kv = ShardUnit::Heads { count: 8, head_dim: 128, field: "num_key_value_heads", replicate_when_short: true };
    let s = split(&kv, 16, "kv").unwrap();
    // Ranks 2h and 2h + 1 hold KV head h.
    assert_eq!(s.width, 128);
    assert_eq!(s.ranges[14], (7 * 128, 8 * 128));
    assert_eq!(s.ranges[15], (7 * 128, 8 * 128));
    assert!(matches!(split(&kv, 12, "kv"), Err(CompileError::Indivisible { .. })));
    assert!(matches!(split(&q, 64, "q"), Err(CompileError::Indivisible { .. })));
    let e = ShardUnit::Elements { width: 14336, field: "intermediate_size" };
    assert_eq!(split(&e, 8, "e").unwrap().width, 1792);
}

#[test]
fn vocab_is_padded_to_a_multiple_of_tp() {
    let s = vocab_split(100, 8);
    assert_eq!(s.width, 13);
    assert_eq!(s.ranges[0], (0, 13));
    assert_eq!(s.ranges[7], (91, 100));
}

#[test]
fn one_all_reduce_per_sublayer() {
    let count = |p: &Plan| p.nodes.iter().filter(|n| n.label == "all_reduce").count();
    assert_eq!(count(&plan(LLAMA, 1, &["all"])), 0);
    // Embedding (vocab-parallel) + o_proj and down_proj in each of 32 layers.
    assert_eq!(count(&plan(LLAMA, 2, &["all"])), 1 + 2 * 32);
    // MoE blocks reduce routed and shared experts together: still two per layer.
    assert_eq!(count(&plan(DEEPSEEK, 8, &["all"])), 1 + 2 * 61);
}

#[test]
fn all_linear_excludes_embedding_and_lm_head() {
    let m = modules(&plan(LLAMA, 1, &["all-linear"]));
    assert_eq!(m, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
    let m = modules(&plan(LLAMA, 1, &["all"]));
    assert!(m.contains(&"embed_tokens".to_string()) && m.contains(&"lm_head".to_string()));
}

#[test]
fn peft_names_reach_every_module_of_that_name() {
    // gate_proj lives in dense MLPs, shared experts and routed experts.
    let p = plan(DEEPSEEK, 8, &["gate_proj"]);
    assert_eq!(modules(&p), ["gate_up_proj", "gate_up_proj_moe"]);
    assert_eq!(p.ranks[0].lora_buffers.len(), 3 + 2 * 58);
    assert_eq!(p.lora.targets, ["gate_proj", "up_proj"]);
    // A fused name selects the whole fused module.
    let p = plan(LLAMA, 1, &["qkv_proj"]);
    assert_eq!(p.lora.targets, ["k_proj", "q_proj", "v_proj"]);
}

#[test]
fn shared_outer_moe_lora_has_expert_dim_one_on_the_outer_sides() {
    let mut opts = CompileOptions::new(8, 16, 8, &["all"]).unwrap();
    opts.moe_lora = MoeLoraMode::SharedOuter;
    let p = plan_with(DEEPSEEK, opts);
    let find = |m: &str| p.ranks[0].lora_buffers.iter().find(|b| b.layer == Some(3) && b.module == m).unwrap();
    let up = find("gate_up_proj_moe");
    assert_eq!((up.layout.a_shape(), up.layout.b_shape()), (vec![8, 1, 32, 7168], vec![8, 256, 512, 16]));
    let down = find("down_proj_moe");
    assert_eq!((down.layout.a_shape(), down.layout.b_shape()), (vec![8, 256, 16, 256], vec![8, 1, 7168, 16]));
}

#[test]
fn caches_by_hand() {
    let mut opts = CompileOptions::new(8, 16, 8, &["all"]).unwrap();
    opts.kv_cache_tokens = 1000;
    opts.kv_page_size = std::num::NonZeroU32::new(8).unwrap();
    // 32 layers × (K + V) × 1 KV head per rank × 128 × 2 bytes × 1000 tokens.
    assert_eq!(plan_with(LLAMA, opts.clone()).ranks[0].memory.kv_cache, 32 * 2 * 128 * 2 * 1000);
    // MLA caches the 512-wide latent plus the 64-wide rope key, whole on every rank.
    assert_eq!(plan_with(DEEPSEEK, opts.clone()).ranks[0].memory.kv_cache, 61 * (512 + 64) * 2 * 1000);
    // Nemotron-H 56B, tp 8, 256 sequences, bf16 state (no mamba_ssm_cache_dtype): per Mamba
    // layer the conv window (256·64/8 x channels + 2 × 1 group × 256 B/C channels, 3 steps) and
    // the SSM state (256/8 heads × 64 × 256).
    let p = plan_with("nvidia__Nemotron-H-56B-Base-8K.json", opts);
    let mamba_layers = 54u64;
    let conv = (256 * 64 / 8 + 2 * 256) * 3 * 2;
    let ssm = (256 / 8) * 64 * 256 * 2;
    assert_eq!(p.ranks[0].memory.state_cache, mamba_layers * (conv + ssm) * 256);
}

#[test]
fn weights_by_hand() {
    // Llama-3.1-8B at tp 1: embedding + lm_head + 32 × (qkv + o + gate/up/down + 2 norms) + final norm.
    let (h, v, i, kv) = (4096u64, 128256u64, 14336u64, 1024u64);
    let per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h;
    let elements = 2 * v * h + 32 * per_layer + h;
    assert_eq!(plan(LLAMA, 1, &["all"]).ranks[0].memory.weights, 2 * elements);
    // At tp 8 everything splits except the norms.
    let norms = 32 * 2 * h + h;
    assert_eq!(plan(LLAMA, 8, &["all"]).ranks[0].memory.weights, 2 * ((elements - norms) / 8 + norms));
}

#[test]
fn lora_pool_by_hand() {
    // Llama-3.1-8B, tp 8, S = 8, R = 16, all targets, bf16 (all buffers are 256-byte multiples).
    let s = 8 * 16;
    let per_layer = s * (3 * 4096 + 768) + s * (512 + 4096) + s * (2 * 4096 + 3584) + s * (1792 + 4096);
    let edges = s * (16032 + 4096) * 2;
    assert_eq!(plan(LLAMA, 8, &["all"]).ranks[0].memory.lora_pool, 2 * (32 * per_layer + edges));
}

/// No two activations alive at the same time share arena bytes (in-place LoRA updates share
/// their base's bytes by design).
#[test]
fn arena_offsets_never_collide_while_live() {
    for (name, tp) in [(LLAMA, 2), (DEEPSEEK, 8), ("nvidia__NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json", 4)] {
        let p = plan(name, tp, &["all"]);
        let mut life = vec![(usize::MAX, 0usize); p.values.len()];
        for (at, node) in p.nodes.iter().enumerate() {
            for v in node.inputs.iter().chain(&node.outputs) {
                let l = &mut life[v.0 as usize];
                *l = (l.0.min(at), l.1.max(at));
            }
        }
        let in_place = |a: usize, b: usize| {
            let (x, y) = (&p.values[a].name, &p.values[b].name);
            x.strip_suffix(".lora") == Some(y.as_str()) || y.strip_suffix(".lora") == Some(x.as_str())
        };
        for a in 0..p.values.len() {
            for b in a + 1..p.values.len() {
                let (la, lb) = (life[a], life[b]);
                let (va, vb) = (&p.values[a], &p.values[b]);
                let live_together = la.0 <= lb.1 && lb.0 <= la.1;
                let overlap = va.arena_offset < vb.arena_offset + vb.bytes && vb.arena_offset < va.arena_offset + va.bytes;
                assert!(!(live_together && overlap && !in_place(a, b)), "{name}: {} and {} collide", va.name, vb.name);
            }
        }
        assert!(p.values.iter().all(|v| v.arena_offset + v.bytes <= p.ranks[0].memory.activations));
    }
}

/// The plan's nodes name exactly the checkpoint's tensors: every tensor of each tiny
/// transformers-made checkpoint is read by some node, and every name a node reads exists.
#[test]
fn node_weights_cover_the_checkpoint_exactly() {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
    for name in ["llama", "qwen3", "qwen3_moe", "deepseek_v3", "qwen3_next", "qwen3_5", "qwen3_5_moe", "nemotron_h"] {
        let dir = tiny.join(name);
        let p = compile(&dir, &CompileOptions::new(1, 8, 2, &["all"]).unwrap()).unwrap();
        let found = lorac_compiler::weights::read_checkpoint_shapes(&dir).unwrap().unwrap();
        let patterns: std::collections::BTreeSet<&str> = p.nodes.iter().flat_map(|n| n.weights.iter().map(String::as_str)).collect();
        let matches = |pattern: &str, tensor: &str| match pattern.split_once("{expert}") {
            Some((head, tail)) => {
                tensor.starts_with(head)
                    && tensor.ends_with(tail)
                    && tensor.len() > head.len() + tail.len()
                    && tensor[head.len()..tensor.len() - tail.len()].bytes().all(|b| b.is_ascii_digit())
            }
            None => pattern == tensor,
        };
        for tensor in found.keys().filter(|t| !t.starts_with("model.visual.")) {
            assert!(patterns.iter().any(|p| matches(p, tensor)), "{name}: no node reads {tensor}");
        }
        for pattern in &patterns {
            assert!(found.keys().any(|t| matches(pattern, t)), "{name}: a node reads {pattern}, which the checkpoint lacks");
        }
    }
}

/// Every linear, embedding and LoRA node carries its linear's role (the LoRA nodes the role
/// of the linear they adapt), and a dense decoder layer runs q|k|v, o, gate|up, down in order.
#[test]
fn linear_nodes_carry_their_roles() {
    use lorac_plan::{KernelSpec, LinearRole};
    for name in [LLAMA, DEEPSEEK, "Qwen__Qwen3-Next-80B-A3B-Instruct.json", "nvidia__Nemotron-H-56B-Base-8K.json"] {
        let p = plan(name, 1, &["all"]);
        for node in &p.nodes {
            let linear = matches!(
                node.kernel.map(|k| &p.kernels[k.0 as usize]),
                Some(
                    KernelSpec::Gemm { .. }
                        | KernelSpec::GroupedGemm { .. }
                        | KernelSpec::EmbeddingGather { .. }
                        | KernelSpec::LoraShrink(_)
                        | KernelSpec::LoraExpand(_)
                        | KernelSpec::LoraEmbeddingShrink(_)
                        | KernelSpec::MoeLoraShrink(_)
                        | KernelSpec::MoeLoraExpand(_)
                )
            );
            assert_eq!(node.role.is_some(), linear, "{name}: node `{}`", node.label);
        }
    }
    let p = plan(LLAMA, 1, &["all"]);
    let layer0: Vec<LinearRole> = p.nodes.iter().filter(|n| n.layer == Some(0) && n.lora_buffer.is_none()).filter_map(|n| n.role).collect();
    assert_eq!(layer0, [LinearRole::AttentionQkv, LinearRole::AttentionOut, LinearRole::MlpUp, LinearRole::MlpDown]);
    let outside: Vec<LinearRole> = p.nodes.iter().filter(|n| n.layer.is_none() && n.lora_buffer.is_none()).filter_map(|n| n.role).collect();
    assert_eq!(outside, [LinearRole::Embedding, LinearRole::LmHead]);
}

#[test]
fn kv_cache_tokens_fill_whole_pages() {
    let mut opts = CompileOptions::new(1, 16, 8, &["all"]).unwrap();
    opts.kv_cache_tokens = 1000;
    let err = compile(&config(LLAMA), &opts).unwrap_err().to_string();
    assert_eq!(err, "--kv-cache-tokens: 1000 is not a positive multiple of the KV page size (16 tokens, --kv-page-size)");
    opts.kv_page_size = std::num::NonZeroU32::new(8).unwrap();
    let plan = plan_with(LLAMA, opts);
    assert_eq!((plan.limits.kv_cache_tokens, plan.limits.kv_page_size), (1000, 8));
}

#[test]
fn softmax_scales_by_hand() {
    let opts = CompileOptions::new(1, 16, 8, &["all"]).unwrap();
    // Llama-3.1-8B: head_dim 128.
    assert_eq!(plan_with(LLAMA, opts.clone()).model.softmax_scale, Some(1.0 / 128f64.sqrt()));
    // DeepSeek-V3: qk head 128 + 64; yarn factor 40 with mscale_all_dim 1 gives
    // mscale = 0.1 · ln 40 + 1 = 1.36888794541..., applied squared.
    let mscale = 0.1 * 40f64.ln() + 1.0;
    let scale = plan_with(DEEPSEEK, opts.clone()).model.softmax_scale.unwrap();
    assert!((scale - mscale * mscale / 192f64.sqrt()).abs() < 1e-15, "{scale}");
    assert!((scale - 0.135_233_8).abs() < 1e-6, "{scale}");
    // Nemotron-H attention layers: attention_head_dim 128.
    assert_eq!(plan_with("nvidia__Nemotron-H-56B-Base-8K.json", opts).model.softmax_scale, Some(1.0 / 128f64.sqrt()));
}

#[test]
fn dtype_overrides_the_config() {
    let bf16 = plan(LLAMA, 1, &["all"]);
    let mut opts = CompileOptions::new(1, 16, 8, &["all"]).unwrap();
    opts.dtype = Some(lorac_plan::DType::F32);
    let f32 = plan_with(LLAMA, opts.clone());
    assert_eq!((bf16.model.dtype, bf16.lora.dtype), (lorac_plan::DType::BF16, lorac_plan::DType::BF16));
    // Weights, KV cache and adapter pool all follow the override (4 bytes instead of 2).
    assert_eq!((f32.model.dtype, f32.lora.dtype), (lorac_plan::DType::F32, lorac_plan::DType::F32));
    let (m16, m32) = (&bf16.ranks[0].memory, &f32.ranks[0].memory);
    assert_eq!((m32.weights, m32.kv_cache, m32.lora_pool), (2 * m16.weights, 2 * m16.kv_cache, 2 * m16.lora_pool));
    // --lora-dtype still wins for the adapter pool.
    opts.lora_dtype = Some(lorac_plan::DType::BF16);
    assert_eq!(plan_with(LLAMA, opts.clone()).lora.dtype, lorac_plan::DType::BF16);
    // Only float dtypes.
    opts.dtype = Some(lorac_plan::DType::I32);
    let err = compile(&config(LLAMA), &opts).unwrap_err().to_string();
    assert_eq!(err, "--dtype: i32 is not a float dtype (expected f32, bf16 or f16)");
    // fp8-declared weights are not converted.
    opts.dtype = Some(lorac_plan::DType::BF16);
    let err = opts.model_dtype(lorac_plan::DType::F8E4M3).unwrap_err().to_string();
    assert_eq!(err, "--dtype: the checkpoint stores f8e4m3 (block-quantised) weights, which are not converted to bf16");
}
