"""GPU: the training step of the release layer (speed.py's train mode) for several settings of the backend in one
process, next to dense in the same run, plus the memory around each stage of one step (bwd_tune.memory_trace).

Each length runs dense once (with the first variant's row), then every variant on the same inputs: forward,
forward+backward (median of `--reps` after a warm-up), peak memory beyond the inputs. A variant is a set of backend
constants applied in-process with `bwd_tune.apply` and restored afterwards. The first variant is repeated at the
end of each length (`again`) to show the run-to-run drift.

    python bench/train_variants.py --lengths 16384 32768 131072 --variants new masked-dq [--memory 16384 131072]

Writes $OUT/train_variants.json (or bench/) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bwd_tune  # noqa: E402  (imports superlinear_kernels from this checkout)
import speed  # noqa: E402
from superlinear_kernels import SpanConfig  # noqa: E402

VARIANTS = {
    "new": {},  # the shipped defaults
    "masked-dq": {"window.DQ_SPLIT": False},  # dQ kernels with masks on every key block
    "fwd-chunk-16k": {"common.TRAIN_FWD_PARTS": 1},  # the training forward in chunks of TRAIN_CHUNK (session 5)
    "fwd-parts-8": {"common.TRAIN_FWD_PARTS": 8},  # by heads: 8 chunks at 32K-128K instead of 16 (default since s8)
    "fwd-parts-4": {"common.TRAIN_FWD_PARTS": 4},  # by heads: 4 chunks at 32K
    # session 8 window A (bench/h200_s8): these two are the defaults since; dV and dK in separate launches of the
    # dK/dV kernels (KV_SEPARATE, backed out) took span dK/dV from 106.6 to 188.9 ms at 128K (step 278 -> 386 ms)
    "s7-defaults": {"common.TRAIN_FWD_PARTS": 16, "window.KV_SPLIT": False},
    "masked-window-kv": {"window.KV_SPLIT": False},  # window dK/dV under the per-key mask on every trip
    "fwd-parts-16": {"common.TRAIN_FWD_PARTS": 16},
    "fwd-min-1k": {"common.TRAIN_FWD_MIN_ROWS": 32768},  # chunks of 1024 queries of the 32-head layer
    "recompute": {"common.KEEP_RESIDUALS": False},  # dO·O_k recomputed instead of stored residuals
    "session5": {"window.DQ_SPLIT": False, "common.TRAIN_FWD_PARTS": 1},
    "fwd-queries": {"common.TRAIN_FWD_BY_HEADS": False},  # the forward's chunks are queries (sessions 5-6)
    # session 9: the backward kernels as session 8 left them (no lean span visits, tl.exp, int64 window indices,
    # acq_rel gradient atomics), and without the lean span visits only
    "s8-kernels": {"span.KV_LEAN": False, "window.KV_EXP2": False, "window.KV_I32": False,
                   "common.GRAD_ATOMIC_SEM": "acq_rel", "span.KV_BLOCK_N": None, "span.KV_WARPS": None},
    "exp2-only": {"span.KV_LEAN": False},
    "lean": {"span.KV_LEAN": True},  # the span dK/dV kernel's lean visits (off by default after window A)
    "span-64x4": {"span.KV_BLOCK_N": 64, "span.KV_WARPS": 4},  # span dK/dV in 64-key programs of 4 warps
    "next": {"span.KV_NEXT": True},  # span dK/dV reads the next tile's key range one trip ahead (default since B)
    "lean-64x4": {"span.KV_LEAN": True, "span.KV_BLOCK_N": 64, "span.KV_WARPS": 4},
    "lean-64x4-masked": {"span.KV_LEAN": True, "span.KV_BLOCK_N": 64, "span.KV_WARPS": 4, "span.KV_INTERIOR": False},
    # session 10: the lean visits in 64-key 4-warp programs are the defaults (so "lean", "span-64x4", "lean-64x4" are
    # the defaults too, and "exp2-only" is plain visits in 64-key programs); session 9's shipped span dK/dV:
    "s9-shipped": {"span.KV_LEAN": False, "span.KV_BLOCK_N": None, "span.KV_WARPS": None},
    # since window D every lean visit is masked by default (= "lean-64x4-masked"); window C's defaults:
    "lean-64x4-interior": {"span.KV_INTERIOR": True},
    # session 11: span dK/dV in 64-key programs of 8 warps, 32-pair tiles. Its variants of the span dK/dV with the L2
    # prefetch of the next tiles' reads and rotated runs are gone with those kernel paths (session 13, H200, backward
    # alone at 128K: defaults 172.3 ms, prefetch 179.2, rotated 172.3; bench/bwd_tune.py's candidates 40-49)
    "span-64x8": {"span.KV_WARPS": 8},
    "tile-32": {"span.KV_TILE": 32},
    # session 13: the window dK/dV's runs rotated by the device's SM count are the default (train step 128K 226.6 ->
    # 222.9 ms, 256K 603.8 -> 591.0, measured with the span's rotation too); in order, as up to session 13:
    "window-in-order": {"window.KV_ROTATE": 0},
}


def host_forward_s(length: int, reps: int) -> float:
    """Median host seconds of one training forward call (release layer, bf16, inputs needing grad): from the call to
    its return, the device synchronised before each call — the launch work the forward costs on the host, to set
    beside its synchronised wall time (a chunked forward whose host time reaches that is bound by the host)."""
    import time

    from superlinear_kernels import superlinear_attention

    q1, q2, k, v = (x.requires_grad_() for x in speed.make_inputs(length, torch.bfloat16, False))
    pos = torch.arange(length, device="cuda")
    cfg = SpanConfig.release()
    times = []
    for i in range(reps + 1):  # the first call is not counted
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = superlinear_attention(q1, q2, k, v, pos, cfg, backend="triton")
        if i:
            times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        del out
    return sorted(times)[len(times) // 2]


def reps_for(length: int, reps: int) -> int:
    """Fewer repetitions for the long rows (a 256K dense step takes ~4 s)."""
    return reps if length <= 65536 else max(2, reps // 2) if length <= 131072 else 1


def faster_variant(rows: list[dict], lengths=(131072, 262144)) -> str:
    """'set' when the command-line variant's train steps, summed over `lengths`, beat the defaults' ('new'),
    else 'new' (also when either lacks a length). `rows` are this script's JSON rows."""
    times: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("length") in lengths and "ours_s" in r:
            times.setdefault(r["variant"], {})[r["length"]] = r["ours_s"]
    total = {v: sum(t.values()) for v, t in times.items() if len(t) == len(lengths)}
    return "set" if "set" in total and "new" in total and total["set"] < total["new"] else "new"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dense-max", type=int, default=1 << 18)
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="lengths with a per-kernel profile of "
                        "the first variant's step")
    parser.add_argument("--profile-variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="at the --profile lengths, also profile these variants' steps")
    parser.add_argument("--memory", type=int, nargs="*", default=[], help="lengths with a memory trace per stage")
    parser.add_argument("--memory-variants", nargs="*", default=["new", "recompute"], choices=list(VARIANTS),
                        help="the variants traced at the --memory lengths")
    parser.add_argument("--host", type=int, nargs="*", default=[], help="lengths where the forward's host time is "
                        "measured too (`host_forward_s`)")
    parser.add_argument("--json", default="train_variants.json")
    parser.add_argument("--set", nargs="*", default=None, metavar="MODULE.NAME=VALUE",
                        help="one more variant, named 'set', from these backend constants (run after --variants)")
    parser.add_argument("--faster", metavar="JSON", help="only print which of 'new' and 'set' of an earlier run's "
                        "JSON was faster over 128K + 256K, and exit")
    args = parser.parse_args()
    if args.faster:
        print(faster_variant(json.loads(Path(args.faster).read_text())["rows"]))
        return
    if args.set is not None:
        VARIANTS["set"] = bwd_tune.parse_settings(args.set)
        args.variants = [v for v in args.variants if v != "set"] + ["set"]
    import triton

    cfg = SpanConfig.release()
    out = Path(os.environ.get("OUT", ROOT / "bench")) / args.json
    report = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "cuda": torch.version.cuda, "dtype": "bfloat16",
                       "H_Q": speed.H_Q, "H_KV": speed.H_KV, "D": speed.D, "config": cfg.to_dict()},
              "variants": {name: VARIANTS[name] for name in args.variants}, "rows": [], "memory": {}}
    print(f"{'L':>7} {'variant':14s} {'fwd ms':>8} {'step ms':>8} {'bwd/fwd':>7} {'peak GB':>7} "
          f"{'dense ms':>8} {'dense GB':>8} {'ratio':>6}", flush=True)
    first = args.variants[0]
    for length in args.lengths:
        dense = {}
        runs = args.variants + [first]
        for i, name in enumerate(runs):
            old = bwd_tune.apply(VARIANTS[name])
            try:
                row = speed.train_row(length, cfg, torch.bfloat16, False, reps_for(length, args.reps),
                                      args.dense_max if i == 0 else 0, length in args.profile and (
                                          i == 0 or (i < len(args.variants) and name in args.profile_variants)))
                if length in args.host:
                    row["host_fwd_s"] = host_forward_s(length, args.reps)
            except Exception as e:  # out of memory, or a setting that does not compile: reported, not fatal
                row = {"length": length, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
            finally:
                bwd_tune.apply(old)
                torch.cuda.empty_cache()
            row["variant"] = name if i < len(args.variants) else f"{name} (again)"
            if "error" not in row:
                if i == 0:
                    dense = {key: value for key, value in row.items() if key.startswith("dense")}
                elif dense.get("dense_s") is not None:
                    row.update(dense, ratio=dense["dense_s"] / row["ours_s"])
            report["rows"].append(row)
            out.write_text(json.dumps(report, indent=1))
            if "error" in row:
                print(f"{length:>7} {row['variant']:14s} {row['error']}", flush=True)
                continue
            dms = "—" if row.get("dense_s") is None else f"{row['dense_s'] * 1e3:8.1f}"
            dgb = "—" if row.get("dense_peak_extra_gb") is None else f"{row['dense_peak_extra_gb']:8.2f}"
            ratio = "—" if row.get("ratio") is None else f"{row['ratio']:6.2f}"
            host = f" host fwd {row['host_fwd_s'] * 1e3:.1f} ms" if "host_fwd_s" in row else ""
            print(f"{length:>7} {row['variant']:14s} {row['ours_fwd_s'] * 1e3:8.1f} {row['ours_s'] * 1e3:8.1f} "
                  f"{row['ours_bwd_over_fwd']:7.2f} {row['peak_extra_gb']:7.2f} {dms:>8} {dgb:>8} {ratio:>6}{host}",
                  flush=True)
    for length in args.memory:
        for name in args.memory_variants:
            old = bwd_tune.apply(VARIANTS[name])
            try:
                print(f"memory {length}, {name}:", flush=True)
                report["memory"][f"{length} {name}"] = bwd_tune.memory_trace(length)
            finally:
                bwd_tune.apply(old)
            out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
