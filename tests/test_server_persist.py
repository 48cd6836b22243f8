"""Sessions survive restarts with ``serve --persist-sessions`` (issue 18 #13): autosaved when idle (so even a
``kill -9`` keeps them) and on a graceful shutdown, restored on start; deleted sessions stay deleted; the restored
conversation continues exactly (greedy) as an uninterrupted copy does."""
from __future__ import annotations

import time

import httpx

from server_process import MODEL, ServerProcess

BASE = ("--persist-sessions", "--session-max-seq-len", "1024")


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def say(h: httpx.Client, sid: str, text: str) -> str:
    r = ok(h.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "temperature": 0,
                                                 "max_tokens": 8, "messages": [{"role": "user", "content": text}]}))
    return r["choices"][0]["message"]["content"]


def history(h: httpx.Client, sid: str) -> dict:
    return ok(h.get(f"/v1/sessions/{sid}/history"))


def autosaves(h: httpx.Client) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for snap in ok(h.get("/v1/snapshots"))["data"]:
        if "autosave" in snap["tags"]:
            sid = next(t for t in snap["tags"] if t.startswith("session:"))[len("session:"):]
            out.setdefault(sid, []).append(snap)
    return out


def test_sessions_survive_kill_and_restart(tmp_path):
    snapshots = tmp_path / "snapshots"
    with ServerProcess(tmp_path, *BASE, "--autosave-idle-s", "1", snapshot_dir=snapshots) as first, \
            httpx.Client(base_url=first.url, timeout=120) as h:
        ok(h.post("/v1/sessions", json={"session_id": "keep"}), 201)
        say(h, "keep", "My name is Ada.")
        say(h, "keep", "I like primes.")
        saved = history(h, "keep")
        snap = ok(h.post("/v1/sessions/keep/save", json={"title": "copy"}), 201)["id"]
        ok(h.post(f"/v1/snapshots/{snap}/load", json={"session_id": "ref"}), 201)
        expected = say(h, "ref", "What is my name?")  # what the uninterrupted conversation says next
        ok(h.delete("/v1/sessions/ref"))
        ok(h.post("/v1/sessions", json={"session_id": "gone"}), 201)
        say(h, "gone", "forget me")
        ok(h.delete("/v1/sessions/gone"))
        deadline = time.monotonic() + 120  # bounded wait for the idle autosave of "keep"
        while time.monotonic() < deadline:
            done = [s for s in autosaves(h).get("keep", []) if s["current_pos"] == saved["current_pos"]]
            if done and set(autosaves(h)) == {"keep"}:
                break
            time.sleep(0.2)
        assert set(autosaves(h)) == {"keep"}, autosaves(h)
        first.proc.kill()  # no shutdown hook runs: only the idle autosave can bring "keep" back
        first.proc.wait(timeout=30)

    with ServerProcess(tmp_path, *BASE, "--autosave-idle-s", "3600", snapshot_dir=snapshots) as second, \
            httpx.Client(base_url=second.url, timeout=120) as h:
        assert [s["id"] for s in ok(h.get("/v1/sessions"))["data"]] == ["keep"]
        assert ok(h.get("/v1/sessions/keep"))["origin"].startswith("autosave:")
        assert history(h, "keep") == saved
        assert say(h, "keep", "What is my name?") == expected
        after = history(h, "keep")
        ok(h.post("/v1/sessions", json={"session_id": "late"}), 201)
        say(h, "late", "saved only at shutdown")
        late = history(h, "late")
        second.stop()  # SIGTERM: graceful shutdown autosaves both

    with ServerProcess(tmp_path, *BASE, snapshot_dir=snapshots) as third, \
            httpx.Client(base_url=third.url, timeout=120) as h:
        assert sorted(s["id"] for s in ok(h.get("/v1/sessions"))["data"]) == ["keep", "late"]
        assert history(h, "keep") == after and history(h, "late") == late
        assert {sid: len(snaps) for sid, snaps in autosaves(h).items()} == {"keep": 1, "late": 1}
        assert snap in [s["id"] for s in ok(h.get("/v1/snapshots"))["data"]]  # explicit snapshots are untouched
