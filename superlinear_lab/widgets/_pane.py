"""`FigurePane`: a small anywidget that shows one plotly figure and updates it by *patches*.

Why not plotly's `FigureWidget`: it ships its 5 MB front-end bundle with every figure, answers each update
with a round trip of trace deltas, serialises 2-D numpy arrays as nested lists (NaN → a "not JSON compliant"
warning) and re-sends unchanged heavy traces. Here:

* plotly.js travels once per kernel session, in one shared `_PlotlyLib` model that every pane references;
* what the kernel sends a pane travels over the shared channel of `_channel.ChannelPane` (anywidget drops the
  messages of a model whose set-up took a busy page more than 2 s; the module docstring there says more);
* the figure travels as JSON with numpy arrays base64-encoded (plotly.js typed-array spec, NaN-safe);
* on every `show(fig)` the pane compares each trace and each top-level layout key with what it sent last
  (Python side, by their serialised text — or a trace by `uid` alone when a view sets one, without
  serialising) and sends only what changed; the front end applies a layout-only change with
  `Plotly.relayout` of the changed keys (shapes, images, title: no trace is recalculated) and a trace change
  with `Plotly.react`, which keeps unchanged traces as they are;
* nothing heavy lives in synced traits: a view that (re)renders asks for the full figure with a message, so
  saved widget state stays small.

Clicks come back as messages; `pane.data[i].on_click(fn)` calls `fn(trace, points, state)` with
`points.xs`, `points.ys`, `points.point_inds` (plotly's `FigureWidget` signature, so views written for it work).
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Callable

import ipywidgets
import plotly.graph_objects as go
import traitlets
from _plotly_utils.utils import convert_to_base64
from ipywidgets import widget_serialization
from plotly.io.json import to_json_plotly

from ._channel import CHANNEL_JS, ChannelPane, shared

log = logging.getLogger(__name__)

_JS = CHANNEL_JS + r"""
async function plotlyOf(model) {
  if (globalThis.Plotly) return globalThis.Plotly;
  if (!globalThis.__slPlotly) {
    globalThis.__slPlotly = (async () => {
      const ref = model.get("lib");
      const lib = await model.widget_manager.get_model(ref.slice("IPY_MODEL_".length));
      const url = URL.createObjectURL(new Blob([lib.get("source")], {type: "text/javascript"}));
      try { await import(/* webpackIgnore: true */ url); } finally { URL.revokeObjectURL(url); }
      return globalThis.Plotly;
    })();
  }
  return globalThis.__slPlotly;
}

