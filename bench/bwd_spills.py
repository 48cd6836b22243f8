"""CPU, no GPU: registers and spills of the Triton backward's kernels at the release layer's shapes, per setting.

Runs the backend's own backward launchers (`grad.gate_grads`, `grad.attention_backward`) on CPU tensors of the
release layer (B 1, H_Q 32, H_KV 2, D 128, bf16, `SpanConfig.release()`, one chunk of queries) with every kernel
launch intercepted: instead of running, each launch is specialized as Triton's launcher would specialize it on a GPU
(pointer alignment, integer divisibility by 16, the launch's constexprs, num_warps / num_stages) and compiled for
sm_90a down to a cubin; `ptxas -v` on that PTX gives registers per thread and spill bytes, and the cubin's SASS the
count of local-memory (spill) instructions. So the launch parameters are the launchers' own for each setting, and
a change to a kernel or a launcher shows here before any GPU time. Settings are backend constants applied in-process
(`bwd_tune.apply`), as bwd_tune.py / train_variants.py / gpu_check.py --set take them.

Needs a Triton with the NVIDIA backend and its ptxas (the GPU's Triton 3.6: PYTHONPATH=/tmp/t36) and no
TRITON_INTERPRET:

    PYTHONPATH=/tmp/t36 .venv/bin/python bench/bwd_spills.py [--only span_bwd_kv] \
        [--set MODULE.NAME=VALUE ...] [--set ...] [--json rows.json] [--ptx DIR]

With --ptx, each compiled kernel's PTX is written without its line information, so that two trees' builds compare
with diff (a copy of another commit's kernels/ as superlinear_kernels first on PYTHONPATH): whether a change left the
default kernels as they were.

Prints one row per (setting, kernel): registers, spill stores / loads (bytes), local-memory instructions in the SASS
(STL / LDL), SASS instructions, the same counts inside the kernel's largest loop (the widest backward branch: what a
loop trip pays), shared memory, warps, stages.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bwd_spills.py compiles real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bwd_tune import apply, parse_settings  # noqa: E402  (the settings rule of bwd_tune / train_variants / gpu_check)
from superlinear_kernels import SpanConfig  # noqa: E402
from superlinear_kernels.triton import common, grad  # noqa: E402

# Named settings (besides the defaults, always first). Each is a dict of backend constants.
VARIANTS: dict[str, dict] = {
    "defaults": {},
}

TARGET = GPUTarget("cuda", 90, 32)
_BACKEND = make_backend(TARGET)


def _ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX (the flags Triton's make_cubin uses)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(TARGET.arch).path, "-lineinfo", "-v",
                               f"--gpu-name={sm_arch_from_capability(TARGET.arch)}", str(src), "-o",
                               str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spill.group(1)) if spill else -1,
            "spill_loads": int(spill.group(2)) if spill else -1,
            "stack": int(stack.group(1)) if stack else -1}


def normalized_ptx(ptx: str) -> str:
    """The PTX without what moves when only source lines move: .loc / .file lines, comments and the DWARF sections
    (so that two builds of the same kernel compare equal)."""
    out, skip = [], False
    for line in ptx.splitlines():
        stripped = line.strip()
        if stripped.startswith(".section") and ".debug" in stripped:
            skip = True
        if skip:
            skip = stripped != "}"
            continue
        if stripped.startswith((".loc", ".file", "//")) or not stripped:
            continue
        out.append(line.split("//")[0].rstrip())
    return "\n".join(out) + "\n"


def _sass_counts(cubin: bytes) -> dict:
    """Instructions in the cubin's SASS: all, and local-memory loads / stores (spill traffic)."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    # the largest loop: the widest backward branch (BRA to a lower address); its body's local-memory instructions are
    # the spills paid per trip
    lo, hi = 0, -1
    for i, ln in enumerate(lines):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ln)
        target = int(m.group(1), 16) if m else addr[i]
        if target < addr[i] and target in addr and (hi < 0 or addr[i] - target > addr[hi] - addr[lo]):
            lo, hi = addr.index(target), i
    body = lines[lo:hi + 1] if hi >= 0 else []
    return {"sass": len(lines), "stl": sum(" STL" in ln for ln in lines), "ldl": sum(" LDL" in ln for ln in lines),
            "loop_sass": len(body), "loop_stl": sum(" STL" in ln for ln in body),
            "loop_ldl": sum(" LDL" in ln for ln in body)}


class Capture:
    """Replaces JITFunction.run while active: each launch is compiled for sm_90a (as the GPU launcher would
    specialize it) and measured, not run. Results in `rows` (one per distinct kernel + specialization)."""

    def __init__(self, only: list[str] | None, ptx_dir: Path | None = None, tag: str = ""):
        self.only = only
        self.ptx_dir, self.tag = ptx_dir, tag
        self.rows: list[dict] = []
        self.seen: set = set()

    def run(self, fn: JITFunction, args, kwargs) -> None:
        name = fn.__name__
        if self.only and not any(o in name for o in self.only):
            return
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, _BACKEND)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound, spec, options)
        key = (name, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)
        if key in self.seen:
            return
        self.seen.add(key)
        src = ASTSource(fn, signature, constexprs, attrs)
        binary = triton_compile(src, target=TARGET, options=options.__dict__)
        row = {"kernel": name, "warps": options.num_warps, "stages": options.num_stages,
               "shared": binary.metadata.shared,
               "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()
                              if isinstance(v, (bool, int, str)) and fn.params[k[0]].is_constexpr}}
        if self.ptx_dir is not None:  # normalized PTX, named by setting, kernel and launch order
            (self.ptx_dir / f"{self.tag}_{len(self.rows):02d}_{name}.ptx").write_text(normalized_ptx(binary.asm["ptx"]))
        row.update(_ptxas_usage(binary.asm["ptx"]))
        row.update(_sass_counts(binary.asm["cubin"]))
        self.rows.append(row)

    @contextlib.contextmanager
    def active(self):
        saved = JITFunction.run
        capture = self

        def run(self, *args, grid, warmup, **kwargs):
            capture.run(self, args, kwargs)
            return None

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = saved


