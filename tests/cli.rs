//! The `lorac` binary end to end: compile the embedded tiny model, inspect it, draw a layer,
//! and refuse bad input with a one-line error (no panic, no backtrace).

mod common;

use std::process::Command;

fn lorac(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorac")).args(args).output().expect("lorac runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn compile_inspect_graph_on_the_tiny_llama() {
    let dir = std::env::temp_dir().join(format!("lorac-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.bin");
    let model = common::tiny("llama");
    let (ok, stdout, stderr) =
        lorac(&["compile", model.to_str().unwrap(), "--tp", "2", "--lora-target-modules", "all", "-o", plan.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("wrote "), "{stdout}");

    let (ok, stdout, stderr) = lorac(&["inspect", plan.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["format_version"], lorac_plan::FORMAT_VERSION);
    assert_eq!(report["limits"]["kv_page_size"], 16);
    assert_eq!(report["model"]["softmax_scale"], 0.25); // head_dim 16
    assert_eq!(report["model"]["model_type"], "llama");
    assert_eq!(report["model"]["num_layers"], 2);
    assert_eq!(report["parallel"]["tp"], 2);
    assert_eq!(report["lora"]["max_rank"], 16);
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    // Tiny llama: hidden 64, 4 heads × 16, 2 KV heads: per rank q 32, k 16, v 16.
    let qkv = ranks[1]["lora_buffers"].as_array().unwrap().iter().find(|b| b["module"] == "qkv_proj" && b["layer"] == 1).unwrap();
    assert_eq!(qkv["parallel"], "column");
    assert_eq!(qkv["experts"], serde_json::Value::Null);
    assert_eq!(qkv["a_shape"], serde_json::json!([8, 48, 64]));
    assert_eq!(qkv["b_shape"], serde_json::json!([8, 64, 16]));
    assert_eq!(
        qkv["slices"],
        serde_json::json!([{"name": "q_proj", "width": 32}, {"name": "k_proj", "width": 16}, {"name": "v_proj", "width": 16}])
    );
    let embed = ranks[0]["lora_buffers"].as_array().unwrap().iter().find(|b| b["module"] == "embed_tokens").unwrap();
    assert_eq!(embed["layer"], serde_json::Value::Null);
    for key in ["weights", "lora_pool", "activations", "kv_cache", "state_cache", "total"] {
        assert!(ranks[0]["memory"][key].is_u64(), "memory.{key}");
    }
    let m = &ranks[0]["memory"];
    let sum: u64 = ["weights", "lora_pool", "activations", "kv_cache", "state_cache"].iter().map(|k| m[*k].as_u64().unwrap()).sum();
    assert_eq!(m["total"].as_u64().unwrap(), sum);

    let (ok, stdout, _) = lorac(&["inspect", plan.to_str().unwrap()]);
    assert!(ok && stdout.contains("| qkv_proj") && stdout.contains("memory per rank"), "{stdout}");

    let (ok, stdout, stderr) = lorac(&["graph", plan.to_str().unwrap(), "--layer", "1", "--dot"]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("digraph layer1 {") && stdout.contains("lora_shrink qkv_proj") && stdout.trim_end().ends_with('}'));

    let (ok, _, stderr) = lorac(&["graph", plan.to_str().unwrap(), "--layer", "9"]);
    assert!(!ok && stderr.starts_with("error: --layer 9"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("lorac-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"this is not a plan at all, just some text!!!!!!!!!!!!!").unwrap();
    let model = common::tiny("llama");
    let llama = model.to_str().unwrap();
    for (args, expected) in [
        (vec!["inspect", junk.to_str().unwrap()], "not a lorac plan"),
        (vec!["inspect", "/nonexistent/plan.bin"], "cannot read /nonexistent/plan.bin"),
        (vec!["compile", llama, "--max-lora-rank", "0"], "--max-lora-rank: must be at least 1"),
        (vec!["compile", llama, "--tp", "3"], "config field `num_attention_heads` = 4 is not divisible by tp 3"),
        (vec!["compile", llama, "--lora-target-modules", "nope"], "unknown LoRA target module `nope`"),
    ] {
        let (ok, _, stderr) = lorac(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--dtype` converts the float32 tiny checkpoint's plan to bf16 (weights, activations, KV
/// cache and, by default, the adapter pool); `--lora-dtype` still overrides the pool.
#[test]
fn compile_dtype_overrides_the_config() {
    let dir = std::env::temp_dir().join(format!("lorac-cli-dtype-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.bin");
    let model = common::tiny("llama");
    let inspect = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["compile", model.to_str().unwrap(), "-o", plan.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = lorac(&args);
        assert!(ok, "{stderr}");
        let (ok, stdout, stderr) = lorac(&["inspect", plan.to_str().unwrap(), "--json"]);
        assert!(ok, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let f32 = inspect(&[]);
    let bf16 = inspect(&["--dtype", "bf16"]);
    assert_eq!((&f32["model"]["dtype"], &f32["lora"]["dtype"]), (&serde_json::json!("f32"), &serde_json::json!("f32")));
    assert_eq!((&bf16["model"]["dtype"], &bf16["lora"]["dtype"]), (&serde_json::json!("bf16"), &serde_json::json!("bf16")));
    let bytes = |r: &serde_json::Value, key: &str| r["ranks"][0]["memory"][key].as_u64().unwrap();
    assert_eq!(bytes(&f32, "weights"), 2 * bytes(&bf16, "weights"));
    assert_eq!(bytes(&f32, "kv_cache"), 2 * bytes(&bf16, "kv_cache"));
    let mixed = inspect(&["--dtype", "bf16", "--lora-dtype", "f32"]);
    assert_eq!((&mixed["model"]["dtype"], &mixed["lora"]["dtype"]), (&serde_json::json!("bf16"), &serde_json::json!("f32")));
    let (ok, _, stderr) = lorac(&["compile", model.to_str().unwrap(), "--dtype", "int8", "-o", plan.to_str().unwrap()]);
    assert!(!ok && stderr.contains("--dtype"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
