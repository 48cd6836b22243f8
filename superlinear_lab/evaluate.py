"""Long-context evaluation: NIAH grid (length × depth), multi-needle and multi-hop suites; answer accuracy and
routing recall, as JSON plus a heatmap figure.

* **Answer accuracy** — one forward over prompt + answer; an example is right when the argmax at every answer
  query equals the answer token. That is exactly "greedy decoding reproduces the answer" (each greedy step sees
  the correct prefix iff all earlier steps were right), at the cost of one forward.
* **Routing recall** — for every (query, evidence range) pair an example declares (`Example.needs`), per attention
  layer and query head: does one branch (a chosen span together with the window) hold every evidence token?
  ``recall_any`` counts a pair as reached when at least one (layer, head) reached it; ``per_head`` gives each
  head's own rate, ``best_head`` the best of those.
* **Chance recall** — what a router that picks its K stripes uniformly at random among the query's candidates
  would reach: ``chance_head`` (one head, averaged over pairs) beside ``per_head``/``best_head`` and
  ``chance_any`` (every layer and head choosing independently) beside ``recall_any``. A recall figure is only
  meaningful next to the chance figure it must beat.

CLI (also ``python -m superlinear_lab.evaluate``)::

    superlinear-lab evaluate --lengths 1024 2048 --depths 0 0.25 0.5 0.75 1 --seeds 4 --out eval/
    superlinear-lab evaluate --device cuda --lengths 4096 8192 16384 32768 --out eval/   # GPU

writes ``eval.json`` and ``niah_heatmap.html`` (plus ``.png`` when kaleido is installed; plotly is imported only
for the figure, so the JSON is written where plotly is absent).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from superlinear_kernels import query_geometry

from . import data as D
from .trace import capture_routing, evidence_reach, window_bounds

__all__ = ["capture_routing", "evidence_pairs", "reached", "chance_recall", "answer_hits", "answer_correct", "run_examples", "summarize", "niah_grid",
           "task_suite", "evaluate", "heatmap", "format_table", "compare_backends", "set_search_power", "main"]
log = logging.getLogger(__name__)

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------- routing capture and recall
# Routing capture and the reach rule live in `superlinear_lab.trace` (one place); `capture_routing` is re-exported
# here for the training loop.


def evidence_pairs(examples: list[D.Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten every (row, query, evidence range) the examples need.

    Returns (row [P], query [P], ev_start [P], ev_end [P]) int64, ranges end-exclusive, in example order.
    """
    rows, queries, starts, ends = [], [], [], []
    for b, ex in enumerate(examples):
        for q in ex.queries:
            for e in ex.needs[q]:
                rows.append(b)
                queries.append(q)
                starts.append(ex.evidence[e][0])
                ends.append(ex.evidence[e][1])
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_t(rows), as_t(queries), as_t(starts), as_t(ends)


def reached(routing, window, row, query, ev_start, ev_end) -> torch.Tensor:
    """bool [P, H_Q]: does one branch of each head (a chosen span together with the window) hold every key of
    evidence range p? — `superlinear_lab.trace.evidence_reach`, the package's one reach rule.

    Args:
        routing: a `SearchResult` with qstart/qend [B, H_Q, L, K] for queries at positions 0 … L-1.
        window: the layer's `SpanConfig`.
        row, query, ev_start, ev_end: int64 [P] from `evidence_pairs` (ranges end-exclusive).
    """
    dev = routing.qstart.device
    row, query, ev_start, ev_end = (t.to(dev) for t in (row, query, ev_start, ev_end))
    qs = routing.qstart[row, :, query]  # [P, H, K]
    qe = routing.qend[row, :, query]
    bounds = window_bounds(window, query)[:, None, :]  # [P, 1, 2]
    per_branch, _ = evidence_reach(qs, qe, bounds, ev_start[:, None], (ev_end - 1)[:, None])
    return (per_branch == (ev_end - ev_start)[:, None, None]).any(dim=-1)


