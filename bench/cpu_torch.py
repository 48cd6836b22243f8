"""CPU benchmark of the torch backend (not a test): time and peak memory of `superlinear_attention`
at L = 16K and 64K (B=1, H_Q=4, H_KV=2, D=64, `SpanConfig.default()`), plus the coverage proof time
of `SpanConfig.release()` up to 2^20 tokens. Prints a table and writes JSON.

    python bench/cpu_torch.py [--lengths 16384 65536] [--json bench/cpu_torch.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import threading
import time

import psutil
import torch

from superlinear_kernels import SpanConfig, coverage, superlinear_attention


class PeakRSS:
    """Samples this process's resident set size in a background thread (peak over the block)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_attention(length: int, cfg: SpanConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (1, 4, length, 64), (1, 2, length, 64)
    q1, q2 = torch.randn(shape_q, generator=gen), torch.randn(shape_q, generator=gen)
    k, v = torch.randn(shape_kv, generator=gen), torch.randn(shape_kv, generator=gen)
    with PeakRSS() as mem:
        began = time.perf_counter()
        out = superlinear_attention(q1, q2, k, v, torch.arange(length), cfg, backend="torch")
        seconds = time.perf_counter() - began
    assert torch.isfinite(out).all()
    return {"length": length, "seconds": seconds, "peak_rss_gb": mem.peak / 1e9,
            "extra_rss_gb": (mem.peak - mem.base) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()
    cfg = SpanConfig.default()
    rows = [run_attention(n, cfg) for n in args.lengths]
    began = time.perf_counter()
    report = coverage(SpanConfig.release(), 2**20)
    proof_seconds = time.perf_counter() - began
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'L':>8} {'seconds':>9} {'peak RSS GB':>12} {'extra GB':>9}")
    for r in rows:
        print(f"{r['length']:>8} {r['seconds']:>9.2f} {r['peak_rss_gb']:>12.2f} {r['extra_rss_gb']:>9.2f}")
    print(f"coverage(release, 2^20): ok={report.ok} in {proof_seconds:.2f} s")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "config": cfg.to_dict(),
              "attention": rows, "coverage_release_2pow20": {"ok": report.ok, "seconds": proof_seconds},
              "max_rss_gb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
