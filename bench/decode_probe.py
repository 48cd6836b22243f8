"""Where a decode step of the release attention layer goes, on the GPU: per-kernel device time, the host time of
the eager single-step calls, and a sweep of the group kernel's settings.

Setting of issue 16: B = 1, H_Q = 32, H_KV = 2, D = 128, bf16, `SpanConfig.release()`, random inputs, one query at
L − 1 of a cache of length L. For every L:
  * graph: the step (`ops.decode_attention`) captured as a CUDA graph; device time with the L2 flushed before each
    replay (`speed.device_times`, the headline "cold") and back to back ("warm");
  * settings (``--sweep-lengths``): `SWEEP`'s kernel (group or heads), chunk size, stages, warps and key block, each
    against the default's output;
  * floor: the keys the step needs (each KV group's union), read by a kernel that only sums them, as the group kernel
    reads them, contiguously and the whole cache — what streaming those bytes costs on this card;
  * profile: per-kernel device time of eager steps (torch.profiler);
  * calls: ms per call over back-to-back calls (CUDA events) of the public `superlinear_attention` (position as a
    list and as a device tensor), the same with its single-step path switched off (the general path),
    `DecodeAttention` (graph and graph=False) and the caller's graph replay; dense SDPA replay; bit-identity of all;
  * host: cProfile of the general path's public call (top functions by own time).

    python bench/decode_probe.py [--lengths 131072 1048576] [--sweep-lengths 1048576] [--json decode_probe.json]

Writes $OUT/<json> (or bench/<json>).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import _import_kernels  # noqa: E402

_import_kernels()
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.triton import decode, ops, search  # noqa: E402
from speed import dense, device_times, graphed, make_inputs, profile_steps  # noqa: E402


def per_call_ms(fn, calls: int = 100, repeats: int = 5) -> float:
    """Median over `repeats` of the device-clock ms per call of `calls` back-to-back calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[repeats // 2]


def host_us(fn, calls: int = 200) -> float:
    """Host µs per call (no synchronisation inside the loop; the queue is drained before and after)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def step_graph(q1, q2, k, v, cfg, pos, plan, row_start):
    graph, out = graphed(lambda: ops.decode_attention(q1, q2, k, v, cfg, pos, row_start, plan))
    graph.replay()
    torch.cuda.synchronize()
    return graph, out.clone()


def graph_times(length, cfg, q1, q2, k, v, pos, reps) -> tuple[dict, torch.Tensor]:
    """The shipped step graphed: L2-flushed ("cold") and back-to-back ("warm") device ms per replay."""
    plan = ops.decode_plan(q1, k, v, cfg)
    graph, out = step_graph(q1, q2, k, v, cfg, pos, plan, torch.zeros(1, dtype=torch.int64, device="cuda"))
    cold, warm = device_times(graph.replay, reps)
    res = {"cold_ms": cold * 1e3, "warm_ms": warm * 1e3}
    print(f"  L={length}: graph {json.dumps(res)}", flush=True)
    return res, out


# Group-kernel settings swept at the sweep lengths; every row is checked against the default's output. by_heads:
# `decode._decode_heads_kernel` (logits once per head, shared by its slots) instead of `_decode_group_kernel`; pdl:
# the step's four kernels with programmatic dependent launch (decode.DECODE_PDL).
SWEEP = [dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32),
         dict(by_heads=True, chunk=1024, stages=3, warps=4, block_n=32),
         dict(by_heads=True, chunk=1024, stages=3, warps=4, block_n=64),
         dict(by_heads=True, chunk=1024, stages=2, warps=4, block_n=64),
         dict(by_heads=True, chunk=1024, stages=4, warps=4, block_n=32),
         dict(by_heads=True, chunk=512, stages=3, warps=4, block_n=32),
         dict(by_heads=True, chunk=2048, stages=3, warps=4, block_n=64),
         dict(by_heads=True, chunk=1024, stages=3, warps=8, block_n=64),
         dict(by_heads=True, chunk=1024, stages=3, warps=2, block_n=32),
         dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=64),
         dict(by_heads=True, chunk=256, stages=3, warps=4, block_n=32),
         dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True),
         dict(by_heads=True, chunk=1024, stages=3, warps=4, block_n=32, pdl=True)]

# Window B (session 9), after A: the heads kernel was slower (144 vs 107 us), PDL saved ~4 us, and a sum-only read of
# the union runs went from 117.9 us (32-key blocks, 4 warps) to 91.6 us (128-key blocks, 8 warps): larger key blocks.
SWEEP_B = [dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True),
           dict(by_heads=False, chunk=1024, stages=3, warps=8, block_n=64, pdl=True),
           dict(by_heads=False, chunk=1024, stages=3, warps=8, block_n=128, pdl=True),
           dict(by_heads=False, chunk=1024, stages=2, warps=8, block_n=128, pdl=True),
           dict(by_heads=False, chunk=1024, stages=2, warps=4, block_n=128, pdl=True),
           dict(by_heads=False, chunk=1024, stages=4, warps=4, block_n=64, pdl=True),
           dict(by_heads=False, chunk=2048, stages=3, warps=8, block_n=128, pdl=True),
           dict(by_heads=False, chunk=512, stages=3, warps=4, block_n=64, pdl=True),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=64, pdl=True),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True,
                set={"search.DECODE_RUNS": 64}),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True,
                set={"search.DECODE_RUNS": 16}),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True,
                set={"search.DECODE_STRIPES": 32, "search.DECODE_RUNS": 64}),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True, set={"decode.DECODE_TMA": True}),
           dict(by_heads=False, chunk=1024, stages=4, warps=4, block_n=32, pdl=True, set={"decode.DECODE_TMA": True}),
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=64, pdl=True, set={"decode.DECODE_TMA": True}),
           dict(by_heads=False, chunk=1024, stages=3, warps=8, block_n=128, pdl=True,
                set={"decode.DECODE_TMA": True}),
           # 17: session 9's shipped step (TMA off; DECODE_TMA is on by default since session 10)
           dict(by_heads=False, chunk=1024, stages=3, warps=4, block_n=32, pdl=True, set={"decode.DECODE_TMA": False})]
SWEEPS = {"A": SWEEP, "B": SWEEP_B}

ONLY: list[int] | None = None  # --only: indices of the sweep list to run
SWEEP_LIST = "A"  # --sweep-list
MODULES = {"decode": decode, "search": search}  # a SWEEP row's "set": {"search.DECODE_RUNS": 64, ...}


def sweep(length, cfg, q1, q2, k, v, pos, reps, ref) -> list:
    plan = ops.decode_plan(q1, k, v, cfg)
    row_start = torch.zeros(1, dtype=torch.int64, device="cuda")
    default = (decode.decode_chunk_for, decode.DECODE_STAGES, decode.DECODE_WARPS, decode.DECODE_BLOCK_N,
               decode.DECODE_BY_HEADS, decode.DECODE_PDL)
    rows = []
    table = SWEEPS[SWEEP_LIST]
    for setting in table if ONLY is None else [table[i] for i in ONLY]:
        chunk = setting["chunk"]
        decode.decode_chunk_for = lambda l_kv, n_pairs, d, c=chunk: c
        decode.DECODE_STAGES, decode.DECODE_WARPS = setting["stages"], setting["warps"]
        decode.DECODE_BLOCK_N, decode.DECODE_BY_HEADS = setting["block_n"], setting["by_heads"]
        decode.DECODE_PDL = setting.get("pdl", False)
        old = {key: getattr(MODULES[key.split(".")[0]], key.split(".")[1]) for key in setting.get("set", {})}
        for key, value in setting.get("set", {}).items():
            setattr(MODULES[key.split(".")[0]], key.split(".")[1], value)
        try:
            graph, out = step_graph(q1, q2, k, v, cfg, pos, plan, row_start)
            cold, warm = device_times(graph.replay, reps)
            row = dict(setting, cold_ms=cold * 1e3, warm_ms=warm * 1e3,
                       max_abs_diff=float((out.float() - ref.float()).abs().max()))
            del graph
            row["kernels_us"] = {r["kernel"][:40]: round(r["us_per_step"], 2) for r in profile_steps(
                lambda: ops.decode_attention(q1, q2, k, v, cfg, pos, row_start, plan), reps=10)}
        except Exception as e:  # noqa: BLE001 - a setting that does not compile/fit is reported, not fatal
            row = dict(setting, error=f"{type(e).__name__}: {e}"[:300])
        for key, value in old.items():
            setattr(MODULES[key.split(".")[0]], key.split(".")[1], value)
        rows.append(row)
        print(f"  L={length}: {row}", flush=True)
        with open(Path(os.environ.get("OUT", ROOT / "bench")) / "decode_probe_sweep.jsonl", "a") as f:
            f.write(json.dumps(dict(row, length=length)) + "\n")
    (decode.decode_chunk_for, decode.DECODE_STAGES, decode.DECODE_WARPS, decode.DECODE_BLOCK_N,
     decode.DECODE_BY_HEADS, decode.DECODE_PDL) = default
    return rows


@triton.jit
def _read_runs_kernel(k_ptr, v_ptr, lo_ptr, hi_ptr, out_ptr, s_h, N_CHUNKS, BLOCK_N: tl.constexpr,
                      D: tl.constexpr):
    """Read K and V rows lo..hi of one chunk (the run the group kernel reads) and keep only a checksum."""
    h = tl.program_id(0)
    c = tl.program_id(1)
    lo = tl.load(lo_ptr + h * N_CHUNKS + c)
    hi = tl.load(hi_ptr + h * N_CHUNKS + c)
    d = tl.arange(0, D)
    k_base = k_ptr + h.to(tl.int64) * s_h
    v_base = v_ptr + h.to(tl.int64) * s_h
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for n0 in range(lo, hi + 1, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = (cols <= hi)[:, None]
        offs = cols.to(tl.int64)[:, None] * D + d[None, :]
        acc += tl.load(k_base + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(v_base + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + h * N_CHUNKS + c, tl.sum(tl.sum(acc, axis=1), axis=0))


FLOOR_READS = [(1024, 32, 3, 4), (1024, 64, 3, 4), (512, 32, 3, 4), (2048, 64, 4, 4), (1024, 128, 3, 8),
               (256, 32, 3, 4)]  # (chunk, key block, stages, warps) of the sum-only reads
# Window B: around A's best (1024, 128, 3, 8: 91.6 us at 1M).
FLOOR_READS_B = [(1024, 128, 3, 8), (1024, 64, 3, 8), (1024, 128, 2, 8), (1024, 128, 4, 8), (1024, 256, 2, 8),
                 (2048, 128, 3, 8), (512, 128, 3, 8), (1024, 128, 3, 4), (1024, 64, 4, 4)]


def _runs(cover, chunk, block):
    """Per (KV head, chunk): the first key of the block holding the chunk's first needed key, and its last needed key
    (0, -1 where the chunk needs none) — the run the group kernel reads."""
    h_kv, n = cover.shape
    n_chunks = -(-n // chunk)
    grid = torch.nn.functional.pad(cover, (0, n_chunks * chunk - n)).view(h_kv, n_chunks, chunk)
    idx = torch.arange(chunk, device=cover.device)
    any_ = grid.any(-1)
    lo = torch.where(grid, idx, chunk).amin(-1)
    hi = torch.where(grid, idx, -1).amax(-1)
    base = torch.arange(n_chunks, device=cover.device)[None, :] * chunk
    return (torch.where(any_, base + lo // block * block, 0).int().contiguous(),
            torch.where(any_, base + hi, -1).int().contiguous())


def floor(length, cfg, q1, q2, k, v, pos, reps) -> dict:
    """What reading the step's keys costs on this card without any attention arithmetic: the union of each KV
    group's spans and window (from the step's own routing), read as the group kernel reads it (per chunk, the run of
    key blocks from the first to the last needed key) by a kernel that only sums them (several chunk/block/stage
    settings); the same number of keys read contiguously; the whole cache (dense decode's bytes); dense SDPA.
    Device ms, L2 flushed before each call."""
    plan = ops.decode_plan(q1, k, v, cfg)
    row_start = torch.zeros(1, dtype=torch.int64, device="cuda")
    (qs, _, qe, _), _ = ops._decode(q1, q2, k, v, cfg, pos, row_start, plan.tables, plan.max_span_len)
    h_kv, group = k.shape[1], q1.shape[1] // k.shape[1]
    cover = torch.zeros(h_kv, length, dtype=torch.bool, device="cuda")
    for h in range(h_kv):
        heads = slice(h * group, (h + 1) * group)
        for a, e in zip(qs[0, heads, 0].flatten().tolist(), qe[0, heads, 0].flatten().tolist()):
            if a >= 0 and e >= a:
                cover[h, a:e + 1] = True
        cover[h, max(0, length - cfg.window_len):length] = True
    union = int(cover.sum())
    kc, vc = k[0].contiguous(), v[0].contiguous()
    summed = int(((qe - qs + 1).clamp(min=0) * (qs >= 0)).sum()) + q1.shape[1] * cfg.window_len
    res = {"union_keys": union, "summed_keys": summed, "union_gb": union * 512 / 1e9, "reads": []}

    def time_read(lo, hi, keys, chunk, block, stages, warps, name):
        out = torch.empty(lo.numel(), dtype=torch.float32, device="cuda")
        n_chunks = lo.shape[1]
        fn = lambda: _read_runs_kernel[(h_kv, n_chunks)](kc, vc, lo, hi, out, kc.stride(0), n_chunks,  # noqa: E731
                                                         BLOCK_N=block, D=k.shape[-1], num_warps=warps,
                                                         num_stages=stages)
        cold, warm = device_times(fn, reps)
        row = {"read": name, "chunk": chunk, "block_n": block, "stages": stages, "warps": warps, "keys": keys,
               "cold_ms": cold * 1e3, "warm_ms": warm * 1e3, "tb_per_s_cold": keys * 512 / cold / 1e12}
        res["reads"].append(row)
        print(f"  L={length}: floor {json.dumps(row)}", flush=True)

    for chunk, block, stages, warps in (FLOOR_READS_B if SWEEP_LIST == "B" else FLOOR_READS):
        lo, hi = _runs(cover, chunk, block)
        time_read(lo, hi, int((hi - lo + 1).clamp(min=0).sum()), chunk, block, stages, warps, "union_runs")
    chunk, block, stages, warps = FLOOR_READS[0]
    per_head = -(-union // h_kv)
    contiguous = torch.zeros(h_kv, length, dtype=torch.bool, device="cuda")
    contiguous[:, :per_head] = True
    time_read(*_runs(contiguous, chunk, block), h_kv * per_head, chunk, block, stages, warps, "contiguous_same_keys")
    time_read(*_runs(torch.ones_like(cover), chunk, block), h_kv * length, chunk, block, stages, warps, "whole_cache")
    cold, _ = device_times(lambda: dense(q2, k, v, False), reps)
    res["dense_sdpa_cold_ms"] = cold * 1e3
    res["dense_tb_per_s"] = h_kv * length * 512 / cold / 1e12
    print(f"  L={length}: floor union {union:,} keys of {summed:,} summed; dense SDPA {cold * 1e3:.4f} ms "
          f"({res['dense_tb_per_s']:.2f} TB/s)", flush=True)
    return res


def profile(cfg, q1, q2, k, v, pos) -> list:
    plan = ops.decode_plan(q1, k, v, cfg)
    row_start = torch.zeros(1, dtype=torch.int64, device="cuda")
    rows = profile_steps(lambda: ops.decode_attention(q1, q2, k, v, cfg, pos, row_start, plan))
    print("  profile: " + "; ".join(f"{r['kernel']} {r['us_per_step']:.1f} us" for r in rows), flush=True)
    return rows


def calls(length, cfg, q1, q2, k, v, pos) -> dict:
    plist = [length - 1]
    public = lambda: superlinear_attention(q1, q2, k, v, plist, cfg)  # noqa: E731
    public_t = lambda: superlinear_attention(q1, q2, k, v, pos, cfg)  # noqa: E731
    general = lambda: superlinear_attention(q1, q2, k, v, pos, cfg, return_routing=True)[0]  # noqa: E731
    entry = DecodeAttention(k, v, cfg, num_heads=q1.shape[1])
    entry_direct = DecodeAttention(k, v, cfg, num_heads=q1.shape[1], graph=False)
    plan = ops.decode_plan(q1, k, v, cfg)
    row_start = torch.zeros(1, dtype=torch.int64, device="cuda")
    graph, g_out = graphed(lambda: ops.decode_attention(q1, q2, k, v, cfg, pos, row_start, plan))
    g_dense, _ = graphed(lambda: dense(q2, k, v, False))
    fns = {"public_list": public, "public_device_tensor": public_t, "general_path": general,
           "decode_attention": lambda: entry(q1, q2, length - 1),
           "decode_attention_no_graph": lambda: entry_direct(q1, q2, length - 1), "graph_replay": graph.replay,
           "dense_graph_replay": g_dense.replay}
    res = {name: {"ms_per_call": per_call_ms(fn), "host_us": host_us(fn)} for name, fn in fns.items()}
    graph.replay()
    torch.cuda.synchronize()
    ref = g_out.clone()
    same = {name: bool(torch.equal(fn(), ref)) for name, fn in
            (("public_list", public), ("public_device_tensor", public_t), ("general_path", general),
             ("decode_attention", fns["decode_attention"]), ("decode_attention_no_graph", fns["decode_attention_no_graph"]))}
    res["bit_identical_to_graph"] = same
    res["public_over_graph"] = res["public_list"]["ms_per_call"] / res["graph_replay"]["ms_per_call"]
    # Where the host time of 50 calls goes: the general path and the single-query path.
    for name, fn in (("general_path", general), ("public_list", public)):
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
        res[f"{name}_cprofile_top"] = text.getvalue()[-5000:]
    print(f"  L={length}: calls " + json.dumps({k_: v_ for k_, v_ in res.items() if not k_.endswith("cprofile_top")}),
          flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--sweep-lengths", type=int, nargs="*", default=[],
                        help="lengths that also sweep the group kernel's settings (after every length's rows)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip", nargs="*", default=[], choices=("graph", "profile", "calls", "sweep", "floor"))
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices of the sweep list (default: all)")
    parser.add_argument("--sweep-list", default="A", choices=("A", "B"),
                        help="settings swept (SWEEP or SWEEP_B) and the floor's reads (FLOOR_READS or FLOOR_READS_B)")
    parser.add_argument("--json", default="decode_probe.json")
    args = parser.parse_args()
    global ONLY, SWEEP_LIST
    ONLY, SWEEP_LIST = args.only, args.sweep_list
    if not torch.cuda.is_available():
        sys.exit("bench/decode_probe.py needs a CUDA device")
    cfg = SpanConfig.release()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dtype": "bfloat16", "H_Q": 32, "H_KV": 2, "D": 128}
    print(meta, flush=True)
    out_dir = Path(os.environ.get("OUT", os.environ.get("R", ROOT / "bench")))
    rows = []
    for length in args.lengths + [n for n in args.sweep_lengths if "sweep" not in args.skip]:
        swept = len(rows) >= len(args.lengths)
        q1, q2, k, v = make_inputs(length, torch.bfloat16, False, q_len=1)
        pos = torch.tensor([length - 1], device="cuda")
        row = {"length": length}
        if swept:
            row["graph"], ref = graph_times(length, cfg, q1, q2, k, v, pos, args.reps)
            row["sweep"] = sweep(length, cfg, q1, q2, k, v, pos, args.reps, ref)
        else:
            if "graph" not in args.skip:
                row["graph"], _ = graph_times(length, cfg, q1, q2, k, v, pos, args.reps)
            if "profile" not in args.skip:
                row["profile"] = profile(cfg, q1, q2, k, v, pos)
            if "floor" not in args.skip:
                row["floor"] = floor(length, cfg, q1, q2, k, v, pos, args.reps)
            if "calls" not in args.skip:
                row["calls"] = calls(length, cfg, q1, q2, k, v, pos)
        rows.append(row)
        (out_dir / args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        del q1, q2, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
