//! Every bad adapter is refused with a message naming what is wrong, and a refusal leaves the
//! pool byte-for-byte as it was. All messages live in one snapshot so they read side by side.

mod common;

use std::fmt::Write as _;
use std::path::Path;

use common::*;
use lorac_adapters::{HostPool, LoadedAdapter};
use lorac_plan::{MoeLoraMode, Plan};

fn bytes(pool: &HostPool, plan: &Plan) -> Vec<Vec<u8>> {
    (0..plan.ranks.len()).map(|k| pool.rank_bytes(k).to_vec()).collect()
}

/// Loads `dir` and, if accepted, writes it into a free slot (the server's path); returns the
/// outcome as text. A refusal must leave the pool unchanged.
fn attempt(pool: &mut HostPool, plan: &Plan, dir: &Path, name: Option<&str>) -> String {
    let before = bytes(pool, plan);
    let loaded = LoadedAdapter::load(dir, plan).map(|a| match name {
        Some(n) => a.with_name(n),
        None => a,
    });
    let outcome = loaded.and_then(|adapter| {
        let slot = pool.free_slot().expect("tests keep a slot free");
        pool.write_slot(slot, &adapter).map(|()| (slot, adapter))
    });
    match outcome {
        Ok((slot, adapter)) => {
            let modules: Vec<String> = adapter.modules().iter().map(|m| format!("{} (rank {})", m.module, m.rank)).collect();
            pool.clear_slot(slot).expect("clear");
            format!("accepted into slot {slot}: {}", modules.join(", "))
        }
        Err(e) => {
            assert_eq!(before, bytes(pool, plan), "refusing {} changed the pool", dir.display());
            format!("refused: {e}")
        }
    }
}

#[test]
fn bad_adapters_are_refused_with_clear_messages() {
    let repo = repo();
    // The README's supported maximum: rank 64.
    let plan = plan("llama", 2, 64, 3, &["all"], None);
    let mut pool = HostPool::new(&plan).expect("pool");
    pool.write_slot(0, &LoadedAdapter::load(&tiny("llama").join("adapters/A"), &plan).expect("A loads")).expect("write A");
    let mut report = String::new();

    let bad = tiny("llama").join("bad_adapters");
    let mut dirs: Vec<_> =
        std::fs::read_dir(&bad).expect("bad_adapters").map(|e| e.expect("entry").path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    assert_eq!(dirs.len(), 8, "one case per bad adapter in the fixture README");
    for dir in &dirs {
        let name = dir.file_name().expect("name").to_string_lossy().into_owned();
        let outcome = attempt(&mut pool, &plan, dir, None);
        // lm_head_only is a valid PEFT adapter and this plan targets lm_head: it loads.
        assert_eq!(outcome.starts_with("accepted"), name == "lm_head_only", "{name}: {outcome}");
        writeln!(report, "bad_adapters/{name} (llama tp2, max rank 64, targets all):\n  {outcome}\n").expect("write");
    }

    let mut case = |title: &str, plan: &Plan, pool: &mut HostPool, dir: &Path, name: Option<&str>| {
        let outcome = attempt(pool, plan, dir, name);
        assert!(outcome.starts_with("refused"), "{title}: {outcome}");
        writeln!(report, "{title}:\n  {outcome}\n").expect("write");
    };
    let llama = |n: &str| tiny("llama").join("adapters").join(n);
    case("adapters/A again under the same name", &plan, &mut pool, &llama("A"), None);

    let narrow = common::plan("llama", 2, 16, 2, &["q_proj", "v_proj"], None);
    let mut narrow_pool = HostPool::new(&narrow).expect("pool");
    case("adapters/B on a plan targeting q_proj, v_proj", &narrow, &mut narrow_pool, &llama("B"), None);
    let small = common::plan("llama", 1, 8, 2, &["all"], None);
    let mut small_pool = HostPool::new(&small).expect("pool");
    case("adapters/C (rank 16) on a plan with max rank 8", &small, &mut small_pool, &llama("C"), None);
    case("a directory that does not exist", &plan, &mut pool, &bad.join("no_such_adapter"), None);

    // Hand-made adapters for what the fixtures do not cover.
    let q = lora_pair("model.layers.0.self_attn.q_proj", 8, 64, 64, 1);
    let synthetic: Vec<(&str, serde_json::Value, Vec<Tensor>)> = vec![
        ("config: r is a string", serde_json::json!({"r": "8"}), q.to_vec()),
        ("config: bias = all", serde_json::json!({"bias": "all"}), q.to_vec()),
        ("config: fan_in_fan_out", serde_json::json!({"fan_in_fan_out": true}), q.to_vec()),
        ("config: r = 4 but tensors have rank 8", serde_json::json!({"r": 4}), q.to_vec()),
        ("config: ambiguous rank_pattern", serde_json::json!({"rank_pattern": {"q_proj": 8, "self_attn\\.q_proj": 4}}), q.to_vec()),
        ("tensors: lora_B without lora_A", serde_json::json!({}), vec![q[1].clone()]),
        ("tensors: lora_A.weight on the embedding", serde_json::json!({}), lora_pair("model.embed_tokens", 8, 512, 64, 5).to_vec()),
        (
            "tensors: a module the model does not have",
            serde_json::json!({}),
            lora_pair("model.layers.7.self_attn.q_proj", 8, 64, 64, 6).to_vec(),
        ),
        ("tensors: none", serde_json::json!({}), vec![]),
    ];
    for (i, (title, config, tensors)) in synthetic.into_iter().enumerate() {
        let dir = write_adapter(&format!("refusal-{i}"), config, &tensors);
        case(title, &plan, &mut pool, &dir, None);
    }
    let not_json = write_adapter("refusal-not-json", serde_json::json!({}), &q);
    std::fs::write(not_json.join("adapter_config.json"), "{\"r\": 8,").expect("write");
    case("config: not JSON", &plan, &mut pool, &not_json, None);
    let empty = write_adapter("refusal-empty-file", serde_json::json!({}), &q);
    std::fs::write(empty.join("adapter_model.safetensors"), b"").expect("write");
    case("tensors: empty file", &plan, &mut pool, &empty, None);

    let moe = plan_with("qwen3_moe", 1, 1, 8, 2, &["all"], None, MoeLoraMode::SharedOuter);
    let mut moe_pool = HostPool::new(&moe).expect("pool");
    let experts: Vec<_> = (0..4u64).flat_map(|e| lora_pair(&format!("model.layers.0.mlp.experts.{e}.down_proj"), 4, 16, 64, e)).collect();
    let dir = write_adapter("refusal-shared-outer", serde_json::json!({"r": 4}), &experts);
    case("qwen3_moe shared-outer plan, per-expert down_proj B differ", &moe, &mut moe_pool, &dir, None);

    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lorac-adapters");
    let report = report.replace(&tmp.display().to_string(), "[TMP]").replace(&repo.display().to_string(), "[REPO]");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(repo.join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!("adapter_load_errors", report));
}