def release_backward(l_q: int, dtype=torch.bfloat16, seed: int = 0) -> None:
    """The backward launchers of one release-layer call over l_q queries (B 1, H_Q 32, H_KV 2, D 128) on CPU
    tensors: gate, window and span dK/dV, window and span dQ, search. Values are random; only shapes, dtypes and
    strides matter to what is compiled (routing in range so the host-side sorts and searches run)."""
    cfg = SpanConfig.release()
    b, h_q, h_kv, d, n = 1, 32, 2, 128, cfg.num_spans
    g = torch.Generator().manual_seed(seed)
    q1, q2, out, do = (torch.randn(b, h_q, l_q, d, generator=g).to(dtype) for _ in range(4))
    k, v = (torch.randn(b, h_kv, l_q, d, generator=g).to(dtype) for _ in range(2))
    qend = torch.randint(0, l_q, (b, h_q, l_q, n), generator=g, dtype=torch.int32)
    qstart = torch.clamp(qend - torch.randint(0, 4096, qend.shape, generator=g, dtype=torch.int32), min=0)
    qanchor = qstart.clone()
    gate = torch.rand(b, h_q, l_q, n, generator=g)
    blse = torch.randn(b, h_q, l_q, n, generator=g)
    win_lse = torch.randn(b, h_q, l_q, generator=g)
    residuals = torch.randn(b, h_q, l_q, n, d, generator=g).to(dtype) if common.KEEP_RESIDUALS else None
    positions = torch.arange(l_q)
    row_start = torch.zeros(b, dtype=torch.int64)
    zeros = torch.zeros(b, h_q, l_q, n)
    order = grad.pair_order(q2, k, qstart, qend, None)
    # the launches are intercepted, so outputs stay empty: fill what later host code reads
    grads = grad.gate_grads(q2, k, v, qstart, qanchor, qend, gate, out, residuals, blse, win_lse, order, positions,
                            row_start, cfg.window_len, do, zeros, zeros)
    dvalues, delta, lse_eff, delta_eff = grads
    for x in (delta, lse_eff, delta_eff):
        x.copy_(torch.randn(x.shape, generator=g))
    grad.attention_backward(q1, q2, k, v, qstart, qanchor, qend, gate, blse, order, positions, row_start,
                            cfg.window_len, do, grads)


def measure(setting: dict, l_q: int, only: list[str] | None, ptx_dir: Path | None = None, tag: str = "") -> list[dict]:
    old = apply(setting)
    tma_ok = common.tma_ok
    common.tma_ok = lambda *tensors: True  # as on the H200 (CPU tensors here): the launchers pick their sm_90 paths
    try:
        cap = Capture(only, ptx_dir, tag)
        with cap.active():
            release_backward(l_q)
        return cap.rows
    finally:
        common.tma_ok = tma_ok
        apply(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384,
                        help="queries of the call (one training chunk; 16384 = common.TRAIN_CHUNK)")
    parser.add_argument("--only", nargs="*", default=None, help="kernels whose name contains one of these")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help="named settings to measure (default: all)")
    parser.add_argument("--set", nargs="*", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="an extra setting (repeat the option for several)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument("--ptx", default=None, help="write each compiled kernel's normalized PTX into this folder "
                        "(setting number, launch order, kernel name), to compare two trees' builds with diff")
    args = parser.parse_args()
    settings = [(name, VARIANTS[name]) for name in (args.variants or list(VARIANTS))]
    for items in args.set:
        settings.append((" ".join(items), parse_settings(items)))
    print(f"triton {triton.__version__}, sm_{TARGET.arch}a, release layer, {args.length} queries", flush=True)
    print(f"{'setting':28s} {'kernel':24s} {'warps':>5} {'stg':>3} {'regs':>4} {'spill st':>8} {'spill ld':>8} "
          f"{'STL':>5} {'LDL':>5} {'SASS':>6} {'loop':>5} {'lSTL':>4} {'lLDL':>4} {'smem':>6}  constexprs", flush=True)
    report = []
    ptx_dir = None
    if args.ptx:
        ptx_dir = Path(args.ptx)
        ptx_dir.mkdir(parents=True, exist_ok=True)
    for number, (name, setting) in enumerate(settings):
        for row in measure(setting, args.length, args.only, ptx_dir, f"s{number:02d}"):
            row["setting"] = name
            row["values"] = setting
            report.append(row)
            ce = ",".join(f"{k}={v}" for k, v in row["constexprs"].items()
                          if k in ("BLOCK_N", "BLOCK_P", "GH", "BQ", "LEAN", "INTERIOR", "SPLIT", "DOTS", "PREFETCH")
                          or k.startswith("KV") or k.startswith("SPLIT_"))
            print(f"{name[:28]:28s} {row['kernel'][:24]:24s} {row['warps']:5d} {row['stages']:3d} {row['regs']:4d} "
                  f"{row['spill_stores']:8d} {row['spill_loads']:8d} {row['stl']:5d} {row['ldl']:5d} "
                  f"{row['sass']:6d} {row['loop_sass']:5d} {row['loop_stl']:4d} {row['loop_ldl']:4d} "
                  f"{row['shared']:6d}  {ce}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
