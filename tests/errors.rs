//! Bad input never panics: every refusal is a clear message naming what to fix. All messages
//! are snapshotted in one file so reviewers read them side by side.

mod common;

use std::path::{Path, PathBuf};

use lorac_compiler::{CompileOptions, compile};

/// A scratch model directory holding `config` (and, when given, the tiny llama checkpoint).
fn model_dir(name: &str, config: &str, with_weights: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lorac-errors-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    if with_weights {
        std::fs::copy(common::tiny("llama").join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    }
    dir
}

fn tiny_llama_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::tiny("llama").join("config.json")).unwrap()).unwrap()
}

fn edited(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut v = tiny_llama_config();
    edit(v.as_object_mut().unwrap());
    serde_json::to_string_pretty(&v).unwrap()
}

fn compile_error(path: &Path, opts: &CompileOptions) -> String {
    match compile(path, opts) {
        Ok(_) => panic!("{} compiled but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

fn opts(tp: u32, targets: &[&str]) -> CompileOptions {
    CompileOptions::new(tp, 16, 8, targets).unwrap()
}

#[test]
fn compile_errors() {
    let mut cases: Vec<(&str, String, Vec<PathBuf>)> = Vec::new();
    let mut case = |name: &'static str, dir: PathBuf, opts: CompileOptions| {
        let message = compile_error(&dir, &opts);
        cases.push((name, message, vec![dir]));
    };
    case("unknown model_type", common::configs().join("openai__gpt-oss-20b.json"), opts(1, &["all"]));
    case("missing field", model_dir("missing", &edited(|m| drop(m.remove("hidden_size"))), false), opts(1, &["all"]));
    case(
        "mistyped field",
        model_dir("mistyped", &edited(|m| drop(m.insert("num_attention_heads".into(), "four".into()))), false),
        opts(1, &["all"]),
    );
    case("zero heads", model_dir("zero", &edited(|m| drop(m.insert("num_attention_heads".into(), 0.into()))), false), opts(1, &["all"]));
    case("gqa heads", model_dir("gqa", &edited(|m| drop(m.insert("num_key_value_heads".into(), 3.into()))), false), opts(1, &["all"]));
    case("not JSON", model_dir("json", "{ \"model_type\": \"llama\", ", false), opts(1, &["all"]));
    case("model_type not a string", model_dir("mt", "{\"model_type\": 7}", false), opts(1, &["all"]));
    case("unreadable path", PathBuf::from("/nonexistent/model"), opts(1, &["all"]));
    case("tp does not divide heads", common::configs().join("meta-llama__Meta-Llama-3.1-8B.json"), opts(3, &["all"]));
    // 48 query heads split over 12 ranks, but 8 KV heads neither split nor replicate.
    let kv = edited(|m| {
        m.insert("num_attention_heads".into(), 48.into());
        m.insert("num_key_value_heads".into(), 8.into());
        m.insert("hidden_size".into(), 768.into());
        m.insert("head_dim".into(), 16.into());
    });
    case("tp not a multiple of KV heads", model_dir("kv", &kv, false), opts(12, &["all"]));
    case(
        "intermediate not divisible",
        model_dir("inter", &edited(|m| drop(m.insert("intermediate_size".into(), 130.into()))), false),
        opts(4, &["all"]),
    );
    let mut ep = opts(8, &["all"]);
    ep.ep = std::num::NonZeroU32::new(3).unwrap();
    case("ep does not divide tp", common::configs().join("deepseek-ai__DeepSeek-V3.json"), ep);
    let deepseek = std::fs::read_to_string(common::tiny("deepseek_v3").join("config.json")).unwrap();
    let mut six_experts: serde_json::Value = serde_json::from_str(&deepseek).unwrap();
    six_experts["n_routed_experts"] = 6.into();
    let mut ep = opts(4, &["all"]);
    ep.ep = std::num::NonZeroU32::new(4).unwrap();
    case("experts not divisible by ep", model_dir("experts", &six_experts.to_string(), false), ep);
    case("unknown target module", common::configs().join("meta-llama__Meta-Llama-3.1-8B.json"), opts(1, &["qkv_proj", "q_projj"]));
    case("target absent from this model", common::configs().join("meta-llama__Meta-Llama-3.1-8B.json"), opts(1, &["in_proj"]));
    case("no targets", common::configs().join("meta-llama__Meta-Llama-3.1-8B.json"), opts(1, &[]));
    let pattern =
        std::fs::read_to_string(common::configs().join("nvidia__Nemotron-H-56B-Base-8K.json")).unwrap().replace("\"M-M-M-M*", "\"M-M-X-M*");
    case("bad hybrid pattern", model_dir("pattern", &pattern, false), opts(1, &["all"]));
    case(
        "layer_types too short",
        model_dir(
            "types",
            &std::fs::read_to_string(common::configs().join("Qwen__Qwen3.5-0.8B.json")).unwrap().replacen("\"linear_attention\",", "", 1),
            false,
        ),
        opts(1, &["all"]),
    );
    case(
        "checkpoint disagrees with config",
        model_dir("ckpt", &edited(|m| drop(m.insert("intermediate_size".into(), 256.into()))), true),
        opts(1, &["all"]),
    );
    case(
        "checkpoint of another model",
        model_dir("other", &edited(|m| drop(m.insert("num_hidden_layers".into(), 3.into()))), true),
        opts(1, &["all"]),
    );
    let bad_st = model_dir("bad-st", &edited(|_| ()), false);
    std::fs::write(bad_st.join("model.safetensors"), b"not a safetensors file").unwrap();
    case("damaged safetensors", bad_st, opts(1, &["all"]));
    case(
        "rank too large",
        common::configs().join("meta-llama__Meta-Llama-3.1-8B.json"),
        CompileOptions::new(1, 1 << 20, 8, &["all"]).unwrap(),
    );
    case(
        "absurd head count",
        model_dir("huge", &edited(|m| drop(m.insert("num_attention_heads".into(), 4_000_000_000u32.into()))), false),
        opts(1, &["all"]),
    );
    case(
        "absurd width",
        model_dir("wide", &edited(|m| drop(m.insert("intermediate_size".into(), 3_000_000_000u32.into()))), false),
        opts(1, &["all"]),
    );
    let err = CompileOptions::new(1, 0, 8, &["all"]).unwrap_err().to_string();
    cases.push(("rank 0", err, vec![]));
    let err = CompileOptions::new(0, 16, 8, &["all"]).unwrap_err().to_string();
    cases.push(("tp 0", err, vec![]));

    let report: String = cases
        .iter()
        .map(|(name, message, dirs)| {
            let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            format!("## {name}\n{}\n", common::scrub(message, &dirs))
        })
        .collect();
    for (_, _, dirs) in &cases {
        for d in dirs.iter().filter(|d| d.starts_with(std::env::temp_dir())) {
            std::fs::remove_dir_all(d).ok();
        }
    }
    common::settings().bind(|| insta::assert_snapshot!("compile_errors", report));
}
