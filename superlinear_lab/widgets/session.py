"""`SessionPanel` and `SnapshotPanel`: live control of a `Session` (tokens used, memory by kind, append,
streamed generation, checkpoint / rollback / fork, prefill progress) and of a `SnapshotStore` (list, save, load,
rename / tag, delete with confirmation). Every failure — overflow, a stale checkpoint, a corrupt or incompatible
snapshot — is shown in the panel, never lost in the log, and leaves the state as it was.
"""
from __future__ import annotations

import html
import time
from typing import Callable

import plotly.graph_objects as go

from superlinear_lab.engine import (ContextOverflowError, Session, SessionError, SnapshotError, SnapshotInfo,
                                    SnapshotStore)

from ._base import COLORS, View, ViewError, base_layout

_MEMORY_KINDS = ("kv_used", "kv", "conv", "ssm", "token_ids", "logits")
_MEMORY_LABELS = {"kv_used": "K/V in use", "kv": "K/V allocated", "conv": "conv states", "ssm": "SSM states",
                  "token_ids": "token ids", "logits": "logits"}


class SessionPanel(View):
    """Live view of a `Session`: context used / max, memory by kind, append, generate (streamed),
    checkpoint / rollback / fork.

    Args:
        session: the `Session` to drive.
        chunk_size: prefill chunk of `append` (the progress bar advances per chunk).

    Actions: `append(text)`, `generate(max_new_tokens, temperature=0, top_p=1, on_text=None)`,
    `checkpoint(name=None)`, `rollback(name)`, `fork()`, `select(index)` (which of the forks is shown),
    `grow(max_len)`. Each returns True on success; on failure `error` holds the message.
    """

    title = "Session"
    _errors = (SessionError, SnapshotError)

    def __init__(self, session: Session, chunk_size: int = 512) -> None:
        super().__init__()
        if not isinstance(session, Session):
            raise TypeError(f"session: expected a Session, got {type(session).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected an int >= 1")
        self.sessions: list[Session] = [session]
        self.index = 0
        self.chunk_size = chunk_size
        self.checkpoints: dict[str, object] = {}
        self.last_output = ""  # text of the last generation (streamed into the panel)
        self.progress: tuple[int, int] = (0, 0)  # (done, total) tokens of the running or last prefill
        self.on_progress: Callable[[int, int], None] | None = None  # the widget's progress bar hook

    @property
    def session(self) -> Session:
        """The session currently shown (the original or one of its forks)."""
        return self.sessions[self.index]

    # ------------------------------------------------------------------ actions
    def append(self, text: str, role: str | None = "user") -> bool:
        """Prefill `text` in chunks of `chunk_size` tokens (progress reported per chunk). All or nothing: a
        failure part-way rolls the session back to where it was."""
        def action():
            if not isinstance(text, str) or not text:
                raise ViewError("append: expected non-empty text")
            s = self.session
            ids = s.tokenizer.encode(text)
            if s.cursor + len(ids) >= s.max_len:
                raise ContextOverflowError(f"{len(ids):,} tokens at cursor {s.cursor:,} do not fit max_len "
                                           f"{s.max_len:,}: grow the session first (the 'grow to' control, or "
                                           f"panel.grow({s.cursor + len(ids) + 1:,}))")
            before = s.checkpoint()
            self._report_progress(0, len(ids))
            try:
                for c0 in range(0, len(ids), self.chunk_size):
                    s.append(ids[c0:c0 + self.chunk_size], role=None, progress=False)
                    self._report_progress(min(c0 + self.chunk_size, len(ids)), len(ids))
            except BaseException:
                s.rollback(before)
                raise
            if role is not None:
                s.add_message(role, text, len(ids))
        return self._act(action)

    def _report_progress(self, done: int, total: int) -> None:
        self.progress = (done, total)
        if self.on_progress is not None:
            self.on_progress(done, total)

    def generate(self, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 on_text: Callable[[str], None] | None = None, flush_every: int = 8) -> bool:
        """Sample up to `max_new_tokens` tokens; `on_text(text_so_far)` is called every `flush_every` tokens
        (and at the end) so the panel streams them."""
        def action():
            s = self.session
            ids: list[int] = []
            self.last_output = ""
            for token in s.stream(max_new_tokens, temperature=temperature, top_p=top_p):
                ids.append(token)
                if on_text is not None and len(ids) % flush_every == 0:
                    on_text(s.tokenizer.decode(ids))
            self.last_output = s.tokenizer.decode(ids)
            if on_text is not None:
                on_text(self.last_output)
        return self._act(action)

    def checkpoint(self, name: str | None = None) -> bool:
        """Remember the current state under `name` (default "cp<n> @ <cursor>")."""
        def action():
            label = name or f"cp{len(self.checkpoints) + 1} @ {self.session.cursor:,}"
            if not isinstance(label, str):
                raise ViewError(f"checkpoint name {label!r}: expected a string")
            if label in self.checkpoints:
                raise ViewError(f"checkpoint {label!r} exists already")
            self.checkpoints[label] = self.session.checkpoint()
        return self._act(action)

    def rollback(self, name: str) -> bool:
        """Return the shown session to checkpoint `name` (refused if stale or from another session)."""
        def action():
            if name not in self.checkpoints:
                raise ViewError(f"no checkpoint {name!r}; known: {list(self.checkpoints) or 'none (take one first)'}")
            self.session.rollback(self.checkpoints[name])
        return self._act(action)

    def fork(self) -> bool:
        """Fork the shown session and show the fork (the original stays in the list)."""
        def action():
            self.sessions.append(self.session.fork())
            self.index = len(self.sessions) - 1
        return self._act(action)

    def select(self, index: int) -> bool:
        """Show session `index` of `sessions` (0 = the original, then forks in creation order)."""
        def action():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.sessions):
                raise ViewError(f"session index {index!r}: expected 0 … {len(self.sessions) - 1}")
            self.index = index
        return self._act(action)

    def grow(self, max_len: int) -> bool:
        """Reallocate the shown session's cache to `max_len` positions (what the "grow to" control does)."""
        def action():
            if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= self.session.max_len:
                raise ViewError(f"grow: max_len={max_len!r}, expected an int > the current {self.session.max_len:,}")
            self.session.grow(max_len)
        return self._act(action)

    def adopt(self, session: Session) -> bool:
        """Add `session` (e.g. one loaded from a snapshot) to the panel's sessions and show it."""
        def action():
            if not isinstance(session, Session):
                raise ViewError(f"adopt: expected a Session, got {type(session).__name__}")
            if session not in self.sessions:
                self.sessions.append(session)
            self.index = self.sessions.index(session)
        return self._act(action)

    # ------------------------------------------------------------------ text and figures
    def summary(self) -> str:
        s = self.session
        mem = s.memory()
        return (f"session {self.index} ({s.id[:8]}): {s.cursor:,} / {s.max_len:,} tokens · "
                f"{len(s.transcript)} messages · {mem['total'] / 2**20:.1f} MiB · "
                f"{len(self.checkpoints)} checkpoint(s), {len(self.sessions) - 1} fork(s)")

    def panels_html(self) -> list[str]:
        s = self.session
        rows = "".join(
            f"<tr><td style='padding:1px 8px;color:#666'>{html.escape(str(m.get('role')))}</td>"
            f"<td style='padding:1px 8px'>{m.get('tokens', '')}</td>"
            f"<td style='padding:1px 8px'><code>{html.escape(_short(str(m.get('content', '')), 110))}</code></td></tr>"
            for m in s.transcript[-6:])
        out = html.escape(_short(self.last_output, 400)) if self.last_output else "<i>nothing generated yet</i>"
        return [f"<div class='sl-transcript'><b>Transcript</b> (last 6 of {len(s.transcript)} messages)"
                f"<table style='font-size:12px'>{rows}</table><b>Last generation:</b> <code>{out}</code></div>"]

    def figures(self) -> list[go.Figure]:
        s = self.session
        mem = s.memory()
        kinds = list(_MEMORY_KINDS)
        values = [mem.get(k, 0) / 2**20 for k in kinds]
        fig = go.Figure(go.Bar(y=[_MEMORY_LABELS[k] for k in kinds], x=values, orientation="h",
                               marker_color=[COLORS["span"], COLORS["muted"], COLORS["window"], COLORS["window"],
                                             COLORS["other"], COLORS["other"]],
                               text=[f"{v:.2f} MiB" for v in values], textposition="auto",
                               hovertemplate="%{y}: %{x:.3f} MiB<extra></extra>"))
        fig.update_layout(**base_layout(f"Memory by kind · context {s.cursor:,} / {s.max_len:,} tokens",
                                        height=240, showlegend=False))
        fig.update_layout(margin=dict(l=110, r=20, t=40, b=40))
        fig.update_xaxes(title_text="MiB")
        fig.update_yaxes(autorange="reversed")
        return [fig]

    def _build_controls(self):
        import ipywidgets as w

        used = w.IntProgress(value=0, min=0, max=1, description="context", layout=w.Layout(width="420px"))
        used_label = w.Label()
        prefill = w.IntProgress(value=0, min=0, max=1, description="prefill", bar_style="info",
                                layout=w.Layout(width="420px"))
        prefill_label = w.Label()
        text = w.Textarea(placeholder="text to append", layout=w.Layout(width="600px", height="60px"))
        append = w.Button(description="append", button_style="primary", icon="plus")
        n_new = w.IntSlider(value=32, min=1, max=512, description="new tokens", continuous_update=False,
                            style={"description_width": "80px"}, layout=w.Layout(width="320px"))
        temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature",
                                    continuous_update=False, style={"description_width": "90px"},
                                    layout=w.Layout(width="320px"))
        generate = w.Button(description="generate", button_style="success", icon="play")
        stream = w.HTML()
        cp = w.Button(description="checkpoint", icon="bookmark")
        cps = w.Dropdown(options=[], description="rollback to", style={"description_width": "80px"},
                         layout=w.Layout(width="260px"))
        rollback = w.Button(description="rollback", icon="undo", button_style="warning")
        fork = w.Button(description="fork", icon="code-fork")
        sessions = w.Dropdown(options=[], description="session", style={"description_width": "60px"},
                              layout=w.Layout(width="220px"))
        grow_to = w.IntText(value=2 * self.session.max_len, description="grow to", style={"description_width": "60px"},
                            layout=w.Layout(width="200px"))
        grow = w.Button(description="grow", icon="expand", tooltip="reallocate the context to this many tokens")
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                s = self.session
                used.max, used.value = s.max_len, s.cursor
                used_label.value = f"{s.cursor:,} / {s.max_len:,} tokens"
                done, total = self.progress
                prefill.max, prefill.value = max(total, 1), done
                prefill_label.value = f"{done:,} / {total:,}" if total else ""
                cps.options = list(self.checkpoints)
                cps.value = list(self.checkpoints)[-1] if self.checkpoints else None
                sessions.options = [(f"{i}: {x.id[:8]}" + (" (fork)" if i else ""), i)
                                    for i, x in enumerate(self.sessions)]
                sessions.value = self.index
                grow_to.value = max(grow_to.value, 2 * s.max_len) if grow_to.value <= s.max_len else grow_to.value
            finally:
                syncing[0] = False

        def show_progress(done, total):
            prefill.max, prefill.value = max(total, 1), done
            prefill_label.value = f"{done:,} / {total:,}"

        def on_append(_):
            if self.append(text.value):
                text.value = ""

        def on_generate(_):
            stream.value = ""
            self.generate(n_new.value, temperature=temperature.value,
                          on_text=lambda t: setattr(stream, "value", f"<code>{html.escape(_short(t, 400))}</code>"))

        self.on_progress = show_progress
        append.on_click(on_append)
        generate.on_click(on_generate)
        cp.on_click(lambda _: self.checkpoint())
        rollback.on_click(lambda _: self.rollback(cps.value or ""))
        fork.on_click(lambda _: self.fork())
        grow.on_click(lambda _: self.grow(int(grow_to.value)))
        sessions.observe(lambda ch: None if syncing[0] or ch["new"] is None else self.select(ch["new"]),
                         names="value")
        self.subscribe(sync)
        sync()
        self._controls = dict(text=text, append=append, generate=generate, new_tokens=n_new,
                              temperature=temperature, checkpoint=cp, checkpoints=cps, rollback=rollback,
                              fork=fork, sessions=sessions, used=used, prefill=prefill, stream=stream,
                              grow_to=grow_to, grow=grow)
        return w.VBox([w.HBox([used, used_label, grow_to, grow]), w.HBox([prefill, prefill_label]),
                       w.HBox([text, append]),
                       w.HBox([n_new, temperature, generate]), stream,
                       w.HBox([cp, cps, rollback, fork, sessions])])


