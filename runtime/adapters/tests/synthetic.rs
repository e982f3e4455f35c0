//! Features the fixtures do not exercise, on adapters written here: per-module rank and alpha
//! (`rank_pattern` / `alpha_pattern`), routed experts (split by tp and by ep), shared-outer
//! MoE LoRA.

mod common;

use common::*;
use lorac_adapters::{AdapterError, HostPool, LoadedAdapter};
use lorac_plan::MoeLoraMode;

#[test]
fn rank_and_alpha_patterns_give_per_module_rank_and_scale() {
    let plan = plan("llama", 2, 16, 2, &["all"], None);
    let q = lora_pair("model.layers.0.self_attn.q_proj", 2, 64, 64, 1);
    let k = lora_pair("model.layers.0.self_attn.k_proj", 8, 64, 32, 2);
    let o = lora_pair("model.layers.1.self_attn.o_proj", 8, 64, 64, 3);
    let tensors: Vec<_> = [q.clone(), k.clone(), o.clone()].into_iter().flatten().collect();
    let dir = write_adapter(
        "patterns",
        serde_json::json!({"r": 8, "lora_alpha": 16, "use_rslora": true, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers\\.1\\.self_attn\\.o_proj": 4}}),
        &tensors,
    );
    let adapter = LoadedAdapter::load(&dir, &plan).expect("loads");
    let ranks: Vec<(String, u32)> = adapter.modules().iter().map(|m| (m.module.clone(), m.rank)).collect();
    assert_eq!(
        ranks,
        vec![
            ("model.layers.0.self_attn.k_proj".to_string(), 8),
            ("model.layers.0.self_attn.q_proj".to_string(), 2),
            ("model.layers.1.self_attn.o_proj".to_string(), 8)
        ]
    );
    let mut pool = HostPool::new(&plan).expect("pool");
    pool.write_slot(1, &adapter).expect("write");
    // rsLoRA: alpha / sqrt(r) with the module's own r and alpha.
    assert_delta(&plan, &pool, 1, "model.layers.0.self_attn.q_proj", &q, 16.0 / 2f32.sqrt());
    assert_delta(&plan, &pool, 1, "model.layers.0.self_attn.k_proj", &k, 16.0 / 8f32.sqrt());
    assert_delta(&plan, &pool, 1, "model.layers.1.self_attn.o_proj", &o, 4.0 / 8f32.sqrt());
    let (qkv, _, _) = locate(&plan, "model.layers.0.self_attn.q_proj");
    assert_eq!(pool.slot(1).expect("slot").ranks[qkv], vec![2, 8, 0]);
    assert_eq!(pool.slot_rank(1, qkv), 8);
    assert_group_padding_zero(&plan, &pool, 1, qkv, 0, 2);
    assert_group_padding_zero(&plan, &pool, 1, qkv, 2, 0);

    // A tensor rank that contradicts the config is refused.
    let dir = write_adapter("patterns-contradict", serde_json::json!({"r": 8, "rank_pattern": {"q_proj": 4}}), &q);
    let e = LoadedAdapter::load(&dir, &plan).expect_err("rank 2 vs rank_pattern 4");
    assert!(matches!(e, AdapterError::RankMismatch { found: 2, config: 4, .. }), "{e}");
}

fn expert_pairs(layer: u32, experts: &[u32], r: usize) -> Vec<(String, [Tensor; 2])> {
    let mut out = Vec::new();
    for &e in experts {
        for (m, n_in, n_out) in [("gate_proj", 64, 16), ("up_proj", 64, 16), ("down_proj", 16, 64)] {
            let path = format!("model.layers.{layer}.mlp.experts.{e}.{m}");
            let seed = 100 * u64::from(e) + n_in as u64 + 7 * m.len() as u64;
            out.push((path.clone(), lora_pair(&path, r, n_in, n_out, seed)));
        }
    }
    out
}

#[test]
fn routed_experts_per_expert_split_by_tp_and_ep() {
    // Expert 3 is not trained: its slot region must stay zero.
    let pairs = expert_pairs(0, &[0, 1, 2], 4);
    let tensors: Vec<_> = pairs.iter().flat_map(|(_, p)| p.clone()).collect();
    let dir = write_adapter("experts", serde_json::json!({"r": 4, "lora_alpha": 8}), &tensors);
    for (tp, ep) in [(1, 1), (2, 1), (2, 2)] {
        let plan = plan_with("qwen3_moe", tp, ep, 8, 2, &["all"], None, MoeLoraMode::PerExpert);
        let adapter = LoadedAdapter::load(&dir, &plan).unwrap_or_else(|e| panic!("tp {tp} ep {ep}: {e}"));
        let mut pool = HostPool::new(&plan).expect("pool");
        pool.write_slot(1, &adapter).expect("write");
        for (path, pair) in &pairs {
            assert_delta(&plan, &pool, 1, path, pair, 2.0);
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            let (untrained, _, _) = pool_delta(&plan, &pool, 1, &format!("model.layers.0.mlp.experts.3.{m}"));
            assert!(untrained.iter().all(|v| *v == 0.0), "tp {tp} ep {ep}: expert 3 {m} not zero");
        }
    }
    // An expert index past the model's experts is refused.
    let stray = lora_pair("model.layers.0.mlp.experts.4.gate_proj", 4, 64, 16, 9);
    let dir = write_adapter("experts-stray", serde_json::json!({"r": 4}), &stray);
    let plan = plan("qwen3_moe", 1, 8, 2, &["all"], None);
    let e = LoadedAdapter::load(&dir, &plan).expect_err("expert 4 of 4");
    assert!(e.to_string().contains("names expert 4 but the model has 4 routed experts"), "{e}");
}

#[test]
fn shared_outer_takes_only_adapters_whose_shared_factor_is_common() {
    let plan = plan_with("qwen3_moe", 2, 1, 8, 2, &["all"], None, MoeLoraMode::SharedOuter);
    // Distinct per-expert A on gate_proj: not representable with one shared A.
    let pairs = expert_pairs(1, &[0, 1, 2, 3], 4);
    let tensors: Vec<_> = pairs.iter().flat_map(|(_, p)| p.clone()).collect();
    let dir = write_adapter("shared-outer-distinct", serde_json::json!({"r": 4}), &tensors);
    let e = LoadedAdapter::load(&dir, &plan).expect_err("distinct A");
    assert!(matches!(e, AdapterError::SharedOuter { side: "A", .. }), "{e}");

    // Common A for gate/up and common B for down across experts: loads, and each expert's
    // delta comes out right.
    let mut pairs = pairs;
    let common: std::collections::BTreeMap<String, (Vec<f32>, Vec<f32>)> = pairs
        .iter()
        .filter(|(p, _)| p.contains("experts.0."))
        .map(|(p, pair)| (p.rsplit('.').next().expect("name").to_string(), (pair[0].2.clone(), pair[1].2.clone())))
        .collect();
    for (path, pair) in &mut pairs {
        let m = path.rsplit('.').next().expect("name");
        if m == "down_proj" {
            pair[1].2 = common["down_proj"].1.clone();
        } else {
            pair[0].2 = common[m].0.clone();
        }
    }
    let tensors: Vec<_> = pairs.iter().flat_map(|(_, p)| p.clone()).collect();
    let dir = write_adapter("shared-outer-common", serde_json::json!({"r": 4, "lora_alpha": 4}), &tensors);
    let adapter = LoadedAdapter::load(&dir, &plan).expect("common factors load");
    let mut pool = HostPool::new(&plan).expect("pool");
    pool.write_slot(0, &adapter).expect("write");
    for (path, pair) in &pairs {
        assert_delta(&plan, &pool, 0, path, pair, 1.0);
    }
}

#[test]
fn vocab_parallel_padding_rows_and_columns_stay_zero() {
    // vocab 510 over tp 4: each rank holds 128 vocab rows, the last only 126 real ones.
    let dir = scratch("llama-vocab-510");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny("llama").join("config.json")).expect("config")).expect("json");
    config["vocab_size"] = 510.into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).expect("json")).expect("write");
    let opts = lorac_compiler::CompileOptions::new(4, 8, 2, &["embed_tokens", "lm_head"]).expect("options");
    let plan = lorac_compiler::compile(&dir, &opts).expect("compiles from config alone");
    let head = lora_pair("lm_head", 8, 64, 510, 11);
    let embed: Vec<Tensor> = vec![
        ("base_model.model.model.embed_tokens.lora_embedding_A".into(), vec![8, 510], values(12, 8 * 510)),
        ("base_model.model.model.embed_tokens.lora_embedding_B".into(), vec![64, 8], values(13, 64 * 8)),
    ];
    let tensors: Vec<Tensor> = head.iter().cloned().chain(embed.iter().cloned()).collect();
    let adapter_dir = write_adapter("vocab-510", serde_json::json!({"r": 8, "lora_alpha": 8}), &tensors);
    let adapter = LoadedAdapter::load(&adapter_dir, &plan).expect("loads");
    let mut pool = HostPool::new(&plan).expect("pool");
    pool.write_slot(1, &adapter).expect("write");
    assert_delta(&plan, &pool, 1, "lm_head", &head, 1.0);
    assert_delta(&plan, &pool, 1, "model.embed_tokens", &embed, 1.0);
    let (lm_head, _, _) = locate(&plan, "lm_head");
    let (embedding, _, _) = locate(&plan, "model.embed_tokens");
    assert_eq!(plan.ranks[3].lora_buffers[lm_head].slice_rows, vec![(384, 510)]);
    assert_eq!(plan.ranks[3].lora_buffers[embedding].input_cols, (384, 510));
    assert_group_padding_zero(&plan, &pool, 1, lm_head, 0, 8);
    // The last rank's two padding columns of the embedding's A are zero.
    let b = &plan.ranks[3].lora_buffers[embedding];
    let l = &b.layout;
    let pool3 = decode(pool.rank_bytes(3), plan.lora.dtype);
    let a_base = b.a_offset as usize / 4 + (l.a_elements() / 2) as usize;
    for q in 0..8 {
        let row = a_base + q * l.in_features() as usize;
        assert_eq!(&pool3[row + 126..row + 128], &[0.0, 0.0], "A row {q}");
        assert!(pool3[row..row + 126].iter().any(|v| *v != 0.0));
    }
}
