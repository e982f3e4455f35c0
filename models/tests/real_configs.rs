//! Every real config in models/configs parses into the layout its model card describes.

use std::path::PathBuf;

use lorac_models::spec::{FfnSpec, MixerSpec};
use lorac_models::{ModelError, ModelSpec};

fn load(name: &str) -> ModelSpec {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join(name);
    lorac_models::load(&path).unwrap_or_else(|e| panic!("{name}: {e}")).1
}

fn count(spec: &ModelSpec, f: impl Fn(&lorac_models::spec::LayerSpec) -> bool) -> usize {
    spec.layers.iter().filter(|l| f(l)).count()
}

#[test]
fn llama_3_1_8b() {
    let s = load("meta-llama__Meta-Llama-3.1-8B.json");
    assert_eq!((s.num_layers(), s.hidden_size, s.vocab_size), (32, 4096, 128256));
    let Some(MixerSpec::Attention(a)) = &s.layers[0].mixer else { panic!("attention expected") };
    assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim), (32, 8, 128));
    assert_eq!(a.qkv.out_features(), 4096 + 1024 + 1024);
}

#[test]
fn deepseek_v3_dense_then_moe() {
    let s = load("deepseek-ai__DeepSeek-V3.json");
    assert_eq!(s.num_layers(), 61);
    assert_eq!(count(&s, |l| matches!(l.ffn, Some(FfnSpec::Dense(_)))), 3);
    assert_eq!(count(&s, |l| matches!(l.ffn, Some(FfnSpec::Moe(_)))), 58);
    let Some(MixerSpec::Mla(m)) = &s.layers[0].mixer else { panic!("MLA expected") };
    assert_eq!(m.qkv_a.out_features(), 1536 + 576);
    assert_eq!(m.q_b.out_features(), 128 * 192);
    assert_eq!(m.kv_b.out_features(), 128 * 256);
}

#[test]
fn qwen3_5_27b_has_16_full_attention_layers() {
    let s = load("Qwen__Qwen3.5-27B.json");
    assert_eq!(count(&s, |l| matches!(l.mixer, Some(MixerSpec::Attention(_)))), 16);
    assert_eq!(count(&s, |l| matches!(l.mixer, Some(MixerSpec::GatedDeltaNet(_)))), 48);
}

#[test]
fn nemotron_layouts_from_pattern() {
    let s = load("nvidia__NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json");
    assert_eq!(s.num_layers(), 52);
    assert_eq!(count(&s, |l| matches!(l.mixer, Some(MixerSpec::Mamba2(_)))), 23);
    assert_eq!(count(&s, |l| matches!(l.mixer, Some(MixerSpec::Attention(_)))), 6);
    assert_eq!(count(&s, |l| matches!(l.ffn, Some(FfnSpec::Moe(_)))), 23);
    let s = load("nvidia__Nemotron-H-56B-Base-8K.json");
    assert_eq!(s.num_layers(), 118);
    let s = load("nvidia__NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4.json");
    let Some(FfnSpec::Moe(m)) = &s.layers[1].ffn else { panic!("MoE expected") };
    assert_eq!(m.latent.as_ref().map(|l| l.size), Some(1024));
}

#[test]
fn every_supported_config_loads() {
    for entry in std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs")).unwrap() {
        let path = entry.unwrap().path();
        match lorac_models::load(&path) {
            Ok(_) => {}
            Err(ModelError::UnknownModelType { found, .. }) => assert_eq!(found, "gpt_oss", "{}", path.display()),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

#[test]
fn nested_decoder_falls_back_to_top_level_tie_word_embeddings() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/Qwen__Qwen3.5-27B.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(v["text_config"].get("tie_word_embeddings").is_none());
    assert!(
        !lorac_models::describe(&lorac_models::ConfigFile::from_bytes(&path, v.to_string().into_bytes()).unwrap())
            .unwrap()
            .tie_word_embeddings
    );
    v["tie_word_embeddings"] = true.into();
    let cfg = lorac_models::ConfigFile::from_bytes(&path, v.to_string().into_bytes()).unwrap();
    assert!(lorac_models::describe(&cfg).unwrap().tie_word_embeddings);
}

#[test]
fn rope_and_norm_constants() {
    use lorac_plan::RopeScaling;
    let s = load("meta-llama__Meta-Llama-3.1-8B.json");
    let rope = s.rope.unwrap();
    assert_eq!((rope.theta, rope.rotary_dim), (500000.0, 128));
    assert_eq!(
        rope.scaling,
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }
    );
    assert_eq!(s.norm.eps, 1e-5);
    // DeepSeek-V3: `type: yarn` (old spelling), rope over the 64-dim rope part of each head.
    let rope = load("deepseek-ai__DeepSeek-V3.json").rope.unwrap();
    assert_eq!(rope.rotary_dim, 64);
    assert!(matches!(rope.scaling, RopeScaling::Yarn { factor: 40.0, original_max_position_embeddings: 4096, .. }));
    // Qwen3.5: rope_parameters under text_config, partial rotary 0.25 of 256, (1 + w) norms.
    let s = load("Qwen__Qwen3.5-27B.json");
    let rope = s.rope.unwrap();
    assert_eq!((rope.theta, rope.rotary_dim), (1e7, 64));
    assert_eq!(rope.scaling, RopeScaling::MRope { sections: vec![11, 11, 10], interleaved: true });
    assert!(s.norm.unit_offset);
    let s = load("Qwen__Qwen3-Next-80B-A3B-Instruct.json");
    assert_eq!((s.rope.unwrap().rotary_dim, s.norm.unit_offset), (64, true));
    assert_eq!(load("nvidia__Nemotron-H-56B-Base-8K.json").rope, None);
}

/// The two config spellings of each tiny fixture (transformers 5's and the hub's) describe the
/// same model, constants included.
#[test]
fn both_config_spellings_agree() {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
    let mut compared = 0;
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let dir = entry.unwrap().path();
        let hub = dir.join("config.hub_style.json");
        if !hub.exists() {
            continue;
        }
        let (_, a) = lorac_models::load(&dir.join("config.json")).unwrap();
        let (_, b) = lorac_models::load(&hub).unwrap();
        assert_eq!(a, b, "{}", dir.display());
        compared += 1;
    }
    assert_eq!(compared, 7);
}
