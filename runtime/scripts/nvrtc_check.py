#!/usr/bin/env python3
"""Compile CUDA sources written by `kernel_sources` with NVRTC and assemble them with ptxas,
without a GPU, and print each kernel's registers, spills and shared memory.

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
    ptx, err = compile_ptx(nvrtc, open(path).read(), name, options)
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
    return f"{name:<48} {regs.group(1) if regs else '?':>5} {spills:>12}  {counts}", True


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
    print(f"{'kernel source':<48} {'regs':>5} {'spill st/ld':>12}  PTX instructions (static count)")
    failed = 0
    for line, ok in results:
        print(line)
        failed += 0 if ok else 1
    print(f"{len(paths) - failed} of {len(paths)} compiled and assembled for {args.arch}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