function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "sl-pane";
  el.appendChild(box);
  let data = null, layout = null, queue = Promise.resolve(), alive = true;
  const config = {displaylogo: false, responsive: true};
  let clickMode = model.get("click_mode");  // kept up to date by "mode" messages (trait updates may be lost)
  const draw = (Plotly) => Plotly.react(box, data.slice(), layout, config);
  const trace = (what) => {  // a short event log for debugging in the browser console
    const ev = (globalThis.__slPaneEvents = globalThis.__slPaneEvents || []);
    ev.push([model.model_id || "?", what, Math.round(performance.now())]);
    if (ev.length > 400) ev.splice(0, ev.length - 400);
  };
  trace("render");
  const onMsg = (msg) => {
    const received = performance.now();
    trace("msg " + msg.type);
    if (msg.type === "mode") { clickMode = msg.mode; return; }
    queue = queue.then(async () => {
      if (!alive) return;
      const Plotly = await plotlyOf(model);
      if (msg.type === "full") {
        data = msg.data.map((t) => JSON.parse(t));
        layout = JSON.parse(msg.layout);
        await draw(Plotly);
        if (!box.__slWired) {
          box.__slWired = true;
          box.on("plotly_click", (ev) => {
            const p = ev.points && ev.points[0];
            if (!p || clickMode !== "points") return;
            model.send({type: "click", curve: p.curveNumber, x: p.x, y: p.y, point: p.pointNumber ?? null});
          });
          // "area" mode: any press inside a subplot is a pick, in data coordinates (also on empty cells of a
          // heatmap), sent at once; plotly never sees the press (its zoom drag would first cost tens of ms of
          // work in a large page, then its click handling as much again): zoom with the modebar's buttons
          const area = (ev) => clickMode === "area" && ev.button === 0 && ev.target.closest
            && ev.target.closest(".nsewdrag");
          box.addEventListener("mousedown", (ev) => { if (area(ev)) ev.stopPropagation(); }, true);
          box.addEventListener("pointerdown", (ev) => {
            const drag = area(ev);
            if (!drag) return;
            const info = box._fullLayout && box._fullLayout._plots[drag.getAttribute("data-subplot")];
            if (!info) return;
            const r = drag.getBoundingClientRect();
            // data coordinates; on a category axis, the category's index (p2d would give its name)
            const at = (ax, px) => { const d = ax.p2d(px); return typeof d === "number" ? d : ax.p2l(px); };
            model.send({type: "areaclick", subplot: drag.getAttribute("data-subplot"),
                        x: at(info.xaxis, ev.clientX - r.left), y: at(info.yaxis, ev.clientY - r.top)});
          }, true);
        }
      } else if (msg.type === "patch" && data !== null) {
        const changed = Object.entries(msg.traces);
        for (const [i, t] of changed) data[+i] = JSON.parse(t);
        // only the top-level layout keys that changed travel (null: the key was removed)
        const update = {};
        for (const [k, v] of Object.entries(msg.layout || {})) {
          if (v === null) { delete layout[k]; update[k] = null; }
          else { layout[k] = JSON.parse(v); update[k] = layout[k]; }
        }
        if (changed.length === 0 && Object.keys(update).length) {
          // layout-only change (overlays are shapes, maps are layout images): no recalculation of traces
          await Plotly.relayout(box, update);
        } else if (changed.length) {
          await draw(Plotly);
        }
      }
      if (msg.type === "snapshot") {
        // the static copy's picture of this figure (kept in a saved notebook for readers without JavaScript)
        if (data === null) return;
        const fl = box._fullLayout;
        const png = await Plotly.toImage(box, {format: "png", width: fl.width, height: fl.height});
        model.send({type: "image", rev: msg.rev, png});
        return;
      }
      box.dataset.rev = String(msg.rev);
      // timing log read by bench/browser_latency.py (kept short)
      const log = (globalThis.__slPaneLog = globalThis.__slPaneLog || []);
      log.push({type: msg.type, received, drawn: performance.now()});
      if (log.length > 200) log.splice(0, log.length - 200);
    }).catch((err) => console.error("superlinear-lab pane:", err));
  };
  // listen on the channel, then ask for the figure until it came
  const stop = follow(model, onMsg, () => !alive || data !== null,
                      (err) => trace(err ? "no channel: " + err : "sync sent"));
  return () => {
    trace("disposed"); alive = false; stop();
    if (globalThis.Plotly) globalThis.Plotly.purge(box);
  };
}
export default { render };
"""

_CSS = """.sl-pane { width: 100%; } .sl-pane .modebar-container { opacity: 0.6; }
/* the static copy printed after a live view (View._ipython_display_) is hidden while the view lives */
.jp-OutputArea:has(.sl-view) .jp-OutputArea-child:has(.sl-static-next),
.jp-OutputArea:has(.sl-view) .jp-OutputArea-child:has(.sl-static-next) + .jp-OutputArea-child { display: none; }
"""


class _PlotlyLib(ipywidgets.Widget):
    """Holds plotly.js (inlined from the installed plotly package, no CDN) for every pane of the session (a plain
    widget model in the browser: its state arrives with it, nothing else is ever sent)."""

    source = traitlets.Unicode("").tag(sync=True)


def _lib() -> _PlotlyLib:
    from plotly.offline import get_plotlyjs

    return shared(_PlotlyLib, lambda: _PlotlyLib(source=get_plotlyjs()))


def _trace_json(trace) -> str:
    props = trace.to_plotly_json()
    convert_to_base64(props)
    return to_json_plotly(props)


class _TraceHandle:
    """`pane.data[i]`: the trace's type and an `on_click` hook (plotly FigureWidget-compatible)."""

    def __init__(self, pane: "FigurePane", index: int, type_: str):
        self._pane, self.index, self.type = pane, index, type_

    def on_click(self, callback: Callable, append: bool = False) -> None:
        callbacks = self._pane._clicks.setdefault(self.index, [])
        if not append:
            callbacks.clear()
        callbacks.append(callback)


