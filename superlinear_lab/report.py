"""Routing report: run a document through a model with a routing trace and write one self-contained HTML
page — per-layer statistics, the routing map and the coverage map — that opens offline in any browser.

    from superlinear_lab.report import routing_report
    routing_report(open("paper.txt").read(), "report.html")

Also `superlinear-lab report PATH -o report.html` (see `superlinear_lab.cli`).
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
                   queries=None, progress: bool | None = None) -> tuple[RoutingTrace, Session]:
    """Append `text` (truncated to `max_tokens` tokens) into a fresh session with a routing trace.

    Returns (trace, session). `queries`: positions to record (None: all).
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
    with session.trace(queries=queries) as trace:
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


def write_report(trace: RoutingTrace, path, title: str = "Routing report") -> Path:
    """Write the HTML report of an existing trace (plotly.js inlined once; no network needed to view it)."""
    from .widgets import CoverageMap, RoutingExplorer

    views = [RoutingExplorer(trace, trace.tokens), CoverageMap(trace)]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
        ".sl-table{border-collapse:collapse;margin:8px 0 24px}.sl-table td,.sl-table th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}.sl-note{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sl-note'>{trace.length:,} tokens, {trace.queries.numel():,} recorded queries, "
        f"{len(trace.layers)} attention layers. Generated {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        _stats_table(trace),
    ]
    plotly_included = False
    for view in views:
        parts.append(f"<h2>{html.escape(view.title)}</h2><p class='sl-note'>{html.escape(view.summary())}</p>")
        for fig in view.figures():
            parts.append(pio.to_html(fig, include_plotlyjs=not plotly_included, full_html=False,
                                     config={"displaylogo": False}))
            plotly_included = True
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def routing_report(text: str, path, model=None, *, max_tokens: int | None = None, chunk_size: int = 4096,
                   title: str = "Routing report", progress: bool | None = None) -> Path:
    """Trace `text` through `model` (default: `load_model()`) and write the HTML report to `path`."""
    trace, _ = trace_document(text, model, max_tokens=max_tokens, chunk_size=chunk_size, progress=progress)
    return write_report(trace, path, title=title)
