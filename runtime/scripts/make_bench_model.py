#!/usr/bin/env python3
"""Random Llama-3-8B-shaped checkpoint (bf16) and random rank-16 PEFT LoRA adapters for the
decode benchmark (runtime/src/bin/decode_bench.rs, runtime/scripts/hf_decode_bench.py).

Runs on the device machine (torch with CUDA): weights are drawn on the GPU, N(0, 0.02) for
every matrix (transformers' Llama init), ones for the norms, and written as safetensors shards
in HF's naming with a config.json that transformers and `lorac compile` both read. Adapters
target every linear of every layer (q, k, v, o, gate, up, down: PEFT's all-linear on Llama),
A ~ N(0, 0.02), B ~ N(0, 0.02), lora_alpha 32, saved in PEFT's own layout
(`base_model.model.<module>.lora_A.weight`, adapter_config.json) so that PEFT's
`PeftModel.from_pretrained` / `load_adapter` and lorac's loader read the same files.

Usage: make_bench_model.py --out DIR [--layers 32] [--adapters 8] [--rank 16]
Prints the time each part took (generation, device-to-host copy and file writes).
"""

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def config(layers: int) -> dict:
    # Meta-Llama-3-8B's config.json fields (no rope scaling: Llama 3, not 3.1).
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


def shapes(cfg: dict) -> dict:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    # (out, in) of each linear.
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def randn(shape, gen) -> torch.Tensor:
    return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers-per-shard", type=int, default=4)
    args = ap.parse_args()

    cfg = config(args.layers)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    lin = shapes(cfg)

    t_gen = t_copy = t_write = 0.0
    total_bytes = 0
    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        nonlocal t_gen, t_copy, t_write, total_bytes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host = {k: t.cpu() for k, t in tensors.items()}
        t1 = time.perf_counter()
        save_file(host, os.path.join(args.out, name), metadata={"format": "pt"})
        t2 = time.perf_counter()
        t_copy += t1 - t0
        t_write += t2 - t1
        total_bytes += sum(t.numel() * t.element_size() for t in host.values())
        for k in host:
            weight_map[k] = name

    t_start = time.perf_counter()
    shards = []
    head = {"model.embed_tokens.weight": None, "model.norm.weight": None, "lm_head.weight": None}
    shards.append(("head", head))
    for first in range(0, args.layers, args.layers_per_shard):
        shards.append((first, None))
    n_files = len(shards)
    for idx, (what, _) in enumerate(shards):
        name = f"model-{idx + 1:05d}-of-{n_files:05d}.safetensors"
        t0 = time.perf_counter()
        if what == "head":
            tensors = {
                "model.embed_tokens.weight": randn((v, h), gen),
                "model.norm.weight": torch.ones(h, device="cuda", dtype=torch.bfloat16),
                "lm_head.weight": randn((v, h), gen),
            }
        else:
            tensors = {}
            for layer in range(what, min(what + args.layers_per_shard, args.layers)):
                p = f"model.layers.{layer}"
                tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, device="cuda", dtype=torch.bfloat16)
                tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, device="cuda", dtype=torch.bfloat16)
                for m, shape in lin.items():
                    tensors[f"{p}.{m}.weight"] = randn(shape, gen)
        torch.cuda.synchronize()
        t_gen += time.perf_counter() - t0
        save(tensors, name)
        del tensors
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    t_model = time.perf_counter() - t_start
    print(
        f"model: {total_bytes / 1e9:.2f} GB in {n_files} shards, {t_model:.1f} s "
        f"(random on GPU {t_gen:.1f} s, device-to-host {t_copy:.1f} s, safetensors write {t_write:.1f} s, "
        f"{total_bytes / 1e9 / max(t_write, 1e-9):.2f} GB/s)",
        flush=True,
    )

    t0 = time.perf_counter()
    r = args.rank
    for a in range(args.adapters):
        gen.manual_seed(1000 + a)
        tensors = {}
        for layer in range(args.layers):
            for m, (out_f, in_f) in lin.items():
                key = f"base_model.model.model.layers.{layer}.{m}"
                tensors[f"{key}.lora_A.weight"] = randn((r, in_f), gen).cpu()
                tensors[f"{key}.lora_B.weight"] = randn((out_f, r), gen).cpu()
        d = os.path.join(args.out + "_adapters", f"a{a}")
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        adapter_cfg = {
            "base_model_name_or_path": args.out,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "lora_alpha": 2 * r,
            "lora_dropout": 0.0,
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": r,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": sorted(m.split(".")[1] for m in LINEARS),
            "task_type": "CAUSAL_LM",
            "use_dora": False,
            "use_rslora": False,
        }
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(adapter_cfg, f, indent=2)
    size = sum(os.path.getsize(os.path.join(args.out + "_adapters", f"a{a}", "adapter_model.safetensors")) for a in range(args.adapters))
    # Written last: a directory with a config.json is complete (the driver reuses it).
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"adapters: {args.adapters} × rank {r} all-linear, {size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
