"""`ChannelPane`: an anywidget whose kernel → browser messages travel over one shared plain ipywidgets model.

Why: anywidget (0.11) gives each model's front-end setup (loading its `_esm`) a fixed 2 s. When a busy page
takes longer — two loaded CPU cores, a notebook that creates many widgets at once — that model silently drops
every message the kernel sends it afterwards: custom messages and trait updates alike. Its view still renders
and its own messages still reach the kernel, so the symptom is a view that asks for its figure and never gets
it (a blank plot, measured in the browser test of lesson 03 on 2 busy cores). A plain `ipywidgets.Widget` has
no such setup step, so:

* `Channel` — one plain widget per kernel, no state — carries every pane's messages, each tagged with the
  pane's `key` (a random id fixed at construction, so it is part of the state the browser gets with the pane);
* a pane's `send(content)` goes over the channel; what the browser sends still uses the pane's own comm;
* the pane's front end (`CHANNEL_JS`) listens on the channel for its key, and asks for its current state with a
  `{"type": "sync"}` message when it renders (the kernel answers on the channel), so nothing relies on a
  message that was sent before the view listened.
"""
from __future__ import annotations

import uuid

import anywidget
import ipywidgets
import traitlets
from ipywidgets import widget_serialization


class Channel(ipywidgets.Widget):
    """The shared plain widget (a base `WidgetModel` in the browser) that carries the panes' messages."""


_SHARED: dict[type, ipywidgets.Widget] = {}


def shared(cls: type, make=None) -> ipywidgets.Widget:
    """The kernel's one widget of class `cls` (`make()` builds it; default `cls()`), made again if it was closed."""
    widget = _SHARED.get(cls)
    if widget is None or getattr(widget, "comm", None) is None:
        widget = _SHARED[cls] = (make or cls)()
    return widget


def channel() -> Channel:
    """The kernel's channel (made again if it was closed)."""
    return shared(Channel)


class ChannelPane(anywidget.AnyWidget):
    """Base of the panes: `send` goes over the shared `Channel`, addressed by `key`."""

    channel = traitlets.Instance(Channel).tag(sync=True, **widget_serialization)
    key = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs):
        super().__init__(channel=channel(), key=uuid.uuid4().hex, **kwargs)

    def send(self, content, buffers=None) -> None:
        """Send `content` to this pane's views in the browser (over the channel)."""
        self.channel.send({"key": self.key, "msg": content}, buffers)


# Front-end half, prepended to each pane's `_esm`: `follow(model, onMsg, answered, onAsk)` calls `onMsg(content)` for
# every message the kernel sends this pane, then asks for the pane's state (`{"type": "sync"}`) every 2 s until
# `answered()` (at most 21 times: a request sent while the kernel is busy can be dropped); `onAsk(error)` is told of
# each request (error null) or of a channel that could not be found. Returns a function that stops listening.
CHANNEL_JS = r"""
function follow(model, onMsg, answered, onAsk = () => {}) {
  const listening = (async () => {
    const ref = model.get("channel");
    const channel = await model.widget_manager.get_model(ref.slice("IPY_MODEL_".length));
    const key = model.get("key");
    const handler = (content) => { if (content && content.key === key) onMsg(content.msg); };
    channel.on("msg:custom", handler);
    return () => channel.off("msg:custom", handler);
  })();
  let tries = 0, stopped = false;
  const ask = () => {
    if (stopped || answered() || tries++ > 20) return;
    model.send({type: "sync"});
    onAsk(null);
    setTimeout(ask, 2000);
  };
  listening.then(ask, (err) => { onAsk(err); console.error("superlinear-lab pane: no channel:", err); });
  return () => { stopped = true; listening.then((off) => off(), () => {}); };
}
"""
