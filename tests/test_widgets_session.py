"""Controller tests for `SessionPanel` and `SnapshotPanel`: every action changes the session / store as the
engine would, failures are shown in the panel and change nothing, and the widgets drive the controllers."""
from __future__ import annotations

import pytest
import torch

from superlinear_lab.engine import Session, SnapshotStore
from superlinear_lab.widgets import SessionPanel, SnapshotPanel


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def panel(model):
    return SessionPanel(Session(model, max_len=1024), chunk_size=64)


def test_append_in_chunks_reports_progress_and_matches_one_append(model, panel):
    seen = []
    panel.on_progress = lambda done, total: seen.append((done, total))
    text = "Superlinear attention routes each query to a few spans. " * 4
    assert panel.append(text) and panel.error is None
    assert seen[0] == (0, len(text)) and seen[-1] == (len(text), len(text)) and len(seen) == 1 + -(-len(text) // 64)
    assert panel.session.cursor == len(text) and panel.session.transcript[-1]["content"] == text
    one = Session(model, max_len=1024)
    one.append(text)
    torch.testing.assert_close(panel.session.logits, one.logits, rtol=1e-4, atol=1e-4)


def test_overflow_and_bad_text_are_reported_and_change_nothing(panel):
    assert panel.append("abc")
    before = (panel.session.cursor, len(panel.session.transcript))
    assert not panel.append("x" * 2000) and "grow the session" in panel.error
    assert not panel.append("") and "non-empty" in panel.error
    assert (panel.session.cursor, len(panel.session.transcript)) == before
    assert "⚠" in panel._status_html()
    assert panel.grow(4096) and panel.session.max_len == 4096
    assert panel.append("x" * 2000) and panel.error is None


def test_generate_streams_and_checkpoint_rollback_fork(panel):
    assert not panel.generate(4) and "append tokens first" in panel.error  # a fresh session has no logits
    assert panel.append("Hello, ")
    assert panel.checkpoint() and list(panel.checkpoints) == ["cp1 @ 7"]
    pieces = []
    assert panel.generate(10, on_text=pieces.append, flush_every=4)
    assert pieces and pieces[-1] == panel.last_output and panel.session.cursor > 7
    assert panel.rollback("cp1 @ 7") and panel.session.cursor == 7
    assert not panel.rollback("missing") and "no checkpoint" in panel.error
    assert not panel.checkpoint("cp1 @ 7") and "exists" in panel.error
    original = panel.session
    assert panel.fork() and panel.index == 1 and panel.session is not original
    assert panel.append("fork only") and original.cursor == 7
    assert panel.select(0) and panel.session is original
    assert not panel.select(5) and "session index" in panel.error and panel.index == 0


def test_session_panel_figure_and_widget(panel):
    panel.view
    c = panel._controls
    c["text"].value = "typed in the panel"
    c["append"].click()
    assert panel.session.cursor == len("typed in the panel") and c["text"].value == ""
    assert c["used"].value == panel.session.cursor and c["prefill"].value == c["prefill"].max
    c["new_tokens"].value = 5
    c["generate"].click()
    assert panel.session.cursor <= len("typed in the panel") + 5 and "<code>" in c["stream"].value
    c["checkpoint"].click()
    assert c["checkpoints"].options
    c["checkpoints"].value = c["checkpoints"].options[0]
    c["rollback"].click()
    assert panel.session.cursor == len("typed in the panel") + len(panel.session.tokenizer.encode(panel.last_output))
    c["fork"].click()
    assert len(c["sessions"].options) == 2
    bars = panel.static().data[0]
    assert "K/V in use" in bars.y and "Memory by kind" in panel.static().layout.title.text


@pytest.fixture
def store(tmp_path):
    return SnapshotStore(tmp_path / "snapshots")


def test_snapshot_panel_save_list_load_rename_tag_delete(model, store):
    session = Session(model, max_len=512)
    session.append("a snapshot of this context")
    panel = SnapshotPanel(store, model=model, session=session)
    assert panel.snapshots == [] and "no snapshots yet" in panel.panels_html()[0]
    assert panel.save("first", ["demo"]) and len(panel.snapshots) == 1
    sid = panel.selected
    assert panel.rename(sid, "renamed") and panel.snapshots[0].title == "renamed"
    assert panel.tag(sid, "x, y") and panel.snapshots[0].tags == ("x", "y")
    assert panel.load() and panel.loaded.cursor == session.cursor
    assert torch.equal(panel.loaded.ids, session.ids)
    assert panel.request_delete(sid) and panel.pending_delete == sid and len(store.list()) == 1  # not yet
    assert panel.cancel_delete() and panel.pending_delete is None and len(store.list()) == 1
    assert panel.request_delete(sid) and panel.confirm_delete() and store.list() == [] and panel.snapshots == []
    assert not panel.confirm_delete() and "request a delete first" in panel.error


def test_snapshot_panel_errors_are_shown(model, store, tmp_path):
    session = Session(model, max_len=256)
    session.append("context")
    panel = SnapshotPanel(store, model=model, session=session)
    assert not panel.load("deadbeef") and "not in the list" in panel.error
    assert panel.save("ok")
    sid = panel.selected
    cache = next(p for p in (tmp_path / "snapshots").rglob("cache.safetensors"))
    cache.write_bytes(cache.read_bytes()[:-8] + b"corrupt!")  # a damaged file must be refused, with a reason
    assert not panel.load(sid)
    assert "cache.safetensors" in panel.error and panel.loaded is None
    assert "⚠" in panel._status_html()
    no_session = SnapshotPanel(store, model=model)
    assert not no_session.save("x") and "no session" in no_session.error
    no_model = SnapshotPanel(store)
    assert not no_model.load(sid) and "no model" in no_model.error
    with pytest.raises(TypeError):
        SnapshotPanel("store")


def test_snapshot_panel_widget_delete_needs_confirmation(model, store):
    session = Session(model, max_len=256)
    session.append("context")
    panel = SnapshotPanel(store, model=model, session=session)
    panel.view
    c = panel._controls
    c["title"].value = "from the widget"
    c["save"].click()
    assert panel.snapshots[-1].title == "from the widget"
    assert c["confirm"].layout.display == "none"
    c["delete"].click()
    assert c["confirm"].layout.display is None and len(store.list()) == 1
    c["confirm"].click()
    assert store.list() == [] and c["confirm"].layout.display == "none"


def test_grow_control_and_loaded_session_are_shown(model, store):
    """The overflow message names a control that exists: the grow control grows the session; a loaded snapshot
    is shown (its context and transcript) and adopted by the linked session panel."""
    panel = SessionPanel(Session(model, max_len=256), chunk_size=64)
    panel.view
    c = panel._controls
    assert not panel.append("y" * 300) and "grow" in panel.error
    c["grow_to"].value = 1024
    c["grow"].click()
    assert panel.session.max_len == 1024 and panel.error is None
    assert not panel.grow(512) and "grow" in panel.error  # shrinking is refused, nothing changes
    assert panel.session.max_len == 1024
    assert panel.append("the loaded context. " * 3)
    snaps = SnapshotPanel(store, model=model, session=lambda: panel.session, panel=panel)
    snaps.view
    assert "no snapshot loaded" in snaps.panels_html()[1]
    assert snaps.save("ctx")
    snaps._controls["load"].click()
    assert snaps.error is None and snaps.loaded is not None
    loaded_html = snaps._view.panels[1].value  # what the widget shows
    assert "Loaded session" in loaded_html and "the loaded context." in loaded_html
    assert f"{snaps.loaded.cursor:,} / " in loaded_html
    assert panel.session is snaps.loaded and len(panel.sessions) == 2  # shown in the session panel
