"""GPU check of the Triton backend: the CPU test comparisons at large sizes, plus one timing row.

Run on a CUDA machine from the repository root:  python bench/gpu_check.py [--quick]

Checks (each row of the printed table is pass/fail against a stated tolerance):
  * grad     — full forward + backward vs the dense oracle (L = 2600, H_Q = 32, H_KV = 2, D = 128,
               left padding): routing equality, out, dq1, dq2, dk, dv;
  * grad-recompute — the same with the backward that recomputes dO·O_k (`common.KEEP_RESIDUALS = False`);
  * chunks   — training over 40,000 queries (forward in chunks of `common.train_forward_chunk`, dQ2 in chunks of
               `common.TRAIN_CHUNK`) == one shot;
  * rows     — prefill at 16K (B = 2, left padding) and 64K (B = 1), H_Q = 32, H_KV = 2, D = 128: the
               full Triton prefill, checked against the oracle on sampled query rows (the dense oracle
               of the whole call would need L² memory);
  * chunked  — 64K prefill in two 32K chunks of cache positions == one shot (sampled rows);
  * decode   — L_Q = 1 at several positions, batch 2 with left padding, vs the oracle, and == the
               prefill row for the same query;
  * graph    — the decode call captured in a CUDA graph and replayed at new positions == eager.
  * timing   — 128K prefill and decode (release preset, bf16) next to dense causal
               scaled_dot_product_attention.
Both presets, bf16 and fp16. Results go to $OUT/gpu_check.json (or bench/gpu_check.json).
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


def _import_kernels():
    """Import superlinear_kernels from this checkout even where the package is not installed."""
    try:
        import superlinear_kernels  # noqa: F401
    except ImportError:
        link_dir = Path("/tmp/superlinear_pkgs")
        link_dir.mkdir(exist_ok=True)
        link = link_dir / "superlinear_kernels"
        if not link.exists():
            link.symlink_to(ROOT / "kernels")
        sys.path.insert(0, str(link_dir))
    import superlinear_kernels

    return superlinear_kernels


sk = _import_kernels()
from superlinear_kernels import SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.api import Prepared  # noqa: E402
from superlinear_kernels.triton import ops as triton_ops  # noqa: E402

OUT_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
GRAD_TOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4}
PRESETS = {"default": SpanConfig.default(), "release": SpanConfig.release()}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

ROWS: list[dict] = []
OUT_PATH = Path(os.environ.get("OUT", ROOT / "bench")) / "gpu_check.json"
META: dict = {}


def save() -> None:
    OUT_PATH.write_text(json.dumps({"meta": META, "rows": ROWS}, indent=1))


def record(check: str, preset: str, dtype: str, size: str, metric: str, value: float, tol: float | None,
           ok: bool | None = None, note: str = "") -> None:
    if ok is None:
        ok = value <= tol
    ROWS.append(dict(check=check, preset=preset, dtype=dtype, size=size, metric=metric, value=value, tol=tol,
                     ok=bool(ok), note=note))
    print(f"  {check:8s} {preset:8s} {dtype:5s} {size:28s} {metric:18s} {value:11.3e} "
          f"{'' if tol is None else f'{tol:8.1e}'} {'PASS' if ok else 'FAIL'} {note}", flush=True)
    save()


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref64, got64 = ref.detach().double(), got.detach().double()
    if not bool(torch.isfinite(got64).all()):
        return float("inf")
    return float((ref64 - got64).abs().max() / ref64.abs().max().clamp_min(1e-12))


def inputs(b, h_q, h_kv, l_q, l_kv, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    return make(b, h_q, l_q, d), make(b, h_q, l_q, d), make(b, h_kv, l_kv, d), make(b, h_kv, l_kv, d)


def mask_for(b, l_kv, starts):
    return torch.arange(l_kv, device="cuda")[None, :] >= torch.tensor(starts, device="cuda")[:, None]


def routing_mismatch(ref, got) -> int:
    """Number of (b, h, q) rows whose anchors differ (near-ties may flip with summation order)."""
    return int((ref.qanchor != got.qanchor).any(-1).sum())


# ----------------------------------------------------------------------------------------------- checks
def check_grad(name, cfg, dname, dtype, l=2600, h_q=32, h_kv=2, d=128, start=137, recompute=False):
    """Gradients vs the oracle; `recompute`: with the backward that recomputes dO·O_k instead of keeping residuals
    (superlinear_kernels.triton.common.KEEP_RESIDUALS = False), recorded as check 'grad-recompute'."""
    from superlinear_kernels.triton import common

    keep, common.KEEP_RESIDUALS = common.KEEP_RESIDUALS, not recompute
    try:
        _check_grad(name, cfg, dname, dtype, l, h_q, h_kv, d, start, "grad-recompute" if recompute else "grad")
    finally:
        common.KEEP_RESIDUALS = keep


def _check_grad(name, cfg, dname, dtype, l, h_q, h_kv, d, start, check):
    size = f"B1 L{l} H{h_q}/{h_kv} D{d} s={start}"
    q1, q2, k, v = inputs(1, h_q, h_kv, l, l, d, dtype, seed=1)
    mask = mask_for(1, l, [start])
    weight = torch.randn(1, h_q, l, d, device="cuda")
    res = {}
    for backend in ("oracle", "triton"):
        xs = [x.clone().requires_grad_() for x in (q1, q2, k, v)]
        out, r = superlinear_attention(*xs, torch.arange(l), cfg, attention_mask=mask, backend=backend,
                                       return_routing=True)
        (out.float() * weight).sum().backward()
        res[backend] = (out, r, [x.grad for x in xs])
        del xs
    (ro, rr, rg), (to, tr, tg) = res["oracle"], res["triton"]
    record(check, name, dname, size, "routing rows diff", routing_mismatch(rr, tr), 0,
           ok=routing_mismatch(rr, tr) <= 2, note="of %d" % (h_q * l))
    record(check, name, dname, size, "out", rel_err(ro.float(), to.float()), OUT_TOL[dtype])
    for gname, a, b in zip(("dq1", "dq2", "dk", "dv"), rg, tg):
        record(check, name, dname, size, gname, rel_err(a.float(), b.float()), GRAD_TOL[dtype])
    del res
    torch.cuda.empty_cache()


def check_chunks(length: int = 40000, h_q: int = 32, h_kv: int = 2, d: int = 128) -> None:
    """Training over more than `common.TRAIN_CHUNK` queries (chunked forward and dQ2) == one shot, bf16, release
    preset, left padding: the chunked path at a size the dense oracle cannot check (the one-shot path is checked
    against the oracle by `check_grad`)."""
    from superlinear_kernels.triton import common

    cfg = SpanConfig.release()
    q1, q2, k, v = inputs(1, h_q, h_kv, length, length, d, torch.bfloat16, seed=3)
    mask = mask_for(1, length, [1001])
    weight = torch.randn(1, h_q, length, d, device="cuda")
    res = {}
    for name, chunk, parts in (("chunked", common.TRAIN_CHUNK, common.TRAIN_FWD_PARTS), ("one-shot", 1 << 30, 1)):
        old = common.TRAIN_CHUNK, common.TRAIN_FWD_PARTS
        common.TRAIN_CHUNK, common.TRAIN_FWD_PARTS = chunk, parts
        try:
            xs = [x.clone().requires_grad_() for x in (q1, q2, k, v)]
            out = superlinear_attention(*xs, torch.arange(length), cfg, attention_mask=mask, backend="triton")
            (out.float() * weight).sum().backward()
            res[name] = [out.detach()] + [x.grad for x in xs]
        finally:
            common.TRAIN_CHUNK, common.TRAIN_FWD_PARTS = old
        del xs
    size = f"B1 L{length} H{h_q}/{h_kv} D{d} s=1001"
    for gname, a, b in zip(("out", "dq1", "dq2", "dk", "dv"), res["one-shot"], res["chunked"]):
        record("chunks", "release", "bf16", size, f"{gname} chunked", rel_err(a.float(), b.float()), 1e-2)
    del res
    torch.cuda.empty_cache()


def check_rows(name, cfg, dname, dtype, b, l, starts, h_q=32, h_kv=2, d=128, n_rows=48, decode=False,
               chunked=False):
    size = f"B{b} L{l} H{h_q}/{h_kv} D{d}" + (f" s={starts}" if any(starts) else "")
    q1, q2, k, v = inputs(b, h_q, h_kv, l, l, d, dtype, seed=2)
    mask = mask_for(b, l, starts)
    pos = torch.arange(l)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, r = superlinear_attention(q1, q2, k, v, pos, cfg, attention_mask=mask, backend="triton",
                                   return_routing=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rows = torch.unique(torch.cat([torch.linspace(0, l - 1, n_rows - 4).long(),
                                   torch.tensor([cfg.window_len, cfg.window_len + 1, l - 2, l - 1])]).clamp(0, l - 1))
    ref_out, ref_r = superlinear_attention(q1[:, :, rows], q2[:, :, rows], k, v, rows, cfg, attention_mask=mask,
                                           backend="oracle", return_routing=True)
    got_r = sk.SearchResult(*(getattr(r, f)[:, :, rows] for f in ("qstart", "qanchor", "qend", "values")))
    diff = (ref_r.qanchor != got_r.qanchor).any(-1)  # [B, H, n]
    n_diff = int(diff.sum())
    record("rows", name, dname, size, "routing rows diff", n_diff, 0, ok=n_diff <= max(1, diff.numel() // 500),
           note=f"of {diff.numel()} sampled; prefill {seconds:.2f}s incl. compile")
    same = ~diff
    err_all = rel_err(ref_out.float(), out[:, :, rows].float())
    err_same = rel_err(ref_out.float()[same], out[:, :, rows].float()[same])
    record("rows", name, dname, size, "out (sampled rows)", err_same, OUT_TOL[dtype],
           note=f"all rows incl. flipped routing: {err_all:.2e}")
    if chunked:
        half = l // 2
        parts = [superlinear_attention(q1[:, :, c0:c1], q2[:, :, c0:c1], k, v, torch.arange(c0, c1), cfg,
                                       attention_mask=mask, backend="triton") for c0, c1 in ((0, half), (half, l))]
        err = rel_err(out.float(), torch.cat(parts, dim=2).float())
        record("chunked", name, dname, size, "2x32K vs one-shot", err, 1e-6 if dtype == torch.float32 else 1e-3)
        del parts
    if decode:
        for p in (min(cfg.window_len, l - 1) - 5, l // 2 + 17, l - 1):
            step, sr = superlinear_attention(q1[:, :, p:p + 1], q2[:, :, p:p + 1], k, v, torch.tensor([p]), cfg,
                                             attention_mask=mask, backend="triton", return_routing=True)
            ref_step, ref_sr = superlinear_attention(q1[:, :, p:p + 1], q2[:, :, p:p + 1], k, v, torch.tensor([p]),
                                                     cfg, attention_mask=mask, backend="oracle", return_routing=True)
            nd = routing_mismatch(ref_sr, sr)
            keep = ~(ref_sr.qanchor != sr.qanchor).any(-1)
            record("decode", name, dname, size + f" q={p}", "vs oracle", rel_err(ref_step.float()[keep],
                                                                                   step.float()[keep]),
                   OUT_TOL[dtype], note=f"routing rows diff {nd}")
            record("decode", name, dname, size + f" q={p}", "vs prefill row",
                   rel_err(out[:, :, p:p + 1].float(), step.float()), OUT_TOL[dtype])
    del out, r, q1, q2, k, v
    torch.cuda.empty_cache()


def _prep(positions: torch.Tensor, row_start: torch.Tensor, l_kv: int) -> Prepared:
    return Prepared(positions, row_start, l_kv - 1, l_kv)


def check_graph(cfg, name, dname, dtype, l=65536, b=2, h_q=32, h_kv=2, d=128):
    """Capture one decode step (validation done outside the graph), replay at new positions."""
    size = f"B{b} L{l} H{h_q}/{h_kv} D{d}"
    q1, q2, k, v = inputs(b, h_q, h_kv, 1, l, d, dtype, seed=3)
    row_start = torch.tensor([0, 4321], device="cuda")[:b]
    pos = torch.tensor([l - 1], device="cuda")
    prep = _prep(pos, row_start, l)
    for _ in range(2):  # compile + build the cached tables outside the capture
        triton_ops.superlinear_attention(q1, q2, k, v, cfg, prep)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out, _ = triton_ops.superlinear_attention(q1, q2, k, v, cfg, prep)
    except Exception as exc:  # report, don't abort the run
        record("graph", name, dname, size, "capture", 1, 0, ok=False, note=f"{type(exc).__name__}: {exc}"[:120])
        return
    worst = 0.0
    for p in (l - 1, l // 3, 5000, 700):
        pos.fill_(p)
        graph.replay()
        eager, _ = triton_ops.superlinear_attention(q1, q2, k, v, cfg, _prep(torch.tensor([p], device="cuda"),
                                                                              row_start, l))
        worst = max(worst, float((static_out.float() - eager.float()).abs().max()))
    record("graph", name, dname, size, "replay vs eager", worst, 0.0, note="max abs diff at 4 positions")


# ----------------------------------------------------------------------------------------------- timing
def cuda_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def sdpa(q, k, v, causal):
    import torch.nn.functional as F

    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):  # older torch / no GQA kernel: expand the KV heads
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              is_causal=causal)


def stage_times(q1, q2, k, v, cfg, prep, reps):
    """Median seconds of each forward stage (prefill: search, window, span, gate; decode: search and the
    group kernel + merge) for the tuning issue."""
    from superlinear_kernels.triton import decode, merge, span, window

    qs, qa, qe, vals = triton_ops._search(q1, k, cfg, prep)
    times = {"search": cuda_time(lambda: triton_ops._search(q1, k, cfg, prep), reps)}
    if q2.shape[2] == 1:
        longest = triton_ops._max_span_len(cfg, k.shape[2])
        run = lambda: decode.decode_forward(q2, k, v, qs, qe, qa, vals, prep.cache_position,  # noqa: E731
                                            prep.row_start, cfg.window_len, longest)
        times["branches+merge+gate (group kernel)"] = cuda_time(run, reps)
        return times
    wo, wl = window.window_forward(q2, k, v, prep.cache_position, prep.row_start, cfg.window_len)
    bo, bl, order = span.span_forward(q2, k, v, qs, qe, wo, wl)
    times["window"] = cuda_time(lambda: window.window_forward(q2, k, v, prep.cache_position, prep.row_start,
                                                              cfg.window_len), reps)
    times["span"] = cuda_time(lambda: span.span_forward(q2, k, v, qs, qe, wo, wl), reps)
    times["gate"] = cuda_time(lambda: merge.gate_forward(vals, qa, bo, q2.dtype), reps)
    # Fraction of each pair tile's (rows x keys) loop that lies inside the rows' spans (the forward's tiles).
    tile, block = span.FWD_BLOCK_P, span.FWD_BLOCK_N
    a, e = qs.reshape(-1)[order].long(), qe.reshape(-1)[order].long()
    live = (a >= 0) & (e >= a)
    pad = (-a.numel()) % tile
    a = torch.cat([a, a.new_full((pad,), -1)]).view(-1, tile)
    e = torch.cat([e, e.new_full((pad,), -1)]).view(-1, tile)
    live = torch.cat([live, live.new_zeros(pad)]).view(-1, tile)
    lo = torch.where(live, a, torch.full_like(a, 1 << 40)).min(1).values
    hi = torch.where(live, e, torch.full_like(e, -1)).max(1).values
    blocks = torch.where(hi >= lo, hi // block - lo // block + 1, torch.zeros_like(hi))
    useful = torch.where(live, e - a + 1, torch.zeros_like(a)).sum()
    times["span_tile_efficiency"] = float(useful) / max(float(blocks.sum()) * block * tile, 1.0)
    del qs, qa, qe, vals, wo, wl, bo, bl
    return times


def timing(l=131072, h_q=32, h_kv=2, d=128, dtype=torch.bfloat16):
    cfg = SpanConfig.release()
    size = f"B1 L{l} H{h_q}/{h_kv} D{d} bf16"
    q1, q2, k, v = inputs(1, h_q, h_kv, l, l, d, dtype, seed=4)
    pos = torch.arange(l, device="cuda")
    prep = _prep(pos, torch.zeros(1, dtype=torch.int64, device="cuda"), l)
    ours = cuda_time(lambda: triton_ops.superlinear_attention(q1, q2, k, v, cfg, prep), 3)
    peak_ours = torch.cuda.max_memory_allocated() / 2**30
    dense = cuda_time(lambda: sdpa(q2, k, v, True), 3)
    stages = stage_times(q1, q2, k, v, cfg, prep, 3)
    META["timing_prefill"] = dict(size=size, ours_s=ours, sdpa_s=dense, ratio=dense / ours, peak_gib=peak_ours,
                                  stages_s=stages)
    print("  stages   prefill " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in stages.items() if n != "span_tile_efficiency")
          + f"; span tile efficiency {stages.get('span_tile_efficiency', 0):.2f}",
          flush=True)
    print(f"  timing   prefill {size}: ours {ours * 1e3:.1f} ms, SDPA causal {dense * 1e3:.1f} ms, "
          f"dense/ours {dense / ours:.2f}x, peak {peak_ours:.1f} GiB", flush=True)
    save()
    # Decode: one query at the last position of a full 128K cache.
    dq1, dq2 = q1[:, :, -1:].contiguous(), q2[:, :, -1:].contiguous()
    del q1, q2
    dpos = torch.tensor([l - 1], device="cuda")
    dprep = _prep(dpos, torch.zeros(1, dtype=torch.int64, device="cuda"), l)
    eager = cuda_time(lambda: triton_ops.superlinear_attention(dq1, dq2, k, v, cfg, dprep), 20)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.superlinear_attention(dq1, dq2, k, v, cfg, dprep)
    graphed = cuda_time(graph.replay, 50)
    dense_dec = cuda_time(lambda: sdpa(dq2, k, v, False), 50)
    dstages = stage_times(dq1, dq2, k, v, cfg, dprep, 20)
    META["timing_decode"] = dict(size=size, ours_eager_s=eager, ours_graph_s=graphed, sdpa_s=dense_dec,
                                 ratio_graph=dense_dec / graphed, stages_s=dstages)
    print("  stages   decode  " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in dstages.items()), flush=True)
    print(f"  timing   decode  {size}: ours eager {eager * 1e3:.3f} ms, ours CUDA graph {graphed * 1e3:.3f} ms, "
          f"SDPA {dense_dec * 1e3:.3f} ms, dense/ours(graph) {dense_dec / graphed:.2f}x", flush=True)
    save()


def training_checks(quick: bool, presets=None, dtypes=None) -> None:
    """The gradient checks: grad (both presets, bf16/fp16; release fp32), grad-recompute, chunks; `presets` /
    `dtypes`: only these (names of PRESETS, DTYPES and 'fp32'; None = all)."""
    presets = list(PRESETS) if presets is None else presets
    dtypes = list(DTYPES) + ["fp32"] if dtypes is None else dtypes
    for pname, cfg in PRESETS.items():
        for dname, dtype in DTYPES.items():
            if pname in presets and dname in dtypes:
                check_grad(pname, cfg, dname, dtype)
    if "release" in presets and "fp32" in dtypes:
        check_grad("release", SpanConfig.release(), "fp32", torch.float32, h_q=8)
    for dname, dtype in DTYPES.items():
        if "release" in presets and dname in dtypes:
            check_grad("release", SpanConfig.release(), dname, dtype, recompute=True)
    check_chunks(length=20000 if quick else 40000)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--grads-only", action="store_true",
                        help="only the training checks: grad (both presets, bf16/fp16, fp32), grad-recompute, chunks")
    parser.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS),
                        help="the presets of the grad rows (default all; the other checks always run all)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES) + ["fp32"],
                        help="the dtypes of the grad rows (default all; the other checks always run all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="MODULE.NAME=VALUE",
                        help="backend constants for this run, e.g. common.TRAIN_FWD_BY_HEADS=False (as speed.py --set)")
    args = parser.parse_args()
    if args.set:
        from bwd_tune import apply, parse_settings

        META["settings"] = parse_settings(args.set)
        apply(META["settings"])
    import triton

    META.update(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda)
    print(f"card {META['card']} | torch {META['torch']} | triton {META['triton']} | CUDA {META['cuda']} | "
          f"settings {META.get('settings', {})}", flush=True)
    print(f"  {'check':8s} {'preset':8s} {'dtype':5s} {'size':28s} {'metric':18s} {'value':>11s} {'tol':>8s}",
          flush=True)
    began = time.perf_counter()
    big = 16384 if args.quick else 65536
    if args.grads_only:
        training_checks(args.quick, args.presets, args.dtypes)
        return summary()
    training_checks(args.quick, args.presets, args.dtypes)
    for pname, cfg in PRESETS.items():
        for dname, dtype in DTYPES.items():
            check_rows(pname, cfg, dname, dtype, b=2, l=16384, starts=[0, 3001])
            check_rows(pname, cfg, dname, dtype, b=1, l=big, starts=[0], decode=True,
                       chunked=(pname == "release"))
    for dname, dtype in DTYPES.items():
        check_graph(SpanConfig.release(), "release", dname, dtype, l=big)
    print(f"checks took {time.perf_counter() - began:.0f} s", flush=True)
    if not args.no_timing:
        timing(l=32768 if args.quick else 131072)
    return summary()


def summary() -> int:
    """Print how many checks passed; the exit status (1 if any failed)."""
    failed = [r for r in ROWS if not r["ok"]]
    print(f"{len(ROWS) - len(failed)}/{len(ROWS)} checks passed; results in {OUT_PATH}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
