"""GPU: per-kernel profile and block-size sweep of the Triton backward (release layer, bf16), then optionally the
gradient checks of `gpu_check.py`, a chunked-vs-one-shot training check at 40K and train-step rows of `speed.py`,
all with the fastest setting.

The settings are module constants of the backend (`window.KV_BLOCK`, `KV_WARPS`, `KV_STAGES`, `span.KV_TILE`,
`KV_SKIP`, `DQ_BLOCK_N`, `DQ_STAGES`), set in-process for each candidate; each backward follows its own forward
(the first backward frees the residuals, so a replay with retain_graph would time the recomputing backward) and
is timed alone with CUDA events. Results: $OUT/bwd_tune.json (gradient rows also in gpu_check.json).

    python bench/bwd_tune.py [--length 131072] [--check] [--train-lengths 32768 131072] [--only 0 1] [--warm 8]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (imports superlinear_kernels from this checkout)
import speed  # noqa: E402
from superlinear_kernels import SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.triton import common, search, span, window  # noqa: E402

CANDIDATES = [
    {},  # the shipped defaults
    {"span.KV_TILE": 128},
    {"window.KV_BLOCK": 128},
    {"window.KV_BLOCK": 32, "window.KV_WARPS": 4},
    {"span.KV_SKIP": False, "window.KV_STAGES": 2},
    {"span.DQ_BLOCK_N": 32, "span.DQ_STAGES": 1},
    # session 5: pair arrays in sorted order, pipelined tile loops, smaller programs
    {"span.KV_SORTED": True},
    {"span.KV_SORTED": True, "span.KV_SKIP": False, "window.KV_STAGES": 2},
    {"span.KV_SORTED": True, "span.KV_SKIP": False, "window.KV_STAGES": 3},
    {"span.KV_SORTED": True, "window.KV_STAGES": 2},
    {"window.KV_WARPS": 4},
    {"window.KV_BLOCK": 32, "window.KV_WARPS": 4, "span.KV_SORTED": True, "span.KV_SKIP": False,
     "window.KV_STAGES": 2},
    {"common.KEEP_RESIDUALS": False},  # 12: dO·O_k recomputed (grad.branch_dots) instead of stored residuals
    {"span.KV_SORTED": False},  # 13, 14: the defaults chosen in window A without sorted arrays / session 4's tiling
    {"span.KV_SORTED": False, "window.KV_BLOCK": 64},
    # session 6, on the 128-key dK/dV programs and the dQ kernels with a mask-free interior
    {"span.KV_TILE": 32},  # 15
    {"window.KV_STAGES": 2},  # 16
    {"span.DQ_STAGES": 3},  # 17
    {"span.DQ_WARPS": 8},  # 18
    {"span.KV_TILE": 32, "window.KV_STAGES": 2},  # 19
    # session 7 (window C, 128K backward alone): each key block's exact tile list (span.KV_VISITS, since backed out)
    # with the loop pipelined 1 / 2 / 3 stages: 226.8 / 264.4 / 288.1 ms; with 64-key programs 358.1 ms
    # (bench/h200_s7/bwd_tune_C.json)
    # session 8 window A (train steps, bench/h200_s8): window.KV_SPLIT (the window's dK/dV trips inside every
    # query's window without masks) is the default since; dV and dK in separate launches took span dK/dV from 106.6
    # to 188.9 ms at 128K (backed out)
    {"window.KV_SPLIT": False},  # 20: the window's dK/dV under the per-key mask (session 7's default)
    # session 8 window B (bwd_tune_B.json, backward alone at 128K, defaults 217.0 ms with span dK/dV 105.9): the span
    # dK/dV loop reading the next tile's pair arrays one trip ahead (span.KV_PREFETCH, backed out) 424.1 ms (span
    # dK/dV 312.4), also its q/dO rows 504.6 (393.2); with 32-pair tiles 300.4 / 342.5, 128-pair tiles 759.3,
    # 2 stages 423.6
    {"window.KV_WARPS": 16},  # 21: both dK/dV kernels with 16 warps (half the registers per thread for dK, dV)
    {"span.KV_TILE": 32},  # 22 (= 15, re-timed with this session's defaults)
    {"window.KV_BLOCK": 64},  # 23: 64-key dK/dV programs (window and span), half the accumulators per program
    # session 9: the span dK/dV kernel's lean visits (span.KV_LEAN) and exp2 in both dK/dV kernels (window.KV_EXP2),
    # and the window dK/dV's indices in int32 (window.KV_I32), the defaults for window A; sm_90 SASS (Triton 3.6):
    # span loop ~1,195 instructions per visit before, ~414 (interior) / ~492 (masked) after; window masked trip
    # 1,651 -> 1,098, unmasked 907 -> 773
    {"span.KV_LEAN": False, "window.KV_EXP2": False, "window.KV_I32": False, "common.GRAD_ATOMIC_SEM": "acq_rel",
     "span.KV_BLOCK_N": None, "span.KV_WARPS": None},  # 24: session 8's backward kernels (+ KV_NEXT since s9 C)
    {"span.KV_LEAN": False},  # 25: exp2 (both kernels) and the window's int32 indices, not the lean span visits
    {"window.KV_I32": False},  # 26: everything but the window's int32 indices
    {"span.KV_BLOCK_N": 64, "span.KV_WARPS": 4},  # 27: span dK/dV in 64-key programs of 4 warps (two per SM)
    # window A (bwd_tune_A.json, 128K): defaults then (lean visits, gate on P and dP) 219.1 ms, span dK/dV 110.1;
    # s8 kernels 219.1 (106.7); no lean visits (exp2 + window int32) 202.1 (93.6; window dK/dV 30.5); no window
    # int32 222.2 (window dK/dV 33.5 vs 29.4). Since: KV_LEAN off by default, the lean visits with the gate folded
    # into lse and Δ (fewer instructions and spills), KV_INTERIOR
    {"span.KV_LEAN": True},  # 28: lean visits (gate folded into lse and Δ)
    {"span.KV_LEAN": True, "span.KV_INTERIOR": False},  # 29: lean visits, every one masked
    {"span.KV_LEAN": True, "span.KV_BLOCK_N": 64, "span.KV_WARPS": 4},  # 30: lean visits, 64-key 4-warp programs
    {"span.KV_NEXT": True},  # 31: each trip reads the next tile's key range ahead
    {"span.KV_NEXT": True, "span.KV_LEAN": True},  # 32: that and the lean visits
    {"common.GRAD_ATOMIC_SEM": "acq_rel"},  # 33: Triton's default memory order on the gradient atomics
    # window B (bwd_tune_B.json, 128K; defaults then: plain visits, exp2, int32 window, relaxed atomics, no NEXT):
    # defaults 187.2 ms, s8 219.2, 27: 228.9, 28: 199.5, 29: 186.9, 30: 181.0, 31: 182.5 (KV_NEXT on since),
    # 32: 195.9, 33: 203.2 (search backward 3.4 -> 11.7 ms, span dQ 34.9 -> 42.5)
    {"span.KV_NEXT": False},  # 34: the key range read in its own trip
    {"span.KV_LEAN": True, "span.KV_BLOCK_N": 64, "span.KV_WARPS": 4, "span.KV_INTERIOR": False},  # 35
    # session 10: the defaults are 30's (lean visits in 64-key 4-warp programs, with KV_NEXT); candidates 25-35 above
    # are read against the defaults of their session
    {"span.KV_LEAN": False, "span.KV_BLOCK_N": None, "span.KV_WARPS": None},  # 36: session 9's shipped span dK/dV
    {"span.KV_INTERIOR": False},  # 37: the defaults with every lean visit masked (= 35)
    {"span.KV_NEXT": False},  # 38: the defaults without the next tile's key range read ahead
    # window C (bwd_tune_C.json, 128K): 0: 177.4 ms (span dK/dV 84.9), 36: 179.4 (89.0), 37: 172.7 (80.0), 38: 177.2
    # (85.3); since window D the defaults are 37's (every lean visit masked)
    {"span.KV_INTERIOR": True},  # 39: window C's defaults (lean 64 x 4 with unmasked interior visits)
    # session 11 (span dK/dV; regs / spill bytes from bench/bwd_spills.py, sm_90a ptxas): the defaults 255 regs,
    # 212 B spill stores
    None,  # 40: the span dK/dV loop asking L2 for the next tile's q/dO rows and pair arrays (removed, below)
    None,  # 41: the span dK/dV's runs of tiles rotated for 264 resident programs (132 SMs x 2; removed)
    None,  # 42: 40 + 41
    {"span.KV_WARPS": 8},  # 43: 64-key programs of 8 warps (no spills; the [keys x pairs] tiles computed per warpgroup)
    {"span.KV_TILE": 32},  # 44: 32-pair tiles (32 B spilled)
    None,  # 45: 44 + 40
    None,  # 46: 41 for 132 resident programs (one per SM)
    {"window.KV_ROTATE": 132},  # 47: the window dK/dV's runs of query trips rotated (one 8-warp program per SM)
    None,  # 48: 41 + 47
    None,  # 49: 40 + 41 + 47
    # session 13 (bench/s13/call1.sh: H200, backward alone at 128K, bf16, median of 3): defaults 172.3 ms; 47: 169.5
    # (the only win, ~1.6 %: window.KV_ROTATE follows the device's SM count by default since); 41: 172.3, 46: 175.2,
    # 48: 169.3 (no more than 47 alone); 40: 179.2, slower in every combination (49: 174.5); 44: 185.9; 43: 235.1;
    # 18: 211.2. The span dK/dV's L2 prefetch and rotated runs were removed with their kernel paths, and its register
    # cap (never timed) with them; their slots stay None so that the other candidates keep their numbers
    {"window.KV_ROTATE": 0},  # 50: the window dK/dV's runs in order (the default up to session 13)
]
MODULES = {"window": window, "span": span, "common": common, "search": search}  # also used by fwd_tune.py


def parse_settings(items: list[str]) -> dict:
    """A setting for `apply` from command-line items "MODULE.NAME=VALUE" (VALUE a Python literal), as the --set
    options of speed.py and gpu_check.py take them."""
    return {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in items)}


def apply(setting: dict) -> dict:
    """Set the constants of `setting`; returns the previous values."""
    old = {}
    for key, value in setting.items():
        mod, name = key.split(".")
        old[key] = getattr(MODULES[mod], name)
        setattr(MODULES[mod], name, value)
    return old


def backward_times(length: int, reps: int, profile: bool):
    cfg = SpanConfig.release()
    q1, q2, k, v = (x.requires_grad_() for x in speed.make_inputs(length, torch.bfloat16, False))
    dout = torch.randn(q2.shape, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(length, device="cuda")

    def fwd():
        for x in (q1, q2, k, v):
            x.grad = None
        out = superlinear_attention(q1, q2, k, v, positions, cfg, backend="triton")
        torch.cuda.synchronize()
        return out

    times = []
    for _ in range(reps + 1):  # the first (compiles) is not counted
        out = fwd()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out.backward(dout)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        del out
    seconds = sorted(times[1:])[reps // 2]
    kernels = {}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        out = fwd()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            out.backward(dout)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", 0) / 1e3
            if t > 0:
                kernels[ev.key[:70]] = kernels.get(ev.key[:70], 0.0) + t
        kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    return seconds, kernels


def memory_trace(length: int) -> list[dict]:
    """Allocated GPU memory around each stage of one training step (release layer, bf16, inputs excluded): rows
    {stage, before_gb, after_gb, peak_so_far_gb} in call order, from wrappers around the backend's stage functions
    (where each is called from)."""
    from superlinear_kernels.triton import grad, ops

    cfg = SpanConfig.release()
    q1, q2, k, v = (x.requires_grad_() for x in speed.make_inputs(length, torch.bfloat16, False))
    dout = torch.randn(q2.shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    rows: list[dict] = []
    patched = []
    for mod, names in ((ops, ("_search", "window_forward", "span_forward", "gate_forward", "gate_grads",
                              "attention_backward")),
                       (grad, ("gate_backward", "window_backward_kv", "span_backward_kv", "window_backward_dq",
                               "span_backward_dq", "search_backward"))):
        for name in names:
            fn = getattr(mod, name)

            def wrapped(*a, _fn=fn, _name=name, **kw):
                before = torch.cuda.memory_allocated()
                result = _fn(*a, **kw)
                rows.append({"stage": _name, "before_gb": (before - base) / 1e9,
                             "after_gb": (torch.cuda.memory_allocated() - base) / 1e9,
                             "peak_so_far_gb": (torch.cuda.max_memory_allocated() - base) / 1e9})
                return result

            setattr(mod, name, wrapped)
            patched.append((mod, name, fn))
    try:
        torch.cuda.reset_peak_memory_stats()
        out = superlinear_attention(q1, q2, k, v, torch.arange(length, device="cuda"), cfg, backend="triton")
        rows.append({"stage": "forward done", "before_gb": 0.0,
                     "after_gb": (torch.cuda.memory_allocated() - base) / 1e9,
                     "peak_so_far_gb": (torch.cuda.max_memory_allocated() - base) / 1e9})
        out.backward(dout)
        torch.cuda.synchronize()
        rows.append({"stage": "backward done", "before_gb": 0.0,
                     "after_gb": (torch.cuda.memory_allocated() - base) / 1e9,
                     "peak_so_far_gb": (torch.cuda.max_memory_allocated() - base) / 1e9})
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)
    for r in rows:
        print(f"  mem {r['stage']:22s} before {r['before_gb']:6.2f} after {r['after_gb']:6.2f} "
              f"peak so far {r['peak_so_far_gb']:6.2f} GB", flush=True)
    del q1, q2, k, v, dout, out
    torch.cuda.empty_cache()
    return rows


def faster_than_defaults(rows: list[dict], margin: float = 0.01) -> dict | None:
    """The fastest timed setting of `rows` (this script's JSON rows) whose backward beats the defaults' row
    (setting {}) by more than `margin` (a fraction), or None (no defaults row, or nothing that fast)."""
    timed = [r for r in rows if "backward_s" in r]
    base = [r["backward_s"] for r in timed if not r["setting"]]
    if not base:
        return None
    better = [r for r in timed if r["setting"] and r["backward_s"] < (1 - margin) * base[0]]
    return min(better, key=lambda r: r["backward_s"])["setting"] if better else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="gradient checks + train rows with the fastest setting")
    parser.add_argument("--train-lengths", type=int, nargs="*", default=[32768, 131072, 262144])
    parser.add_argument("--only", type=int, nargs="*", default=None,
                        help="indices of CANDIDATES to run (removed ones, None, are skipped)")
    parser.add_argument("--json", default="bwd_tune.json", help="file name under $OUT (or bench/)")
    parser.add_argument("--memory", action="store_true", help="first, memory around each stage of one step")
    parser.add_argument("--profile-all", action="store_true", help="a per-kernel profile of every candidate (else of "
                        "the first run only)")
    parser.add_argument("--warm", type=int, default=0,
                        help="compile the candidates first in this many parallel processes (a short run each)")
    parser.add_argument("--pick", metavar="JSON", help="only print the setting of an earlier run's JSON that beats the "
                        "defaults by > 1 %% as MODULE.NAME=VALUE words for --set (nothing if none), and exit")
    args = parser.parse_args()
    if args.pick:
        best = faster_than_defaults(json.loads(Path(args.pick).read_text())["rows"])
        print(" ".join(f"{k}={v}" for k, v in (best or {}).items()))
        return
    picked = [i for i, setting in enumerate(CANDIDATES)
              if setting is not None and (args.only is None or i in args.only)]
    if args.warm:
        import fwd_tune

        fwd_tune.warm_cache([[__file__, "--length", "16384", "--reps", "1", "--only", str(i)] for i in picked],
                            args.warm)
    rows = []
    report = {"length": args.length, "device": torch.cuda.get_device_name(), "rows": rows}
    out = Path(os.environ.get("OUT", ROOT / "bench")) / args.json
    if args.memory:
        report["memory"] = {}
        for name, setting in (("residuals", {}), ("recomputed", {"common.KEEP_RESIDUALS": False})):
            old = apply(setting)
            try:
                print(f"memory, {name}:", flush=True)
                report["memory"][name] = memory_trace(args.length)
            finally:
                apply(old)
            out.write_text(json.dumps(report, indent=1))
    for i in picked:
        setting = CANDIDATES[i]
        old = apply(setting)
        try:
            seconds, kernels = backward_times(args.length, args.reps, profile=(i == picked[0] or args.profile_all))
            rows.append({"setting": setting, "backward_s": seconds, "profile_ms": kernels})
            print(f"{json.dumps(setting):55s} backward {seconds * 1e3:8.1f} ms", flush=True)
            for name, ms in kernels.items():
                print(f"    {ms:8.2f} ms  {name}", flush=True)
        except Exception as e:  # a setting that does not compile or fit is reported, not fatal
            rows.append({"setting": setting, "error": repr(e)[:300]})
            print(f"{json.dumps(setting):55s} error {repr(e)[:200]}", flush=True)
        finally:
            apply(old)
            torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=1))
    timed = [r for r in rows if "backward_s" in r]
    best = min(timed, key=lambda r: r["backward_s"])
    print(f"fastest: {json.dumps(best['setting'])} {best['backward_s'] * 1e3:.1f} ms", flush=True)
    report["best"] = best["setting"]
    if args.check:
        apply(best["setting"])
        for pname, cfg in gpu_check.PRESETS.items():
            for dname, dtype in gpu_check.DTYPES.items():
                gpu_check.check_grad(pname, cfg, dname, dtype)
        gpu_check.check_grad("release", SpanConfig.release(), "fp32", torch.float32, h_q=8)
        gpu_check.check_chunks()
        report["checks"] = gpu_check.ROWS
        report["train"] = []
        for n in args.train_lengths:
            report["train"].append(speed.train_row(n, SpanConfig.release(), torch.bfloat16, False, 1, 1 << 18, False))
            torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=1))
            r = report["train"][-1]
            dense = ("" if r["dense_s"] is None else f", dense {r['dense_s']:.4f} s (peak {r['dense_peak_extra_gb']:.2f} GB), "
                     f"ratio {r['ratio']:.2f}")
            print(f"train {r['length']}: ours {r['ours_s']:.4f} s (fwd {r['ours_fwd_s']:.4f}), bwd/fwd "
                  f"{r['ours_bwd_over_fwd']:.2f}, peak {r['peak_extra_gb']:.2f} GB{dense}", flush=True)
        failed = [r for r in gpu_check.ROWS if not r["ok"]]
        print(f"{len(gpu_check.ROWS) - len(failed)}/{len(gpu_check.ROWS)} gradient checks passed", flush=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
