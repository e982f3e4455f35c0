#!/usr/bin/env python3
"""Compile the CUDA sources that `lora_bench --cuda-sources DIR` writes with NVRTC and assemble
them with ptxas, without a GPU, and print each kernel's registers and spills (ptxas), threads
and shared memory (from the source), the resident cubes per H100 multiprocessor these allow,
the waves of its grid and the bytes its cubes stage from L2 where the source names them
(`// lorac:` header), and static PTX instruction counts.

Needs NVRTC, the CUDA headers and ptxas, for example from PyPI:
    python3 -m venv /tmp/cu
    /tmp/cu/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12
    /tmp/cu/bin/python runtime/scripts/nvrtc_check.py DIR [--arch sm_90a]
Exit status 1 if any source fails to compile or assemble.
"""
import argparse
import ctypes
import glob
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile


# Static instruction counts that tell two versions of a kernel apart (PTX, before ptxas).
PTX_CLASSES = [
    ("mma", r"\b(?:wmma\.mma|mma)\.sync"),
    ("wmma.ld", r"\bwmma\.load"),
    ("ld.global", r"\bld\.global"),
    ("st.global", r"\bst\.global"),
    ("ld.shared", r"\bld\.shared"),
    ("st.shared", r"\bst\.shared"),
    ("cp.async", r"\bcp\.async\.(?:ca|cg)"),
    ("bar", r"\bbar(?:rier)?\.sync"),
    ("local", r"\b(?:ld|st)\.local"),
]


# Per-multiprocessor limits of the H100 (sm_90) for the occupancy estimate.
SM_REGISTERS = 65536
SM_SHARED = 233472  # 228 KiB, of which each resident cube reserves 1 KiB
SM_THREADS = 2048
SM_CUBES = 32
SMS = 132


def shared_bytes(source):
    """Shared memory a cubecl CUDA source declares: the end of its furthest array or barrier
    in `dynamic_shared_mem` (cubecl lays them out by offset, with a size comment per array)."""
    end = 0
    size = None
    for line in source.splitlines():
        m = re.match(r"// Shared array size: \d+, (\d+) bytes", line.strip())
        if m:
            size = int(m.group(1))
            continue
        m = re.search(r"dynamic_shared_mem\[(\d+)\]", line)
        if m and "extern" not in line:
            end = max(end, int(m.group(1)) + (size if size is not None else 8))  # barriers: 8 bytes
        size = None
    return end


def occupancy(regs, threads, shared):
    """Resident cubes per multiprocessor: the tightest of registers (allocated per warp in units
    of 256), shared memory, threads and the cube limit."""
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGISTERS // regs_per_warp) // warps if regs_per_warp else SM_CUBES
    by_shared = SM_SHARED // (shared + 1024)
    return min(by_regs, by_shared, SM_THREADS // threads, SM_CUBES)


def nvidia_root():
    import nvidia  # the PyPI wheels' namespace package

    return list(nvidia.__path__)[0]


def load_nvrtc(root):
    libs = sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    if not libs:
        sys.exit("libnvrtc not found under " + root)
    return ctypes.CDLL(libs[0])


def compile_ptx(nvrtc, source, name, options):
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return None, f"nvrtcCreateProgram failed ({rc})"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        return None, log.value.decode(errors="replace")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode(), None


def check_one(job):
    """Compiles and assembles one source; returns its report line and whether it passed."""
    path, options, ptxas, arch, ptx_dir = job
    nvrtc = load_nvrtc(nvidia_root())
    name = os.path.basename(path)
    source = open(path).read()
    ptx, err = compile_ptx(nvrtc, source, name, options)
    if err is not None:
        return f"{name:<48} NVRTC FAILED\n{err}", False
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        ptx_no_lines = "\n".join(l for l in ptx.splitlines() if not l.lstrip().startswith((".loc", ".file", "//")))
        with open(os.path.join(ptx_dir, name[:-3] + ".ptx"), "w") as f:
            f.write(ptx_no_lines)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        return f"{name:<48} PTXAS FAILED\n{out.stderr}", False
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    counts = " ".join(f"{op}={len(re.findall(pattern, ptx))}" for op, pattern in PTX_CLASSES)
    spills = (spill.group(1) + "/" + spill.group(2)) if spill else "?"
    threads = re.search(r"__launch_bounds__\((\d+)\)", source)
    cubes = re.search(r"^// lorac: grid cubes (\d+)", source, re.M)
    staged = re.search(r"^// lorac: grid cubes \d+, staged MB (\d+)", source, re.M)
    shared = shared_bytes(source)
    fit, waves = "?", ""
    if regs and threads:
        per_sm = occupancy(int(regs.group(1)), int(threads.group(1)), shared)
        fit = str(per_sm)
        if cubes and per_sm:
            waves = f"{int(cubes.group(1)) / (per_sm * SMS):.2f}"
    line = (
        f"{name:<48} {regs.group(1) if regs else '?':>5} {spills:>12} {threads.group(1) if threads else '?':>7} "
        f"{shared // 1024:>6} {fit:>6} {waves:>6} {staged.group(1) if staged else '':>6}  {counts}"
    )
    return line, True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compilations (default: one per CPU)")
    parser.add_argument("--ptx-dir", help="also write each kernel's PTX here (without line info), to diff two versions")
    args = parser.parse_args()
    root = nvidia_root()
    includes = [os.path.join(root, d, "include") for d in ("cuda_runtime", "cuda_nvcc", "cuda_cccl")]
    ptxas = os.path.join(root, "cuda_nvcc", "bin", "ptxas")
    # The options cubecl's CUDA runtime passes to NVRTC (cubecl-cuda 0.10, compute/context.rs).
    options = [f"--gpu-architecture={args.arch}", "-lineinfo"] + [f"-I{i}" for i in includes]
    paths = sorted(glob.glob(os.path.join(args.dir, "*.cu")))
    jobs = [(path, options, ptxas, args.arch, args.ptx_dir) for path in paths]
    with multiprocessing.Pool(args.jobs or os.cpu_count()) as pool:
        results = pool.map(check_one, jobs)
    print(
        f"{'kernel source':<48} {'regs':>5} {'spill st/ld':>12} {'threads':>7} {'smem K':>6} {'cubes/SM':>6} {'waves':>6} {'L2 MB':>6}"
        "  PTX instructions (static count)"
    )
    failed = 0
    for line, ok in results:
        print(line)
        failed += 0 if ok else 1
    print(f"{len(paths) - failed} of {len(paths)} compiled and assembled for {args.arch}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
