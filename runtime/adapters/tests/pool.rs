//! Adapters written into the host pool reproduce PEFT's ΔW = scale · B · A on every rank.

mod common;

use std::collections::BTreeSet;

use common::*;
use lorac_adapters::{AdapterError, HostPool, LoadedAdapter};
use lorac_plan::{DType, Plan};

/// Checks every module of the adapter in `dir`, loaded into `slot`: ΔW reassembled from the
/// pool equals scale · B · A from the file (f32: to rounding; bf16: within two bf16 roundings
/// of each term), rank padding is zero, and groups the adapter does not train are zero.
fn check_adapter(plan: &Plan, pool: &HostPool, slot: usize, dir: &std::path::Path) -> usize {
    let tensors = read_tensors(&dir.join("adapter_model.safetensors"));
    let scale = peft_scale(dir);
    let mut trained = BTreeSet::new();
    for (name, a) in &tensors {
        let (module, b_name) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, format!("{m}.lora_B.weight"))
        } else if let Some(m) = name.strip_suffix(".lora_embedding_A") {
            (m, format!("{m}.lora_embedding_B"))
        } else {
            continue;
        };
        let path = module.strip_prefix("base_model.model.").expect("PEFT prefix");
        let b = &tensors[&b_name];
        let (want, magnitude, n_out, n_in) = expected_delta(a, b, scale);
        let (got, out, inp) = pool_delta(plan, pool, slot, path);
        assert_eq!((out, inp), (n_out, n_in), "{path}: ΔW shape");
        let rel = match plan.lora.dtype {
            DType::F32 => 1e-5,
            // Each of A and scale·B is rounded once to bf16 (8 bits of mantissa).
            _ => 2.0 * 2f32.powi(-8) * 1.01,
        };
        for (e, ((w, g), m)) in want.iter().zip(&got).zip(&magnitude).enumerate() {
            assert!(
                (w - g).abs() <= rel * m + 1e-7,
                "{path}: ΔW[{}, {}] is {g}, expected {w} (dtype {})",
                e / n_in,
                e % n_in,
                plan.lora.dtype
            );
        }
        let (i, g, _) = locate(plan, path);
        assert_group_padding_zero(plan, pool, slot, i, g, a.0[0]);
        assert_eq!(pool.slot(slot).expect("occupied").ranks[i][g], a.0[0] as u32, "{path}: recorded rank");
        assert!((pool.slot(slot).expect("occupied").scales[i][g] - scale).abs() < 1e-6);
        trained.insert((i, g));
    }
    // Everything the adapter does not train is zero in its slot.
    for (i, b) in plan.ranks[0].lora_buffers.iter().enumerate() {
        for g in 0..b.layout.groups() as usize {
            if !trained.contains(&(i, g)) {
                assert_group_padding_zero(plan, pool, slot, i, g, 0);
                assert_eq!(pool.slot(slot).expect("occupied").ranks[i][g], 0);
            }
        }
    }
    trained.len()
}

#[test]
fn llama_adapters_reproduce_peft_delta_on_every_rank() {
    for dtype in [None, Some(DType::BF16)] {
        for tp in [1, 2] {
            let plan = plan("llama", tp, 16, 4, &["all"], dtype);
            assert_eq!(plan.lora.dtype, dtype.unwrap_or(DType::F32));
            let mut pool = HostPool::new(&plan).expect("pool");
            assert_eq!(pool.rank_bytes(0).len() as u64, plan.ranks[0].memory.lora_pool);
            let mut modules = Vec::new();
            for (slot, name) in [(3, "A"), (0, "B"), (1, "C")] {
                let dir = tiny("llama").join("adapters").join(name);
                let adapter = LoadedAdapter::load(&dir, &plan).unwrap_or_else(|e| panic!("adapter {name}: {e}"));
                assert_eq!(adapter.name(), name);
                pool.write_slot(slot, &adapter).expect("free slot");
                assert_eq!(pool.find(name), Some(slot));
                modules.push(adapter.modules().len());
            }
            // A: 7 modules × 2 layers, B: 4 × 2, C: 3 × 2 + embed_tokens + lm_head.
            assert_eq!(modules, vec![14, 8, 8]);
            assert_eq!(check_adapter(&plan, &pool, 3, &tiny("llama").join("adapters/A")), 14);
            assert_eq!(check_adapter(&plan, &pool, 0, &tiny("llama").join("adapters/B")), 8);
            assert_eq!(check_adapter(&plan, &pool, 1, &tiny("llama").join("adapters/C")), 8);
            // The free slot is all zeros.
            for k in 0..plan.ranks.len() {
                let owner = slot_owner(&plan, k);
                assert!(pool.rank_bytes(k).iter().zip(&owner).all(|(byte, o)| *o != Some(2) || *byte == 0));
            }
            assert_eq!(pool.slot_rank(1, 0), 16, "C's embedding rank");
            assert_eq!(pool.slot_rank(0, 0), 0, "B leaves the embedding alone");
        }
    }
}

