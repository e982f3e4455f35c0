#!/usr/bin/env python3
"""Generate tiny random Hugging Face checkpoints, PEFT LoRA adapters and
reference outputs for lorac's tests.

Independent reference implementation: torch (CPU), transformers, peft, all from
PyPI (pinned in scripts/requirements.txt).  Nothing is downloaded from a model
hub: configs are built here, weights are random (fixed seeds), the tokenizer is
a byte-level BPE trained here on public-domain text embedded below.

Usage (from the repository root):
    python3 -m venv /work/venv && /work/venv/bin/pip install -r scripts/requirements.txt
    /work/venv/bin/python scripts/make_tiny_models.py [--out tests/fixtures/tiny] [--only llama,qwen3]

Re-running produces the same files (deterministic seeds; torch CPU kernels;
single thread).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import safetensors
from safetensors import safe_open
from safetensors.torch import save_file, load_file
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
import transformers
from transformers import PreTrainedTokenizerFast
import peft
from peft import LoraConfig, get_peft_model, PeftModel

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tiny"
GENERATOR_CMD = "/work/venv/bin/python scripts/make_tiny_models.py"

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# Public-domain English text (excerpts: Lincoln's Gettysburg Address, 1863;
# the opening of Jane Austen's Pride and Prejudice, 1813; Aesop's fables in
# the 19th-century Townsend translation; a few simple sentences written here).
CORPUS = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation,
conceived in Liberty, and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so
conceived and so dedicated, can long endure. We are met on a great battle-field of that war.
We have come to dedicate a portion of that field, as a final resting place for those who here
gave their lives that that nation might live. It is altogether fitting and proper that we
should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- we can
not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated
it, far above our poor power to add or detract. The world will little note, nor long remember
what we say here, but it can never forget what they did here. It is for us the living, rather,
to be dedicated here to the unfinished work which they who fought here have thus far so nobly
advanced. It is rather for us to be here dedicated to the great task remaining before us --
that from these honored dead we take increased devotion to that cause for which they gave the
last full measure of devotion -- that we here highly resolve that these dead shall not have
died in vain -- that this nation, under God, shall have a new birth of freedom -- and that
government of the people, by the people, for the people, shall not perish from the earth.
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be on
his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is
let at last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has
just been here, and she told me all about it." Mr. Bennet made no answer.
A Hare one day ridiculed the short feet and slow pace of the Tortoise, who replied, laughing:
"Though you be swift as the wind, I will beat you in a race." The Hare, believing her assertion
to be simply impossible, assented to the proposal; and they agreed that the Fox should choose
the course and fix the goal. On the day appointed for the race the two started together. The
Tortoise never for a moment stopped, but went on with a slow but steady pace straight to the end
of the course. The Hare, lying down by the wayside, fell fast asleep. At last waking up, and
moving as fast as he could, he saw the Tortoise had reached the goal, and was comfortably dozing
after her fatigue. Slow but steady wins the race.
A Fox one day spied a beautiful bunch of ripe grapes hanging from a vine trained along the
branches of a tree. The grapes seemed ready to burst with juice, and the Fox's mouth watered as
he gazed longingly at them. The bunch hung from a high branch, and the Fox had to jump for it.
The first time he jumped he missed it by a long way. So he walked off a short distance and took
a running leap at it, only to fall short once more. Again and again he tried, but in vain.
Now he sat down and looked at the grapes in disgust. "What a fool I am," he said. "Here I am
wearing myself out to get a bunch of sour grapes that are not worth gaping for."
The North Wind and the Sun disputed as to which was the most powerful, and agreed that he should
be declared the victor who could first strip a wayfaring man of his clothes.
The quick brown fox jumps over the lazy dog. The cat sat on the mat. Hello, world!
What is the capital of France? The capital of France is Paris. One, two, three, four, five.
The user asks a question and the assistant answers it. Please write a short story about a cat.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000. Code: fn main() { println!("hi"); }
"""

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in CORPUS.splitlines() if l.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    bos_id = tok.token_to_id("<|bos|>")
    # Prepend <|bos|> to every encoded sequence (like Llama 3).
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A",
        pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    initializer_range=0.08,  # larger than HF default so logits are well separated
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def cfg_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **COMMON,
    )
    return c, LlamaForCausalLM, "LlamaForCausalLM: 2 layers, hidden 64, 4 q heads / 2 kv heads, head_dim 16, SwiGLU 128, llama3 rope scaling, untied embeddings"


def cfg_llama_wide():
    from transformers import LlamaConfig, LlamaForCausalLM

    # The smallest Llama whose LoRA sites are wide enough for the runtime's K-split shrink:
    # K = hidden = 1024 splits into four 256-wide shares, and qkv (3 slices) and gate_up (2) are
    # 128 or more rows wide at a plan max rank of 64. One layer, two heads and a narrow MLP keep
    # the bf16 checkpoint near 5 MB.
    c = LlamaConfig(
        hidden_size=1024,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **COMMON,
    )
    return c, LlamaForCausalLM, ("LlamaForCausalLM: 1 layer, hidden 1024, 2 q heads / 1 kv head, head_dim 128, SwiGLU 128, "
                                 "untied embeddings, saved in bfloat16")