def chance_recall(cfg, query: int, ev_start: int, ev_end: int) -> float:
    """Probability that one head reaches evidence [ev_start, ev_end) (end-exclusive) from `query` when it picks
    its K stripes uniformly at random, without replacement, among the query's candidate stripes — the baseline a
    routing recall must beat. Same reach rule as `reached` (one branch, span ∪ window, holds every key).

    With M candidates of which c have a branch holding the evidence: 1 if the window alone holds it, else
    1 − C(M − c, K) / C(M, K) (all M are chosen when M ≤ K).
    """
    g = query_geometry(cfg, query)
    qs, qe = g.qstart[g.candidate], g.qend[g.candidate]  # [M]
    win = window_bounds(cfg, query)  # [2]
    width = ev_end - ev_start
    window_only, _ = evidence_reach(torch.full((1,), -1), torch.full((1,), -1), win, ev_start, ev_end - 1)
    if int(window_only[0]) == width:
        return 1.0
    per_branch, _ = evidence_reach(qs, qe, win, ev_start, ev_end - 1)
    m, c, k = int(qs.numel()), int((per_branch == width).sum()), cfg.num_spans
    if c == 0:
        return 0.0
    if m <= k:
        return 1.0
    return 1.0 - math.comb(m - c, k) / math.comb(m, k)


def answer_hits(logits: torch.Tensor, examples: list[D.Example]) -> list[list[bool]]:
    """Per example, per answer byte: is the argmax at the query predicting it that byte (with the correct prefix
    before it, i.e. teacher forcing)? `logits` [B, L, V] of the examples' ids."""
    out = []
    for b, ex in enumerate(examples):
        a0, a1 = ex.answer
        target = torch.tensor(ex.ids[a0:a1], device=logits.device)
        out.append((logits[b, a0 - 1:a1 - 1].argmax(-1) == target).tolist())
    return out


def answer_correct(logits: torch.Tensor, examples: list[D.Example]) -> list[bool]:
    """Per example: argmax at every answer query equals the answer token (greedy decoding reproduces it)."""
    return [all(hits) for hits in answer_hits(logits, examples)]


@torch.no_grad()
def run_examples(model, examples: list[D.Example], batch_size: int = 1) -> list[dict]:
    """Evaluate examples (same length within a batch). Returns one dict per example: task, length, meta,
    correct, pairs, hit_any [pairs], hit [layers][heads] counts."""
    results = []
    device = model.device
    window = {i: layer.span_config for i, layer in model.routing_layers()}
    for b0 in range(0, len(examples), batch_size):
        chunk = examples[b0:b0 + batch_size]
        if len({ex.length for ex in chunk}) != 1:
            raise ValueError("run_examples: a batch must hold examples of one length")
        ids = torch.tensor([ex.ids for ex in chunk], device=device)
        with capture_routing(model) as records:
            logits = model(ids)
        byte_hits = answer_hits(logits, chunk)
        row, query, es, ee = evidence_pairs(chunk)
        per_layer = {i: reached(records[i][1], window[i], row, query, es, ee).cpu() for i in sorted(records)}
        hits = torch.stack([per_layer[i] for i in sorted(per_layer)], dim=1)  # [P, layers, H]
        heads = hits.shape[-1]
        chance = torch.tensor([[chance_recall(window[i], int(q), int(a), int(e)) for i in sorted(records)]
                               for q, a, e in zip(query.tolist(), es.tolist(), ee.tolist())],
                              dtype=torch.float64).reshape(len(query), len(records))  # [P, layers]
        for b, ex in enumerate(chunk):
            sel = row == b
            h = hits[sel]
            results.append({"task": ex.task, "length": ex.length, "meta": ex.meta, "correct": all(byte_hits[b]),
                            "answer_bytes": len(byte_hits[b]), "bytes_right": sum(byte_hits[b]),
                            "first_byte": bool(byte_hits[b][:1] == [True]),
                            "pairs": int(sel.sum()), "hit_any": h.flatten(1).any(1).tolist(),
                            "hit": h.sum(0).tolist(), "chance_head": chance[sel].mean(1).tolist(),
                            "chance_any": (1 - ((1 - chance[sel]) ** heads).prod(1)).tolist()})
    return results


