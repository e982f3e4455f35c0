#!/usr/bin/env python3
"""The obvious PyTorch multi-LoRA implementations, timed on the same cases as lora_bench.

* gather+bmm: gather each token's A and B (``A[slot_of_token]``) and ``torch.bmm``; the
  textbook batched-LoRA formulation (decode sizes only: at T=4096 the gathered weights would
  take tens of GB).
* loop: one ``x[idx] @ A[s].T @ B[s].T`` per adapter in the batch, with the per-adapter token
  indices precomputed outside the timed region (which favours PyTorch).
* MoE: gather A and B per (token, expert) pair and ``bmm``; the router-weighted down projection
  is summed over experts with ``index_add_``.

Times are medians over repetitions of many back-to-back calls, CUDA events around each batch,
with inputs rotated over the same number of buffer sets as lora_bench so weights come from HBM.
Prints CSV: case,impl,us.
"""
import argparse
import math

import torch

SLOTS = 8
L2_BYTES = 50e6
DT = torch.bfloat16
DEV = "cuda"

MODULES = [
    ("qkv", 4096, 3, [(4096, 0), (1024, 1), (1024, 2)]),
    ("gate_up", 4096, 2, [(14336, 0), (14336, 1)]),
    ("mla_qkv_a", 7168, 2, [(1536, 0), (576, 1)]),
]
SHAPES = [(1, 1), (8, 1), (8, 8), (32, 1), (32, 8), (128, 1), (128, 8), (4096, 8)]
MOE_SHAPES = [(1, 1), (8, 8), (32, 8), (128, 8), (1024, 8)]


