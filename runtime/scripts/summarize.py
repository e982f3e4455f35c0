#!/usr/bin/env python3
"""Joins lora_bench's CSV with the PyTorch baseline's into one markdown table.

usage: summarize.py BENCH_CSV TORCH_CSV
The copy-bandwidth reference is the larger of the two copies measured in the run (cubecl's
copy kernel and torch's device-to-device copy), so the fractions are the conservative ones.
"""
import os
import sys


def read(path):
    meta, rows = {}, []
    header = None
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            for tok in line[1:].replace(";", " ").split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    meta[k] = v
            continue
        if header is None:
            header = line.split(",")
            continue
        rows.append(dict(zip(header, line.split(","))))
    return meta, rows


def main():
    bmeta, bench = read(sys.argv[1])
    tmeta, torch_rows = read(sys.argv[2]) if len(sys.argv) > 2 and os.path.exists(sys.argv[2]) else ({}, [])
    copy = max(float(bmeta.get("copy_GBps", 0)), float(tmeta.get("copy_GBps", 0)))
    launch = float(bmeta.get("launch_us", "nan"))
    best = {}
    for r in torch_rows:
        us = float(r["us"])
        if r["case"] not in best or us < best[r["case"]][0]:
            best[r["case"]] = (us, r["impl"])
    print(f"copy bandwidth (read+write): cubecl {bmeta.get('copy_GBps')} GB/s, torch {tmeta.get('copy_GBps')} GB/s; reference {copy:.0f} GB/s")
    print(f"empty cubecl kernel: {launch} us per launch back-to-back, {bmeta.get('launch_sync_us')} us launch+sync\n")
    print("| case | variant | shrink µs | expand µs | shrink+expand µs | min MB | GB/s | of copy BW | 2 launches share | torch µs (impl) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sweep = [r for r in bench if r["pair_us"] == "NaN" or r["pair_us"] == "nan"]
    bench = [r for r in bench if r not in sweep]
    for r in bench:
        pair = float(r["pair_us"])
        mb = float(r["shrink_MB"]) + float(r["expand_MB"])
        gbps = mb * 1e6 / (pair * 1e-6) / 1e9
        t = best.get(r["case"])
        torch_s = f"{t[0]:.1f} ({t[1]})" if t else "n/a"
        speed = f"{t[0] / pair:.1f}x" if t else "n/a"
        share = min(1.0, 2 * launch / pair)
        print(f"| {r['case']} | {r['variant']} | {float(r['shrink_us']):.1f} | {float(r['expand_us']):.1f} | {pair:.1f} | {mb:.2f} | {gbps:.0f} | {gbps / copy:.2f} | {share:.2f} | {torch_s} | {speed} |")
    if sweep:
        print("\nTile sweep (prefill; each kernel timed alone, GB/s over its own minimum bytes):\n")
        print("| case | kernel | µs | min MB | GB/s | of copy BW |")
        print("|---|---|---|---|---|---|")
        for r in sweep:
            kind = "shrink" if r["variant"].startswith("shrink") else "expand"
            us, mb = float(r[kind + "_us"]), float(r[kind + "_MB"])
            gbps = mb * 1e6 / (us * 1e-6) / 1e9
            print(f"| {r['case']} | {r['variant']} | {us:.1f} | {mb:.1f} | {gbps:.0f} | {gbps / copy:.2f} |")


if __name__ == "__main__":
    main()