def cfg_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # q width 4*32=128 != hidden 64 (as in real Qwen3)
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # like Qwen3-0.6B/1.7B/4B
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **COMMON,
    )
    return c, Qwen3ForCausalLM, "Qwen3ForCausalLM: 2 layers, hidden 64, 4 q heads / 2 kv heads, head_dim 32, q_norm/k_norm, SwiGLU 128, TIED embeddings"


def cfg_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    c = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **COMMON,
    )
    return c, Qwen3MoeForCausalLM, "Qwen3MoeForCausalLM: 2 layers (both MoE), hidden 64, 4q/2kv heads, head_dim 16, 4 experts top-2 (norm_topk_prob), expert ffn 16"


def cfg_deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    c = DeepseekV3Config(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_interleave=True,
        tie_word_embeddings=False,
        # YaRN as in the real DeepSeek-V3 config (mscale_all_dim also rescales the softmax scale).
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        **COMMON,
    )
    return c, DeepseekV3ForCausalLM, ("DeepseekV3ForCausalLM: 2 layers (layer 0 dense, layer 1 MoE: first_k_dense_replace=1), hidden 64, "
                                      "MLA 4 heads q_lora_rank 32 kv_lora_rank 16 qk_nope 16 qk_rope 8 v 16, YaRN rope (factor 4, mscale_all_dim 1), "
                                      "interleaved rope, 8 routed experts top-2 "
                                      "(n_group 2, topk_group 1, sigmoid + e_score_correction_bias), 1 shared expert, expert ffn 16")


def _linear_attn_common():
    return dict(
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )


def cfg_qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    c = Qwen3NextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        full_attention_interval=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        **_linear_attn_common(),
        **COMMON,
    )
    return c, Qwen3NextForCausalLM, ("Qwen3NextForCausalLM: 3 layers [linear, linear, full] (full_attention_interval 3), hidden 64, "
                                     "gated attention 4q/2kv head_dim 16 partial rotary 0.25, Gated DeltaNet 2 k-heads / 4 v-heads dk=dv=16 conv 4, "
                                     "all layers MoE 4 experts top-2 + gated shared expert, expert ffn 16, shared ffn 32")


def cfg_qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # rotary dim 32*0.25 = 8, mrope_section sums to 8/2 = 4
        full_attention_interval=3,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        **_linear_attn_common(),
        **COMMON,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  initializer_range=0.08)
    c = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True,
                      image_token_id=VOCAB_SIZE - 1, video_token_id=VOCAB_SIZE - 2,
                      vision_start_token_id=VOCAB_SIZE - 3, vision_end_token_id=VOCAB_SIZE - 4)
    return c, Qwen3_5ForConditionalGeneration, ("Qwen3_5ForConditionalGeneration (the class real Qwen3.5 checkpoints use; config nests the "
                                                "decoder under text_config): text 3 layers [linear, linear, full], hidden 64, gated attention "
                                                "4q/2kv head_dim 32 (partial rotary 0.25, interleaved mrope [2,1,1]), GDN 2 k-heads / 4 v-heads dk=dv=16, dense SwiGLU 128, TIED embeddings (like the small "
                                                "Qwen3.5 models); tiny 1-block vision tower")


def cfg_qwen3_5_moe():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # rotary dim 32*0.25 = 8, mrope_section sums to 8/2 = 4
        full_attention_interval=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        **_linear_attn_common(),
        **COMMON,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  initializer_range=0.08)
    c = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         image_token_id=VOCAB_SIZE - 1, video_token_id=VOCAB_SIZE - 2,
                         vision_start_token_id=VOCAB_SIZE - 3, vision_end_token_id=VOCAB_SIZE - 4)
    return c, Qwen3_5MoeForConditionalGeneration, ("Qwen3_5MoeForConditionalGeneration: text 3 layers [linear, linear, full], hidden 64, gated attention 4q/2kv head_dim 32, "
                                                   "GDN as qwen3_5, all layers MoE 4 experts top-2 (ffn 16) + gated shared expert (ffn 32), untied; tiny vision tower")


def cfg_nemotron_h():
    from transformers import NemotronHConfig, NemotronHForCausalLM

    c = NemotronHConfig(
        hidden_size=64,
        num_hidden_layers=5,
        hybrid_override_pattern="M-*ME",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mlp_hidden_act="relu2",
        use_mamba_kernels=False,
        ssm_state_size=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=2,
        conv_kernel=4,
        expand=1,  # unused by HF (mamba width = mamba_num_heads * mamba_head_dim = 64); kept consistent
        chunk_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=32,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        **COMMON,
    )
    return c, NemotronHForCausalLM, ("NemotronHForCausalLM: 5 layers pattern 'M-*ME' (Mamba2, relu2 MLP, attention (no rope), Mamba2, MoE), "
                                     "hidden 64, Mamba2 4 heads x head_dim 16, n_groups 2, d_state 16, conv 4; attention 4q/2kv head_dim 16; "
                                     "MoE 8 experts top-2 sigmoid router (ffn 16) + 1 shared expert (ffn 32), relu2")


