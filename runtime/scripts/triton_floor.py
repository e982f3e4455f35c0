#!/usr/bin/env python3
"""What an independent GPU implementation reaches on lora_bench's decode cases, and what merely
reading the bytes costs, each replayed from a CUDA graph as lora_bench's graph rows are.

* read floor: a Triton kernel that only reads N bytes (bf16, summed per program, one float
  written per program), best of a few tile shapes, for N from 0.25 to 50 MB; plus an empty
  kernel and two reads back to back (the bytes of a shrink, then those of an expand). This is
  the least a kernel that must stream that many bytes from HBM costs in a graph.
* triton pair: a segmented LoRA shrink + expand written in Triton here (tokens contiguous per
  segment, every adapter of rank R; tl.dot on 16-token tiles, split K with f32 partial sums
  that the expand adds up, B read once per column block), best of a small sweep, timed plainly
  and with programmatic dependent launch (B and the first A tile loaded before the wait).
  Not a copy of any engine's kernel: a strong baseline of the kind an engine ships.
* `--fused`: an experiment, the shrink and expand in one kernel (`fused_pair_kernel`, the
  expand programs waiting on per-segment counters); see `fused_rows` for what it showed.

Inputs rotate over enough buffer sets that every launch streams from HBM (4x the 50 MB L2).
Prints CSV rows to stdout: section,case,variant,us,MB,GBps,frac_copy.

`--check` runs the pair on the CPU through Triton's interpreter (TRITON_INTERPRET=1) on small
shapes and compares it with a float64 reference; no GPU needed.
"""
import argparse
import math
import os
import sys

if "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: no programmatic launch rows
    gdc_wait = gdc_launch_dependents = None

L2_BYTES = 50e6
SLOTS = 8
MODULES = {
    "qkv": (4096, [4096, 1024, 1024]),
    "gate_up": (4096, [14336, 14336]),
    "mla_qkv_a": (7168, [1536, 576]),
}


@triton.jit
def read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out + pid, tl.sum(acc, axis=0))


@triton.jit
def empty_kernel(out):
    pass


@triton.jit
def segment_of(seg_ptr, seg_slot, seg):
    """Segment `seg`'s token range and adapter slot."""
    start = tl.load(seg_ptr + seg)
    end = tl.load(seg_ptr + seg + 1)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    return start, end, slot


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Under a programmatic launch: wait for the kernel before, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def shrink_kernel(x, a, part, seg_ptr, seg_slot, K, CR, T,
                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
                  PDL: tl.constexpr):
    """part[ks, t, r] = sum over K share ks of x[t, :] * A[slot(t), r, :]."""
    shrink_tile(x, a, part, seg_ptr, seg_slot, tl.program_id(0), tl.program_id(1), tl.program_id(2), K, CR, T,
                BLOCK_T, BLOCK_R, BLOCK_K, K_SPLIT, PDL)


@triton.jit
def shrink_tile(x, a, part, seg_ptr, seg_slot, seg, rb, ks, K, CR, T,
                BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
                PDL: tl.constexpr):
    """Row block `rb` and K share `ks` of segment `seg`'s shrink (see `shrink_kernel`)."""
    start, end, slot = segment_of(seg_ptr, seg_slot, seg)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    k_per = K // K_SPLIT
    k_lo = ks * k_per
    kk = tl.arange(0, BLOCK_K)
    a_rows = a + (slot * CR + r)[:, None] * K
    # The first A tile needs nothing the kernel before writes: under a programmatic launch it
    # streams in while that kernel finishes.
    a_first = tl.load(a_rows + (k_lo + kk)[None, :])
    wait_for_previous(PDL)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        x_rows = x + t.to(tl.int64)[:, None] * K
        xv = tl.load(x_rows + (k_lo + kk)[None, :], mask=tmask[:, None], other=0.0)
        acc = tl.dot(xv, tl.trans(a_first))
        for k0 in range(k_lo + BLOCK_K, k_lo + k_per, BLOCK_K):
            xv = tl.load(x_rows + (k0 + kk)[None, :], mask=tmask[:, None], other=0.0)
            av = tl.load(a_rows + (k0 + kk)[None, :])
            acc = tl.dot(xv, tl.trans(av), acc)
        tl.store(part + (ks * T + t)[:, None] * CR + r[None, :], acc, mask=tmask[:, None])


