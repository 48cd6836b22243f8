"""What every view shares: the controller base class (state, actions, errors, listeners), the lazily built
ipywidgets view, the static fallback and the self-contained HTML export.

A view is split in two so it can be tested without a browser:

* the **controller** (a subclass of `View`) holds the state, exposes one method per user action and builds
  plain plotly figures from the state (`figures()`); actions that fail record `error` and leave the state
  unchanged, they never raise into a widget callback where the message would be lost in the log;
* the **widget** (`view`, built on first use) is a thin ipywidgets 8 layout: controls that call the actions
  and `FigureWidget`s that are re-synchronised from `figures()` after every change.

Front ends without widget support get the static fallback: `static()` returns the plain figure, and the
display bundle carries a short text summary next to the widget view. `to_html(path)` writes one file with
plotly.js inlined (no CDN), so it opens offline.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Callable

import plotly.graph_objects as go
import plotly.io as pio

# Colours shared by all views, so "window", "span", "anchor" and "miss" mean the same thing everywhere.
COLORS = {
    "window": "#4C78A8",
    "span": "#F58518",
    "anchor": "#54A24B",
    "union": "#72B7B2",
    "miss": "#D62728",
    "query": "#222222",
    "muted": "#BBBBBB",
    "other": "#B279A2",
}
FONT = dict(family="system-ui, -apple-system, 'Segoe UI', sans-serif", size=12)
# FigureWidgets do not reliably measure their output area when first shown (they fall back to plotly's 700 px),
# so widgets get an explicit width that fits JupyterLab's default notebook column; exports stay responsive.
WIDGET_WIDTH = 960


_AXIS = dict(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", zerolinewidth=2, ticks="",
             automargin=True)
# A small white template (what plotly_white sets for 2-D plots): a named plotly template is deep-copied and
# validated into every figure (tens of ms per redraw) and its 10 KB travel with every layout change.
TEMPLATE = dict(layout=dict(paper_bgcolor="white", plot_bgcolor="white", font=dict(color="#2a3f5f"),
                            xaxis=_AXIS, yaxis=_AXIS, hovermode="closest",
                            colorway=["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3"]))


def with_model(summary: str, trace) -> str:
    """A view's summary line followed by the model and weights that produced its trace (`trace.model`, from
    `describe_model`), so a figure never hides whether it shows a trained or a randomly initialised model."""
    return f"{summary} · {trace.model}" if getattr(trace, "model", None) else summary


def base_layout(title: str, height: int = 380, **extra) -> dict:
    """The layout every figure starts from: white background, small margins, a left-aligned title."""
    layout = dict(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)),
        template=TEMPLATE,
        height=height,
        margin=dict(l=70, r=20, t=50, b=50),
        font=FONT,
        showlegend=True,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        hoverlabel=dict(font=dict(family="ui-monospace, monospace", size=12)),
    )
    layout.update(extra)
    return layout


# Static copy (see `View._ipython_display_`): each static output is preceded by a marker; the live view's CSS
# (`_pane._CSS`) hides markers and the output after each one; this style hides the "model not found" line a
# saved notebook shows where the live view was.
_MARKER = "<div class='sl-static-next'></div>"
_STATIC_STYLE = ("<style>.jp-OutputArea:not(:has(.sl-view)):has(.sl-static-next) > .jp-OutputArea-child:has("
                 "> .jp-OutputArea-output.jupyter-widgets){display:none}</style>")


class ViewError(ValueError):
    """A user action that a view refused (bad value, missing data); its message is shown in the view."""


class View:
    """Base controller: state + actions + figures; the widget and the exports are derived from it.

    Subclasses implement `figures()` (plain `go.Figure`s, the static fallback), `summary()` (one line of
    text) and `_build_controls()` (the ipywidgets controls, wired to the actions). Every action goes through
    `_act`, which records failures in `error` and notifies listeners (the widget) on success.
    """

    title = "view"
    _errors: tuple[type[BaseException], ...] = ()  # extra exception types an action may report (engine errors)

    def __init__(self) -> None:
        self.error: str | None = None  # message of the last refused action, None after a successful one
        self.last_redraw_s: float | None = None  # seconds the last figure rebuild took (controller side)
        self._listeners: list[Callable[[], None]] = []
        self._view = None

    # ------------------------------------------------------------------ actions and errors
    def _act(self, action: Callable[[], None]) -> bool:
        """Run one state change; on ValueError/TypeError/KeyError/IndexError (or a view's `_errors`) record the
        message and return False — actions check before they change anything, so the old state stays.
        Listeners run after every action, so the widget shows the new state or the error."""
        try:
            action()
        except (ValueError, TypeError, KeyError, IndexError) + self._errors as exc:
            self.error = str(exc) if not isinstance(exc, KeyError) else f"unknown key {exc}"
            self._notify()
            return False
        self.error = None
        self._notify()
        return True

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every action (the widget uses this to redraw)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # ------------------------------------------------------------------ what subclasses provide
    def figures(self) -> list[go.Figure]:
        """The current state as plain plotly figures (also the static fallback)."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line describing the current state (text fallback, widget status line)."""
        raise NotImplementedError

    def _build_controls(self):
        """The ipywidgets controls (a widget), wired to the actions."""
        raise NotImplementedError

    def panels_html(self) -> list[str]:
        """HTML panels shown under the figures (tables, text); a fixed number per view. Default: none."""
        return []

    def panel_css(self) -> str:
        """CSS the text panels need (loaded once by the live view; exports carry it inside the panels)."""
        return ""

    def _widget_panels_html(self) -> list[str]:
        """The panels as the live view shows them (default: `panels_html()`; a view may leave out styles that
        `panel_css` loads once)."""
        return self.panels_html()

    def _build_extras(self) -> list:
        """Widgets shown between the figures and the panels (e.g. the document pane); they keep themselves in
        sync (subscribe to the controller). Default: none."""
        return []

    def _wire_figures(self, widgets: list) -> None:
        """Attach click/hover callbacks to the FigureWidgets (called again whenever their traces are replaced)."""

    def _status_html(self) -> str:
        """HTML of the status line under the figures: the summary, or the error in red."""
        if self.error:
            return (f"<div class='sl-status sl-error' style='color:{COLORS['miss']};font-weight:600'>"
                    f"⚠ {html.escape(self.error)}</div>")
        return f"<div class='sl-status'>{html.escape(self.summary())}</div>"

    # ------------------------------------------------------------------ static fallback and export
    def static(self) -> go.Figure:
        """The main figure as a plain `go.Figure`, for front ends without widget support."""
        return self.figures()[0]

    def to_html(self, path: str | Path) -> Path:
        """Write the current state as one self-contained HTML file (plotly.js inlined, no network): the summary,
        every figure and every text panel (tables, explanations, transcript) of the view."""
        path = Path(path)
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
            ".sl-summary{color:#333;margin:8px 0 16px}</style></head><body>",
            f"<h2>{html.escape(self.title)}</h2>",
            f"<div class='sl-summary'>{html.escape(self.summary())}</div>",
        ]
        for i, fig in enumerate(self.figures()):
            parts.append(pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False,
                                     config={"displaylogo": False}))
        parts += [f"<div class='sl-panel'>{panel}</div>" for panel in self.panels_html()]
        parts.append("</body></html>")
        path.write_text("".join(parts), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ the widget
    @property
    def view(self):
        """The ipywidgets view (built on first access, then kept in sync with the controller)."""
        if self._view is None:
            self._view = _WidgetView(self)
        return self._view.root

    def static_html(self) -> str:
        """The text part of the static copy: title, summary (or error) and the text panels, as HTML."""
        return (f"<div class='sl-static'><b>{html.escape(self.title)}</b> "
                f"<span style='color:#888'>(static copy: the live view needs a running kernel)</span>"
                f"{self._status_html()}{''.join(self.panels_html())}</div>")

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.view._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"{self.title}: {self.summary()}"
        bundle["text/html"] = self.static_html()  # front ends without widget support (GitHub, nbconvert)
        return bundle

    def static_outputs(self) -> list[dict]:
        """Display bundles of the static copy shown next to the live view (see `_ipython_display_`): the text
        panels, then each figure as plotly JSON (rendered without a kernel by JupyterLab, VS Code, nbviewer) and,
        once the browser has drawn it, as a PNG (for readers that run no JavaScript: GitHub, nbconvert's HTML),
        each preceded by a marker the live view uses to hide it."""
        out = [{"text/html": _STATIC_STYLE + _MARKER + self.static_html(),
                "text/plain": f"{self.title}: {self.summary()}"}]
        panes = self._view.figure_widgets if self._view is not None else []
        for i, fig in enumerate(self.figures()):
            out.append({"text/html": _MARKER, "text/plain": ""})
            bundle = {"application/vnd.plotly.v1+json": json.loads(pio.to_json(fig, validate=False)),
                      "text/plain": f"<figure: {fig.layout.title.text or self.title}>"}
            if i < len(panes) and panes[i].image_current:
                bundle["image/png"] = panes[i].image
            out.append(bundle)
        return out

    def _ipython_display_(self) -> None:
        """In a notebook: the live view, then a static copy of its figures and panels that the live view hides
        (CSS in the pane) and that stays visible in a saved notebook without a kernel or widget state. The
        copy follows the view: its text and figures 2 s after the user's last change, pictures of the figures
        as the browser drew them once the view has been left alone for `PICTURE_IDLE_S` (drawing them takes
        the page a few hundred ms, which an interaction must not wait for)."""
        from IPython.display import display

        bundle = self._repr_mimebundle_()
        bundle["text/html"] = ""  # without widgets the static copy below shows everything (not twice)
        display(bundle, raw=True)  # the live widget
        bundles = self.static_outputs()
        self._static_handles = [display(bundle, raw=True, display_id=True) for bundle in bundles]
        self._static_written, self._picture_tries = dict(enumerate(bundles)), 0
        self._schedule("_picture_timer", 2.0, self._update_pictures)  # once the browser has drawn the figures

    def _update_static(self) -> None:
        """Rewrite the static copy's text and figures now (its pictures follow later: `_update_pictures`)."""
        self._write_static()
        self._schedule("_picture_timer", self.PICTURE_IDLE_S, self._update_pictures)

    def _update_pictures(self) -> None:
        """Ask the browser for pictures of the figures changed since their last picture; the static copy is
        rewritten when they arrived. Retried a few times while no browser shows the view yet."""
        panes = self._view.figure_widgets if self._view is not None else []
        stale = [p for p in panes if not p.image_current]
        asked = [p for p in stale if p.request_image(lambda: self._image_arrived(asked))]
        if len(asked) < len(stale) and self._picture_tries < 10:
            self._picture_tries += 1
            self._schedule("_picture_timer", 2.0, self._update_pictures)  # no browser asked for a pane yet

    def _image_arrived(self, asked: list) -> None:
        if all(not p._image_waiters for p in asked):  # the last of the pictures asked for together
            self._write_static()

    def _write_static(self) -> None:
        """Update the static copy's outputs whose content changed (each update re-renders it in the browser)."""
        written = getattr(self, "_static_written", {})
        for i, (handle, bundle) in enumerate(zip(getattr(self, "_static_handles", []), self.static_outputs())):
            if written.get(i) != bundle:
                handle.update(bundle, raw=True)
                written[i] = bundle
        self._static_written = written

    PICTURE_IDLE_S = 10.0

    def _schedule_static(self, delay_s: float = 2.0) -> None:
        """Refresh the static copy `delay_s` after the last change (on the kernel's own event loop, so it never
        runs concurrently with an action); a no-op outside a running event loop (scripts, tests)."""
        self._schedule("_static_timer", delay_s, self._update_static)
        pending = getattr(self, "_picture_timer", None)
        if pending is not None:  # the user is active: pictures wait until the view is left alone
            pending.cancel()

    def _schedule(self, timer: str, delay_s: float, callback) -> None:
        """Run `callback` `delay_s` from now on the kernel's event loop, replacing the pending call of the same
        `timer` (a no-op without a displayed static copy or outside a running event loop)."""
        if not getattr(self, "_static_handles", None):
            return
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        pending = getattr(self, timer, None)
        if pending is not None:
            pending.cancel()
        setattr(self, timer, loop.call_later(delay_s, callback))

    def redraw_seconds(self) -> float:
        """Time one full redraw of the widget from the current state (figures + widget update)."""
        began = time.perf_counter()
        self.view  # noqa: B018 - builds the widget on first use
        self._view.refresh()
        return time.perf_counter() - began


def sync_figure(pane, fig: go.Figure) -> bool:
    """Make `pane` (a `FigurePane`) show `fig`, sending only the traces and layout that changed; True if the
    trace structure changed (every trace resent, click hooks must be wired again)."""
    return pane.show(fig, default_width=WIDGET_WIDTH)


class _WidgetView:
    """The thin ipywidgets layer: controls on top, one FigureWidget per figure, a status line."""

    def __init__(self, controller: View) -> None:
        import ipywidgets as w

        self.controller = controller
        from ._pane import FigurePane

        figs = controller.figures()
        self.figure_widgets = [FigurePane() for _ in figs]
        for pane, fig in zip(self.figure_widgets, figs):
            sync_figure(pane, fig)
        self.status = w.HTML(controller._status_html())
        self.panels = [w.HTML(text) for text in controller._widget_panels_html()]
        self.controls = controller._build_controls()
        self.extras = controller._build_extras()
        controller._wire_figures(self.figure_widgets)
        css = controller.panel_css()
        style = [w.HTML(f"<style>{css}</style>", layout=w.Layout(display="none"))] if css else []
        children = (([self.controls] if self.controls is not None else []) + self.figure_widgets + self.extras
                    + self.panels + [self.status] + style)
        self.root = w.VBox(children, layout=w.Layout(width="100%"))
        self.root.add_class("sl-view")
        self.root.add_class("sl-" + type(controller).__name__.lower())
        # the figures first: their messages reach the browser (whose drawing takes longest) while the controls
        # and extras are still being synchronised in the kernel
        controller._listeners.insert(0, self.refresh)

    def refresh(self) -> None:
        began = time.perf_counter()
        figs = self.controller.figures()
        if len(figs) != len(self.figure_widgets):
            raise RuntimeError(f"{type(self.controller).__name__}.figures() changed its figure count")
        replaced = [sync_figure(widget, fig) for widget, fig in zip(self.figure_widgets, figs)]
        if any(replaced):
            self.controller._wire_figures(self.figure_widgets)
        for panel, text in zip(self.panels, self.controller._widget_panels_html()):
            panel.value = text
        self.status.value = self.controller._status_html()
        self.controller.last_redraw_s = time.perf_counter() - began
        self.controller._schedule_static()