ARCHS = {
    "llama": cfg_llama,
    "qwen3": cfg_qwen3,
    "qwen3_moe": cfg_qwen3_moe,
    "deepseek_v3": cfg_deepseek_v3,
    "qwen3_next": cfg_qwen3_next,
    "qwen3_5": cfg_qwen3_5,
    "qwen3_5_moe": cfg_qwen3_5_moe,
    "nemotron_h": cfg_nemotron_h,
    # Last: each model's seed is its position here.
    "llama_wide": cfg_llama_wide,
}
SEEDS = {name: 1000 + i for i, name in enumerate(ARCHS)}
# Checkpoints saved in another dtype than float32 (references still run in float32, on the
# saved weights upcast).
SAVE_DTYPES = {"llama_wide": torch.bfloat16}
# Models with adapters and the mixed-batch references (the others: base-model references).
WITH_ADAPTERS = ("llama", "llama_wide", "qwen3")

# ---------------------------------------------------------------------------
# Prompts / adapters
# ---------------------------------------------------------------------------

PROMPTS = [
    "The quick brown fox",
    "Four score and seven years ago",
    "Hello, world!",
    "It is a truth universally acknowledged",
    "What is the capital of France?",
]
ROW_ADAPTERS = ["A", "B", "C", None, "A"]  # None = base model
NEW_TOKENS = 8
BASE_FULL_LOGIT_ROWS = {0, 2}  # base-only models: rows whose full-sequence logits are stored


def adapter_specs():
    return {
        "A": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=False),
        "B": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
        "C": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
                  use_rslora=False),
    }


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def save_tokenizer(tok, d: Path):
    tok.save_pretrained(str(d))
    # transformers v5 writes the template to chat_template.jinja; many runtimes (and older hub
    # checkpoints) read it from tokenizer_config.json, so put it there too.
    tc = d / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    tc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def randomize_lora(model, seed: int, b_std: float = 0.02):
    """Give every LoRA A/B (and embedding A/B) deterministic non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" not in name:
                continue
            if "lora_A" in name or "lora_embedding_A" in name:
                # A: [r, in] (embedding A: [r, vocab])
                fan_in = p.shape[1] if "lora_A" in name else 1
                std = 1.0 / (fan_in ** 0.5) if "lora_A" in name else 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)


def normalize_adapter_dir(adir: Path, base_name: str):
    """Make PEFT's output reproducible: repo-relative base path, sorted target_modules, no auto model card."""
    cp = adir / "adapter_config.json"
    cfg = json.loads(cp.read_text())
    cfg["base_model_name_or_path"] = f"tests/fixtures/tiny/{base_name}"
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if isinstance(cfg.get("modules_to_save"), list):
        cfg["modules_to_save"] = sorted(cfg["modules_to_save"])
    cp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = adir / "README.md"
    if readme.exists():
        readme.unlink()


def perturb_constant_tensors(model, seed: int, std: float = 0.1):
    """HF initialises norms to 1 (or 0 for Qwen3-Next-style (1+w) norms), biases / D / router score-correction
    biases to constants. A runtime that ignored such a tensor would still match, so add N(0, std) noise to
    every saved tensor whose elements are all equal. Returns the name patterns that were perturbed."""
    g = torch.Generator().manual_seed(seed)
    pats = set()
    with torch.no_grad():
        sd = model.state_dict()
        seen = set()
        for k in sorted(sd):
            t = sd[k]
            if not torch.is_floating_point(t) or t.numel() == 0 or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if bool((t == t.flatten()[0]).all()):
                t.add_(torch.randn(t.shape, generator=g) * std)
                import re as _re
                pats.add(_re.sub(r"\.(\d+)\.", ".{n}.", k))
    return sorted(pats)


def to_hub_style(cfg_json: dict) -> dict:
    """Rewrite transformers-v5 keys into the older spelling found in most hub checkpoints:
    rope_parameters -> rope_theta (+ rope_scaling when not default; partial_rotary_factor top level),
    nemotron_h layers_block_type -> hybrid_override_pattern."""
    c = copy.deepcopy(cfg_json)
    rp = c.pop("rope_parameters", None)
    if isinstance(rp, dict):
        rp = dict(rp)
        c["rope_theta"] = rp.pop("rope_theta")
        if "partial_rotary_factor" in rp:
            c["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
        if rp.get("rope_type", "default") == "default" and len(rp) == 1:
            c["rope_scaling"] = None
        else:
            c["rope_scaling"] = rp
    lt = c.get("layer_types")
    if c.get("model_type") == "qwen3_next" and isinstance(lt, list):
        # hub Qwen3-Next configs carry full_attention_interval, not layer_types
        for k in range(1, len(lt) + 1):
            if lt == ["linear_attention" if (i + 1) % k else "full_attention" for i in range(len(lt))]:
                c.pop("layer_types")
                c["full_attention_interval"] = k
                break
    if c.get("model_type") == "nemotron_h" and "layers_block_type" in c:
        m = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}
        c["hybrid_override_pattern"] = "".join(m[x] for x in c.pop("layers_block_type"))
        mtp = c.pop("mtp_layers_block_type", None)
        if mtp is not None:
            c["mtp_hybrid_override_pattern"] = "".join(m[x] for x in mtp)
    return c