@triton.jit
def expand_block(b, seg_ptr, seg_slot, seg, nb, N, S1, S2, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column block `nb` of segment `seg`'s expand: the segment's token range, the block's
    intermediate group `g`, its columns `n`, the rank indices `j` and its B rows (loaded)."""
    start, end, slot = segment_of(seg_ptr, seg_slot, seg)
    n0 = nb * BLOCK_N
    g = (n0 >= S1).to(tl.int32) + (n0 >= S2).to(tl.int32)
    n = n0 + tl.arange(0, BLOCK_N)
    j = tl.arange(0, R)
    bv = tl.load(b + (slot * N + n)[:, None] * R + j[None, :])
    return start, end, g, n, j, bv


@triton.jit
def expand_kernel(part, b, y, seg_ptr, seg_slot, N, CR, T, S1, S2, scale,
                  R: tl.constexpr, K_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  PDL: tl.constexpr):
    """y[t, n] += scale * sum_j a[t, g(n)*R + j] * B[slot(t), n, j], a summed over the K splits."""
    start, end, g, n, j, bv = expand_block(b, seg_ptr, seg_slot, tl.program_id(0), tl.program_id(1), N, S1, S2, R, BLOCK_N)
    wait_for_previous(PDL)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        av = tl.zeros([BLOCK_T, R], dtype=tl.float32)
        for ks in tl.static_range(K_SPLIT):
            av += tl.load(part + (ks * T + t)[:, None] * CR + (g * R + j)[None, :], mask=tmask[:, None], other=0.0)
        y_ptr = y + t.to(tl.int64)[:, None] * N + n[None, :]
        yv = tl.load(y_ptr, mask=tmask[:, None], other=0.0)
        delta = tl.dot(av.to(bv.dtype), tl.trans(bv))
        tl.store(y_ptr, (yv.to(tl.float32) + scale * delta).to(yv.dtype), mask=tmask[:, None])


@triton.jit
def load_around_l1(ptrs, mask, safe_ptr, L2_LOADS: tl.constexpr):
    """f32 loads that bypass L1 (`ld.global.cg`): another multiprocessor wrote these values
    during this launch, and a 128-byte line this one cached earlier (lines span the rows of
    two segments) would be stale. Triton ignores `cache_modifier` and `volatile` on loads its
    pipeliner turns into asynchronous copies, which cache in L1. Without `L2_LOADS` (the CPU
    interpreter, which has no inline assembly) a plain load."""
    if L2_LOADS:
        v = tl.inline_asm_elementwise("ld.global.cg.f32 $0, [$1];", "=f,l", [tl.where(mask, ptrs, safe_ptr)],
                                      dtype=tl.float32, is_pure=False, pack=1)
        return tl.where(mask, v, 0.0)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def fused_pair_kernel(x, a, b, y, part, sync, seg_ptr, seg_slot, K, N, CR, T, S1, S2, scale, n_segments,
                      R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, SYNC_BLOCK: tl.constexpr, PDL: tl.constexpr,
                      L2_LOADS: tl.constexpr, TICKET: tl.constexpr = True, WAIT: tl.constexpr = True):
    """The shrink and the expand in one grid. `sync` (int32, zero between launches) holds a
    ticket, a count of finished programs and one count of finished shrink programs per segment.

    Each program takes a ticket: the first `segments * shrink_per_segment` tickets are shrink
    programs, the rest expand programs, which spin until their segment's shrink programs have
    all published their partial sums. A program that holds a ticket is running, and every
    lower ticket went to a program that was already running, so an expand program only ever
    waits for programs that are resident: no deadlock, whatever order the hardware schedules
    the grid in. The last program to finish sets `sync` back to zero for the next launch.

    Timing bounds only (wrong results): without `TICKET` roles follow the program id (no
    ticket round trip); without `WAIT` expand programs do not wait for the shrink's sums.
    """
    if TICKET:
        ticket = tl.atomic_add(sync, 1)
    else:
        ticket = tl.program_id(0)
    rows_per_seg = CR // BLOCK_R
    shrink_per_seg = rows_per_seg * K_SPLIT
    expand_per_seg = N // BLOCK_N
    n_shrink = n_segments * shrink_per_seg
    total = n_shrink + n_segments * expand_per_seg
    if ticket < n_shrink:
        seg = ticket // shrink_per_seg
        rb = (ticket % shrink_per_seg) // K_SPLIT
        ks = ticket % K_SPLIT
        shrink_tile(x, a, part, seg_ptr, seg_slot, seg, rb, ks, K, CR, T, BLOCK_T, BLOCK_R, BLOCK_K, K_SPLIT, PDL)
        # Every thread's partial sums are written before one thread publishes them.
        tl.debug_barrier()
        tl.atomic_add(sync + 2 + seg, 1, sem="release", scope="gpu")
    else:
        e = ticket - n_shrink
        seg = e // expand_per_seg
        start, end, g, n, j, bv = expand_block(b, seg_ptr, seg_slot, seg, e % expand_per_seg, N, S1, S2, R, BLOCK_N)
        wait_for_previous(PDL)
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < end
        y_ptr = y + t.to(tl.int64)[:, None] * N + n[None, :]
        yv = tl.load(y_ptr, mask=tmask[:, None], other=0.0)
        if WAIT:
            done_shrinks = tl.atomic_add(sync + 2 + seg, 0, sem="acquire", scope="gpu")
            while done_shrinks < shrink_per_seg:
                done_shrinks = tl.atomic_add(sync + 2 + seg, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tmask = t < end
            av = tl.zeros([BLOCK_T, R], dtype=tl.float32)
            for ks in tl.static_range(K_SPLIT):
                av += load_around_l1(part + (ks * T + t)[:, None] * CR + (g * R + j)[None, :], tmask[:, None], part, L2_LOADS)
            y_ptr = y + t.to(tl.int64)[:, None] * N + n[None, :]
            if t0 != start:
                yv = tl.load(y_ptr, mask=tmask[:, None], other=0.0)
            delta = tl.dot(av.to(bv.dtype), tl.trans(bv))
            tl.store(y_ptr, (yv.to(tl.float32) + scale * delta).to(yv.dtype), mask=tmask[:, None])
    finished = tl.atomic_add(sync + 1, 1, sem="acq_rel", scope="gpu")
    if finished == total - 1:
        offs = tl.arange(0, SYNC_BLOCK)
        tl.store(sync + offs, tl.zeros([SYNC_BLOCK], dtype=tl.int32), mask=offs < 2 + n_segments)


class PairCase:
    """One decode case's buffers (`sets` independent copies) and its Triton launches."""

    def __init__(self, module, rank, tokens, adapters, sets, device, dtype=torch.bfloat16):
        self.name = f"{module} R={rank} T={tokens} adapters={adapters}"
        self.K, widths = MODULES[module]
        self.widths = widths
        self.R, self.T = rank, tokens
        self.CR = len(widths) * rank
        self.N = sum(widths)
        bounds = [sum(widths[: i + 1]) for i in range(len(widths))]
        self.S1 = bounds[0]
        self.S2 = bounds[1] if len(bounds) > 2 else self.N
        per = math.ceil(tokens / adapters)
        ptr = [min(i * per, tokens) for i in range(adapters + 1)]
        self.segments = adapters
        self.seg_ptr = torch.tensor(ptr, dtype=torch.int32, device=device)
        self.seg_slot = torch.tensor([s % SLOTS for s in range(adapters)], dtype=torch.int32, device=device)
        self.max_seg = per
        self.sets = []
        for _ in range(sets):
            self.sets.append(dict(
                x=torch.randn(tokens, self.K, device=device, dtype=dtype),
                a=(torch.randn(SLOTS, self.CR, self.K, device=device) / math.sqrt(self.K)).to(dtype),
                b=(torch.randn(SLOTS, self.N, rank, device=device) / math.sqrt(rank)).to(dtype),
                y=torch.randn(tokens, self.N, device=device, dtype=dtype),
                part=torch.empty(16, tokens, self.CR, device=device, dtype=torch.float32),
                sync=torch.zeros(2 + adapters, device=device, dtype=torch.int32),
            ))
        self.scale = 0.5
        used = min(adapters, SLOTS)
        elem = torch.finfo(dtype).bits // 8
        # lora_bench's minimum: x once, each distinct adapter's A and B once, the f32
        # intermediate written and read once, y read and written once.
        self.shrink_bytes = tokens * self.K * elem + used * self.CR * self.K * elem + tokens * self.CR * 4
        self.expand_bytes = tokens * self.CR * 4 + used * self.N * rank * elem + 2 * tokens * self.N * elem

    def shrink(self, s, cfg, pdl=False):
        d = self.sets[s]
        grid = (self.segments, self.CR // cfg["BLOCK_R"], cfg["K_SPLIT"])
        kwargs = {"launch_pdl": True} if pdl else {}
        shrink_kernel[grid](d["x"], d["a"], d["part"], self.seg_ptr, self.seg_slot, self.K, self.CR, self.T,
                            BLOCK_T=cfg["BLOCK_T"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], K_SPLIT=cfg["K_SPLIT"],
                            PDL=pdl, num_warps=cfg["warps"], num_stages=cfg["stages"], **kwargs)

    def expand(self, s, cfg, k_split, pdl=False):
        d = self.sets[s]
        grid = (self.segments, self.N // cfg["BLOCK_N"])
        kwargs = {"launch_pdl": True} if pdl else {}
        expand_kernel[grid](d["part"], d["b"], d["y"], self.seg_ptr, self.seg_slot, self.N, self.CR, self.T, self.S1, self.S2,
                            self.scale, R=self.R, K_SPLIT=k_split, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], PDL=pdl,
                            num_warps=cfg["warps"], num_stages=1, **kwargs)

    def fused(self, s, scfg, ecfg, pdl=False, **bounds):
        d = self.sets[s]
        programs = self.segments * (self.CR // scfg["BLOCK_R"] * scfg["K_SPLIT"] + self.N // ecfg["BLOCK_N"])
        kwargs = {"launch_pdl": True} if pdl else {}
        fused_pair_kernel[(programs,)](d["x"], d["a"], d["b"], d["y"], d["part"], d["sync"], self.seg_ptr, self.seg_slot,
                                       self.K, self.N, self.CR, self.T, self.S1, self.S2, self.scale, self.segments,
                                       R=self.R, BLOCK_T=16, BLOCK_R=scfg["BLOCK_R"], BLOCK_K=scfg["BLOCK_K"],
                                       K_SPLIT=scfg["K_SPLIT"], BLOCK_N=ecfg["BLOCK_N"],
                                       SYNC_BLOCK=triton.next_power_of_2(2 + self.segments), PDL=pdl,
                                       L2_LOADS=os.environ.get("TRITON_INTERPRET") != "1",
                                       num_warps=4, num_stages=scfg["stages"], **bounds, **kwargs)

    def reference_delta(self, s):
        d = self.sets[s]
        ptr = self.seg_ptr.tolist()
        slots = self.seg_slot.tolist()
        out = torch.zeros(self.T, self.N, dtype=torch.float64)
        x = d["x"].double().cpu()
        for seg in range(self.segments):
            lo, hi = ptr[seg], ptr[seg + 1]
            if lo == hi:
                continue
            a = d["a"][slots[seg]].double().cpu()
            b = d["b"][slots[seg]].double().cpu()
            inter = x[lo:hi] @ a.T
            col = 0
            for g, w in enumerate(self.widths):
                out[lo:hi, col:col + w] = self.scale * inter[:, g * self.R:(g + 1) * self.R] @ b[col:col + w].T
                col += w
        return out


def shrink_configs(case):
    out = []
    for block_k in (128, 256):
        for k_split in (1, 2, 4, 8):
            if case.K % (k_split * block_k) == 0:
                out.append(dict(BLOCK_T=16, BLOCK_R=16, BLOCK_K=block_k, K_SPLIT=k_split, warps=4, stages=3))
    return out


def expand_configs(case):
    return [dict(BLOCK_T=16, BLOCK_N=bn, warps=4) for bn in (64, 128) if all(w % bn == 0 for w in case.widths)]


def check():
    """Interpreter run on small shapes against the float64 reference."""
    torch.manual_seed(0)
    MODULES["tiny_qkv"] = (256, [128, 64, 64])
    MODULES["tiny_mla"] = (256, [128, 64])
    worst = 0.0
    for module, rank, tokens, adapters in [("tiny_qkv", 16, 8, 3), ("tiny_mla", 16, 40, 2), ("tiny_qkv", 32, 5, 8)]:
        case = PairCase(module, rank, tokens, adapters, 1, "cpu", dtype=torch.float32)
        for k_split in (1, 2, 4):
            scfg = dict(shrink_configs(case)[0], BLOCK_K=64, K_SPLIT=k_split)
            for ecfg in expand_configs(case):
                ref = case.reference_delta(0)
                # The pair, then the fused kernel twice (its counters must be back at zero).
                runs = [("pair", lambda: (case.shrink(0, scfg), case.expand(0, ecfg, scfg["K_SPLIT"])))]
                runs += [(f"fused#{i}", lambda: case.fused(0, scfg, ecfg)) for i in (1, 2)]
                for label, launch in runs:
                    y0 = case.sets[0]["y"].clone()
                    launch()
                    got = case.sets[0]["y"].double() - y0.double()
                    case.sets[0]["y"].copy_(y0)
                    err = ((got - ref).norm() / ref.norm()).item()
                    worst = max(worst, err)
                    print(f"check,{case.name},{label} {scfg['K_SPLIT']}x{scfg['BLOCK_K']} n{ecfg['BLOCK_N']},rel_err={err:.2e}")
                if case.sets[0]["sync"].abs().sum().item() != 0:
                    print(f"check,{case.name},fused left its counters at {case.sets[0]['sync'].tolist()}")
                    worst = float("inf")
    print(f"check worst relative error {worst:.2e}")
    return 0 if worst < 1e-4 else 1


def graph_us(units, reps=15):
    """Median time per unit of a CUDA graph holding `units` (callables enqueueing launches)."""
    for u in units[:4]:
        u()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for u in units:
            u()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(units))
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / 20
    return 2 * n / (us * 1e-6) / 1e9


def row(section, case, variant, us, mb, copy_gbps):
    gbps = mb * 1e6 / (us * 1e-6) / 1e9 if mb else float("nan")
    print(f"{section},{case},{variant},{us:.2f},{mb:.3f},{gbps:.0f},{gbps / copy_gbps:.3f}", flush=True)


def read_floor(copy_gbps, units=200):
    pool_bytes = 400 << 20
    pool = torch.randn(pool_bytes // 2, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1 << 20, device="cuda", dtype=torch.float32)
    configs = [(1024, it, 4) for it in (1, 2, 4, 8, 16)] + [(2048, it, 8) for it in (2, 4, 8)]

    def read_units(nbytes, cfg):
        block, iters, warps = cfg
        n = nbytes // 2
        grid = (triton.cdiv(n, block * iters),)
        span = pool.numel() - n
        stride = n + 4096
        return [
            (lambda off: lambda: read_kernel[grid](pool[off:off + n], out, n, BLOCK=block, ITERS=iters, num_warps=warps))(
                (i * stride) % span)
            for i in range(units)
        ]

    row("floor", "empty kernel", "plain", graph_us([lambda: empty_kernel[(1,)](out)] * units), 0, copy_gbps)
    for mb in (0.25, 1.0, 2.0, 2.365, 3.414, 5.78, 12.87, 20.0, 50.0):
        nbytes = int(mb * 1e6) // 256 * 256
        best = min((graph_us(read_units(nbytes, cfg)), cfg) for cfg in configs)
        row("floor", f"read {mb} MB", "best of %d: %dx%d w%d" % ((len(configs),) + best[1]), best[0], nbytes / 1e6, copy_gbps)
    # A shrink's bytes then an expand's, as two kernels (qkv R=16 T=32 sizes).
    a_cfg, b_cfg = (1024, 2, 4), (1024, 2, 4)
    first = read_units(int(3.414e6) // 256 * 256, a_cfg)
    second = read_units(int(2.365e6) // 256 * 256, b_cfg)
    pairs = [u for ab in zip(first, second) for u in ab]
    row("floor", "read 3.414 MB then 2.365 MB", "two kernels", 2 * graph_us(pairs), 5.779, copy_gbps)


def pair_rows(spec, copy_gbps, fused):
    module, rank, tokens, adapters = spec
    probe = PairCase(module, rank, tokens, adapters, 1, "cuda")
    per_set = probe.shrink_bytes + probe.expand_bytes + probe.sets[0]["part"].numel() * 4
    sets = max(2, min(64, math.ceil(4 * L2_BYTES / per_set)))
    del probe
    case = PairCase(module, rank, tokens, adapters, sets, "cuda")
    units = max(sets, 64 // sets * sets)
    order = [i % sets for i in range(units)]
    mb_s, mb_e = case.shrink_bytes / 1e6, case.expand_bytes / 1e6

    # Correctness of one pair on the GPU before any timing.
    s_configs, e_configs = shrink_configs(case), expand_configs(case)
    scfg, ecfg = s_configs[0], e_configs[0]
    y0 = case.sets[0]["y"].clone()
    case.shrink(0, scfg)
    case.expand(0, ecfg, scfg["K_SPLIT"])
    torch.cuda.synchronize()
    got = case.sets[0]["y"].double().cpu() - y0.double().cpu()
    ref = case.reference_delta(0)
    err = ((got - ref).norm() / ref.norm()).item()
    case.sets[0]["y"].copy_(y0)
    print(f"# {case.name}: {sets} sets, relative error of the bf16 pair {err:.2e}", flush=True)

    shrinks = sorted((graph_us([(lambda s: lambda: case.shrink(s, c))(s) for s in order]), i) for i, c in enumerate(s_configs))
    best_s = s_configs[shrinks[0][1]]
    tag = lambda c: f"k{c['BLOCK_K']} split{c['K_SPLIT']}"
    row("triton", case.name, f"shrink {tag(best_s)}", shrinks[0][0], mb_s, copy_gbps)
    best_e, best_e_us = None, None
    for c in e_configs:
        us = graph_us([(lambda s: lambda: case.expand(s, c, best_s["K_SPLIT"]))(s) for s in order])
        if best_e_us is None or us < best_e_us:
            best_e, best_e_us = c, us
    row("triton", case.name, f"expand n{best_e['BLOCK_N']}", best_e_us, mb_e, copy_gbps)
    # Pairs: the three fastest shrinks with the best expand, plain and programmatic.
    for _, i in shrinks[:3]:
        c = s_configs[i]
        for pdl in (False, True) if gdc_wait is not None else (False,):
            fn = lambda s, c=c, pdl=pdl: (case.shrink(s, c, pdl), case.expand(s, best_e, c["K_SPLIT"], pdl))
            try:
                us = graph_us([(lambda s: lambda: fn(s))(s) for s in order])
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"# {case.name} pair {tag(c)} pdl={pdl}: {type(e).__name__}: {e}", flush=True)
                continue
            row("triton", case.name, f"pair {tag(c)} n{best_e['BLOCK_N']}" + (" pdl" if pdl else ""), us, mb_s + mb_e, copy_gbps)
    if fused:
        fused_rows(case, order, ref, s_configs, e_configs, shrinks, best_e, mb_s + mb_e, copy_gbps)


def fused_rows(case, order, ref, s_configs, e_configs, shrinks, best_e, mb, copy_gbps):
    """`--fused`: the fused kernel's error on the GPU (twice in a row, so its counters must
    reset; partial sums poisoned first), then its time with the three fastest shrink tiles and
    each expand tile, plain and programmatic, and the bounds without ticket and wait.

    H100, 2026-11-24 (BENCHMARKS.md, runs 96-98): slower than the two-kernel pair in every
    case, and so is its bound without any waiting; its results were wrong on the GPU (not NaN
    with poisoned partial sums, so not an early read) though right on the interpreter at the
    same shapes. Kept as the record of that experiment, not as a baseline."""
    tag = lambda c: f"k{c['BLOCK_K']} split{c['K_SPLIT']}"
    scfg, ecfg = s_configs[0], e_configs[0]
    for label in ("fused#1", "fused#2"):
        # Poisoned partial sums: an expand program that reads them before the shrink wrote them
        # makes the error NaN.
        case.sets[0]["part"].fill_(float("nan"))
        y0 = case.sets[0]["y"].clone()
        case.fused(0, scfg, ecfg)
        torch.cuda.synchronize()
        got = case.sets[0]["y"].double().cpu() - y0.double().cpu()
        case.sets[0]["y"].copy_(y0)
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"# {case.name}: relative error of the bf16 {label} {err:.2e}, counters {case.sets[0]['sync'].tolist()}", flush=True)
    for _, i in shrinks[:3]:
        c = s_configs[i]
        for e in e_configs + [dict(BLOCK_T=16, BLOCK_N=256, warps=4)] * all(w % 256 == 0 for w in case.widths):
            for pdl in (False, True) if gdc_wait is not None else (False,):
                try:
                    us = graph_us([(lambda s: lambda: case.fused(s, c, e, pdl))(s) for s in order])
                except Exception as ex:  # noqa: BLE001 - report and go on
                    print(f"# {case.name} fused {tag(c)} pdl={pdl}: {type(ex).__name__}: {ex}", flush=True)
                    continue
                row("triton", case.name, f"fused {tag(c)} n{e['BLOCK_N']}" + (" pdl" if pdl else ""), us, mb, copy_gbps)
    # Bounds on the fused kernel's cost (wrong results): roles by program id, and no waiting.
    c, e = s_configs[shrinks[0][1]], best_e
    for label, bounds in [("no-ticket", dict(TICKET=False)), ("no-ticket no-wait", dict(TICKET=False, WAIT=False))]:
        us = graph_us([(lambda s: lambda: case.fused(s, c, e, True, **bounds))(s) for s in order])
        row("triton", case.name, f"fused {label} {tag(c)} n{e['BLOCK_N']} pdl", us, mb, copy_gbps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--fused", action="store_true", help="also the fused one-kernel pair (an experiment; see fused_rows)")
    parser.add_argument("--cases", help="module:rank:tokens[,...] (8 adapters each); default: the eight below")
    args = parser.parse_args()
    if args.check:
        return check()
    print(f"# torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, pdl={gdc_wait is not None}")
    copy_gbps = copy_bandwidth()
    print(f"# copy_GBps={copy_gbps:.0f}")
    print("section,case,variant,us,MB,GBps,frac_copy")
    if not args.skip_floor:
        read_floor(copy_gbps)
    specs = [("qkv", 16, 32, 8), ("qkv", 64, 32, 8), ("gate_up", 64, 32, 8), ("mla_qkv_a", 64, 32, 8),
             ("qkv", 16, 128, 8), ("qkv", 64, 128, 8), ("gate_up", 64, 128, 8), ("mla_qkv_a", 64, 128, 8)]
    if args.cases:
        specs = [(m, int(r), int(t), 8) for m, r, t in (c.split(":") for c in args.cases.split(","))]
    for spec in specs:
        try:
            pair_rows(spec, copy_gbps, args.fused)
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others
            print(f"# {spec}: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
