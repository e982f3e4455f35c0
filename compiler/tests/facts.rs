//! The shape facts the issue lists (S = 8, R = 16), each checked on the real config.

use std::path::PathBuf;

use lorac_compiler::{CompileOptions, compile};
use lorac_plan::{LoraBuffer, Plan};

fn config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/configs").join(name)
}

fn plan(name: &str, tp: u32, ep: u32) -> Plan {
    let mut opts = CompileOptions::new(tp, 16, 8, &["all"]).unwrap();
    opts.ep = std::num::NonZeroU32::new(ep).unwrap();
    compile(&config(name), &opts).unwrap_or_else(|e| panic!("{name} tp {tp}: {e}"))
}

fn buffer<'a>(plan: &'a Plan, layer: Option<u32>, module: &str) -> &'a LoraBuffer {
    plan.ranks[0]
        .lora_buffers
        .iter()
        .find(|b| b.layer == layer && b.module == module)
        .unwrap_or_else(|| panic!("no {module} buffer on layer {layer:?}"))
}

fn slices(b: &LoraBuffer) -> Vec<(&str, u32)> {
    b.layout.slices().iter().map(|s| (s.name.as_str(), s.width)).collect()
}

#[test]
fn llama_3_1_8b_tp8() {
    let p = plan("meta-llama__Meta-Llama-3.1-8B.json", 8, 1);
    let qkv = buffer(&p, Some(0), "qkv_proj");
    assert_eq!(qkv.layout.a_shape(), [8, 48, 4096]);
    assert_eq!(qkv.layout.b_shape(), [8, 768, 16]);
    assert_eq!(slices(qkv), [("q_proj", 512), ("k_proj", 128), ("v_proj", 128)]);
    assert_eq!(buffer(&p, Some(0), "o_proj").layout.a_shape(), [8, 16, 512]);
    assert_eq!(buffer(&p, Some(0), "gate_up_proj").layout.b_shape(), [8, 3584, 16]);
    assert_eq!(buffer(&p, Some(0), "down_proj").layout.a_shape(), [8, 16, 1792]);
}

#[test]
fn qwen3_8b_tp16_replicates_kv_heads() {
    let p = plan("Qwen__Qwen3-8B.json", 16, 1);
    let qkv = buffer(&p, Some(0), "qkv_proj");
    assert_eq!(qkv.layout.b_shape(), [8, 512, 16]);
    assert_eq!(slices(qkv), [("q_proj", 256), ("k_proj", 128), ("v_proj", 128)]);
    // Ranks 2k and 2k+1 share KV head k: rank 3 holds head 1, rows 128..256 of k_proj.
    let rank3 = p.ranks[3].lora_buffers.iter().find(|b| b.layer == Some(0) && b.module == "qkv_proj").unwrap();
    assert_eq!(rank3.slice_rows, [(768, 1024), (128, 256), (128, 256)]);
}

#[test]
fn deepseek_v3_tp8() {
    let p = plan("deepseek-ai__DeepSeek-V3.json", 8, 1);
    let fused = buffer(&p, Some(0), "fused_qkv_a_proj_with_mqa");
    assert_eq!(fused.parallel, lorac_plan::ParallelKind::Replicated);
    assert_eq!(fused.layout.a_shape(), [8, 32, 7168]);
    assert_eq!(fused.layout.b_shape(), [8, 2112, 16]);
    assert_eq!(slices(fused), [("q_a_proj", 1536), ("kv_a_proj_with_mqa", 576)]);
    assert_eq!(buffer(&p, Some(0), "q_b_proj").layout.b_shape(), [8, 3072, 16]);
    let kv_b = buffer(&p, Some(0), "kv_b_proj");
    assert_eq!((kv_b.layout.a_shape(), kv_b.layout.b_shape()), (vec![8, 16, 512], vec![8, 4096, 16]));
    assert_eq!(buffer(&p, Some(0), "o_proj").layout.a_shape(), [8, 16, 2048]);
    for layer in 0..3 {
        assert_eq!(buffer(&p, Some(layer), "gate_up_proj").layout.b_shape(), [8, 4608, 16]);
    }
    // MoE layers: the shared expert uses the dense names, routed experts the _moe names.
    assert_eq!(buffer(&p, Some(3), "gate_up_proj").layout.b_shape(), [8, 512, 16]);
    let routed = buffer(&p, Some(3), "gate_up_proj_moe");
    assert_eq!(routed.layout.a_shape(), [8, 256, 32, 7168]);
    assert_eq!(routed.layout.b_shape(), [8, 256, 512, 16]);
    let ep = plan("deepseek-ai__DeepSeek-V3.json", 8, 8);
    let routed = buffer(&ep, Some(3), "gate_up_proj_moe");
    assert_eq!(routed.layout.a_shape()[1], 32);
    assert_eq!(
        ep.ranks[5].lora_buffers.iter().find(|b| b.layer == Some(3) && b.module == "gate_up_proj_moe").unwrap().experts,
        Some((160, 192))
    );
}

#[test]
fn qwen3_5_27b_tp8_qkv_only_on_full_attention_layers() {
    let p = plan("Qwen__Qwen3.5-27B.json", 8, 1);
    let qkv: Vec<&LoraBuffer> = p.ranks[0].lora_buffers.iter().filter(|b| b.module == "qkv_proj").collect();
    assert_eq!(qkv.len(), 16);
    assert!(qkv.iter().all(|b| b.layer.is_some_and(|l| l % 4 == 3)));
    assert_eq!(qkv[0].layout.b_shape(), [8, 2048, 16]);
    assert_eq!(slices(qkv[0]), [("q_proj", 1536), ("k_proj", 256), ("v_proj", 256)]);
}

#[test]
fn nemotron_3_nano_tp4() {
    let p = plan("nvidia__NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json", 4, 1);
    let qkv = p.ranks[0].lora_buffers.iter().find(|b| b.module == "qkv_proj").unwrap();
    assert_eq!(qkv.layout.b_shape(), [8, 1280, 16]);
    let routed = p.ranks[0].lora_buffers.iter().find(|b| b.module == "gate_up_proj_moe").unwrap();
    assert_eq!(routed.layout.a_shape(), [8, 128, 16, 2688]);
    assert_eq!(routed.layout.b_shape(), [8, 128, 464, 16]);
    // Mamba in_proj: one A, five slices sharded as the base layer is.
    let in_proj = p.ranks[0].lora_buffers.iter().find(|b| b.module == "in_proj").unwrap();
    assert_eq!(in_proj.layout.a_shape(), [8, 16, 2688]);
    assert_eq!(slices(in_proj), [("z", 1024), ("x", 1024), ("B", 256), ("C", 256), ("dt", 16)]);
}
