"""Decode step on the GPU: correctness at scale, a sweep of the decode kernel's tile choices, stage times.

Setting of the speed issue: B = 1, H_Q = 32, H_KV = 2, D = 128, bf16, `SpanConfig.release()`, one query at
L − 1 of a cache of length L. For every L:
  * the Triton decode output (CUDA-graph replay) against the torch backend on the same inputs;
  * device time per step with CUDA events, L2 flushed before each step ("cold"), and the mean of
    back-to-back steps ("warm"); the same for dense non-causal SDPA;
  * on the sweep lengths, every (chunk size, BLOCK_N, stages) combination; elsewhere the defaults;
  * stage times: search alone and branches + merge + gate alone (each its own graph).

    python bench/decode_tune.py [--lengths ...] [--sweep-lengths ...]

Prints a table and writes $OUT/decode_tune.json (or bench/decode_tune.json).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import _import_kernels  # noqa: E402

_import_kernels()
from superlinear_kernels import SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.api import Prepared  # noqa: E402
from superlinear_kernels.triton import decode, ops  # noqa: E402
from speed import H_KV, H_Q, D, dense, device_times, graphed, make_inputs, profile_steps  # noqa: E402


def inputs(length: int, dtype, coherent: bool):
    return make_inputs(length, dtype, coherent, q_len=1)


# The shipped tile choices (chunk None = decode.decode_chunk); read once, before any sweep changes them.
DEFAULTS = dict(chunk=None, block_n=decode.DECODE_BLOCK_N, stages=decode.DECODE_STAGES, warps=decode.DECODE_WARPS)


def settings(sweep: bool):
    if not sweep:
        return [DEFAULTS]
    return [dict(chunk=c, block_n=n, stages=s, warps=w)
            for c, n, s, w in itertools.product((256, 512, 1024, 2048, 4096), (32, 64), (2, 3), (4,))]


_DEFAULT_CHUNK = decode.decode_chunk


def apply(setting):
    chunk = setting["chunk"]
    decode.decode_chunk = _DEFAULT_CHUNK if chunk is None else (lambda l_kv: chunk)
    decode.DECODE_BLOCK_N = setting["block_n"]
    decode.DECODE_STAGES = setting["stages"]
    decode.DECODE_WARPS = setting["warps"]


def profile(length: int, cfg, dtype, coherent: bool) -> list[dict]:
    """Per-kernel device time of eager decode steps (torch.profiler), to see where a step goes."""
    q1, q2, k, v = inputs(length, dtype, coherent)
    pos = torch.tensor([length - 1], device="cuda")
    prep = Prepared(pos, torch.zeros(1, dtype=torch.int64, device="cuda"), length - 1, length)
    rows = profile_steps(lambda: ops._AttentionFunction.apply(q1, q2, k, v, cfg, prep))
    print(f"profile L={length}: " + "; ".join(f"{r['kernel']} {r['us_per_step']:.1f} us" for r in rows), flush=True)
    return rows


def run_length(length: int, cfg, dtype, sweep: bool, reps: int, coherent: bool) -> dict:
    q1, q2, k, v = inputs(length, dtype, coherent)
    pos = torch.tensor([length - 1], device="cuda")
    prep = Prepared(pos, torch.zeros(1, dtype=torch.int64, device="cuda"), length - 1, length)
    ref, ref_r = superlinear_attention(q1, q2, k, v, pos, cfg, backend="torch", return_routing=True)
    row = {"length": length, "settings": []}
    dense_cold, dense_warm = device_times(lambda: dense(q2, k, v, False), reps)
    row.update(dense_cold_s=dense_cold, dense_warm_s=dense_warm)
    for setting in settings(sweep):
        apply(setting)
        graph, (out, qs, qa, qe, vals, gate) = graphed(lambda: ops._AttentionFunction.apply(q1, q2, k, v, cfg, prep))
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(qa, ref_r.qanchor))
        err = float((out.float() - ref.float()).abs().max())
        cold, warm = device_times(graph.replay, reps)
        entry = dict(setting, chunk=decode.decode_chunk(length), cold_s=cold, warm_s=warm, max_abs_err=err,
                     routing_equal=same)
        row["settings"].append(entry)
        print(f"  L={length:>8} chunk={entry['chunk']:>5} BN={setting['block_n']:>3} "
              f"stages={setting['stages']} warps={setting['warps']}  cold {cold * 1e3:.4f} ms  warm {warm * 1e3:.4f} ms  err {err:.2e} "
              f"routing {'=' if same else '≠'}", flush=True)
        del graph
    best = min(row["settings"], key=lambda e: e["cold_s"])
    apply(best)
    # Stage times with the best setting, each stage its own graph.
    g_search, (qs, qa, qe, vals) = graphed(lambda: ops._search(q1, k, cfg, prep))
    longest = ops._max_span_len(cfg, length)
    g_branch, _ = graphed(lambda: decode.decode_forward(q2, k, v, qs, qe, qa, vals, pos, prep.row_start,
                                                        cfg.window_len, longest))
    row["stage_cold_s"] = {"search": device_times(g_search.replay, reps)[0],
                           "branches+merge+gate": device_times(g_branch.replay, reps)[0]}
    apply(DEFAULTS)  # the next length runs the shipped choices, not this sweep's best
    # Keys one step reads: the union over each KV group's branches (what the kernel loads) vs their sum.
    starts, ends = qs[0, :, 0].long(), qe[0, :, 0].long()
    group = H_Q // H_KV
    union = 0
    for h in range(H_KV):
        cover = torch.zeros(length, dtype=torch.bool, device="cuda")
        heads = slice(h * group, (h + 1) * group)
        for a, e in zip(starts[heads].flatten().tolist(), ends[heads].flatten().tolist()):
            if a >= 0 and e >= a:
                cover[a:e + 1] = True
        cover[max(0, length - cfg.window_len):] = True
        union += int(cover.sum())
    total = int(((ends - starts + 1).clamp(min=0) * (starts >= 0)).sum()) + H_Q * cfg.window_len
    row.update(best=best, union_keys=union, summed_keys=total, bytes_read=union * 2 * D * 2,
               byte_floor_s=union * 2 * D * 2 / 3.35e12, ratio_cold=dense_cold / best["cold_s"],
               ratio_warm=dense_warm / best["warm_s"])
    print(f"L={length:>8} best cold {best['cold_s'] * 1e3:.4f} ms (dense {dense_cold * 1e3:.4f}, ×{row['ratio_cold']:.2f})"
          f"  warm {best['warm_s'] * 1e3:.4f} ms (dense {dense_warm * 1e3:.4f}, ×{row['ratio_warm']:.2f})"
          f"  stages {', '.join(f'{k} {t * 1e3:.4f}' for k, t in row['stage_cold_s'].items())} ms"
          f"  union {union:,} keys of {total:,}, floor {row['byte_floor_s'] * 1e3:.4f} ms", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[65536, 131072, 262144, 524288, 1048576, 2097152, 4194304])
    parser.add_argument("--sweep-lengths", type=int, nargs="*", default=[131072, 1048576])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--profile-lengths", type=int, nargs="*", default=[131072, 1048576])
    parser.add_argument("--coherent", action="store_true", help="slowly varying keys (bench/speed.py's walk)")
    parser.add_argument("--json", default="decode_tune.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_tune.py needs a CUDA device")
    import triton

    cfg = SpanConfig.release()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "H_Q": H_Q, "H_KV": H_KV, "D": D, "dtype": "bfloat16"}
    print(meta, flush=True)
    meta["coherent"] = args.coherent
    meta["profile"] = {n: profile(n, cfg, torch.bfloat16, args.coherent) for n in args.profile_lengths}
    rows = [run_length(n, cfg, torch.bfloat16, n in args.sweep_lengths, args.reps, args.coherent) for n in args.lengths]
    out = Path(os.environ.get("OUT", ROOT / "bench")) / args.json
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