def _short(text: str, limit: int) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit // 2] + " … " + text[-(limit // 2):]


class SnapshotPanel(View):
    """List, save, load, rename / tag and delete the snapshots of a `SnapshotStore`.

    Args:
        store: the `SnapshotStore`.
        model: the model snapshots are loaded onto (and listed for: only compatible ones); None lists all.
        session: the session `save()` writes (optional; e.g. `SessionPanel.session`), or a callable returning it.

    Actions: `refresh()`, `save(title, tags=(), description="")`, `load(snapshot_id)` (the new session is in
    `loaded`), `rename(snapshot_id, title)`, `tag(snapshot_id, tags)`, `request_delete(snapshot_id)` then
    `confirm_delete()` or `cancel_delete()`. Errors (missing, corrupt or incompatible snapshots) are shown.
    """

    title = "Snapshots"
    _errors = (SnapshotError, SessionError)

    def __init__(self, store: SnapshotStore, model=None, session: Session | Callable[[], Session] | None = None,
                 panel: "SessionPanel | None" = None):
        super().__init__()
        self.panel = panel  # a SessionPanel that shows (adopts) every loaded session
        if not isinstance(store, SnapshotStore):
            raise TypeError(f"store: expected a SnapshotStore, got {type(store).__name__}")
        self.store = store
        self.model = model
        self._session = session
        self.snapshots: list[SnapshotInfo] = []
        self.selected: str | None = None
        self.pending_delete: str | None = None
        self.loaded: Session | None = None
        self.loaded_id: str | None = None
        self.message = ""
        self._refresh()

    def _current_session(self) -> Session:
        s = self._session() if callable(self._session) else self._session
        if s is None:
            raise ViewError("no session to save: create the panel with session=...")
        return s

    def _refresh(self) -> None:
        self.snapshots = self.store.list(self.model)
        ids = [i.id for i in self.snapshots]
        if self.selected not in ids:
            self.selected = ids[-1] if ids else None

    def _check_id(self, snapshot_id: str) -> str:
        if snapshot_id not in [i.id for i in self.snapshots]:
            raise ViewError(f"snapshot {snapshot_id!r} is not in the list (refresh?)")
        return snapshot_id

    # ------------------------------------------------------------------ actions
    def refresh(self) -> bool:
        """Re-read the store."""
        return self._act(self._refresh)

    def select(self, snapshot_id: str) -> bool:
        """Select a listed snapshot (what load / rename / tag / delete act on in the widget)."""
        def action():
            self.selected = self._check_id(snapshot_id)
        return self._act(action)

    def save(self, title: str = "", tags=(), description: str = "") -> bool:
        """Save the session as a new snapshot and select it."""
        def action():
            sid = self.store.save(self._current_session(), title=title, tags=tags, description=description)
            self._refresh()
            self.selected = sid
            self.message = f"saved {sid[:8]} ({title or 'untitled'})"
        return self._act(action)

    def load(self, snapshot_id: str | None = None) -> bool:
        """Verify and load a snapshot onto `model`; the new session is `loaded` (append before generating)."""
        def action():
            if self.model is None:
                raise ViewError("no model to load onto: create the panel with model=...")
            sid = self._check_id(snapshot_id or self.selected or "")
            self.loaded = self.store.load(sid, self.model)
            self.loaded_id = sid
            self.message = f"loaded {sid[:8]}: {self.loaded.cursor:,} tokens"
            if self.panel is not None:
                self.panel.adopt(self.loaded)
        return self._act(action)

    def rename(self, snapshot_id: str, title: str) -> bool:
        """Set a snapshot's title."""
        def action():
            if not isinstance(title, str):
                raise ViewError(f"title={title!r}: expected a string")
            self.store.update(self._check_id(snapshot_id), title=title)
            self._refresh()
            self.message = f"renamed {snapshot_id[:8]} to {title!r}"
        return self._act(action)

    def tag(self, snapshot_id: str, tags) -> bool:
        """Replace a snapshot's tags (a list of strings, or a comma-separated string)."""
        def action():
            values = [t.strip() for t in tags.split(",") if t.strip()] if isinstance(tags, str) else list(tags)
            if not all(isinstance(t, str) for t in values):
                raise ViewError(f"tags={tags!r}: expected strings")
            self.store.update(self._check_id(snapshot_id), tags=values)
            self._refresh()
            self.message = f"tagged {snapshot_id[:8]}: {', '.join(values) or 'no tags'}"
        return self._act(action)

    def request_delete(self, snapshot_id: str) -> bool:
        """First step of a delete: nothing is removed until `confirm_delete()`."""
        def action():
            self.pending_delete = self._check_id(snapshot_id)
            self.message = f"delete {snapshot_id[:8]}? confirm or cancel"
        return self._act(action)

    def confirm_delete(self) -> bool:
        """Delete the snapshot named by `request_delete`."""
        def action():
            if self.pending_delete is None:
                raise ViewError("nothing to delete: request a delete first")
            sid, self.pending_delete = self.pending_delete, None
            self.store.delete(sid)
            self._refresh()
            self.message = f"deleted {sid[:8]}"
        return self._act(action)

    def cancel_delete(self) -> bool:
        """Forget a requested delete."""
        def action():
            self.pending_delete = None
            self.message = "delete cancelled"
        return self._act(action)

    # ------------------------------------------------------------------ text and figures
    def summary(self) -> str:
        parts = [f"{len(self.snapshots)} snapshot(s) in {self.store.root}"]
        if self.message:
            parts.append(self.message)
        return " · ".join(parts)

    def panels_html(self) -> list[str]:
        rows = []
        for info in reversed(self.snapshots):
            mark = "▶ " if info.id == self.selected else ""
            style = " style='background:#fdecea'" if info.id == self.pending_delete else ""
            rows.append(f"<tr{style}><td style='padding:1px 8px'>{mark}<code>{info.id[:8]}</code></td>"
                        f"<td style='padding:1px 8px'>{html.escape(info.title or '—')}</td>"
                        f"<td style='padding:1px 8px'>{html.escape(', '.join(info.tags))}</td>"
                        f"<td style='padding:1px 8px;text-align:right'>{info.current_pos:,}</td>"
                        f"<td style='padding:1px 8px'>{time.strftime('%Y-%m-%d %H:%M', time.localtime(info.created_at))}"
                        "</td></tr>")
        body = "".join(rows) or "<tr><td colspan='5'><i>no snapshots yet</i></td></tr>"
        table = ("<table style='font-size:12px;border-collapse:collapse'><tr><th>id</th><th>title</th><th>tags</th>"
                 f"<th>tokens</th><th>created</th></tr>{body}</table>")
        return [table, self._loaded_html()]

    def _loaded_html(self) -> str:
        """What the last `load` gave: the session's id, context and its transcript (last 6 messages)."""
        s = self.loaded
        if s is None:
            return "<div class='sl-loaded'><i>no snapshot loaded yet (select one and press load)</i></div>"
        rows = "".join(
            f"<tr><td style='padding:1px 8px;color:#666'>{html.escape(str(m.get('role')))}</td>"
            f"<td style='padding:1px 8px'>{m.get('tokens', '')}</td>"
            f"<td style='padding:1px 8px'><code>{html.escape(_short(str(m.get('content', '')), 110))}</code></td></tr>"
            for m in s.transcript[-6:])
        tail = html.escape(_short(s.tokenizer.decode(s.ids[-80:].tolist()), 160)) if s.cursor else ""
        return (f"<div class='sl-loaded'><b>Loaded session</b> from snapshot <code>{html.escape(self.loaded_id[:8])}"
                f"</code>: session <code>{html.escape(s.id[:8])}</code>, {s.cursor:,} / {s.max_len:,} tokens, "
                f"{len(s.transcript)} messages{' (now shown in the session panel)' if self.panel is not None else ''}"
                f"<table style='font-size:12px'>{rows}</table><b>Context ends with:</b> <code>…{tail}</code></div>")

    def figures(self) -> list[go.Figure]:
        infos = self.snapshots
        fig = go.Figure(go.Bar(x=[f"{i.title or i.id[:8]}" for i in infos], y=[i.current_pos for i in infos],
                               marker_color=[COLORS["span"] if i.id == self.selected else COLORS["muted"]
                                             for i in infos],
                               hovertext=[f"{i.id[:8]} · {i.current_pos:,} / {i.max_seq_len:,} tokens" for i in infos],
                               hoverinfo="text"))
        fig.update_layout(**base_layout("Tokens per snapshot (selected in orange)", height=220, showlegend=False))
        fig.update_yaxes(title_text="tokens")
        return [fig]

    def _build_controls(self):
        import ipywidgets as w

        pick = w.Dropdown(options=[], description="snapshot", style={"description_width": "60px"},
                          layout=w.Layout(width="320px"))
        title = w.Text(placeholder="title", layout=w.Layout(width="200px"))
        tags = w.Text(placeholder="tags, comma separated", layout=w.Layout(width="200px"))
        save = w.Button(description="save session", icon="save", button_style="primary")
        load = w.Button(description="load", icon="upload")
        rename = w.Button(description="rename", icon="pencil")
        retag = w.Button(description="set tags", icon="tag")
        delete = w.Button(description="delete…", icon="trash", button_style="danger")
        confirm = w.Button(description="confirm delete", button_style="danger")
        cancel = w.Button(description="cancel")
        refresh = w.Button(description="refresh", icon="refresh")
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                pick.options = [(f"{i.id[:8]} · {i.title or 'untitled'}", i.id) for i in reversed(self.snapshots)]
                pick.value = self.selected
                pending = self.pending_delete is not None
                confirm.layout.display = None if pending else "none"
                cancel.layout.display = None if pending else "none"
            finally:
                syncing[0] = False

        pick.observe(lambda ch: None if syncing[0] or ch["new"] is None else self.select(ch["new"]), names="value")
        save.on_click(lambda _: self.save(title.value, [t.strip() for t in tags.value.split(",") if t.strip()]))
        load.on_click(lambda _: self.load())
        rename.on_click(lambda _: self.rename(self.selected or "", title.value))
        retag.on_click(lambda _: self.tag(self.selected or "", tags.value))
        delete.on_click(lambda _: self.request_delete(self.selected or ""))
        confirm.on_click(lambda _: self.confirm_delete())
        cancel.on_click(lambda _: self.cancel_delete())
        refresh.on_click(lambda _: self.refresh())
        self.subscribe(sync)
        sync()
        self._controls = dict(pick=pick, title=title, tags=tags, save=save, load=load, rename=rename, retag=retag,
                              delete=delete, confirm=confirm, cancel=cancel, refresh=refresh)
        return w.VBox([w.HBox([pick, refresh]), w.HBox([title, tags, save]),
                       w.HBox([load, rename, retag, delete, confirm, cancel])])