class FigurePane(ChannelPane):
    """One plotly figure in the browser, updated by patches (see the module docstring).

    `show(fig) -> bool` sends what changed since the last call (True when the trace structure changed and
    every trace was resent); `bytes_sent` counts the JSON text sent so far (the benchmark reads it).
    """

    _esm = _JS
    _css = _CSS
    lib = traitlets.Instance(_PlotlyLib).tag(sync=True, **widget_serialization)
    click_mode = traitlets.Unicode("points").tag(sync=True)  # "points": clicks on data points; "area": anywhere

    def __init__(self, fig: go.Figure | None = None, **kwargs):
        super().__init__(lib=_lib(), **kwargs)
        self._traces: list[tuple[str, str | None, str]] = []  # (type, uid, json) of what the front end holds
        self._layout_parts: dict[str, str] = {}  # top-level layout key -> its JSON, as the front end holds it
        self._rev = 0
        self.figure: go.Figure | None = None
        self._clicks: dict[int, list[Callable]] = {}
        self.bytes_sent = 0
        self._synced = False  # no front end asked for the figure yet: nothing to patch
        self.image: str | None = None  # base64 PNG of the figure as the browser drew it (revision `image_rev`)
        self.image_rev = -1
        self._content_rev = 0  # counts changes of the figure (not re-sends of the same one)
        self._image_waiters: list[Callable[[], None]] = []
        self.data: list[_TraceHandle] = []
        self.on_msg(self._on_msg)
        if fig is not None:
            self.show(fig)

    # ------------------------------------------------------------------ Python → browser
    def show(self, fig: go.Figure, default_width: int | None = None) -> bool:
        self.figure = fig  # the figure the front end shows (after this call)
        types = [t.type for t in fig.data]
        replace = types != [t for t, _, _ in self._traces]
        changed: dict[int, str] = {}
        new_traces = []
        for i, trace in enumerate(fig.data):
            uid = trace.uid
            if not replace and uid is not None and self._traces[i][1] == uid:
                new_traces.append(self._traces[i])  # same uid: the view promises the same content
                continue
            text = _trace_json(trace)
            if replace or self._traces[i][2] != text:
                changed[i] = text
            new_traces.append((trace.type, uid, text))
        layout_props = fig.layout.to_plotly_json()
        if default_width is not None and layout_props.get("width") is None:
            layout_props["width"] = default_width
        parts = {k: to_json_plotly(v) for k, v in layout_props.items()}
        layout_changed = {k: v for k, v in parts.items() if self._layout_parts.get(k) != v}
        layout_changed.update({k: None for k in self._layout_parts if k not in parts})
        self._traces, self._layout_parts = new_traces, parts
        if replace or changed or layout_changed:
            self._content_rev += 1
        if replace:
            self.data = [_TraceHandle(self, i, t) for i, t in enumerate(types)]
            self._clicks.clear()
            if self._synced:
                self._send_full()
        elif self._synced and (changed or layout_changed):
            self._rev += 1
            msg = dict(type="patch", traces={str(i): t for i, t in changed.items()}, layout=layout_changed,
                       rev=self._rev)
            self.bytes_sent += sum(len(t) for t in changed.values()) + sum(
                len(k) + len(v or "") for k, v in layout_changed.items())
            self.send(msg)
        return replace

    @traitlets.observe("click_mode")
    def _click_mode_changed(self, change) -> None:
        if getattr(self, "_synced", False):  # a view shows the pane: tell it on the channel (see the module docstring)
            self.send(dict(type="mode", mode=change["new"]))

    def request_image(self, callback: Callable[[], None]) -> bool:
        """Ask the browser for a PNG of the figure as drawn now; `callback()` runs once it arrived (`image`,
        `image_current`). False (nothing asked) when no browser shows the pane."""
        if not self._synced:
            return False
        self._image_waiters.append(callback)
        self.send(dict(type="snapshot", rev=self._content_rev))
        return True

    @property
    def image_current(self) -> bool:
        """True when `image` shows the figure the browser holds now."""
        return self.image is not None and self.image_rev == self._content_rev

    def _send_full(self) -> None:
        self._rev += 1
        data = [t for _, _, t in self._traces]
        layout = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in self._layout_parts.items()) + "}"
        self.bytes_sent += sum(len(t) for t in data) + len(layout)
        self.send(dict(type="full", data=data, layout=layout, rev=self._rev))

    # ------------------------------------------------------------------ browser → Python
    def _on_msg(self, _widget, content, _buffers) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "sync":
            self._synced = True
            self._send_full()
        elif kind == "click":
            self.click(int(content["curve"]), content.get("x"), content.get("y"), content.get("point"))
        elif kind == "image":
            png, rev = content.get("png"), content.get("rev")
            prefix = "data:image/png;base64,"
            if isinstance(png, str) and png.startswith(prefix) and rev == self._content_rev:
                self.image, self.image_rev = png[len(prefix):], rev
            waiters, self._image_waiters = self._image_waiters, []
            for callback in waiters:
                callback()
        elif kind == "areaclick":
            self.area_click(str(content.get("subplot")), float(content["x"]), float(content["y"]))

    def on_area_click(self, callback: Callable[[str, float, float], None]) -> None:
        """Call `callback(subplot, x, y)` (data coordinates, subplot like "xy" or "x2y2") on any click inside a
        subplot; switches the pane to "area" clicks."""
        self._area_clicks = [callback]
        self.click_mode = "area"

    def area_click(self, subplot: str, x: float, y: float) -> None:
        for callback in list(getattr(self, "_area_clicks", [])):
            callback(subplot, x, y)

    def click(self, curve: int, x, y, point=None) -> None:
        """Dispatch a click on trace `curve` at (x, y) to its `on_click` callbacks (also what tests call)."""
        points = SimpleNamespace(xs=[x], ys=[y], point_inds=[point] if point is not None else [0],
                                 trace_index=curve, trace_indexes=[curve])
        handle = self.data[curve] if 0 <= curve < len(self.data) else None
        for callback in list(self._clicks.get(curve, [])):
            callback(handle, points, None)
