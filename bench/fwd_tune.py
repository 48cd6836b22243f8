"""GPU: stage times and a tile sweep of the Triton prefill forward (release layer, bf16): search, window and span
kernels timed alone on real routing, each candidate checked against the first (same inputs, max |diff|), then a
per-kernel profile of whole prefills and the 1M prefill with the fastest settings.

The settings are module constants of the backend (`span.FWD_*`, `window.FWD_*`, `search.SEARCH_*`), set in-process
for each candidate; timings are CUDA-event medians (`gpu_check.cuda_time`). Results: $OUT/fwd_tune.json.

    python bench/fwd_tune.py [--lengths 131072 1048576] [--full 1048576] [--budget 80]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (imports superlinear_kernels from this checkout)
import speed  # noqa: E402
from bwd_tune import apply  # noqa: E402  (one way to set a kernel module's tuning constants)
from superlinear_kernels import SpanConfig  # noqa: E402
from superlinear_kernels.triton import common, ops, span, window  # noqa: E402

SPAN = [  # (pairs per tile, key block, warps, stages, interior without masks)
    {"span.FWD_SPLIT": False},  # the previous kernel's tiling (64 x 64, 4 warps, 2 stages, masks everywhere)
    {},
    {"span.FWD_BLOCK_P": 128, "span.FWD_WARPS": 8},
    {"span.FWD_BLOCK_P": 128, "span.FWD_WARPS": 8, "span.FWD_STAGES": 3},
    {"span.FWD_BLOCK_P": 128, "span.FWD_BLOCK_N": 128, "span.FWD_WARPS": 8},
    {"span.FWD_BLOCK_P": 128, "span.FWD_WARPS": 4, "span.FWD_STAGES": 3},
    {"span.FWD_BLOCK_N": 128, "span.FWD_WARPS": 4},
    {"span.FWD_BLOCK_P": 256, "span.FWD_BLOCK_N": 32, "span.FWD_WARPS": 8},
    {"span.FWD_BLOCK_P": 128, "span.FWD_WARPS": 8, "span.FWD_STAGES": 4},
    {"span.FWD_BLOCK_P": 128, "span.FWD_BLOCK_N": 32, "span.FWD_WARPS": 8, "span.FWD_STAGES": 3},
    # 10-15 (session 10; since its window C, FWD_FOLD and FWD_TMA are the defaults and TMA runs span.FWD_TMA_STAGES = 3,
    # so these rows reproduce its sweep only with both set back to False first):
    # the scale folded into exp2's argument (window.FWD_FOLD, used by the span forward too),
    # interior key blocks through TMA, both; 32-key blocks in 3 stages with the fold (64 KB of shared memory); the fold
    # with 3 stages of 64-key blocks (112 KB: still 2 programs per SM), and with TMA too
    {"window.FWD_FOLD": True},
    {"span.FWD_TMA": True},
    {"window.FWD_FOLD": True, "span.FWD_TMA": True},
    {"window.FWD_FOLD": True, "span.FWD_BLOCK_N": 32, "span.FWD_STAGES": 3},
    {"window.FWD_FOLD": True, "span.FWD_STAGES": 3},
    {"window.FWD_FOLD": True, "span.FWD_TMA": True, "span.FWD_STAGES": 3},
    # (16, the fold with int32 key indices and masks: window.FWD_I32, slower, removed in session 11)
]
WINDOW = [
    {"window.FWD_SPLIT": False},
    {},
    {"window.FWD_ROWS": 128, "window.FWD_WARPS": 8},
    {"window.FWD_ROWS": 128, "window.FWD_WARPS": 8, "window.FWD_STAGES": 3},
    {"window.FWD_ROWS": 128, "window.FWD_BLOCK_N": 128, "window.FWD_WARPS": 8},
    {"window.FWD_STAGES": 3},
    {"window.FWD_ROWS": 128, "window.FWD_WARPS": 8, "window.FWD_BLOCK_N": 32, "window.FWD_STAGES": 3},
    # 7-9 (session 10): fold, TMA, both (as SPAN 10-12)
    {"window.FWD_FOLD": True},
    {"window.FWD_TMA": True},
    {"window.FWD_FOLD": True, "window.FWD_TMA": True},
    # (10, the fold with int32 key indices and masks: window.FWD_I32, slower, removed in session 11)
]
SEARCH = [
    {},
    {"search.SEARCH_WARPS": 8},
    {"search.SEARCH_TILE_BYTES": 65536, "search.SEARCH_WARPS": 8},
    {"search.SEARCH_STRIPES": 32},
    {"search.SEARCH_TILE_BYTES": 16384},
    {"search.SEARCH_KEYED": True},
    {"search.SEARCH_KEYED": True, "search.SEARCH_WARPS": 8},
    # 7-8 (session 10): the top-K as named fp32 slots filled in anchor order, every round run (session 10's row 7,
    # rounds after the first only where a row needed them, search.SEARCH_SKIP, was slower and removed in session 11);
    # 32 stripes per trip
    {"search.SEARCH_ORDERED": True},
    {"search.SEARCH_ORDERED": True, "search.SEARCH_STRIPES": 32},
]


def warm_cache(commands: list[list[str]], processes: int) -> None:
    """Run each command (a tuner on a short input, one candidate each) in parallel subprocesses, `processes` at a
    time, so that Triton's on-disk cache holds every candidate's kernels before the timed run compiles them
    serially. Output goes to a scratch folder; failures only cost the time."""
    import subprocess
    import tempfile

    t0 = time.time()
    scratch = tempfile.mkdtemp(prefix="tune_warm_")
    env = dict(os.environ, OUT=scratch)
    running: list = []
    failed = 0
    for cmd in commands:
        while len(running) >= processes:
            failed += running.pop(0).wait() != 0
        running.append(subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    for p in running:
        failed += p.wait() != 0
    print(f"compiled {len(commands)} candidate runs in {time.time() - t0:.1f} s ({failed} failed)", flush=True)


DEVICE = "cuda"


def stage_inputs(length: int, q_len: int, dtype=torch.bfloat16, h_q: int = speed.H_Q):
    """Release inputs over a cache of `length` keys and the last `q_len` queries, their routing and window."""
    cfg = SpanConfig.release()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q1, q2 = (torch.randn(1, h_q, q_len, speed.D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, speed.H_KV, length, speed.D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2))
    pos = torch.arange(length - q_len, length, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tables = common.geometry_tables(cfg, length, DEVICE)
    routing = ops._search_at(q1, k, cfg, pos, start, tables)
    win = window.window_forward(q2, k, v, pos, start, cfg.window_len)
    return dict(cfg=cfg, q1=q1, q2=q2, k=k, v=v, pos=pos, start=start, tables=tables, routing=routing, win=win)


def stage_work(x) -> dict:
    """Useful FLOPs of each stage on these inputs, counted from the routing itself: span = 4·D·Σ over valid pairs of
    their span's keys (QKᵀ and PV), window = 4·D·Σ over query rows of their window's keys, search = 2·D·Σ over query
    rows of the stripes M(q + 1) − σ scored (K rows dotted with Q1)."""
    cfg, (qstart, _, qend, _) = x["cfg"], x["routing"]
    d = x["q2"].shape[-1]
    live = (qstart >= 0) & (qend >= qstart)
    span_keys = torch.where(live, qend.long() - qstart.long() + 1, torch.zeros_like(qend, dtype=torch.int64)).sum()
    pos = x["pos"]
    win_keys = (pos - torch.clamp(pos - cfg.window_len + 1, min=0) + 1).sum() * x["q2"].shape[1]
    offsets = x["tables"][0]
    stripes = (common.max_stripes(offsets, pos) - cfg.sw_index).clamp(min=0).sum() * x["q1"].shape[1]
    return {"span": 4 * d * int(span_keys), "window": 4 * d * int(win_keys), "search": 2 * d * int(stripes),
            "span_pair_keys": int(span_keys), "window_row_keys": int(win_keys), "search_row_stripes": int(stripes)}


def stage_fns(x):
    cfg, (qstart, qanchor, qend, values) = x["cfg"], x["routing"]
    return {
        "search": lambda: ops._search_at(x["q1"], x["k"], cfg, x["pos"], x["start"], x["tables"]),
        "window": lambda: window.window_forward(x["q2"], x["k"], x["v"], x["pos"], x["start"], cfg.window_len),
        "span": lambda: span.span_forward(x["q2"], x["k"], x["v"], qstart, qend, *x["win"]),
    }


def max_diff(ref, got) -> float:
    worst = 0.0
    for a, b in zip(ref, got):
        if a.is_floating_point():
            fin = torch.isfinite(a)
            if not torch.equal(fin, torch.isfinite(b)):
                return float("inf")
            worst = max(worst, (a[fin].float() - b[fin].float()).abs().max().item() if fin.any() else 0.0)
        else:
            worst = max(worst, float((a != b).sum().item()))  # int outputs: number of differing entries
    return worst


def sweep(stage: str, candidates, x, reps: int, rows: list, label: str, deadline: float, work: dict | None = None):
    fn = stage_fns(x)[stage]
    ref = None
    best = None
    for setting in candidates:
        if time.time() > deadline:
            print(f"  {label} {stage}: out of time, stopped", flush=True)
            break
        old = apply(setting)
        try:
            out = fn()
            out = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
            if stage == "span":
                out = out[:2]
            diff = 0.0 if ref is None else max_diff(ref, out)
            ref = out if ref is None else ref
            ms = gpu_check.cuda_time(fn, reps) * 1e3
            tflops = None if work is None else work[stage] / ms / 1e9
            rows.append({"at": label, "stage": stage, "setting": setting, "ms": ms, "max_diff_vs_first": diff,
                         "tflops": tflops})
            print(f"  {label} {stage:6s} {json.dumps(setting):80s} {ms:8.2f} ms  diff {diff:.3g}"
                  + ("" if tflops is None else f"  {tflops:6.1f} TFLOP/s"), flush=True)
            if diff < 1e-2 and (best is None or ms < best[1]):
                best = (setting, ms)
        except Exception as e:  # a setting that does not compile or fit is reported, not fatal
            rows.append({"at": label, "stage": stage, "setting": setting, "error": repr(e)[:300]})
            print(f"  {label} {stage:6s} {json.dumps(setting):80s} error {repr(e)[:200]}", flush=True)
        finally:
            apply(old)
        del out
    return best


def prefill_profile(length: int, reps: int) -> dict:
    """Whole prefill in speed.py's 32K chunks: host seconds and per-kernel device ms of one run."""
    cfg = SpanConfig.release()
    q1, q2, k, v = speed.make_inputs(length, torch.bfloat16, False)
    from superlinear_kernels import superlinear_attention

    def run():
        for c0 in range(0, length, speed.CHUNK):
            pos = torch.arange(c0, min(c0 + speed.CHUNK, length), device="cuda")
            superlinear_attention(q1[:, :, c0:c0 + speed.CHUNK], q2[:, :, c0:c0 + speed.CHUNK], k, v, pos, cfg,
                                  backend="triton")

    seconds = speed.timed(run, reps)
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = speed.kernel_rows(prof, 1, 60)[:10]
    return {"length": length, "seconds": seconds, "kernels": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1048576, 131072],
                        help="cache lengths; the stage sweep uses the last 32K queries of each")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stages", nargs="*", default=["span", "window", "search"])
    parser.add_argument("--full", type=int, nargs="*", default=[131072, 1048576],
                        help="whole prefills profiled with the fastest settings (and with the defaults at 128K)")
    parser.add_argument("--budget", type=float, default=1e9,
                        help="seconds from the start after which no more candidates are swept")
    parser.add_argument("--json", default="fwd_tune.json", help="file name under $OUT (or bench/)")
    parser.add_argument("--pick", nargs="*", default=None, help="only these candidates, as STAGE:INDEX")
    parser.add_argument("--warm", type=int, default=0,
                        help="compile the candidates first in this many parallel processes (a short run each)")
    args = parser.parse_args()
    t0 = time.time()
    table = {"span": SPAN, "window": WINDOW, "search": SEARCH}
    if args.warm:
        # 6,784 keys: M(L) = 128 is a multiple of 16 as M(2^20) = 2048 is, so the search compiles as at 1M.
        warm_cache([[__file__, "--lengths", "6784", "--reps", "1", "--full", "--stages", stage, "--pick",
                     f"{stage}:{i}"] for stage in args.stages for i in range(len(table[stage]))], args.warm)
    out = Path(os.environ.get("OUT", ROOT / "bench")) / args.json
    rows: list = []
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "best": {}}
    import triton

    report["triton"] = triton.__version__
    print(f"{report['device']} | torch {report['torch']} | triton {report['triton']}", flush=True)
    best: dict = {}
    for length in args.lengths:
        x = stage_inputs(length, min(speed.CHUNK, length))
        label = f"L{length // 1024}K-last32K"
        work = stage_work(x)
        report.setdefault("work", {})[label] = work
        print(f"  {label} useful work: " + ", ".join(f"{k} {v:.3e}" for k, v in work.items()), flush=True)
        for stage in args.stages:
            if length < args.lengths[0] and stage == "search":
                continue  # the search is swept at the first (longest) length only
            cands = [c for i, c in enumerate(table[stage]) if args.pick is None or f"{stage}:{i}" in args.pick]
            found = sweep(stage, cands, x, args.reps, rows, label, t0 + args.budget, work)
            if found is not None and stage not in best:  # the first (longest) length decides
                best[stage] = found[0]
            out.write_text(json.dumps(report, indent=1))
        del x
        torch.cuda.empty_cache()
    chosen = {k: v for s in best.values() for k, v in s.items()}
    report["best"] = chosen
    print(f"fastest: {json.dumps(chosen)}", flush=True)
    report["prefill"] = []
    for length in args.full:
        for name, setting in (("defaults", {}), ("fastest", chosen)):
            if name == "defaults" and length > 131072:
                continue
            old = apply(setting)
            try:
                r = prefill_profile(length, 1 if length > 131072 else args.reps)
            finally:
                apply(old)
            r["setting"] = name
            report["prefill"].append(r)
            print(f"prefill {length}: {name} {r['seconds']:.4f} s; " + "; ".join(
                f"{k['kernel'][:38]} {k['us_per_step'] / 1e3:.1f} ms" for k in r["kernels"][:6]), flush=True)
            out.write_text(json.dumps(report, indent=1))
            torch.cuda.empty_cache()
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
