"""Routing report: run a document through a model with a routing trace and write one self-contained HTML
page — the model and its weights, per-layer statistics, the routing map and the coverage map, and, with
`evidence=`, whether every layer and head reached that text and why not (the missed-span debugger's table and
figures) — that opens offline in any browser.

    from superlinear_lab.report import routing_report
    routing_report(open("paper.txt").read(), "report.html", evidence=["the fact to find"])

Also `superlinear-lab report PATH -o report.html [--model NAME|PATH] [--evidence TEXT]` (`superlinear_lab.cli`).
"""
from __future__ import annotations

import html
import time
from pathlib import Path

import plotly.io as pio

from .engine import Session
from .model import load_model
from .trace import RoutingTrace


def trace_document(text: str, model=None, *, max_tokens: int | None = None, chunk_size: int = 4096,
                   queries=None, profile_queries=None, progress: bool | None = None) -> tuple[RoutingTrace, Session]:
    """Append `text` (truncated to `max_tokens` tokens) into a fresh session with a routing trace.

    Returns (trace, session). `queries`: positions to record (None: all); `profile_queries`: positions whose full
    stripe-score profile is recorded too ("last" for the last token).
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text: expected a non-empty string")
    model = load_model() if model is None else model
    ids = model.tokenizer.encode(text)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: expected an int >= 1")
        ids = ids[:max_tokens]
    session = Session(model, max_len=len(ids) + 2, chunk_size=chunk_size, progress=progress)
    if isinstance(profile_queries, str) and profile_queries == "last":
        profile_queries = [len(ids) - 1]
    with session.trace(queries=queries, profile_queries=profile_queries) as trace:
        session.append(ids, role="user")
    return trace, session


def _stats_table(trace: RoutingTrace) -> str:
    rows = []
    for name, layer in trace.summary()["layers"].items():
        coverage = layer["coverage"]
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{layer['heads']}</td><td>{layer['num_spans']}</td>"
            f"<td>{layer['window_len']}</td><td>{layer['valid_slot_fraction']:.2f}</td>"
            f"<td>{layer['mean_span_len']:.1f}</td><td>{layer['mean_gate_max']:.2f}</td>"
            f"<td>{min(coverage):.3f} – {max(coverage):.3f}</td></tr>")
    return ("<table class='sl-table'><tr><th>layer</th><th>heads</th><th>K</th><th>window</th>"
            "<th>valid slots</th><th>mean span</th><th>mean top gate</th><th>keys reached (min – max head)</th></tr>"
            + "".join(rows) + "</table>")


def _evidence_section(trace: RoutingTrace, evidence, tokenizer) -> tuple[str, list]:
    """HTML and figures of the evidence section: the debugger's table for every layer and head, its grid and the
    explanation of the first miss (or of the first cell)."""
    from .widgets import MissedSpanDebugger

    dbg = MissedSpanDebugger(trace, list(evidence), tokenizer=tokenizer)
    marked = "".join(f"<li><code>{html.escape(trace_text(trace, e.start, e.end, tokenizer))}</code> — tokens "
                     f"[{e.start:,}, {e.end:,}], needed by query {', '.join(f'{q:,}' for q in e.queries)}</li>"
                     for e in dbg.evidence)
    parts = [f"<h2>Evidence</h2><ul>{marked}</ul><p class='sl-note'>{html.escape(dbg.summary())}</p>",
             dbg.table_html(), "<h3>The selected cell</h3>", *dbg.panels_html()]
    return "".join(parts), dbg.figures()


def trace_text(trace: RoutingTrace, start: int, end: int, tokenizer=None) -> str:
    """Raw text of tokens [start, end] of a trace (decoded with `tokenizer` when given, else its token strings)."""
    if tokenizer is not None and trace.token_ids is not None:
        return tokenizer.decode(trace.token_ids[start:end + 1].tolist())
    return "".join((trace.tokens or [])[start:end + 1])


def write_report(trace: RoutingTrace, path, title: str = "Routing report", *, evidence=None,
                 tokenizer=None) -> Path:
    """Write the HTML report of an existing trace (plotly.js inlined once; no network needed to view it).

    `evidence`: texts (or any evidence `MissedSpanDebugger` takes) to mark; the page then shows, for every layer and
    head, whether the last recorded query reached them and why not. `tokenizer` maps texts to tokens (pass the
    model's for model traces)."""
    from .widgets import CoverageMap, RoutingExplorer

    views = [RoutingExplorer(trace, trace.tokens), CoverageMap(trace)]
    model = trace.model or "unknown model (the trace does not name one)"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
        ".sl-table{border-collapse:collapse;margin:8px 0 24px}.sl-table td,.sl-table th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}.sl-note{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sl-model'>Model: <b>{html.escape(model)}</b></p>",
        f"<p class='sl-note'>{trace.length:,} tokens, {trace.queries.numel():,} recorded queries, "
        f"{len(trace.layers)} attention layers. Generated {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        _stats_table(trace),
    ]
    figures_html: list[str] = []

    def add_figures(figs) -> None:
        for fig in figs:
            figures_html.append(pio.to_html(fig, include_plotlyjs=not figures_html, full_html=False,
                                            config={"displaylogo": False}))
            parts.append(figures_html[-1])

    if evidence:
        section, figs = _evidence_section(trace, evidence, tokenizer)
        parts.append(section)
        add_figures(figs)
    for view in views:
        parts.append(f"<h2>{html.escape(view.title)}</h2><p class='sl-note'>{html.escape(view.summary())}</p>")
        add_figures(view.figures())
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def routing_report(text: str, path, model=None, *, max_tokens: int | None = None, chunk_size: int = 4096,
                   title: str = "Routing report", evidence=None, progress: bool | None = None) -> Path:
    """Trace `text` through `model` (default: `load_model()`) and write the HTML report to `path`.

    `evidence`: texts to mark (each found in the document; the last token is the query that needed them); the
    last token's full stripe profile is then recorded so misses get ranks and margins."""
    if isinstance(evidence, str):
        evidence = [evidence]
    trace, session = trace_document(text, model, max_tokens=max_tokens, chunk_size=chunk_size, progress=progress,
                                    profile_queries="last" if evidence else None)
    return write_report(trace, path, title=title, evidence=evidence, tokenizer=session.model.tokenizer)
