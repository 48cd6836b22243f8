"""Interaction latency of the views in the browser the user actually gets: JupyterLab 4 in headless Chromium
(Playwright, /usr/bin/chromium), the kernel on this machine.

For each view and action: arm a MutationObserver on the view's DOM, perform the action as a user would (a
click on the routing map, a key press on a slider, a choice in a drop-down), and record the time from the
user's input event (page clock) to the *last* DOM change of the view, once the view and the kernel websocket
have been quiet for `--quiet` ms. The first interaction comes `--settle` s (8) after the notebook ran, as a person
reads the page (background work after display — the routing map's prefetch of every (layer, head), the static
copy's pictures — finishes meanwhile). Before a click the pointer moves onto the point and rests 0.3 s (a person
hovers before clicking; the hover label that appears on arrival is not the click's doing). Bytes are what the
browser received on the kernel websocket meanwhile (comm messages: figure updates, panel HTML, status).

    python bench/browser_latency.py [--tokens 8192 65536] [--repeat 12] [--json bench/browser_latency.json]
    python bench/browser_latency.py --tokens 8192 --only Missed --action grid --timeline   # profile one

`--timeline` prints, per interaction, where the time went: every kernel websocket frame (ms after the input,
in/out, size), each figure message (received → drawn) and the last change of each part of the view.

Writes records {view, action, tokens, median_ms, p95_ms, bytes_sent, n, ...} to the JSON file. Not a test:
timings depend on the machine (note whether it was shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from browser_lab import (CHROMIUM_ARGS, cell_errors, chromium, lab_server, notebook,  # noqa: E402
                         open_and_run)

SETUP = """\
import os, torch
torch.set_num_threads(1)
from superlinear_kernels import SpanConfig
from superlinear_lab.widgets import RoutingExplorer, StripeExplorer, CoverageMap, MissedSpanDebugger
from superlinear_lab.widgets.demo import demo_trace, plant, reference_text, stack_layers
N = {tokens}
needle = "The secret launch code is ZX-7481-QJ.\\n"
text, ranges = plant(reference_text(N - 3 * len(needle)), needle, [0.2, 0.5, 0.8])
prof = [N // 2, N - 1]
a = demo_trace(text, SpanConfig.default(), profile_queries=prof)
b = demo_trace(text, SpanConfig.default().replace(search_power=1 / 3, backward_factor=3.0), seed=1,
               profile_queries=prof)
trace = stack_layers([a, b])          # two layers that route differently
other = stack_layers([b, a])          # a genuinely different trace for compare mode
"""
# (cell source, view name); every cell shows one view.
VIEWS = [
    ("RoutingExplorer(trace)", "RoutingExplorer"),
    ("RoutingExplorer(trace, compare=other, labels=('A', 'B'))", "RoutingExplorer compare"),
    ("StripeExplorer(SpanConfig.default(), query=N - 1, max_query=N)", "StripeExplorer"),
    ("CoverageMap(trace)", "CoverageMap"),
    ("MissedSpanDebugger(trace, [dict(start=a, end=b, unit='char') for a, b in ranges], queries=[N - 1])",
     "MissedSpanDebugger"),
]

# What the kernel drew in a view (plot titles, shapes and images, HTML panels): an interaction must change it,
# else it did not work (e.g. a click the view refused) and its time means nothing.
_CONTENT = """el => [...el.querySelectorAll('.js-plotly-plot .gtitle, .widget-html-content')].map(e => e.textContent)
  .join('|') + '|' + [...el.querySelectorAll('.js-plotly-plot .shapelayer path, .js-plotly-plot .layer-above image')]
  .map(e => (e.getAttribute('d') || '') + (e.getAttribute('href') || '').length).join(',')"""

# Page side: one MutationObserver on the armed view; t0 = the first user input event after arming.
_INSTALL = """() => {
  if (window.__slBench) return;
  const s = window.__slBench = {t0: null, last: null, n: 0, obs: null};
  const mark = () => { if (s.armed && s.t0 === null) s.t0 = performance.now(); };
  for (const ev of ['pointerdown', 'mousedown', 'keydown', 'input', 'change'])
    document.addEventListener(ev, mark, {capture: true});
}"""
_ARM = """el => {
  const s = window.__slBench;
  if (s.obs) s.obs.disconnect();
  s.t0 = null; s.last = null; s.n = 0; s.armed = true; s.regions = new Map(); s.hover = null;
  const sel = '.sl-pane, .sl-document, .sl-mappane, .widget-html, .widget-slider, .widget-dropdown, .widget-label, .widget-button';
  s.el = el; s.sel = sel;
  s.obs = new MutationObserver((records) => {
    const now = performance.now();
    s.last = now; s.n++;
    for (const r of records) {  // cheap here (the observer runs inside the measured work); named in _STATE
      const e = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      const reg = (e && e.closest(sel)) || el;
      s.regions.set(reg, now);
      if (e && e.closest('.hoverlayer')) s.hover = now;
    }
  });
  s.obs.observe(el, {subtree: true, childList: true, attributes: true, characterData: true});
}"""
_STATE = """() => { const s = window.__slBench;
  const log = (globalThis.__slPaneLog || []).filter(e => s.t0 !== null && e.received >= s.t0);
  const rel = (t) => Math.round(t - s.t0);
  const ws = (globalThis.__slWs || []).filter(e => s.t0 !== null && e[0] >= s.t0).map(e => [rel(e[0]), e[1], e[2]]);
  const regions = {};
  const panes = s.el ? [...s.el.querySelectorAll('.sl-pane, .sl-mappane')] : [];
  if (s.t0 !== null && s.regions) for (const [r, t] of s.regions) {
    const name = r === s.el ? 'other' : r.className.split(' ')[0];
    regions[name + (panes.includes(r) ? panes.indexOf(r) : '')] = rel(t);
  }
  if (s.t0 !== null && s.hover !== null) regions['hover'] = rel(s.hover);
  return {t0: s.t0, last: s.last, n: s.n, now: performance.now(), ws, regions,
          panes: log.map(e => [rel(e.received), rel(e.drawn), e.type]),
          reply: log.length ? log[0].received - s.t0 : null,
          draw: log.reduce((a, e) => a + (e.drawn - e.received), 0)}; }"""


# Page side, before JupyterLab loads: every kernel websocket frame (time, direction, size) for --timeline.
_WS_HOOK = """(() => {
  const Orig = window.WebSocket;
  window.WebSocket = class extends Orig {
    constructor(...args) {
      super(...args);
      const log = (globalThis.__slWs = globalThis.__slWs || []);
      const size = (d) => d.length ?? d.byteLength ?? d.size ?? 0;
      this.addEventListener('message', (ev) => { log.push([performance.now(), 'in', size(ev.data)]);
                                                  if (log.length > 2000) log.splice(0, 1000); });
      const send = this.send.bind(this);
      this.send = (d) => { log.push([performance.now(), 'out', size(d)]); return send(d); };
    }
  };
})()"""


class Socket:
    """Bytes the page received on the kernel websocket, and when the last frame came (monotonic seconds)."""

    def __init__(self, page):
        self.bytes = 0
        self.last = 0.0
        page.on("websocket", self._attach)

    def _attach(self, ws):
        if "/api/kernels/" in ws.url:
            ws.on("framereceived", self._frame)

    def _frame(self, payload):
        self.bytes += len(payload)
        self.last = time.monotonic()


def measure(page, sock: Socket, view, act, quiet_ms: int, timeout_s: float = 30.0) -> tuple[float, int, dict]:
    """(ms from the input event to the last DOM change of `view`, bytes received, {reply_ms, draw_ms}) for one
    action `act()`: reply = input → first figure message in the page (kernel + transport), draw = time spent
    applying figure messages (Plotly.react)."""
    prepare = getattr(act, "prepare", None)
    if prepare is not None:  # e.g. the pointer moves onto the plot (a person hovers before clicking)
        prepare()
        time.sleep(0.3)
    page.evaluate(_ARM, view.element_handle())
    before = view.evaluate(_CONTENT)
    sent = sock.bytes
    act()
    began = time.monotonic()
    while True:
        time.sleep(0.05)
        s = page.evaluate(_STATE)
        if s["t0"] is not None and s["last"] is not None and s["last"] >= s["t0"]:
            dom_quiet = s["now"] - s["last"]
            ws_quiet = (time.monotonic() - max(sock.last, began)) * 1e3
            if dom_quiet >= quiet_ms and ws_quiet >= quiet_ms:
                return s["last"] - s["t0"], sock.bytes - sent, dict(
                    reply_ms=s["reply"], draw_ms=s["draw"], ws=s["ws"], regions=s["regions"], panes=s["panes"],
                    changed=view.evaluate(_CONTENT) != before)
        if time.monotonic() - began > timeout_s:
            raise RuntimeError(f"no DOM change settled within {timeout_s} s (state {s})")


def _slider_handle(page, view, label):
    return view.locator(".widget-slider", has=page.locator(".widget-label", has_text=label)).first \
        .locator(".noUi-handle").first


def _select(view, label):
    box = view.locator(".widget-dropdown", has=view.page.locator(".widget-label", has_text=label)).first
    return box.locator("select")


def _click(page, point):
    """A click at `point` whose pointer first arrives there (`prepare`, not timed): the hover label a person sees
    on the way to a click is not part of the click's latency; what the click changes afterwards is."""
    def go():
        page.mouse.down()
        page.mouse.up()
    go.prepare = lambda: page.mouse.move(*point)
    return go


def actions(page, view, name: str):
    """(action name, list of callables) pairs for one view: each callable performs one user input."""
    out = []
    if name.startswith("RoutingExplorer"):
        plot = view.locator(".js-plotly-plot").first
        drag = plot.locator(".nsewdrag").first
        box = drag.bounding_box()
        # click the left map panel at several heights (the nearest recorded query is picked)
        points = [(box["x"] + box["width"] * (0.1 if "compare" in name else 0.3),
                   box["y"] + box["height"] * f) for f in (0.2, 0.45, 0.7, 0.9, 0.35, 0.6)]

        out.append(("query pick (map click)", [_click(page, p) for p in points]))
        handle = _slider_handle(page, view, "query")

        def key(k):
            def go():
                handle.focus()
                page.keyboard.press(k)
            return go
        out.append(("query step (slider key)", [key(k) for k in ("ArrowLeft", "ArrowRight")]))
        head = _select(view, "head")
        out.append(("head change", [lambda v=v: head.select_option(str(v)) for v in ("1", "2", "3", "0")]))
        layer = _select(view, "layer")
        labels = layer.locator("option").all_inner_texts()
        out.append(("layer change", [lambda v=v: layer.select_option(label=v) for v in labels[1:] + labels[:1]]))
    elif name == "StripeExplorer":
        handle = _slider_handle(page, view, "query q")

        def key(k):
            def go():
                handle.focus()
                page.keyboard.press(k)
            return go
        out.append(("query step (slider key)", [key(k) for k in ("ArrowLeft", "ArrowRight")]))
        bf = _slider_handle(page, view, "b_f")
        out.append(("b_f step (slider key)", [lambda k=k: (bf.focus(), page.keyboard.press(k))
                                              for k in ("ArrowRight", "ArrowLeft")]))
    elif name == "MissedSpanDebugger":
        grid = view.locator(".sl-pane").first.locator(".nsewdrag").first
        box = grid.bounding_box()
        cells = [(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                 for fx, fy in ((0.1, 0.1), (0.4, 0.1), (0.65, 0.5), (0.9, 0.9), (0.4, 0.6), (0.1, 0.9))]
        out.append(("grid cell click", [_click(page, p) for p in cells]))
        layer = _select(view, "layer")
        labels = layer.locator("option").all_inner_texts()
        out.append(("layer change", [lambda v=v: layer.select_option(label=v) for v in labels[1:] + labels[:1]]))
    elif name == "CoverageMap":
        head = _select(view, "head")
        out.append(("head change", [lambda v=v: head.select_option(str(v)) for v in ("1", "2", "3", "0")]))
        layer = _select(view, "layer")
        labels = layer.locator("option").all_inner_texts()
        out.append(("layer change", [lambda v=v: layer.select_option(label=v) for v in labels[1:] + labels[:1]]))
    return out


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def _timeline(ms: float, part: dict) -> str:
    """One interaction as text: websocket frames, figure messages (received→drawn) and the last DOM change of
    each region of the view, in ms after the input event."""
    ws = " ".join(f"{d}{t}:{n // 1024 if n >= 1024 else n}{'K' if n >= 1024 else 'B'}" for t, d, n in part["ws"])
    panes = " ".join(f"{k}{a}→{b}" for a, b, k in part["panes"])
    regions = " ".join(f"{k}@{t}" for k, t in sorted(part["regions"].items(), key=lambda kv: kv[1]))
    return f"    {ms:6.0f} ms | ws {ws} | panes {panes} | last change {regions}"


def run(tokens_list, repeat: int, quiet_ms: int, only: str | None, timeline: bool = False,
        actions_only: str | None = None, settle_s: float = 8.0) -> list[dict]:
    from playwright.sync_api import sync_playwright

    records = []
    with tempfile.TemporaryDirectory(prefix="sl-browser-bench-") as tmp:
        work = Path(tmp)
        root = work / "nb"
        root.mkdir()
        for tokens in tokens_list:
            cells = [SETUP.format(tokens=tokens)] + [src for src, name in VIEWS if not only or only in name]
            (root / f"bench_{tokens}.ipynb").write_text(json.dumps(notebook(*cells)))
        with lab_server(root, work) as (base, token), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
            try:
                for tokens in tokens_list:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.add_init_script(_WS_HOOK)
                    sock = Socket(page)
                    open_and_run(page, base, token, f"bench_{tokens}.ipynb")
                    errors = cell_errors(page)
                    if errors:
                        raise RuntimeError(f"bench notebook ({tokens} tokens) failed: {errors}")
                    page.evaluate(_INSTALL)
                    time.sleep(settle_s)  # background work after display (map prefetch, static-copy pictures)
                    names = [name for _, name in VIEWS if not only or only in name]
                    page.wait_for_function(f"() => document.querySelectorAll('.sl-view').length >= {len(names)}")
                    for i, name in enumerate(names):
                        view = page.locator(".sl-view").nth(i)
                        view.scroll_into_view_if_needed()
                        view.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=60_000)
                        page.mouse.move(2, 2)
                        for action, steps in actions(page, view, name):
                            if actions_only and actions_only not in action:
                                continue
                            ms, sizes, parts, times = [], [], [], []
                            if hasattr(steps[0], "prepare"):
                                steps[0].prepare()
                            steps[0]()  # warm-up (first use of a code path), not counted
                            time.sleep(quiet_ms / 1e3 + 0.5)
                            for r in range(repeat):
                                t, nbytes, part = measure(page, sock, view, steps[(r + 1) % len(steps)], quiet_ms)
                                ms.append(t)
                                times.append(t)
                                parts.append(part)
                                sizes.append(nbytes)
                            ms.sort()
                            rec = dict(view=name, action=action, tokens=tokens, n=len(ms),
                                       median_ms=round(statistics.median(ms), 1),
                                       p95_ms=round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 1),
                                       max_ms=round(ms[-1], 1), bytes_sent=int(statistics.median(sizes)),
                                       reply_median_ms=_median([p["reply_ms"] for p in parts]),
                                       draw_median_ms=_median([p["draw_ms"] for p in parts]),
                                       unchanged=sum(not p["changed"] for p in parts),
                                       load_1min=round(os.getloadavg()[0], 2),
                                       last_change_median_ms={k: _median([p["regions"].get(k) for p in parts])
                                                              for k in sorted({k for p in parts for k in p["regions"]})})
                            records.append(rec)
                            print(f"{name:26s} {action:26s} {tokens:>7,} tokens: median {rec['median_ms']:7.1f} ms"
                                  f"  p95 {rec['p95_ms']:7.1f} ms  {rec['bytes_sent']:>9,} B  (reply {rec['reply_median_ms']} ms,"
                                  f" draw {rec['draw_median_ms']} ms)"
                                  + f"  load {rec['load_1min']}"
                                  + (f"  WARNING: {rec['unchanged']} interactions changed nothing" if rec["unchanged"]
                                     else ""), flush=True)
                            if timeline:
                                for t, part in zip(times, parts):
                                    print(_timeline(t, part), flush=True)
                    page.close()
            finally:
                browser.close()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--repeat", type=int, default=12)
    parser.add_argument("--quiet", type=int, default=600, help="ms without DOM change or websocket frame")
    parser.add_argument("--only", default=None, help="only views whose name contains this")
    parser.add_argument("--action", default=None, help="only actions whose name contains this")
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds between the notebook's run and the first interaction (as a person reads)")
    parser.add_argument("--timeline", action="store_true",
                        help="print each interaction's websocket frames, figure draws and last change per region")
    parser.add_argument("--json", default=str(ROOT / "bench" / "browser_latency.json"))
    args = parser.parse_args()
    began, load_before = time.time(), os.getloadavg()
    records = run(args.tokens, args.repeat, args.quiet, args.only, args.timeline, args.action, args.settle)
    meta = dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                settle_s=args.settle,
                load_avg_before=load_before, load_avg_after=os.getloadavg(), wall_s=round(time.time() - began, 1),
                started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)))
    for rec in records:  # one flat record per (view, action, tokens), each saying where it was measured
        rec.update(meta)
    Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
