"""CPU benchmark (not a test): append a 64K-token document (Python's reference docs, `pydoc_data.topics`) into a
session of a shipped model (`--model`, default tiny) while recording a full routing trace (every layer, head and query). Prints time,
tokens/s and peak memory, and writes JSON. Target (docs/design.md): <= 60 s on 2 cores.

    python bench/cpu_trace.py [--model tiny] [--tokens 65536] [--chunk-size 4096] [--profile] [--json bench/cpu_trace.json]
    python bench/cpu_trace.py --model small --with d_model=256 d_ff=704   # random weights, the config changed

`--with FIELD=VALUE ...` times a model that does not exist yet: the shipped model's config with those fields changed,
random weights (the time depends on the shape, not on the weights). It answers "what would a larger model cost here".

`--profile` adds a second run under cProfile and prints where the time goes (attention kernel vs the rest).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import platform
import pstats
import resource
import time

import psutil
import torch

from superlinear_lab import Session, load_model

from cpu_torch import PeakRSS  # noqa: E402  (bench/ is on sys.path when run as a script)


def reference_document(n_tokens: int) -> str:
    """The first `n_tokens` bytes (= byte-level tokens) of the concatenated pydoc topics, cut at a char boundary."""
    from superlinear_lab.data import reference_docs

    text = reference_docs()
    while len(text.encode()) < n_tokens:
        text += "\n\n" + text
    return text.encode()[:n_tokens].decode("utf-8", errors="ignore")


def run(doc: str, chunk_size: int, model_name: str = "tiny", changes: dict | None = None) -> tuple[dict, object]:
    if changes:
        config = dataclasses.replace(load_model(model_name, backend="torch").cfg, **changes)
        model = load_model(model_name, config=config, backend="torch")  # a config alone: random weights
    else:
        model = load_model(model_name, backend="torch")
    n = len(doc.encode())
    session = Session(model, max_len=n + 1024, chunk_size=chunk_size, progress=False)
    with PeakRSS() as mem:
        began, cpu_began = time.perf_counter(), time.process_time()
        with session.trace() as trace:
            session.append(doc)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    return {
        "tokens": n, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "tokens_per_s": round(n / seconds),
        "peak_rss_gb": round(mem.peak / 1e9, 3), "rss_before_gb": round(mem.base / 1e9, 3),
        "session_memory_mb": {k: round(v / 1e6, 2) for k, v in session.memory().items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "trace_queries": int(trace.queries.numel()), "trace_layers": trace.names,
        "coverage_layer1": [round(c, 4) for c in trace.coverage(1).tolist()],
    }, session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="tiny", help="shipped model name")
    parser.add_argument("--with", dest="changes", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="random weights, the model's config with these fields changed (ints or a pattern)")
    args = parser.parse_args()
    changes = {}
    for item in args.changes:
        field, _, value = item.partition("=")
        if not value:
            parser.error(f"--with expects FIELD=VALUE, got {item!r}")
        changes[field] = int(value) if value.lstrip("-").isdigit() else value
    doc = reference_document(args.tokens)
    result, _ = run(doc, args.chunk_size, args.model, changes)
    result.update({"model": args.model, "changes": changes, "chunk_size": args.chunk_size, "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "cpus": psutil.cpu_count(), "load_avg_1m": round(psutil.getloadavg()[0], 2),
                   "machine": platform.processor() or platform.machine(),
                   "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)})
    print(json.dumps(result, indent=2))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(doc, args.chunk_size, args.model, changes)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(r"(superlinear_attention|span_search|range_attention|"
                                                   r"_chunks_of_scores|ssm.py|layers.py|trace.py|hybrid.py)")
        stats.sort_stats("tottime").print_stats(12)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
