"""Snapshots survive a server restart: save, stop the server, start a new one on the same snapshot directory,
load, and the conversation continues exactly (greedy) as it did without the restart."""
from __future__ import annotations

import httpx

from server_process import MODEL, ServerProcess

TURNS = ["My name is Ada.", "I like prime numbers.", "What is my name?"]


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def say(h: httpx.Client, sid: str, text: str) -> str:
    r = ok(h.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "temperature": 0,
                                                 "max_tokens": 12, "messages": [{"role": "user", "content": text}]}))
    return r["choices"][0]["message"]["content"]


def history(h: httpx.Client, sid: str) -> tuple:
    data = ok(h.get(f"/v1/sessions/{sid}/history"))
    return data["current_pos"], data["messages"]


def test_snapshot_restart_continues_identically(tmp_path):
    snapshots = tmp_path / "snapshots"
    args = ("--session-max-seq-len", "2048")
    with ServerProcess(tmp_path, *args, snapshot_dir=snapshots) as first, \
            httpx.Client(base_url=first.url, timeout=120) as h:
        sid = ok(h.post("/v1/sessions", json={"session_id": "conversation"}), 201)["session_id"]
        for text in TURNS[:2]:
            say(h, sid, text)
        saved_state = history(h, sid)
        snap = ok(h.post(f"/v1/sessions/{sid}/save", json={"title": "before restart"}), 201)["id"]
        uninterrupted = [say(h, sid, TURNS[2]), say(h, sid, "And again?")]
        uninterrupted_state = history(h, sid)
        assert any(uninterrupted), "the comparison needs generated text"

    with ServerProcess(tmp_path, *args, snapshot_dir=snapshots) as second, \
            httpx.Client(base_url=second.url, timeout=120) as h:
        assert ok(h.get("/v1/sessions"))["data"] == []  # sessions live in memory; snapshots on disk
        assert [s["id"] for s in ok(h.get("/v1/snapshots"))["data"]] == [snap]
        loaded = ok(h.post(f"/v1/snapshots/{snap}/load", json={"session_id": "conversation"}), 201)
        assert loaded["session_id"] == "conversation" and loaded["origin"] == f"snapshot:{snap}"
        assert history(h, "conversation") == saved_state
        resumed = [say(h, "conversation", TURNS[2]), say(h, "conversation", "And again?")]
        assert resumed == uninterrupted
        assert history(h, "conversation") == uninterrupted_state