def time_us(fn, iters, reps=15):
    for i in range(min(iters, 20)):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    for rep in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(rep * iters + i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = time_us(lambda i: dst.copy_(src), 20)
    return 2 * n / (us * 1e-6) / 1e9


def rotation_sets(bytes_moved, bytes_per_set):
    want = math.ceil(4 * L2_BYTES / bytes_moved)
    budget = int(16e9 / bytes_per_set)
    return max(1, min(max(2, min(want, 64)), budget))


def dense_case(name, k, groups, slices, rank, t, adapters):
    out = sum(w for w, _ in slices)
    c_r = groups * rank
    moved = t * k * 2 + adapters * c_r * k * 2 + 2 * t * c_r * 4 + adapters * out * rank * 2 + 2 * t * out * 2
    set_bytes = SLOTS * (c_r * k + out * rank) * 2 + t * (k + out) * 2
    sets = rotation_sets(moved, set_bytes)
    data = []
    for _ in range(sets):
        data.append(dict(
            A=torch.randn(SLOTS, c_r, k, dtype=DT, device=DEV) * 0.05,
            B=torch.randn(SLOTS, out, rank, dtype=DT, device=DEV) * 0.05,
            x=torch.randn(t, k, dtype=DT, device=DEV),
            y=torch.randn(t, out, dtype=DT, device=DEV),
        ))
    scales = torch.full((SLOTS,), 0.5, dtype=DT, device=DEV)
    slot_of_token = torch.arange(t, device=DEV) % adapters
    offsets = [0]
    for w, _ in slices:
        offsets.append(offsets[-1] + w)
    per_adapter = [(s, (slot_of_token == s).nonzero().squeeze(1)) for s in range(adapters)]
    scale_tok = scales[slot_of_token].unsqueeze(1)

    def gather_bmm(i):
        d = data[i % sets]
        a = torch.bmm(d["A"][slot_of_token], d["x"].unsqueeze(2))  # [T, cR, 1]
        bt = d["B"][slot_of_token]  # [T, out, R]
        for j, (w, g) in enumerate(slices):
            lo, hi = offsets[j], offsets[j + 1]
            delta = torch.bmm(bt[:, lo:hi, :], a[:, g * rank:(g + 1) * rank, :]).squeeze(2)
            d["y"][:, lo:hi] += scale_tok * delta

    def loop(i):
        d = data[i % sets]
        for s, idx in per_adapter:
            a = d["x"][idx] @ d["A"][s].T  # [n, cR]
            delta = torch.cat([a[:, g * rank:(g + 1) * rank] @ d["B"][s, offsets[j]:offsets[j + 1]].T for j, (w, g) in enumerate(slices)], dim=1)
            d["y"].index_add_(0, idx, delta * scales[s])

    iters = 20 if t >= 1024 else 100
    case = f"{name} R={rank} T={t} adapters={adapters}"
    rows = [(case, "loop", time_us(loop, iters))]
    if t <= 128:
        rows.append((case, "gather_bmm", time_us(gather_bmm, iters)))
    del data
    torch.cuda.empty_cache()
    return rows


def moe_case(rank, t, adapters):
    hidden, inter, experts, topk = 2048, 1024, 64, 8
    rows = []
    slot_of_token = torch.arange(t, device=DEV) % adapters
    for name, k, groups, slices, per_pair_in, weighted in [
        ("moe_gate_up", hidden, 2, [(inter, 0), (inter, 1)], False, False),
        ("moe_down", inter, 1, [(hidden, 0)], True, True),
    ]:
        out = sum(w for w, _ in slices)
        A = torch.randn(SLOTS, experts, groups * rank, k, dtype=DT, device=DEV) * 0.05
        B = torch.randn(SLOTS, experts, out, rank, dtype=DT, device=DEV) * 0.05
        sets = 16
        pairs = t * topk
        data = []
        for _ in range(sets):
            ids = torch.stack([torch.randperm(experts, device=DEV)[:topk] for _ in range(t)]).reshape(-1)
            data.append(dict(
                ids=ids,
                w=torch.full((pairs,), 1.0 / topk, dtype=DT, device=DEV),
                x=torch.randn(pairs if per_pair_in else t, k, dtype=DT, device=DEV),
                y=torch.randn(t if weighted else pairs, out, dtype=DT, device=DEV),
            ))
        slot_pair = slot_of_token.repeat_interleave(topk)
        tok_pair = torch.arange(t, device=DEV).repeat_interleave(topk)
        offsets = [0]
        for w, _ in slices:
            offsets.append(offsets[-1] + w)

        def gather_bmm(i):
            d = data[i % sets]
            x_rows = d["x"] if per_pair_in else d["x"][tok_pair]
            a = torch.bmm(A[slot_pair, d["ids"]], x_rows.unsqueeze(2))  # [P, cR, 1]
            bt = B[slot_pair, d["ids"]]  # [P, out, R]
            delta = torch.cat([torch.bmm(bt[:, offsets[j]:offsets[j + 1], :], a[:, g * rank:(g + 1) * rank, :]).squeeze(2) for j, (w, g) in enumerate(slices)], dim=1) * 0.5
            if weighted:
                d["y"].index_add_(0, tok_pair, delta * d["w"].unsqueeze(1))
            else:
                d["y"] += delta

        iters = 20 if t >= 1024 else 100
        rows.append((f"{name} R={rank} T={t} adapters={adapters}", "gather_bmm", time_us(gather_bmm, iters)))
        del A, B, data
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [f"# torch {torch.__version__} on {torch.cuda.get_device_name()}; copy_GBps={copy_bandwidth():.0f}", "case,impl,us"]
    print(lines[0], flush=True)
    ranks = [16] if args.quick else [16, 64]
    for name, k, groups, slices in MODULES:
        for rank in ranks:
            for t, adapters in SHAPES:
                for case, impl, us in dense_case(name, k, groups, slices, rank, t, adapters):
                    lines.append(f"{case},{impl},{us:.2f}")
                    print(lines[-1], flush=True)
    for rank in ranks:
        for t, adapters in MOE_SHAPES:
            for case, impl, us in moe_case(rank, t, adapters):
                lines.append(f"{case},{impl},{us:.2f}")
                print(lines[-1], flush=True)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
