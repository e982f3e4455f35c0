#!/usr/bin/env python3
"""The decode benchmark's workload with HF transformers + PEFT (the baseline for
runtime/src/bin/decode_bench.rs), written the way a user would: bf16 model on the GPU,
`model.generate` with greedy decoding and its default (dynamic) KV cache, PEFT adapters loaded
with `PeftModel.from_pretrained` / `load_adapter`, mixed-adapter batches through
`generate(..., adapter_names=[...])`.

Cases: batch 1, 8, 32 × 0, 1, 8 distinct adapters (n > batch skipped). Row i of a case with
n adapters uses adapter `a{i % n}`; 0 adapters is the plain transformers model (measured before
PEFT wraps it); 1 adapter is `set_adapter("a0")` and a plain generate.

Decode time per step: (T(1 + N new tokens) - T(1 new token)) / N, each T the median of
`--reps` synchronised generate calls after a warm-up call, so the prefill and generate's
fixed costs cancel; tokens/s = batch / step time. The prefill time is T(1 new token).

Also, with `--matmul`, cuBLAS (torch.nn.functional.linear) at the decode step's projection
shapes, for comparison with decode_bench's op breakdown.

Usage: hf_decode_bench.py --model DIR --adapters DIR... [--new-tokens 32] [--prompt-len 128]
       [--csv FILE] [--matmul]
"""

import argparse
import statistics
import sys
import time

import torch


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_table(cfg) -> None:
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    shapes = [("qkv_proj", qkv, h), ("o_proj", h, cfg.num_attention_heads * d), ("gate_up_proj", 2 * i, h), ("down_proj", h, i), ("lm_head", cfg.vocab_size, h)]
    print("\n# cuBLAS (F.linear, bf16) at the decode projections: µs per call, GB/s over the weight bytes")
    print("| batch | op | µs | GB/s |")
    print("|---|---|---|---|")
    for m in (1, 8, 32):
        for name, n, k in shapes:
            copies = max(1, min(8, -(-4 * 50 * 2**20 // (n * k * 2))))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            state = {"i": 0}

            def call():
                for _ in range(50):
                    torch.nn.functional.linear(x, ws[state["i"] % copies])
                    state["i"] += 1

            us = timed(call, 7) / 50 * 1e6
            print(f"| {m} | {name} ({n}×{k}) | {us:.1f} | {n * k * 2 / us / 1e3:.0f} |")
            del ws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", nargs="+", default=[])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--adapter-counts", default="0,1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--csv")
    ap.add_argument("--matmul", action="store_true")
    args = ap.parse_args()

    import peft
    import transformers
    from transformers import AutoModelForCausalLM

    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {torch.cuda.get_device_name()}", flush=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    print(f"# model load: {time.perf_counter() - t0:.1f} s, attention implementation {model.config._attn_implementation}", flush=True)
    if args.matmul:
        matmul_table(model.config)

    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(c) for c in args.adapter_counts.split(",")]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen).cuda() for b in batches}
    results = []

    def run_case(m, batch: int, n: int) -> None:
        ids = prompts[batch]
        mask = torch.ones_like(ids)
        extra = {"adapter_names": [f"a{i % n}" for i in range(batch)]} if n > 1 else {}

        def generate(new: int):
            return lambda: m.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

        with torch.inference_mode():
            t_one = timed(generate(1), args.reps)
            t_all = timed(generate(1 + args.new_tokens), args.reps)
        step = (t_all - t_one) / args.new_tokens
        results.append((batch, n, step, t_one))
        print(f"batch {batch:>3} adapters {n}: step {step * 1e3:.2f} ms, {batch / step:.1f} tok/s; prefill (generate of 1 token) {t_one * 1e3:.1f} ms", flush=True)

    for b in batches:
        if 0 in counts:
            run_case(model, b, 0)
    if any(c > 0 for c in counts):
        from peft import PeftModel

        t0 = time.perf_counter()
        pm = PeftModel.from_pretrained(model, args.adapters[0], adapter_name="a0")
        for i, path in enumerate(args.adapters[1:], start=1):
            pm.load_adapter(path, adapter_name=f"a{i}")
        pm.set_adapter("a0")
        pm.eval()
        print(f"# {len(args.adapters)} PEFT adapters loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        for b in batches:
            for n in counts:
                if n == 0:
                    continue
                if n > b:
                    print(f"# batch {b}: skipping {n} distinct adapters (more than rows)")
                    continue
                if n > len(args.adapters):
                    sys.exit(f"{n} adapters asked for, {len(args.adapters)} given")
                run_case(pm, b, n)

    print("\n| batch | adapters | step ms | tok/s | vs 0 adapters | prefill ms |")
    print("|---|---|---|---|---|---|")
    lines = ["batch,adapters,step_ms,tokens_per_s,overhead_vs_base,prefill_ms"]
    for batch, n, step, t_one in results:
        base = next((s for b, c, s, _ in results if b == batch and c == 0), None)
        over = "" if base is None else f"{step / base - 1:.4f}"
        over_text = "-" if base is None else f"{(step / base - 1) * 100:+.1f}%"
        print(f"| {batch} | {n} | {step * 1e3:.2f} | {batch / step:.1f} | {over_text} | {t_one * 1e3:.1f} |")
        lines.append(f"{batch},{n},{step * 1e3:.4f},{batch / step:.2f},{over},{t_one * 1e3:.3f}")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
