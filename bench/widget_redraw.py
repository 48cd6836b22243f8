"""Redraw latency of the views for a 64K-token trace (not a test; docs/design.md target: ≤ 150 ms per interaction).

One interaction = the controller action + rebuilding the figures + the figure panes working out and serialising
what changed (`View.last_redraw_s` covers the last two), measured in the kernel process with no browser attached
(the panes behave as if a front end had asked for their figures; messages are counted, not sent). Browser-side
time is measured by bench/browser_latency.py.

    python bench/widget_redraw.py [--length 65536] [--repeat 5] [--json bench/widget_redraw.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from superlinear_kernels import SpanConfig
from superlinear_lab.widgets import CoverageMap, MissedSpanDebugger, RoutingExplorer, StripeExplorer
from superlinear_lab.widgets.demo import demo_trace, plant, reference_text


def measure(view, name: str, actions, repeat: int) -> dict:
    """Run each action `repeat` times (cycling its arguments); return per-interaction timings in ms."""
    view.view  # build the widget once; interactions update it in place
    panes = view._view.figure_widgets
    for pane in panes:  # as if a browser had asked for the figure: updates are diffed and serialised
        pane._synced = True
        pane.send = lambda *a, **k: None
    totals, interact, serial, sizes = [], [], [], []
    for _ in range(repeat):
        for action in actions:
            sent = sum(p.bytes_sent for p in panes)
            began = time.perf_counter()
            ok = action()
            acted = time.perf_counter() - began
            if not ok:
                raise RuntimeError(f"{name}: action failed: {view.error}")
            interact.append(acted * 1e3)
            serial.append(0.0)  # serialisation is part of the action now (the pane diffs serialised traces)
            totals.append(acted * 1e3)
            sizes.append(sum(p.bytes_sent for p in panes) - sent)
    return dict(view=name, interactions=len(totals), median_ms=statistics.median(totals), max_ms=max(totals),
                interaction_median_ms=statistics.median(interact), serialise_median_ms=statistics.median(serial),
                payload_kb=statistics.median(sizes) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65_536)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default="bench/widget_redraw.json")
    args = parser.parse_args()

    needle = "The secret launch code is ZX-7481-QJ.\n"
    text, ranges = plant(reference_text(args.length - len(needle) * 3), needle, [0.2, 0.5, 0.8])
    q = len(text) - 1
    began = time.perf_counter()
    trace = demo_trace(text, SpanConfig.default(), needle=needle, profile_queries=[q // 2, q])
    build_s = time.perf_counter() - began
    print(f"trace: {trace} built in {build_s:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    queries = trace.queries

    results = []
    stripes = StripeExplorer(SpanConfig.release(), query=q)
    results.append(measure(stripes, "StripeExplorer (release, q=64K)", [
        lambda: stripes.set_query(q // 3), lambda: stripes.set_query(q),
        lambda: stripes.set_params(backward_factor=2.5), lambda: stripes.set_params(backward_factor=3.0),
        lambda: stripes.set_x_axis("distance"), lambda: stripes.set_x_axis("position")], args.repeat))

    routing = RoutingExplorer(trace)
    n = queries.numel()
    results.append(measure(routing, "RoutingExplorer: pick a query", [
        lambda i=i: routing.set_query_index(int(i)) for i in torch.linspace(0, n - 1, 8).long()], args.repeat))
    results.append(measure(routing, "RoutingExplorer: change head", [
        lambda h=h: routing.set_head(h) for h in (1, 2, 3, 0)], 1))

    other = demo_trace(text, SpanConfig.default().replace(search_power=1 / 3, backward_factor=3.0), needle=needle,
                       profile_queries=[q // 2, q])
    compare = RoutingExplorer(trace, compare=other, labels=("N=2", "N=3"))
    results.append(measure(compare, "RoutingExplorer compare: pick a query", [
        lambda i=i: compare.set_query_index(int(i)) for i in torch.linspace(0, n - 1, 8).long()], args.repeat))

    cmap = CoverageMap(trace)
    results.append(measure(cmap, "CoverageMap: select head", [
        lambda h=h: cmap.select(0, h) for h in (1, 2, 3, 0)], args.repeat))

    debugger = MissedSpanDebugger(trace, [dict(start=a, end=b, unit="char") for a, b in ranges], queries=[q])
    results.append(measure(debugger, "MissedSpanDebugger: select head", [
        lambda h=h: debugger.select(head=h) for h in (1, 2, 3, 0)], args.repeat))

    print(f"\n{'view / interaction':44s} {'n':>3s} {'median ms':>10s} {'max ms':>8s} {'(action':>8s} "
          f"{'+ json)':>8s} {'figure KB':>10s}")
    for r in results:
        print(f"{r['view']:44s} {r['interactions']:3d} {r['median_ms']:10.1f} {r['max_ms']:8.1f} "
              f"{r['interaction_median_ms']:8.1f} {r['serialise_median_ms']:8.1f} {r['payload_kb']:10.0f}")
    out = dict(length=trace.length, recorded_queries=int(n), heads=trace.layer(0).heads, trace_build_s=build_s,
               torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
               machine=platform.machine(), target_ms=150, results=results)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