def summarize(results: list[dict], layers: list[int]) -> dict:
    """Accuracy, recall_any (over pairs), example-level routing success, per-layer-any, per-head, best head.
    With the answer-byte counts of `run_examples`, also ``byte_accuracy`` (share of answer bytes predicted right
    given the right prefix) and ``first_byte_accuracy`` (the byte that must come from the evidence): they tell
    "copied the value with one slip" from "did not copy at all" where exact-match accuracy says 0 to both."""
    n = len(results)
    pairs = sum(r["pairs"] for r in results)
    any_hits = sum(sum(r["hit_any"]) for r in results)
    per_head = None
    for r in results:
        t = torch.tensor(r["hit"], dtype=torch.float64)
        per_head = t if per_head is None else per_head + t
    per_head = (per_head / max(pairs, 1)).tolist() if per_head is not None else []
    flat = [(v, layers[li], h) for li, row in enumerate(per_head) for h, v in enumerate(row)]
    best = max(flat) if flat else (math.nan, None, None)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in results) / max(n, 1),
        "byte_accuracy": (sum(r["bytes_right"] for r in results) / max(1, sum(r["answer_bytes"] for r in results))
                          if all("answer_bytes" in r for r in results) else math.nan),
        "first_byte_accuracy": (sum(r["first_byte"] for r in results) / max(n, 1)
                                if all("first_byte" in r for r in results) else math.nan),
        "pairs": pairs,
        "recall_any": any_hits / max(pairs, 1),
        "chance_any": sum(sum(r["chance_any"]) for r in results) / max(pairs, 1),
        "chance_head": sum(sum(r["chance_head"]) for r in results) / max(pairs, 1),
        "routed_examples": sum(all(r["hit_any"]) for r in results) / max(n, 1),
        "per_head": {f"layers.{layers[li]}": row for li, row in enumerate(per_head)},
        "best_head": {"recall": best[0], "layer": best[1], "head": best[2]},
    }


# --------------------------------------------------------------------------- suites
def niah_grid(model, lengths, depths=DEFAULT_DEPTHS, seeds: int = 4, task: str = "niah", batch_size: int = 1,
              progress: bool = True, seed_offset: int = 0) -> dict:
    """Accuracy and routing recall per (length, depth) on held-out seeds seed_offset … seed_offset+seeds-1
    (split "eval"; the reported tables use offset 0, settings were chosen on offset 10000)."""
    layers = [i for i, _ in model.routing_layers()]
    cells, all_results = [], []
    bar = tqdm(total=len(lengths) * len(depths), desc=task, unit="cell", disable=not progress)
    for length in lengths:
        for depth in depths:
            t0 = time.time()
            exs = [D.make_example(task, length, seed_offset + s, "eval", depth=depth) for s in range(seeds)]
            res = run_examples(model, exs, batch_size)
            all_results += res
            cell = {"length": length, "depth": depth, **summarize(res, layers), "seconds": round(time.time() - t0, 2)}
            cells.append(cell)
            bar.set_postfix(L=length, depth=depth, acc=f"{cell['accuracy']:.2f}", recall=f"{cell['recall_any']:.3f}")
            bar.update()
            log.info("%s L=%d depth=%s: acc %.2f recall %.3f (%ss)", task, length, depth, cell["accuracy"],
                     cell["recall_any"], cell["seconds"])
    bar.close()
    by_length = {}
    for length in lengths:
        res = [r for r in all_results if r["length"] == length]
        by_length[str(length)] = summarize(res, layers)
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "seeds": seeds,
            "seed_offset": seed_offset, "cells": cells,
            "by_length": by_length}


def task_suite(model, task: str, lengths, seeds: int = 8, batch_size: int = 1, seed_offset: int = 0,
               progress: bool = True) -> dict:
    """One of multi_key / multi_value / multi_hop / passkey per length on held-out seeds."""
    layers = [i for i, _ in model.routing_layers()]
    out = {}
    for length in tqdm(lengths, desc=task, unit="length", disable=not progress):
        exs = [D.make_example(task, length, seed_offset + s, "eval") for s in range(seeds)]
        out[str(length)] = summarize(run_examples(model, exs, batch_size), layers)
        log.info("%s L=%d: acc %.2f recall %.3f", task, length, out[str(length)]["accuracy"],
                 out[str(length)]["recall_any"])
    return {"task": task, "seeds": seeds, "seed_offset": seed_offset, "by_length": out}


