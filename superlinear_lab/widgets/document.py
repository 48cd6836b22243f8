"""The document pane: the text itself, with the tokens a query reads highlighted — its sliding window, its chosen
spans, the evidence — where a click on a token picks it as the query, and a search marks evidence or jumps to it.

Long documents are shown as *excerpts* (around the query, each chosen span and each evidence range, joined by
"…"), so a 64K-token document sends a few KB per redraw. Tokens are shown by the one display rule
(`_aggregate.display_token`) and searched by the text they stand for (`raw_token`).

Two parts:

* `Document` — pure functions of the tokens: `find(text)` → token ranges, `render(...)` → HTML;
* `DocumentPane` — the anywidget showing that HTML; a click on a token calls `on_pick(position)`.

Used by `RoutingExplorer` (and open to other views: `DocumentPane(document).show(query=…, window=…, spans=…,
evidence=…)`, `pane.on_pick(callback)`).
"""
from __future__ import annotations

import html
from typing import Callable

import numpy as np
import traitlets

from ._aggregate import display_token, raw_token
from ._base import ViewError
from ._channel import CHANNEL_JS, ChannelPane

# Highlight colours (the views' colours: window blue, chosen span orange, evidence green, the query dark).
_STYLE = {
    "window": "background:rgba(76,120,168,0.22)",
    "span": "background:rgba(245,133,24,0.35)",
    "evidence": "background:rgba(84,162,75,0.45);outline:1px solid #54A24B",
    "query": "background:#222;color:#fff",
}
_CLASS = {"window": "w", "span": "s", "evidence": "e", "query": "q"}  # one letter: ~8 bytes per token sent