#[test]
fn qwen3_tied_embeddings_keep_separate_embedding_and_lm_head_lora() {
    for tp in [1, 2] {
        let plan = plan("qwen3", tp, 16, 2, &["all"], None);
        assert!(plan.model.tie_word_embeddings, "the fixture ties lm_head to the embedding");
        let mut pool = HostPool::new(&plan).expect("pool");
        let dir = tiny("qwen3").join("adapters/C");
        let adapter = LoadedAdapter::load(&dir, &plan).expect("qwen3 C loads");
        pool.write_slot(1, &adapter).expect("write");
        assert_eq!(check_adapter(&plan, &pool, 1, &dir), 8);
        // The two deltas are different matrices: the embedding's is [hidden, vocab] from
        // lora_embedding_*, lm_head's [vocab, hidden] from lora_A/B.
        let (embed, eo, ei) = pool_delta(&plan, &pool, 1, "model.embed_tokens");
        let (head, ho, hi) = pool_delta(&plan, &pool, 1, "lm_head");
        assert_eq!((eo, ei, ho, hi), (64, 512, 512, 64));
        let transposed: Vec<f32> = (0..512 * 64).map(|e| embed[(e % 64) * 512 + e / 64]).collect();
        assert_ne!(transposed, head);
        for name in ["A", "B"] {
            let other = LoadedAdapter::load(&tiny("qwen3").join("adapters").join(name), &plan).expect("qwen3 adapters load");
            let slot = pool.free_slot().expect("a free slot");
            pool.write_slot(slot, &other).expect("write");
            check_adapter(&plan, &pool, slot, &tiny("qwen3").join("adapters").join(name));
            pool.clear_slot(slot).expect("clear");
        }
    }
}

#[test]
fn write_and_clear_touch_exactly_one_slot() {
    let plan = plan("llama", 2, 16, 4, &["all"], Some(DType::BF16));
    let mut pool = HostPool::new(&plan).expect("pool");
    let load = |name: &str| LoadedAdapter::load(&tiny("llama").join("adapters").join(name), &plan).expect("loads");
    let (a, b, c) = (load("A"), load("B"), load("C"));
    pool.write_slot(0, &a).expect("write A");
    pool.write_slot(1, &c).expect("write C");
    let owners: Vec<_> = (0..2).map(|k| slot_owner(&plan, k)).collect();
    let unchanged_except = |before: &[Vec<u8>], pool: &HostPool, slot: usize| {
        for (k, owner) in owners.iter().enumerate() {
            for (at, ((x, y), o)) in before[k].iter().zip(pool.rank_bytes(k)).zip(owner).enumerate() {
                assert!(x == y || *o == Some(slot), "rank {k} byte {at} (slot {o:?}) changed");
            }
        }
    };
    let snapshot = |pool: &HostPool| -> Vec<Vec<u8>> { (0..2).map(|k| pool.rank_bytes(k).to_vec()).collect() };

    let before = snapshot(&pool);
    pool.write_slot(2, &b).expect("write B");
    unchanged_except(&before, &pool, 2);
    assert_ne!(before, snapshot(&pool));

    // Refusals leave every byte as it was.
    let before = snapshot(&pool);
    let e = pool.write_slot(2, &a.clone().with_name("A2")).expect_err("occupied");
    assert!(matches!(e, AdapterError::SlotOccupied { slot: 2, .. }), "{e}");
    let e = pool.write_slot(3, &a).expect_err("same name");
    assert!(matches!(e, AdapterError::AlreadyLoaded { slot: 0, .. }), "{e}");
    let e = pool.write_slot(4, &a.clone().with_name("A2")).expect_err("no slot 4");
    assert!(matches!(e, AdapterError::SlotOutOfRange { slot: 4, slots: 4 }), "{e}");
    let tp1 = common::plan("llama", 1, 16, 4, &["all"], Some(DType::BF16));
    let foreign = LoadedAdapter::load(&tiny("llama").join("adapters/B"), &tp1).expect("loads").with_name("B-tp1");
    let e = pool.write_slot(3, &foreign).expect_err("other plan");
    assert!(matches!(e, AdapterError::PlanMismatch { .. }), "{e}");
    assert_eq!(before, snapshot(&pool));

    // Clearing zeroes exactly one slot and frees it.
    let before = snapshot(&pool);
    assert_eq!(pool.clear_slot(0).expect("clear"), Some("A".to_string()));
    unchanged_except(&before, &pool, 0);
    for (k, owner) in owners.iter().enumerate() {
        assert!(pool.rank_bytes(k).iter().zip(owner).all(|(byte, o)| *o != Some(0) || *byte == 0));
    }
    assert!(pool.slot(0).is_none());
    assert_eq!(pool.free_slot(), Some(0));
    // The regions the pool reports for a slot are exactly the bytes the plan gives it.
    for (k, owner) in owners.iter().enumerate() {
        let mut mine: Vec<usize> = pool.slot_regions(k, 2).into_iter().flat_map(|(s, e)| s..e).collect();
        mine.sort_unstable();
        let expected: Vec<usize> = owner.iter().enumerate().filter(|(_, o)| **o == Some(2)).map(|(at, _)| at).collect();
        assert_eq!(mine, expected);
    }
    assert_eq!(pool.clear_slot(0).expect("clear again"), None);

    // The freed slot takes the same adapter again, and the others still check out.
    pool.write_slot(0, &a).expect("rewrite A");
    check_adapter(&plan, &pool, 0, &tiny("llama").join("adapters/A"));
    check_adapter(&plan, &pool, 1, &tiny("llama").join("adapters/C"));
    check_adapter(&plan, &pool, 2, &tiny("llama").join("adapters/B"));
}