def set_search_power(model, search_power: float):
    """Use stripe power `search_power` in every attention layer (an inference-time geometry change: the search
    scores the same ⟨Q1, K⟩, only at a denser or sparser set of anchors). Updates `model.cfg` so a saved model
    carries it. Returns the model."""
    from dataclasses import replace

    span = model.cfg.span.replace(search_power=search_power)
    model.cfg = replace(model.cfg, span=span)
    for _, layer in model.routing_layers():
        layer.cfg = model.cfg
        layer.span_config = span
    return model


@torch.no_grad()
def compare_backends(model, examples: list[D.Example], reference: str = "oracle") -> dict:
    """Run `examples` with the model's backend and with `reference`; report, per attention layer, the share of
    (head, query, slot) anchors that agree, the max |Δlogit|, and whether correctness and recall agree."""
    backend = model.routing_layers()[0][1].backend
    layers = [i for i, _ in model.routing_layers()]
    runs = {}
    for name in (backend, reference):
        model.set_backend(name)
        rows = []
        for ex in examples:
            ids = torch.tensor([ex.ids], device=model.device)
            with capture_routing(model) as records:
                logits = model(ids)
            rows.append((logits, {i: records[i][1].qanchor.clone() for i in layers}, run_examples(model, [ex])[0]))
        runs[name] = rows
    model.set_backend(backend)
    out = {"backend": backend, "reference": reference, "lengths": [ex.length for ex in examples],
           "anchor_agreement": {}, "max_logit_diff": 0.0, "same_results": True}
    for i in layers:
        eq = [float((a[1][i] == b[1][i]).float().mean()) for a, b in zip(runs[backend], runs[reference])]
        out["anchor_agreement"][f"layers.{i}"] = min(eq)
    for a, b in zip(runs[backend], runs[reference]):
        out["max_logit_diff"] = max(out["max_logit_diff"], float((a[0] - b[0]).abs().max()))
        out["same_results"] &= a[2]["correct"] == b[2]["correct"] and a[2]["hit_any"] == b[2]["hit_any"]
    return out


