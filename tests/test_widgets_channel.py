"""The panes' kernel → browser messages travel over the shared plain-widget channel (widgets/_channel.py), addressed
by the pane's key, never over the pane's own anywidget comm (whose messages anywidget drops when the page was slow
to set the pane up). The browser half is checked in tests/test_browser.py (late set-up)."""
from __future__ import annotations

import anywidget
import plotly.graph_objects as go
import pytest

from superlinear_lab.widgets._channel import Channel, channel
from superlinear_lab.widgets._pane import FigurePane
from superlinear_lab.widgets.document import Document, DocumentPane


@pytest.fixture
def wire(monkeypatch):
    """Messages sent on the channel, and on any pane's own comm, as (where, content)."""
    sent = []
    ch = channel()
    monkeypatch.setattr(ch, "send", lambda content, buffers=None: sent.append(("channel", content)))
    real = anywidget.AnyWidget.send  # the pane's own comm

    def own(self, content, buffers=None):
        sent.append(("own", content))
        return real(self, content, buffers)

    monkeypatch.setattr(anywidget.AnyWidget, "send", own)
    return sent


def _fig(title: str) -> go.Figure:
    return go.Figure(go.Bar(x=[1, 2], y=[3, 4]), layout=dict(title=dict(text=title)))


def test_figure_messages_go_over_the_channel_to_their_pane(wire):
    a, b = FigurePane(_fig("a")), FigurePane(_fig("b"))
    assert a.key and b.key and a.key != b.key
    assert a.get_state()["key"] == a.key  # travels with the pane's state (the browser knows it from the start)
    assert a.channel is b.channel is channel() and isinstance(a.channel, Channel)
    assert wire == []  # nothing is sent before a browser asks
    a._on_msg(a, {"type": "sync"}, [])
    assert [(w, m["key"], m["msg"]["type"]) for w, m in wire] == [("channel", a.key, "full")]
    wire.clear()
    a.show(_fig("a2"))  # a patch, for a only
    b.show(_fig("b2"))  # b was never synchronised: nothing
    assert [(w, m["key"], m["msg"]["type"]) for w, m in wire] == [("channel", a.key, "patch")]
    assert "a2" in wire[0][1]["msg"]["layout"]["title"]
    wire.clear()
    a.click_mode = "area"  # a trait change reaches the view as a message too
    assert [(w, m["msg"]) for w, m in wire] == [("channel", {"type": "mode", "mode": "area"})]


def test_document_html_goes_over_the_channel_once_a_view_asked(wire):
    doc = Document(list("one two three four five six seven"))
    pane = DocumentPane(doc)
    pane.show(query=3)
    first = pane.html
    assert first and pane.current_html == first and wire == []  # not shown yet: the picture is in the state
    pane._on_msg(pane, {"type": "sync"}, [])
    assert [(w, m["key"], m["msg"]) for w, m in wire] == [("channel", pane.key, {"type": "html", "html": first})]
    wire.clear()
    pane.show(query=10)
    assert [w for w, _ in wire] == ["channel"] and wire[0][1]["msg"]["html"] == pane.current_html != first
    assert pane.html == first  # the trait (whose updates a slow page drops) is left alone
    wire.clear()
    pane.show(query=10)  # unchanged: nothing sent
    assert wire == []