class Document:
    """The tokens of a trace as searchable, renderable text.

    Args:
        tokens: one display string per position (a trace's `tokens`).
    """

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ViewError("tokens: the document pane needs the trace's tokens (got none)")
        self.tokens = list(tokens)
        raw = [raw_token(t) for t in self.tokens]
        self.text = "".join(raw)
        self._starts = np.concatenate([[0], np.cumsum([len(t) for t in raw])]).astype(np.int64)  # [L + 1]

    def __len__(self) -> int:
        return len(self.tokens)

    def find(self, text: str, limit: int = 100) -> list[tuple[int, int]]:
        """Inclusive token ranges [start, end] of the first `limit` occurrences of `text` (case-sensitive)."""
        if not isinstance(text, str) or not text:
            raise ViewError("search text: expected a non-empty string")
        out, at = [], self.text.find(text)
        while at >= 0 and len(out) < limit:
            first = int(np.searchsorted(self._starts, at, side="right")) - 1
            last = int(np.searchsorted(self._starts, at + len(text) - 1, side="right")) - 1
            out.append((first, last))
            at = self.text.find(text, at + 1)
        return out

    def render(self, query: int | None = None, window: tuple[int, int] | None = None,
               spans: list[tuple[int, int]] = (), evidence: list[tuple[int, int]] = (), context: int = 120,
               max_tokens: int = 1600) -> str:
        """HTML of the excerpts: tokens near the query, each span and each evidence range (± `context`),
        at most `max_tokens` tokens in all. Each excerpt is a `<span class='sl-ex' data-start=a>` holding one
        `<i>` per token (its highlight as a one-letter class), so a token's position is start + its index."""
        n = len(self.tokens)
        marks = np.zeros(n, dtype=np.int8)  # 0 none, 1 window, 2 span, 3 evidence (the strongest wins)
        want: list[tuple[int, int]] = []
        if window is not None and window[1] >= window[0] >= 0:
            marks[window[0]:window[1] + 1] = 1
            want.append((max(window[0], window[1] - context), window[1]))
        for a, b in spans:
            marks[max(a, 0):b + 1] = np.maximum(marks[max(a, 0):b + 1], 2)
            want.append((a - context // 4, min(b, a + context) + context // 4))
        for a, b in evidence:
            marks[max(a, 0):b + 1] = 3
            want.append((a - context // 2, b + context // 2))
        if query is not None:
            want.append((query - context, query + 8))
        if not want:
            want.append((0, min(n - 1, 2 * context)))
        merged: list[list[int]] = []
        for a, b in sorted((max(0, a), min(n - 1, b)) for a, b in want):
            if merged and a <= merged[-1][1] + 8:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        budget = max_tokens
        parts = []
        for a, b in merged:
            if budget <= 0:
                parts.append("<span class='sl-gap'> … (more excerpts not shown) </span>")
                break
            b = min(b, a + budget - 1)
            budget -= b - a + 1
            parts.append(f"<span class='sl-gap'>{'… ' if a > 0 else ''}[{a:,}]</span><span class='sl-ex' "
                         f"data-start='{a}'>")
            names = ("", "window", "span", "evidence")
            for i in range(a, b + 1):
                kind = "query" if i == query else names[marks[i]]
                text = html.escape(display_token(self.tokens[i]))
                parts.append(f"<i class={_CLASS[kind]}>{text}</i>" if kind else f"<i>{text}</i>")
            parts.append("</span>" + (" …" if b < n - 1 else ""))
        legend = " ".join(f"<span style='{_STYLE[k]};padding:0 4px'>{k}</span>"
                          for k in ("query", "window", "span", "evidence"))
        return (f"<div class='sl-doc-legend' style='font-size:11px;color:#555;margin-bottom:4px'>{legend} · "
                f"click a token to pick it as the query</div><div class='sl-doc-text'>{''.join(parts)}</div>")


_JS = CHANNEL_JS + r"""
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "sl-document";
  el.appendChild(box);
  box.innerHTML = model.get("html");  // as built; the kernel sends the current HTML when asked (below)
  let current = false;
  box.addEventListener("click", (ev) => {
    const t = ev.target.closest("i"), ex = t && t.parentElement;
    if (!ex || !ex.classList.contains("sl-ex")) return;
    model.send({type: "pick", pos: Number(ex.dataset.start) + Array.prototype.indexOf.call(ex.children, t)});
  });
  const stop = follow(model, (msg) => {
    if (msg.type === "html") { box.innerHTML = msg.html; current = true; }
  }, () => current);  // listen on the channel, then ask for the current HTML until it came
  return () => { current = true; stop(); };
}
export default { render };
"""
_CSS = """.sl-document { font-family: ui-monospace, monospace; font-size: 12px; line-height: 1.6;
  white-space: pre-wrap; word-break: break-all; max-height: 260px; overflow-y: auto; border: 1px solid #ddd;
  padding: 6px 8px; border-radius: 4px; }
.sl-document i { font-style: normal; cursor: pointer; }
.sl-document i:hover { outline: 1px solid #999; }
.sl-document .sl-gap { color: #999; font-size: 10px; }
""" + "\n".join(f".sl-document i.{c} {{ {_STYLE[k]}; }}" for k, c in _CLASS.items())


class DocumentPane(ChannelPane):
    """The document pane widget: shows `Document.render(...)` HTML; a click on a token calls `on_pick(pos)`.

    `html` (the HTML shown) travels with the pane when it is first displayed; later changes are sent over the
    shared channel (`_channel`), and a view that renders asks for the current HTML."""

    _esm = _JS
    _css = _CSS
    html = traitlets.Unicode("").tag(sync=True)  # as built (the browser's first picture); see `current_html`

    def __init__(self, document: Document, **kwargs):
        super().__init__(**kwargs)
        self.document = document
        self.current_html = self.html  # what the views show once they have synchronised
        self._synced = False  # a view asked for the HTML: changes go over the channel from now on
        self._pick: Callable[[int], None] | None = None
        self.on_msg(self._on_msg)

    def show(self, **highlights) -> None:
        """Redraw with `Document.render(**highlights)` (only sent when the HTML changed)."""
        text = self.document.render(**highlights)
        if text != self.current_html:
            self.current_html = text
            if self._synced:
                self.send({"type": "html", "html": text})
            else:  # not shown yet: the first picture travels with the pane's state
                self.html = text

    def on_pick(self, callback: Callable[[int], None]) -> None:
        """Call `callback(position)` when the user clicks a token."""
        self._pick = callback

    def _on_msg(self, _widget, content, _buffers) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "sync":
            self._synced = True
            self.send({"type": "html", "html": self.current_html})
        elif kind == "pick" and self._pick is not None:
            self._pick(int(content["pos"]))
