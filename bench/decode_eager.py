"""Host cost of the eager decode step (issue 16): `DecodeAttention(..., graph=False)` launched from Python, per call.

Session 10 measured 0.396 ms per eager call at 1M on the H200 (session 9: 0.223) once the decode step read its keys
through TMA: the two host descriptors were built on every launch. `common.tma_descriptors` now keeps them per cache
layout (`common.TMA_DESC_CACHE`). Release attention layer (B = 1, H_Q = 32, H_KV = 2, D = 128, bf16, random K/V in a
static cache of capacity L, the query at L - 1), per L and per variant:

  * ``cache``: the defaults (TMA on, descriptors kept);
  * ``no_cache``: ``TMA_DESC_CACHE = 0`` (descriptors built at every launch: session 10's eager path);
  * ``no_tma``: ``decode.DECODE_TMA = False`` (masked loads, no descriptors: session 9's eager path);

  ``eager_ms``: device time of `--reps` back-to-back eager calls / reps (CUDA events, median of 5 loops; an eager
  call is host-bound, so this is its host time); ``enqueue_us``: wall time of the Python call alone (no
  synchronisation), median over `--reps` calls; both the median of `--rounds` rounds that interleave the variants
  (each round's value is kept), so that a busy host (load average recorded) slows every variant alike;
  ``lone_call_ms``: one call then a synchronisation (median of 50); ``equals_graph``: its output == the caller's
  CUDA graph of the same call (defaults), bit for bit.
  Same run: ``graph_ms`` (that graph, replayed back to back), ``entry_ms`` (`DecodeAttention` with its own graph),
  ``descriptors_us`` (one `tma_descriptors` call, kept vs built) and, per variant, the `--top` functions of a
  cProfile of `--profile-calls` eager calls by own time (µs per call).

    python bench/decode_eager.py --lengths 131072 1048576 --out $OUT/decode_eager.json
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
# session_decode imports speed, which imports the kernels of this checkout
from session_decode import loop_ms, release_decode_inputs  # noqa: E402
from speed import D, H_Q, graphed, timed  # noqa: E402

from superlinear_kernels import DecodeAttention, SpanConfig  # noqa: E402
from superlinear_kernels.triton import common, decode  # noqa: E402

VARIANTS = {"cache": {}, "no_cache": {"TMA_DESC_CACHE": 0}, "no_tma": {"DECODE_TMA": False}}


@contextlib.contextmanager
def variant(name: str):
    """The variant's switches set (in `common` or `decode`), restored on exit."""
    saved = []
    for attr, value in VARIANTS[name].items():
        module = common if hasattr(common, attr) else decode
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def enqueue_us(fn, reps: int) -> float:
    """Median wall µs of one call of `fn` without synchronising (what the host spends launching it)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def profile_top(fn, calls: int, top: int) -> list[dict]:
    """The `top` functions of a cProfile of `calls` calls by own time: {function, calls_per_call, own_us_per_call}."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls_per_call": n / calls,
             "own_us_per_call": round(1e6 * own / calls, 2)} for (file, line, name), (_, n, own, _, _) in rows]


def descriptors_us(k, v, reps: int = 2000) -> dict:
    """µs per `common.tma_descriptors` call over the same caches: kept (defaults) and built (TMA_DESC_CACHE = 0)."""
    out = {}
    for name in ("cache", "no_cache"):
        with variant(name):
            common.tma_descriptors(k, v, decode.DECODE_BLOCK_N, common.block_d(D), True)
            start = time.perf_counter()
            for _ in range(reps):
                common.tma_descriptors(k, v, decode.DECODE_BLOCK_N, common.block_d(D), True)
            out[name] = 1e6 * (time.perf_counter() - start) / reps
    return out


def length_row(length: int, reps: int, rounds: int, profile_calls: int, top: int) -> dict:
    cfg = SpanConfig.release()
    k, v, q1, q2, pos, pos_dev = release_decode_inputs(length)
    row = {"L": length, "tma": decode.decode_tma(k, v), "variants": {}}
    with torch.no_grad():
        direct = DecodeAttention(k, v, cfg, num_heads=H_Q, backend="triton", graph=False)
        graph, ref = graphed(lambda: direct(q1, q2, pos_dev))
        graph.replay()
        entry = DecodeAttention(k, v, cfg, num_heads=H_Q, backend="triton")
        row["graph_ms"] = loop_ms(graph.replay, reps)
        row["entry_ms"] = loop_ms(lambda: entry(q1, q2, pos), reps)
        row["entry_equals_graph"] = bool(torch.equal(entry(q1, q2, pos), ref))
        calls = {}
        for name in VARIANTS:
            with variant(name):
                eager = DecodeAttention(k, v, cfg, num_heads=H_Q, backend="triton", graph=False)
                calls[name] = lambda eager=eager: eager(q1, q2, pos)
                out = calls[name]()
                torch.cuda.synchronize()
                row["variants"][name] = {"equals_graph": bool(torch.equal(out, ref)), "eager_ms_rounds": [],
                                         "enqueue_us_rounds": []}
        for _ in range(rounds):  # the variants interleaved, so a busy host slows them alike
            for name, call in calls.items():
                with variant(name):
                    row["variants"][name]["eager_ms_rounds"].append(loop_ms(call, reps))
                    row["variants"][name]["enqueue_us_rounds"].append(enqueue_us(call, reps))
        for name, call in calls.items():
            r = row["variants"][name]
            with variant(name):
                r["eager_ms"] = statistics.median(r["eager_ms_rounds"])
                r["enqueue_us"] = statistics.median(r["enqueue_us_rounds"])
                r["lone_call_ms"] = 1e3 * timed(call, 50)
                r["profile"] = profile_top(call, profile_calls, top)
        row["descriptors_us"] = descriptors_us(k, v)
    for name, r in row["variants"].items():
        r["eager_over_graph"] = r["eager_ms"] / row["graph_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over the variants")
    parser.add_argument("--profile-calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(ROOT / "bench")), "decode_eager.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_eager.py needs a CUDA device")
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tma_desc_cache": common.TMA_DESC_CACHE,
              "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "rows": []}
    for length in args.lengths:
        row = length_row(length, args.reps, args.rounds, args.profile_calls, args.top)
        torch.cuda.empty_cache()
        summary = {name: (round(r["eager_ms"], 4), round(r["enqueue_us"], 1), r["equals_graph"])
                   for name, r in row["variants"].items()}
        print(f"L={length} graph {row['graph_ms']:.4f} ms, entry {row['entry_ms']:.4f} ms, descriptors "
              f"{row['descriptors_us']}; eager (ms, enqueue us, == graph): {summary}", flush=True)
        result["rows"].append(row)
        result["load_avg_end"] = os.getloadavg()  # eager calls are host-bound: a busy host inflates them
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