def write_hub_style_config(name: str, d: Path, cls):
    """Write config.hub_style.json (legacy key spelling) if transformers loads it to the same config."""
    if name in ("qwen3_5", "qwen3_5_moe"):
        return None  # Qwen3.5 was released with the v5 spelling (rope_parameters in text_config)
    cfg_json = json.loads((d / "config.json").read_text())
    hub = to_hub_style(cfg_json)
    if hub == cfg_json:
        return None
    tmp = d / "_hub_check"
    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n")
    a = cls.config_class.from_pretrained(str(d)).to_dict()
    b = cls.config_class.from_pretrained(str(tmp)).to_dict()
    shutil.rmtree(tmp)
    for x in (a, b):
        x.pop("transformers_version", None)
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"not written: transformers loads it differently ({diff})"
    (d / "config.hub_style.json").write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n")
    return "config.hub_style.json"


def list_safetensors(path: Path):
    out = []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            out.append((k, list(sl.get_shape()), sl.get_dtype()))
    return out, meta


def run_logits(model, ids, adapter_names=None, attention_mask=None):
    kw = {}
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False, **kw).logits


def greedy_nocache(model, ids, n, adapter_names=None):
    """Reference greedy decode by full recompute (no KV cache)."""
    cur = ids.clone()
    toks, margins = [], []
    for _ in range(n):
        lg = run_logits(model, cur, adapter_names)[0, -1]
        top2 = torch.topk(lg, 2)
        toks.append(int(top2.indices[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
        cur = torch.cat([cur, top2.indices[:1].view(1, 1)], dim=1)
    return toks, margins


def hf_generate(model, ids, n, attention_mask=None, adapter_names=None):
    kw = {}
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **kw,
        )
    return out[:, ids.shape[1]:]


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


# ---------------------------------------------------------------------------
# Main per-model work
# ---------------------------------------------------------------------------


def make_model(name: str, out: Path, tok):
    cfg_fn = ARCHS[name]
    cfg, cls, summary = cfg_fn()
    # eager attention for reference numerics
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        sc = getattr(cfg, sub, None)
        if sc is not None:
            sc._attn_implementation = "eager"
    seed_all(SEEDS[name])
    model = cls(cfg).eval().to(torch.float32)
    perturbed = perturb_constant_tensors(model, SEEDS[name] + 7)
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.to(SAVE_DTYPES.get(name, torch.float32)).save_pretrained(str(d), safe_serialization=True)
    # generation_config.json is noise for our purposes but harmless; keep it.
    save_tokenizer(tok, d)
    # Reload from disk so references come from exactly the committed weights.
    model = cls.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
    return model, cfg, summary, d, perturbed


def reference_base_only(name, model, tok, d: Path):
    rows = []
    tensors = {}
    last = []
    for i, p in enumerate(PROMPTS):
        ids = tok(p, return_tensors="pt").input_ids
        lg = run_logits(model, ids)[0]
        if i in BASE_FULL_LOGIT_ROWS:  # full-sequence logits only for the short rows (fixture size)
            tensors[f"row{i}.logits"] = lg.contiguous().clone()
        last.append(lg[-1])
        gen = hf_generate(model, ids, NEW_TOKENS)[0].tolist()
        nc, margins = greedy_nocache(model, ids, NEW_TOKENS)
        rows.append(dict(prompt=p, input_ids=ids[0].tolist(), adapter=None,
                         generated_ids=gen, generated_text=tok.decode(gen),
                         greedy_nocache_ids=nc, generate_matches_nocache=(gen == nc),
                         greedy_top1_top2_margins=[sig6(m) for m in margins],
                         last_logits_top5=[[int(j), sig6(float(lg[-1, j]))] for j in torch.topk(lg[-1], 5).indices]))
    tensors["last_logits"] = torch.stack(last).contiguous()
    save_file(tensors, str(d / "reference.safetensors"), metadata={"format": "pt"})
    ref = dict(
        description="Base-model references (no adapters). reference.safetensors holds 'last_logits' float32 "
                    "[num_prompts, vocab] (last-position logits of every row) and, for rows "
                    f"{sorted(BASE_FULL_LOGIT_ROWS)} only, full-sequence logits 'row{{i}}.logits' float32 [seq_len, vocab]. Each row is run alone (no padding), float32, eager "
                    "attention, CPU. generated_ids: HF generate greedy (do_sample=False, KV cache), eos not a stop "
                    "condition; greedy_nocache_ids: argmax loop recomputing the full sequence each step.",
        new_tokens=NEW_TOKENS,
        rows=rows,
    )
    (d / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def make_adapters_and_reference(name, base_model, tok, d: Path, cls):
    specs = adapter_specs()
    adir = d / "adapters"
    adir.mkdir(exist_ok=True)
    notes = {}
    for i, (an, spec) in enumerate(specs.items()):
        seed_all(SEEDS[name] * 10 + i)
        fresh = cls.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
        lcfg = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                          use_rslora=spec["use_rslora"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          init_lora_weights=False)
        pm = get_peft_model(fresh, lcfg)
        randomize_lora(pm, SEEDS[name] * 100 + i)
        # save_embedding_layers=False: store only the LoRA factors for embed_tokens/lm_head, not a
        # copy of the (unchanged) base embedding matrices.
        pm.save_pretrained(str(adir / an), safe_serialization=True, save_embedding_layers=False)
        normalize_adapter_dir(adir / an, name)
        notes[an] = dict(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
                         target_modules=spec["target_modules"],
                         scaling=(spec["lora_alpha"] / (spec["r"] ** 0.5) if spec["use_rslora"] else spec["lora_alpha"] / spec["r"]))
        del pm, fresh

    # Load all three adapters onto one PeftModel.
    base = cls.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(base, str(adir / "A"), adapter_name="A")
    pm.load_adapter(str(adir / "B"), adapter_name="B")
    pm.load_adapter(str(adir / "C"), adapter_name="C")
    pm.eval()

    def single(ids, an):
        if an is None:
            with pm.disable_adapter():
                lg = run_logits(pm, ids)[0]
                gen = hf_generate(pm, ids, NEW_TOKENS)[0].tolist()
                nc, margins = greedy_nocache(pm, ids, NEW_TOKENS)
        else:
            pm.set_adapter(an)
            lg = run_logits(pm, ids)[0]
            gen = hf_generate(pm, ids, NEW_TOKENS)[0].tolist()
            nc, margins = greedy_nocache(pm, ids, NEW_TOKENS)
        return lg, gen, nc, margins

    rows, tensors = [], {}
    enc = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    for i, (p, ids, an) in enumerate(zip(PROMPTS, enc, ROW_ADAPTERS)):
        lg, gen, nc, margins = single(ids, an)
        tensors[f"row{i}.logits"] = lg.contiguous().clone()
        # How far is this adapter from the base model on this row?
        with pm.disable_adapter():
            base_lg = run_logits(pm, ids)[0]
        rows.append(dict(prompt=p, input_ids=ids[0].tolist(), adapter=an,
                         generated_ids=gen, generated_text=tok.decode(gen),
                         greedy_nocache_ids=nc, generate_matches_nocache=(gen == nc),
                         greedy_top1_top2_margins=[sig6(m) for m in margins],
                         max_abs_logit_delta_vs_base=sig6(float((lg - base_lg).abs().max())),
                         max_abs_logit=sig6(float(lg.abs().max())),
                         last_logits_top5=[[int(j), sig6(float(lg[-1, j]))] for j in torch.topk(lg[-1], 5).indices]))
    # Also: every adapter's (and the base model's) last-position logits for every prompt, so each
    # adapter can be tested alone on every prompt. [num_prompts, vocab]
    for an in ("A", "B", "C"):
        pm.set_adapter(an)
        tensors[f"adapter_{an}.last_logits"] = torch.stack([run_logits(pm, ids)[0, -1] for ids in enc]).contiguous()
    with pm.disable_adapter():
        tensors["base.last_logits"] = torch.stack([run_logits(pm, ids)[0, -1] for ids in enc]).contiguous()

    # Mixed batch with PEFT's adapter_names (left padded).
    mixed = {}
    try:
        names = [a if a is not None else "__base__" for a in ROW_ADAPTERS]
        btok = copy.deepcopy(tok)  # don't mutate the tokenizer that gets saved
        btok.padding_side = "left"
        batch = btok(PROMPTS, return_tensors="pt", padding=True)
        lg_b = run_logits(pm, batch.input_ids, adapter_names=names, attention_mask=batch.attention_mask)
        max_diff = 0.0
        for i, ids in enumerate(enc):
            L = ids.shape[1]
            diff = (lg_b[i, -L:] - tensors[f"row{i}.logits"]).abs().max()
            max_diff = max(max_diff, float(diff))
        gen_b = hf_generate(pm, batch.input_ids, NEW_TOKENS, attention_mask=batch.attention_mask,
                            adapter_names=names).tolist()
        gen_agree = [gen_b[i] == rows[i]["generated_ids"] for i in range(len(rows))]
        mixed = dict(ok=True, adapter_names=names, padding_side="left",
                     max_abs_logit_diff_vs_single_rows=sig6(max_diff),
                     generated_ids=gen_b, generations_agree_with_single_rows=gen_agree)
    except Exception as e:  # record, don't fail
        mixed = dict(ok=False, error=f"{type(e).__name__}: {e}")

    save_file(tensors, str(d / "reference.safetensors"), metadata={"format": "pt"})
    ref = dict(
        description="References for the mixed-adapter batch. Row i uses adapter rows[i].adapter (null = base model). "
                    "Full-sequence logits in reference.safetensors: 'row{i}.logits' (row with its assigned adapter), "
                    "'adapter_{A,B,C}.last_logits' and 'base.last_logits' [num_prompts, vocab] "
                    "(last-position logits of every prompt under every adapter / the base model), float32. Each row run alone (no padding), float32, eager attention, CPU. "
                    "generated_ids: HF generate greedy (do_sample=False, KV cache), eos not a stop condition; "
                    "greedy_nocache_ids: argmax loop recomputing the full sequence. mixed_batch: PEFT multi-adapter "
                    "batch inference (adapter_names=[...], left padding) compared with the single-row references.",
        adapters=notes,
        new_tokens=NEW_TOKENS,
        rows=rows,
        mixed_batch=mixed,
    )
    (d / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def write_tokenizer_examples(tok, tdir: Path):
    texts = PROMPTS + ["", " leading space", "Tabs\tand\nnewlines", "unicode: caf\u00e9 \u00fc\u00f1\u00ee \u2603 \U0001F600",
                       "<|im_start|>user<|im_end|>"]
    ex = []
    for t in texts:
        ids = tok(t).input_ids
        ex.append(dict(text=t, ids=ids, tokens=tok.convert_ids_to_tokens(ids),
                       decoded=tok.decode(ids), decoded_skip_special=tok.decode(ids, skip_special_tokens=True)))
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # the template already emits bos; tokenize without the post-processor's bos
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    doc = dict(description="Tokenizer reference: ids are from tokenizer(text) (post-processor prepends <|bos|>=1); "
                           "chat: apply_chat_template(messages, add_generation_prompt=True) then tokenize with "
                           "add_special_tokens=False.",
               vocab_size=len(tok), special_tokens={t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
               examples=ex, chat=dict(messages=msgs, add_generation_prompt=True, rendered=rendered, ids=chat_ids))
    (tdir / "examples.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def make_bad_adapters(d: Path, tok, cls):
    """Adapters that lorac must refuse (or handle specially). Only for llama."""
    bd = d / "bad_adapters"
    if bd.exists():
        shutil.rmtree(bd)
    bd.mkdir()
    desc = {}

    def peft_save(sub, seed, **kw):
        seed_all(seed)
        m = cls.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
        resize = kw.pop("_resize_vocab", None)
        save_emb = kw.pop("_save_embedding_layers", False)
        if resize:
            m.resize_token_embeddings(resize, mean_resizing=False)
        lcfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False, **kw)
        pm = get_peft_model(m, lcfg)
        randomize_lora(pm, seed)
        pm.save_pretrained(str(bd / sub), safe_serialization=True, save_embedding_layers=save_emb)
        normalize_adapter_dir(bd / sub, "llama")

    peft_save("rank_128", 501, r=128, lora_alpha=128, target_modules=["q_proj"], layers_to_transform=[0])
    desc["rank_128"] = "r=128 LoRA on q_proj of layer 0 only (rank above the supported maximum of 64)."
    peft_save("dora", 502, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True)
    desc["dora"] = "use_dora=True on q_proj,v_proj: has extra lora_magnitude_vector tensors (DoRA unsupported)."
    peft_save("lm_head_only", 503, r=8, lora_alpha=16, target_modules=["lm_head"])
    desc["lm_head_only"] = ("LoRA only on lm_head (valid PEFT adapter; a module no other adapter targets -- "
                            "lorac must either support it or refuse it cleanly).")
    peft_save("modules_to_save_embed", 504, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
              modules_to_save=["embed_tokens"])
    desc["modules_to_save_embed"] = ("LoRA on q_proj,v_proj plus modules_to_save=['embed_tokens']: the adapter carries a full "
                                     "replacement embedding matrix (not LoRA); expected to be refused.")
    peft_save("added_tokens", 505, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
              trainable_token_indices={"embed_tokens": list(range(VOCAB_SIZE, VOCAB_SIZE + 8))},
              _resize_vocab=VOCAB_SIZE + 8)
    desc["added_tokens"] = (f"Base vocabulary resized {VOCAB_SIZE} -> {VOCAB_SIZE + 8} (8 added tokens) before attaching the "
                            "adapter; LoRA on q_proj,v_proj plus PEFT trainable_token_indices for the 8 new token rows "
                            "(tensor ...embed_tokens.token_adapter.trainable_tokens_delta). Saved with "
                            "save_embedding_layers=False, so it only works on a base whose vocab was resized to "
                            f"{VOCAB_SIZE + 8}; expected to be refused.")

    # File-level corruptions derived from the good adapter B.
    good = d / "adapters" / "B"
    st = good / "adapter_model.safetensors"

    sub = bd / "truncated"
    shutil.copytree(good, sub)
    raw = st.read_bytes()
    (sub / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    desc["truncated"] = f"Copy of adapters/B with adapter_model.safetensors cut to its first half ({len(raw)//2} of {len(raw)} bytes)."

    tensors = load_file(str(st))
    keys = sorted(tensors)

    sub = bd / "missing_tensor"
    shutil.copytree(good, sub)
    missing = [k for k in keys if "lora_B" in k][0]
    t2 = {k: v for k, v in tensors.items() if k != missing}
    save_file(t2, str(sub / "adapter_model.safetensors"), metadata={"format": "pt"})
    desc["missing_tensor"] = f"Copy of adapters/B with tensor '{missing}' deleted."

    sub = bd / "wrong_shape"
    shutil.copytree(good, sub)
    victim = [k for k in keys if "lora_A" in k][0]
    t3 = dict(tensors)
    r, n = t3[victim].shape
    t3[victim] = t3[victim][:, : n // 2].contiguous().clone()
    save_file(t3, str(sub / "adapter_model.safetensors"), metadata={"format": "pt"})
    desc["wrong_shape"] = f"Copy of adapters/B with '{victim}' shape [{r}, {n}] replaced by [{r}, {n // 2}]."

    lines = ["# Bad / unsupported adapters for the tiny llama", "",
             "Generated by `scripts/make_tiny_models.py`; the base model is `../` (tests/fixtures/tiny/llama).",
             "Each directory is a PEFT-style adapter dir (adapter_config.json + adapter_model.safetensors).", ""]
    for k in sorted(desc):
        lines.append(f"- `{k}/`: {desc[k]}")
        files = sorted(p.name for p in (bd / k).iterdir())
        lines.append(f"  - files: {', '.join(files)}")
        stp = bd / k / "adapter_model.safetensors"
        if k != "truncated":
            lst, _ = list_safetensors(stp)
            for tn, shp, dt in lst:
                lines.append(f"  - `{tn}` {shp} {dt}")
    (bd / "README.md").write_text("\n".join(lines) + "\n")
    return desc


# ---------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def layout_keys(cfg_json: dict):
    keys = ["model_type", "architectures", "num_hidden_layers", "layer_types", "layers_block_type",
            "hybrid_override_pattern", "full_attention_interval", "first_k_dense_replace", "decoder_sparse_step",
            "mlp_only_layers", "moe_layer_freq", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
            "head_dim", "num_attention_heads", "num_key_value_heads", "num_experts", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts"]
    out = {}
    for k in keys:
        if k in cfg_json:
            out[k] = cfg_json[k]
    return out


def pattern_table(path: Path):
    import re
    lst, _ = list_safetensors(path)
    pats = {}
    for k, shp, dt in lst:
        p = re.sub(r"layers\.(\d+)\.", "layers.{i}.", k)
        p = re.sub(r"experts\.(\d+)\.", "experts.{e}.", p)
        m = re.search(r"layers\.(\d+)\.", k)
        e = re.search(r"experts\.(\d+)\.", k)
        ent = pats.setdefault((p, tuple(shp), dt), [set(), set()])
        if m:
            ent[0].add(int(m.group(1)))
        if e:
            ent[1].add(int(e.group(1)))
    out = []
    for (p, shp, dt), (ls, es) in sorted(pats.items()):
        extra = ""
        if ls:
            extra += f" layers={sorted(ls)}"
        if es:
            extra += f" experts={min(es)}..{max(es)}"
        out.append(f"{p} {list(shp)} {dt}{extra}")
    return out


def write_manifest(out: Path, done: dict, skipped: dict):
    versions = dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                    peft=peft.__version__, safetensors=safetensors.__version__, tokenizers=tokenizers.__version__,
                    numpy=np.__version__)
    L = ["# Tiny model fixtures", "",
         "Generated by an independent implementation (PyTorch CPU + Hugging Face transformers + PEFT) with random",
         "weights and a locally trained byte-level BPE tokenizer. Do not edit by hand: regenerate with", "",
         "```", "python3 -m venv /work/venv && /work/venv/bin/pip install -r scripts/requirements.txt",
         f"{GENERATOR_CMD}", "```", "",
         "Library versions used:", ""]
    for k, v in versions.items():
        L.append(f"- {k} {v}")
    manifest_free = dir_size(out) - ((out / "MANIFEST.md").stat().st_size if (out / "MANIFEST.md").exists() else 0)
    L += ["", f"Total size of tests/fixtures/tiny (excluding this file): {manifest_free} bytes", "",
          "Tokenizer (shared, copied into each model dir): byte-level BPE, vocab "
          f"{VOCAB_SIZE}, special tokens {SPECIAL_TOKENS} (ids 0..4), bos `<|bos|>`=1 is prepended by the "
          "post-processor, eos `<|eos|>`=2, pad `<|pad|>`=0, ChatML-like chat_template.", ""]
    L += ["## Notes", "",
          "- Weights were created by transformers' own init with `initializer_range=0.08` (fixed seed per model), then every "
          "tensor that HF initialises to a constant (norm weights, biases, Mamba `D`, `e_score_correction_bias`, ...) got "
          "N(0, 0.1) noise, then the model was saved with `save_pretrained(safe_serialization=True)` in float32 (llama_wide: "
          "bfloat16) and reloaded from disk in float32 to compute the references.",
          "- transformers 5 keeps MoE experts fused in memory (`mlp.experts.gate_up_proj` / `down_proj` 3-D tensors) but "
          "`save_pretrained` converts back to the hub layout, so every file here stores experts per expert "
          "(`...mlp.experts.{e}.gate_proj.weight` etc.), as real hub checkpoints do.",
          "- `config.json` is transformers 5's own serialisation (`rope_parameters`, nemotron_h `layers_block_type`, "
          "qwen3_next `layer_types`). Where the older hub spelling differs, `config.hub_style.json` holds the same config "
          "with `rope_theta` + `rope_scaling` (+ top-level `partial_rotary_factor`), nemotron_h `hybrid_override_pattern`, "
          "qwen3_next `full_attention_interval`; the generator checks that transformers loads it to an identical config.",
          "- qwen3_5 / qwen3_5_moe are saved as `Qwen3_5(Moe)ForConditionalGeneration` (model_type `qwen3_5`/`qwen3_5_moe`, "
          "decoder config nested under `text_config` with model_type `qwen3_5_text`/`qwen3_5_moe_text`, decoder weights "
          "under `model.language_model.`, a tiny vision tower under `model.visual.`), which is how the real Qwen3.5 "
          "checkpoints are laid out (the real ones also carry `mtp.*` multi-token-prediction weights, which transformers "
          "neither creates nor uses). `AutoModelForCausalLM` loads these dirs as the text-only "
          "`Qwen3_5(Moe)ForCausalLM` and reproduces the reference logits (max abs diff ~2e-6).",
          "- LoRA scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`. Linear: "
          "`y = W x + scaling * B (A x)` with `lora_A.weight [r, in]`, `lora_B.weight [out, r]`. Embedding: "
          "`lora_embedding_A [r, vocab]`, `lora_embedding_B [hidden, r]`, `e(t) = E[t] + scaling * B @ A[:, t]`. PEFT "
          "key prefix: `base_model.model.` + the base model's module name.",
          "- Linear-attention / SSM layers run on transformers' pure-PyTorch fallbacks (chunked gated delta rule and "
          "torch causal conv for GDN; the chunked SSD scan with chunk_size 16 for Mamba2); KV-cached `generate` agrees "
          "with full recomputation for every row (`generate_matches_nocache` in each reference.json).",
          "- Greedy top-1/top-2 logit margins per generated token are recorded (`greedy_top1_top2_margins`); some are "
          "below 1e-3, so compare generations only where the implementation's error is below the margin.",
          ""]
    if skipped:
        L += ["## Not generated", ""]
        for k, v in skipped.items():
            L.append(f"- `{k}`: {v}")
        L.append("")
    for name, info in done.items():
        d = out / name
        L += [f"## {name}", "", f"- command: `{GENERATOR_CMD} --only {name}` (or without --only for all)",
              f"- class: {info['class']}", f"- summary: {info['summary']}", f"- dir size: {dir_size(d)} bytes",
              f"- files: {', '.join(sorted(p.name for p in d.iterdir()))}", ""]
        cj = json.loads((d / "config.json").read_text())
        L += ["Layer-layout keys in config.json:", "", "```json", json.dumps(layout_keys(cj), indent=1), "```", ""]
        if "text_config" in cj:
            L += ["text_config layout keys:", "", "```json", json.dumps(layout_keys(cj["text_config"]), indent=1), "```", ""]
        hs = info.get("hub_style_config")
        if hs == "config.hub_style.json":
            hj = json.loads((d / hs).read_text())
            L += ["`config.hub_style.json` (same model, older key spelling as in most hub checkpoints; verified to load "
                  "to an identical config in transformers) layout keys:", "", "```json",
                  json.dumps(layout_keys(hj), indent=1), "```", ""]
        elif hs:
            L += [f"hub-style config: {hs}", ""]
        if info.get("perturbed_constant_tensors"):
            L += ["Tensors that HF initialises to a constant and that were perturbed with N(0, 0.1) noise (so a runtime "
                  "that ignores them cannot match; transformers in-memory names, which can differ from the file's): " + ", ".join(f"`{x}`" for x in info["perturbed_constant_tensors"]), ""]
        L += ["Full config.json:", "", "<details><summary>config.json</summary>", "", "```json",
              (d / "config.json").read_text().strip(), "```", "</details>", ""]
        L += ["Weight-name patterns in `model.safetensors` (`{i}` = layer, `{e}` = expert; layers listed where the "
              "pattern occurs):", "", "```"] + pattern_table(d / "model.safetensors") + ["```", ""]
        for stf in sorted(d.rglob("*.safetensors")):
            rel = stf.relative_to(d)
            if "bad_adapters" in rel.parts and stf.parent.name == "truncated":
                continue
            try:
                lst, meta = list_safetensors(stf)
            except Exception as e:
                L += [f"`{rel}`: unreadable ({e})", ""]
                continue
            L += [f"Tensors in `{rel}` (metadata {meta}):", "", "```"]
            for tn, shp, dt in lst:
                L.append(f"{tn} {shp} {dt}")
            L += ["```", ""]
    (out / "MANIFEST.md").write_text("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ARCHS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s] or list(ARCHS)

    tok = build_tokenizer()
    tdir = out / "tokenizer"
    if tdir.exists():
        shutil.rmtree(tdir)
    save_tokenizer(tok, tdir)
    write_tokenizer_examples(tok, tdir)

    done, skipped = {}, {}
    status_path = out / "generation_status.json"
    prev = json.loads(status_path.read_text()) if status_path.exists() else {}
    for name in only:
        print(f"== {name}", flush=True)
        try:
            model, cfg, summary, d, perturbed = make_model(name, out, tok)
        except Exception as e:
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f"   SKIPPED {skipped[name]}", flush=True)
            continue
        cls = type(model)
        if name in WITH_ADAPTERS:
            make_adapters_and_reference(name, model, tok, d, cls)
            if name == "llama":
                make_bad_adapters(d, tok, cls)
        else:
            reference_base_only(name, model, tok, d)
        legacy = write_hub_style_config(name, d, cls)
        done[name] = {"class": cls.__name__, "summary": summary, "perturbed_constant_tensors": perturbed,
                      "hub_style_config": legacy}
        print(f"   ok {dir_size(d)} bytes", flush=True)
    # merge with previous status so --only runs keep the manifest complete
    status = {k: v for k, v in prev.items() if k in ARCHS and k not in only}
    for k, v in done.items():
        status[k] = dict(ok=True, **v)
    for k, v in skipped.items():
        status[k] = dict(ok=False, error=v)
    status = {k: status[k] for k in ARCHS if k in status}
    status_path.write_text(json.dumps(status, indent=1) + "\n")
    write_manifest(out, {k: v for k, v in status.items() if v.get("ok")},
                   {k: v["error"] for k, v in status.items() if not v.get("ok")})
    print(f"total fixtures size: {dir_size(out)} bytes")


if __name__ == "__main__":
    main()
