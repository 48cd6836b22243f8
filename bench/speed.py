"""GPU speed benchmark of the attention layer (issue: beat dense attention from 64K to 1M and beyond).

Setting: the released model's attention layer — B = 1, H_Q = 32, H_KV = 2, D = 128, bf16,
`SpanConfig.release()`. Prefill runs in chunks of 32,768 queries into a static cache of length L (as a
long-context server does); decode is one query at position L - 1. The baseline runs in the same process:
dense causal `scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` over all L queries for
prefill, and the same without causality for one-token decode.

    python bench/speed.py --mode both --lengths 65536 131072 262144 524288 1048576 [--coherent]
    python bench/speed.py --mode train --lengths 16384 32768 65536 131072 262144 [--profile]

Train mode: one training step of the layer over the whole sequence (q_len = L, positions 0..L-1, inputs that
require grad): forward, then backward from a fixed random dO; dense is causal SDPA forward + backward on the same
inputs. Forward and forward+backward are timed separately (backward = their difference); peak = extra GPU memory
beyond the inputs during forward+backward. `--profile` adds per-kernel device times of one of our steps.

Prints a table (L, dense s, ours s, ratio, tokens/s, peak GB, keys attended per query) and writes JSON to
$OUT/speed.json (or bench/speed.json). Decode is one step replayed from a CUDA graph, timed on the device
(L2 flushed before each step) against dense SDPA timed the same way.
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
from gpu_check import _import_kernels  # noqa: E402  (imports superlinear_kernels from this checkout)

_import_kernels()
from superlinear_kernels import SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.api import Prepared  # noqa: E402
from superlinear_kernels.geometry import max_stripe, span_lengths  # noqa: E402

H_Q, H_KV, D = 32, 2, 128
CHUNK = 32768
DENSE_COLD_FROM = 1 << 19


def keys_per_query(cfg: SpanConfig, t: int) -> int:
    """Keys one query at t reads at most: K (B + Fw + 1) + W (docs/algorithm.md §1.9), capped at t."""
    backward, forward = span_lengths(cfg, t)
    routed = cfg.num_spans * (int(backward[t]) + int(forward[t]) + 1) if max_stripe(cfg, t) > cfg.sw_index else 0
    return min(t, routed + cfg.window_len)


def make_inputs(length: int, dtype, coherent: bool, seed: int = 0, q_len: int | None = None):
    """q1, q2 [1, H_Q, q_len (default L), D]; k, v [1, H_KV, L, D]. Coherent keys vary slowly with position."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_len = length if q_len is None else q_len
    q1 = torch.randn(1, H_Q, q_len, D, device="cuda", dtype=dtype, generator=gen)
    q2 = torch.randn(1, H_Q, q_len, D, device="cuda", dtype=dtype, generator=gen)
    if coherent:
        # A random walk in key space, normalised: neighbouring queries see near-identical anchor scores.
        steps = torch.randn(1, H_KV, length // 256 + 2, D, device="cuda", generator=gen)
        walk = torch.nn.functional.interpolate(steps.cumsum(2).flatten(0, 1).transpose(1, 2), size=length,
                                               mode="linear", align_corners=True).transpose(1, 2)
        k = (walk / walk.norm(dim=-1, keepdim=True) * D ** 0.5).reshape(1, H_KV, length, D).to(dtype).contiguous()
    else:
        k = torch.randn(1, H_KV, length, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, H_KV, length, D, device="cuda", dtype=dtype, generator=gen)
    return q1, q2, k, v


def timed(fn, reps: int, warmup: bool = True) -> float:
    """Median seconds of `reps` calls (after one warm-up unless `warmup` is False), CUDA-synchronised."""
    if warmup:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_FLUSH: list[torch.Tensor] = []


def device_times(fn, reps: int) -> tuple[float, float]:
    """(cold, warm) device seconds per call from CUDA events: the median over calls that each follow an
    L2 flush (a 256 MB write, more than the H100's 50 MB L2), and the mean of `reps` back-to-back calls."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))
    fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        _FLUSH[0].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    cold = sorted(s.elapsed_time(e) for s, e in pairs)[reps // 2] / 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return cold, start.elapsed_time(end) / 1e3 / reps


def graphed(fn):
    """Run `fn` once (compiles, warms the allocator), then capture it in a CUDA graph: (graph, fn's result)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def kernel_rows(prof, steps: int, width: int = 90) -> list[dict]:
    """Per-kernel device time of a torch.profiler run over `steps` steps: rows {kernel, calls_per_step, us_per_step},
    slowest first."""
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": event.key[:width], "calls_per_step": event.count / steps,
                         "us_per_step": total / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def profile_steps(step, reps: int = 20, width: int = 60) -> list[dict]:
    """`kernel_rows` of `reps` calls of `step` (one warm-up call first) under torch.profiler, CUDA activity only."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return kernel_rows(prof, reps, width=width)


def dense(q, k, v, causal: bool):
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa
        group = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal)


def prefill_row(length: int, cfg, dtype, coherent: bool, reps: int, dense_max: int) -> dict:
    q1, q2, k, v = make_inputs(length, dtype, coherent)

    def ours():
        for c0 in range(0, length, CHUNK):
            pos = torch.arange(c0, min(c0 + CHUNK, length), device="cuda")
            superlinear_attention(q1[:, :, c0:c0 + CHUNK], q2[:, :, c0:c0 + CHUNK], k, v, pos, cfg, backend="triton")

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours_s = timed(ours, reps)
    peak = torch.cuda.max_memory_allocated() - base
    # Dense from 512K on: one call without a warm-up (its kernels ran at the shorter lengths; a 1M call takes ~19 s).
    dense_s = (timed(lambda: dense(q2, k, v, True), max(1, reps // 2), warmup=length < DENSE_COLD_FROM)
               if length <= dense_max else None)
    return {"mode": "prefill", "length": length, "coherent": coherent, "ours_s": ours_s, "dense_s": dense_s,
            "ratio": None if dense_s is None else dense_s / ours_s, "tokens_per_s": length / ours_s,
            "peak_extra_gb": peak / 1e9, "inputs_gb": sum(x.numel() * x.element_size() for x in (q1, q2, k, v)) / 1e9,
            "keys_per_query_at_L": keys_per_query(cfg, length)}


def train_row(length: int, cfg, dtype, coherent: bool, reps: int, dense_max: int, profile: bool) -> dict:
    q1, q2, k, v = (x.requires_grad_() for x in make_inputs(length, dtype, coherent))
    dout = torch.randn(q2.shape, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(7))
    pos = torch.arange(length, device="cuda")

    def ours_fwd():
        return superlinear_attention(q1, q2, k, v, pos, cfg, backend="triton")

    def dense_fwd():
        return dense(q2, k, v, True)

    def step(fwd):
        def run():
            for x in (q1, q2, k, v):
                x.grad = None
            fwd().backward(dout)
        return run

    def measure(fwd, n):
        fwd_s = timed(lambda: fwd(), n)  # with autograd recording, as in training (the graph is dropped)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        total_s = timed(step(fwd), n)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        for x in (q1, q2, k, v):
            x.grad = None
        torch.cuda.empty_cache()
        return fwd_s, total_s, peak

    fwd_s, total_s, peak = measure(ours_fwd, reps)
    row = {"mode": "train", "length": length, "coherent": coherent, "ours_fwd_s": fwd_s, "ours_s": total_s,
           "ours_bwd_s": total_s - fwd_s, "ours_bwd_over_fwd": (total_s - fwd_s) / fwd_s, "peak_extra_gb": peak,
           "inputs_gb": sum(x.numel() * x.element_size() for x in (q1, q2, k, v)) / 1e9,
           "keys_per_query_at_L": keys_per_query(cfg, length), "dense_s": None, "ratio": None,
           "tokens_per_s": length / total_s}
    if length <= dense_max:
        d_fwd, d_total, d_peak = measure(dense_fwd, max(1, reps // 2) if length > 131072 else reps)
        row.update(dense_fwd_s=d_fwd, dense_s=d_total, dense_bwd_s=d_total - d_fwd,
                   dense_bwd_over_fwd=(d_total - d_fwd) / d_fwd, dense_peak_extra_gb=d_peak,
                   ratio=d_total / total_s)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(ours_fwd)()
            torch.cuda.synchronize()
        kernels: dict[str, float] = {}
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
                kernels[ev.key[:60]] = kernels.get(ev.key[:60], 0.0) + getattr(ev, "self_device_time_total", 0) / 1e3
        row["profile_ms"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:14])
        print("    profile (ms): " + "; ".join(f"{n} {t:.1f}" for n, t in row["profile_ms"].items()), flush=True)
    return row


def decode_row(length: int, cfg, dtype, coherent: bool, reps: int) -> dict:
    """One decode step at L - 1. Ours: the Triton op replayed from a CUDA graph (as a serving loop runs
    it); dense: non-causal SDPA. Both timed on the device with CUDA events, cold (L2 flushed before
    each call, the headline) and warm (back-to-back); the eager public call is timed on the host too."""
    q1, q2, k, v = make_inputs(length, dtype, coherent, q_len=1)
    pos = torch.tensor([length - 1], device="cuda")
    superlinear_attention(q1, q2, k, v, pos, cfg, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    superlinear_attention(q1, q2, k, v, pos, cfg, backend="triton")
    peak = torch.cuda.max_memory_allocated() - base  # one eager step's scratch: routing, partials, output
    eager = timed(lambda: superlinear_attention(q1, q2, k, v, pos, cfg, backend="triton"), reps)
    from superlinear_kernels.triton import ops

    prep = Prepared(pos.clone(), torch.zeros(1, dtype=torch.int64, device="cuda"), length - 1, length)
    graph, _ = graphed(lambda: ops.superlinear_attention(q1, q2, k, v, cfg, prep))
    cold, warm = device_times(graph.replay, reps)
    dense_cold, dense_warm = device_times(lambda: dense(q2, k, v, False), reps)
    return {"mode": "decode", "length": length, "coherent": coherent, "ours_eager_host_s": eager,
            "ours_s": cold, "ours_warm_s": warm, "dense_s": dense_cold, "dense_warm_s": dense_warm,
            "ratio": dense_cold / cold, "ratio_warm": dense_warm / warm, "tokens_per_s": 1 / cold,
            "peak_extra_gb": peak / 1e9, "inputs_gb": sum(x.numel() * x.element_size() for x in (q1, q2, k, v)) / 1e9,
            "keys_per_query_at_L": keys_per_query(cfg, length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("prefill", "decode", "both", "train"), default="both")
    parser.add_argument("--profile", action="store_true", help="train mode: per-kernel device times of one step")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144, 524288, 1048576])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=None,
                        help="decode lengths (default: --lengths); decode needs only the cache, so 2M-4M fit")
    parser.add_argument("--coherent", action="store_true", help="slowly varying keys instead of random")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-max", type=int, default=1 << 21, help="skip the dense prefill above this length")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--json", default=None, help="file name of the JSON written under $OUT (or bench/)")
    parser.add_argument("--recompute", action="store_true",
                        help="train mode: the backward recomputes dO·O_k instead of keeping residuals "
                             "(superlinear_kernels.triton.common.KEEP_RESIDUALS = False)")
    parser.add_argument("--set", nargs="*", default=[], metavar="MODULE.NAME=VALUE",
                        help="backend constants for this run, e.g. window.DQ_SPLIT=False common.TRAIN_FWD_PARTS=1 "
                             "(modules of bwd_tune.MODULES; values are Python literals)")
    args = parser.parse_args()
    settings = {}
    if args.set or args.recompute:
        from bwd_tune import apply, parse_settings

        settings = parse_settings(args.set)
        if args.recompute:
            settings["common.KEEP_RESIDUALS"] = False
        apply(settings)
    if not torch.cuda.is_available():
        sys.exit("bench/speed.py needs a CUDA device")
    cfg, dtype = SpanConfig.release(), getattr(torch, args.dtype)
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dtype": args.dtype, "H_Q": H_Q, "H_KV": H_KV, "D": D, "chunk": CHUNK,
            "config": cfg.to_dict(), "recompute": args.recompute, "settings": settings}
    rows = []
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {args.dtype} | "
          f"{'coherent' if args.coherent else 'random'} keys")
    print(f"{'mode':>7} {'L':>9} {'dense s':>9} {'ours s':>9} {'ratio':>7} {'tokens/s':>11} {'peak GB':>8} {'keys/q':>7}")
    modes = ("prefill", "decode") if args.mode == "both" else (args.mode,)
    decode_lengths = args.lengths if args.decode_lengths is None else args.decode_lengths
    plan = [(n, "train") for n in args.lengths if "train" in modes]
    plan += [(n, "prefill") for n in args.lengths if "prefill" in modes]
    plan += [(n, "decode") for n in decode_lengths if "decode" in modes]
    for length, mode in plan:
        try:
            if mode == "train":
                row = train_row(length, cfg, dtype, args.coherent, args.reps, args.dense_max, args.profile)
            elif mode == "prefill":
                row = prefill_row(length, cfg, dtype, args.coherent, args.reps, args.dense_max)
            else:
                row = decode_row(length, cfg, dtype, args.coherent, args.reps * 10)
        except torch.cuda.OutOfMemoryError as e:
            print(f"{mode:>7} {length:>9}  out of GPU memory: {str(e).splitlines()[0][:100]}", flush=True)
            rows.append({"mode": mode, "length": length, "coherent": args.coherent, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        fmt = ".6f" if mode == "decode" else ".4f"
        dense_s = "—" if row["dense_s"] is None else f"{row['dense_s']:{fmt}}"
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        peak = "—" if row["peak_extra_gb"] is None else f"{row['peak_extra_gb']:.{3 if mode == 'decode' else 2}f}"
        print(f"{mode:>7} {length:>9} {dense_s:>9} {row['ours_s']:>9{fmt}} {ratio:>7} {row['tokens_per_s']:>11.0f} "
              f"{peak:>8} {row['keys_per_query_at_L']:>7}", flush=True)
        if mode == "train":
            dense_part = ("" if row["dense_s"] is None else
                          f"; dense fwd {row['dense_fwd_s']:.4f} s, bwd/fwd {row['dense_bwd_over_fwd']:.2f}, "
                          f"peak {row['dense_peak_extra_gb']:.2f} GB")
            print(f"          ours fwd {row['ours_fwd_s']:.4f} s, bwd {row['ours_bwd_s']:.4f} s, "
                  f"bwd/fwd {row['ours_bwd_over_fwd']:.2f}{dense_part}", flush=True)
        torch.cuda.empty_cache()
    prefill = [r for r in rows if r["mode"] == "prefill" and r["length"] >= 131072 and "error" not in r]
    if len(prefill) >= 2:
        import math

        xs = [math.log(r["length"]) for r in prefill]
        ys = [math.log(r["ours_s"]) for r in prefill]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        meta["prefill_time_exponent_128k_up"] = slope
        print(f"fitted prefill time exponent (L >= 128K): {slope:.3f}")
    name = args.json or (f"speed_{args.mode}.json" if args.mode == "train"
                         else "speed_coherent.json" if args.coherent else "speed.json")
    out = Path(os.environ.get("OUT", ROOT / "bench")) / name
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