def heatmap(grid: dict, path, title: str = "NIAH") -> list[Path]:
    """Two heatmaps (answer accuracy, routing recall_any) over length × depth, to `path`.html (+ .png with
    kaleido). Returns the files written."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    lengths, depths = grid["lengths"], grid["depths"]
    cell = {(c["length"], c["depth"]): c for c in grid["cells"]}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("answer accuracy", "routing recall (any head)"))
    for col, key in ((1, "accuracy"), (2, "recall_any")):
        z = [[cell[(length, d)][key] for length in lengths] for d in depths]
        fig.add_trace(go.Heatmap(z=z, x=[str(x) for x in lengths], y=[f"{d:.2f}" for d in depths], zmin=0, zmax=1,
                                 colorscale="Viridis", text=[[f"{v:.2f}" for v in row] for row in z],
                                 texttemplate="%{text}", showscale=col == 2), row=1, col=col)
        fig.update_xaxes(title_text="context length (tokens)", type="category", row=1, col=col)
        fig.update_yaxes(title_text="needle depth", row=1, col=col)
    fig.update_layout(title=title, width=1000, height=420)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = path.with_suffix(".html")
    fig.write_html(str(html), include_plotlyjs=True)
    written = [html]
    try:
        fig.write_image(str(path.with_suffix(".png")))
        written.append(path.with_suffix(".png"))
    except Exception:  # kaleido missing or unable to start: the HTML is the figure
        pass
    return written


def evaluate(model, lengths, depths=DEFAULT_DEPTHS, seeds: int = 4, suite_seeds: int = 8,
             suites=("multi_key", "multi_value", "multi_hop"), batch_size: int = 1, on_part=None,
             seed_offset: int = 0, progress: bool = True) -> dict:
    """The full evaluation: NIAH grid plus the other suites at the same lengths. `on_part(report)` is called
    after each part (to save partial results of a long run)."""
    t0 = time.time()
    report = {"niah": niah_grid(model, lengths, depths, seeds, batch_size=batch_size, progress=progress,
                                seed_offset=seed_offset)}
    for task in suites:
        if on_part:
            on_part(report)
        report[task] = task_suite(model, task, lengths, suite_seeds, batch_size, seed_offset, progress)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="superlinear-lab evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", metavar="NAME|PATH",
                   help="shipped model name, model directory or Superlinear-Exp checkpoint (default tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "oracle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    p.add_argument("--seeds", type=int, default=4, help="held-out seeds per NIAH cell")
    p.add_argument("--suite-seeds", type=int, default=8, help="held-out seeds per suite and length")
    p.add_argument("--seed-offset", type=int, default=0, help="first held-out seed (use another range to tune)")
    p.add_argument("--search-power", type=float, help="override the stripe power p of every attention layer")
    p.add_argument("--suites", nargs="*", default=["multi_key", "multi_value", "multi_hop"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default="eval", help="output directory (eval.json, niah_heatmap.html)")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--compare", metavar="BACKEND", help="first check the backend against this one (e.g. oracle) "
                   "on two held-out NIAH rows at --compare-length")
    p.add_argument("--compare-length", type=int, default=4096)
    p.add_argument("--figure-from", metavar="EVAL_JSON", help="only redraw the heatmap of an existing eval.json "
                   "(e.g. one written on a GPU machine without plotly) next to it, and print its table")
    args = p.parse_args(argv)
    if args.figure_from:
        src = Path(args.figure_from)
        report = json.loads(src.read_text())
        heatmap(report["niah"], src.parent / "niah_heatmap", title=f"NIAH — {report['setup']['model']}")
        print(format_table(report))
        return 0

    from .loaders import open_model
    from .model import describe_model

    model = open_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    if args.search_power is not None:
        set_search_power(model, args.search_power)
    check = None
    if args.compare:
        exs = [D.niah(args.compare_length, d, 900 + i, "eval") for i, d in enumerate((0.1, 0.9))]
        check = compare_backends(model, exs, args.compare)
        log.info("backend check: %s", json.dumps(check))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"model": model.model_id, "source": model.source.get("name"), "weights": describe_model(model),
             "device": args.device,
             "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
             "dtype": args.dtype, "backend": args.backend, "torch": torch.__version__,
             "span": model.cfg.span.to_dict(), "backend_check": check}
    save = lambda rep: (out / "eval.json").write_text(json.dumps({**rep, "setup": setup}, indent=1))  # noqa: E731
    report = evaluate(model, args.lengths, args.depths, args.seeds, args.suite_seeds, tuple(args.suites),
                      args.batch_size, on_part=save, seed_offset=args.seed_offset)
    report["setup"] = setup
    save(report)
    if not args.no_figure:
        try:
            heatmap(report["niah"], out / "niah_heatmap", title=f"NIAH — {model.model_id}")
        except ImportError:
            log.warning("plotly not installed: figure skipped (eval.json written)")
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    """Markdown table: per length, NIAH accuracy / recall and each suite's accuracy / recall."""
    lengths = report["niah"]["lengths"]
    suites = [k for k in report if k not in ("niah", "seconds", "setup")]
    head = "| length | NIAH acc | NIAH recall | NIAH best head |" + "".join(
        f" {s} acc | {s} recall |" for s in suites)
    sep = "|" + "---|" * (4 + 2 * len(suites))
    rows = [head, sep]
    for length in lengths:
        n = report["niah"]["by_length"][str(length)]
        row = f"| {length} | {n['accuracy']:.3f} | {n['recall_any']:.3f} | {n['best_head']['recall']:.3f} |"
        for s in suites:
            c = report[s]["by_length"].get(str(length))
            row += f" {c['accuracy']:.3f} | {c['recall_any']:.3f} |" if c else " – | – |"
        rows.append(row)
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
