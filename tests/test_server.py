"""The HTTP server end to end: a real `superlinear-lab serve` subprocess on a free loopback port, driven with the
official `openai` client (chat, streaming and not) and raw HTTP (sessions, snapshots, limits, disconnects).

The model is the tiny random-initialisation preset on CPU; replies are short (max_tokens is small) and greedy
where results are compared. Every request loop is bounded in count, and every request has a timeout.
"""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_process import MODEL, ServerProcess

CAP = 128  # the server's --http-max-completion-tokens
LONG = [{"role": "user", "content": "Hello"}]  # greedy reply of an empty session runs past CAP (checked below)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("server"), "--session-max-seq-len", "4096",
                       "--http-max-concurrency", "16", "--http-max-completion-tokens", str(CAP),
                       "--max-request-bytes", "65536", "--max-seq-len-limit", "65536") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def new_session(http, **body) -> str:
    return ok(http.post("/v1/sessions", json=body), 201)["session_id"]


def chat(http, messages, session_id=None, **kw) -> dict:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 4, **kw}
    if session_id is not None:
        body["session_id"] = session_id
    return ok(http.post("/v1/chat/completions", json=body))


def reply(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def state(http, sid: str) -> tuple:
    h = ok(http.get(f"/v1/sessions/{sid}/history"))
    return h["current_pos"], [(m["role"], m["content"], m["tokens"]) for m in h["messages"]]


@pytest.fixture(scope="module")
def long_reply(http):
    """Precondition of the cancellation tests: the greedy reply to LONG in an empty session does not end before
    CAP tokens, so a request for CAP tokens is still generating when its client leaves."""
    sid = new_session(http)
    r = chat(http, LONG, sid, max_tokens=CAP)
    assert r["choices"][0]["finish_reason"] == "length", r
    ok(http.delete(f"/v1/sessions/{sid}"))
    return reply(r)


# ---------------------------------------------------------------------- OpenAI client
def test_health_and_models(http, oai):
    assert ok(http.get("/health")) == {"status": "ok", "model": MODEL}
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_openai_client_greedy_is_deterministic(oai):
    kwargs = dict(model=MODEL, messages=user("Tell me a story"), temperature=0, max_tokens=6)
    a = oai.chat.completions.create(**kwargs)
    b = oai.chat.completions.create(**kwargs)
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason in ("stop", "length")
    assert a.usage.completion_tokens <= 6 and a.usage.prompt_tokens > 0


def test_openai_streaming_equals_non_streaming(oai, http):
    kwargs = dict(model=MODEL, messages=user("Tell me a story"), temperature=0, max_tokens=12)
    full = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": user("hi there"),
                                                            "stream": True, "max_tokens": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_openai_client_drives_a_session(oai, http):
    sid = new_session(http, max_seq_len=512)
    a = oai.chat.completions.create(model=MODEL, messages=user("one"), temperature=0, max_tokens=4,
                                    extra_body={"session_id": sid})
    stream = oai.chat.completions.create(model=MODEL, messages=user("two"), temperature=0, max_tokens=4,
                                         stream=True, extra_body={"session_id": sid})
    b = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    pos, messages = state(http, sid)
    assert [m[:2] for m in messages] == [("user", "one"), ("assistant", a.choices[0].message.content),
                                         ("user", "two"), ("assistant", b)]
    assert pos == sum(m[2] for m in messages)


def test_sampling_top_p_and_seed(oai):
    kwargs = dict(model=MODEL, messages=user("Tell me a story"), max_tokens=8)
    a = oai.chat.completions.create(temperature=1.0, top_p=0.9, seed=7, **kwargs).choices[0].message.content
    b = oai.chat.completions.create(temperature=1.0, top_p=0.9, seed=7, **kwargs).choices[0].message.content
    assert a == b  # same seed, same draw
    # a tiny nucleus keeps only the most probable token: the same as greedy
    greedy = oai.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    nucleus = oai.chat.completions.create(temperature=1.0, top_p=1e-6, seed=3, **kwargs).choices[0].message.content
    assert nucleus == greedy


def test_max_tokens_is_capped(oai, long_reply):
    r = oai.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_tokens=100_000)
    assert r.usage.completion_tokens == CAP and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == long_reply
    r = oai.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5


def test_stop_string_trims_reply_and_cache(http, long_reply):
    # the first printable ASCII character after a clean (no U+FFFD) prefix, so the prefix re-encodes exactly
    cut = next(i for i, ch in enumerate(long_reply) if i >= 2 and ch.isascii() and ch.isprintable()
               and "\ufffd" not in long_reply[:i])
    stop, kept = long_reply[cut:cut + 2], long_reply[:cut]
    r = chat(http, LONG, max_tokens=CAP, stop=["never-generated", stop])
    assert reply(r) == kept and r["choices"][0]["finish_reason"] == "stop"
    # on a session the cache is trimmed too: the next turn sees exactly the kept reply
    sid = new_session(http)
    assert reply(chat(http, LONG, sid, max_tokens=CAP, stop=[stop])) == kept
    pos, messages = state(http, sid)
    assert messages[-1][:2] == ("assistant", kept) and pos == sum(m[2] for m in messages)
    history = LONG + [{"role": "assistant", "content": kept}] + user("next")
    assert reply(chat(http, user("next"), sid, max_tokens=6)) == reply(chat(http, history, max_tokens=6))


def test_request_validation(http):
    def err(r, status):
        assert r.status_code == status, r.text
        assert "message" in r.json()["error"]

    err(http.post("/v1/chat/completions", json={"model": "other", "messages": user("x")}), 404)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "n": 2}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "temperature": -1}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "top_p": 0}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "max_tokens": 0}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "session_id": "nope"}), 404)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "session_id": "../x"}), 400)
    err(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    big = {"model": MODEL, "messages": user("x" * 70_000)}
    err(http.post("/v1/chat/completions", json=big), 413)
    err(http.post("/v1/sessions", json={"max_seq_len": 10**9}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "stream": True,
                                                "stream_options": {"flush_every_ms": "soon"}}), 400)
    err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "tools": [{}]}), 400)


def test_prompt_longer_than_session_is_refused_and_changes_nothing(http):
    sid = new_session(http, max_seq_len=64)
    chat(http, user("short"), sid, max_tokens=2)
    before = state(http, sid)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("y" * 100), "session_id": sid})
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"
    assert state(http, sid) == before


# ---------------------------------------------------------------------- sessions
def test_session_lifecycle(http):
    sid = new_session(http, session_id="lifecycle-1", max_seq_len=2048)
    assert sid == "lifecycle-1"
    assert http.post("/v1/sessions", json={"session_id": "lifecycle-1"}).status_code == 409
    assert sid in [s["id"] for s in ok(http.get("/v1/sessions"))["data"]]
    info = ok(http.get(f"/v1/sessions/{sid}"))
    assert (info["current_pos"], info["messages"], info["max_seq_len"]) == (0, 0, 2048)

    system = {"role": "system", "content": "Answer briefly."}
    r1 = chat(http, [system] + user("first"), sid)
    assert r1["session_id"] == sid
    r2 = chat(http, [system] + user("second"), sid)  # a repeated leading system message is dropped
    pos, messages = state(http, sid)
    assert [m[:2] for m in messages] == [("system", "Answer briefly."), ("user", "first"), ("assistant", reply(r1)),
                                         ("user", "second"), ("assistant", reply(r2))]
    assert pos == sum(m[2] for m in messages)
    bad = http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": [
        {"role": "system", "content": "Something else."}] + user("third")})
    assert bad.status_code == 409
    assert state(http, sid) == (pos, messages)
    tail = ok(http.get(f"/v1/sessions/{sid}/history", params={"tail": 2}))["messages"]
    assert [(m["role"], m["content"]) for m in tail] == [m[:2] for m in messages[-2:]]

    # the session equals a stateless request over the same history (same tokens, same greedy reply)
    full = [system] + user("first") + [{"role": "assistant", "content": reply(r1)}] + user("second") + \
        [{"role": "assistant", "content": reply(r2)}] + user("third")
    if all(ch != "\ufffd" for m in full for ch in m["content"]):
        assert reply(chat(http, user("third"), sid)) == reply(chat(http, full))
        ok(http.post(f"/v1/sessions/{sid}/rollback", json={"keep_messages": 5}))

    info = ok(http.post(f"/v1/sessions/{sid}/rollback", json={"keep_messages": 3}))
    pos3, messages3 = state(http, sid)
    assert messages3 == messages[:3] and info["current_pos"] == pos3 == sum(m[2] for m in messages[:3])
    assert http.post(f"/v1/sessions/{sid}/rollback", json={"keep_messages": 9}).status_code == 400
    chat(http, user("after rollback"), sid)
    assert state(http, sid)[1][3][:2] == ("user", "after rollback")

    grown = ok(http.post(f"/v1/sessions/{sid}/resize/next_pow2"))
    assert grown["max_seq_len"] == 4096 and grown["current_pos"] == state(http, sid)[0]
    ok(http.delete(f"/v1/sessions/{sid}"))
    assert http.get(f"/v1/sessions/{sid}").status_code == 404
    assert http.delete(f"/v1/sessions/{sid}").status_code == 404


# ---------------------------------------------------------------------- snapshots
def test_snapshot_lifecycle_and_continuation(http, server):
    sid = new_session(http, max_seq_len=1024)
    chat(http, user("remember the number 7"), sid)
    chat(http, user("and the colour blue"), sid)
    before = state(http, sid)
    snap = ok(http.post(f"/v1/sessions/{sid}/save", json={"title": "t", "tags": ["a"], "description": "d"}), 201)
    assert (snap["title"], snap["tags"], snap["current_pos"]) == ("t", ["a"], before[0])
    assert snap["id"] in [s["id"] for s in ok(http.get("/v1/snapshots"))["data"]]
    patched = ok(http.patch(f"/v1/snapshots/{snap['id']}", json={"title": "renamed", "tags": ["b", "c"]}))
    assert (patched["title"], patched["tags"], patched["description"]) == ("renamed", ["b", "c"], "d")
    assert ok(http.get(f"/v1/snapshots/{snap['id']}"))["title"] == "renamed"

    loaded = ok(http.post(f"/v1/snapshots/{snap['id']}/load", json={}), 201)["session_id"]
    assert loaded.startswith("sess_") and state(http, loaded) == before
    assert http.post(f"/v1/snapshots/{snap['id']}/load", json={"session_id": sid}).status_code == 409
    ok(http.post(f"/v1/snapshots/{snap['id']}/load", json={"session_id": "copy-2"}), 201)

    # continuing the loaded session gives what continuing the original gives (greedy)
    original = reply(chat(http, user("what did I say?"), sid, max_tokens=8))
    assert reply(chat(http, user("what did I say?"), loaded, max_tokens=8)) == original
    assert state(http, loaded) == state(http, sid)
    ok(http.post(f"/v1/snapshots/{snap['id']}/load", json={"session_id": "copy-2", "force": True}), 201)
    assert state(http, "copy-2") == before

    ok(http.delete(f"/v1/snapshots/{snap['id']}"))
    assert http.get(f"/v1/snapshots/{snap['id']}").status_code == 404
    assert http.post(f"/v1/snapshots/{snap['id']}/load", json={}).status_code == 404
    assert http.get("/v1/snapshots/bad..id").status_code == 400
    assert not list(server.snapshot_dir.rglob(f"*{snap['id']}*"))


def test_corrupted_snapshot_is_refused(http, server):
    sid = new_session(http, max_seq_len=256)
    chat(http, user("x"), sid, max_tokens=2)
    snap = ok(http.post(f"/v1/sessions/{sid}/save", json={}), 201)["id"]
    (cache,) = server.snapshot_dir.rglob(f"{snap}/cache.safetensors")
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    r = http.post(f"/v1/snapshots/{snap}/load", json={"session_id": "never"})
    assert r.status_code == 422 and "sha256" in r.json()["error"]["message"]
    assert http.get("/v1/sessions/never").status_code == 404


def test_snapshot_without_chat_transcript_gives_409_until_reset(http, server):
    """A snapshot whose cache holds tokens the transcript does not describe (here: saved by library code that
    appended raw text) loads, but chatting on it is a 409 until it is rolled back to nothing."""
    from superlinear_lab.engine import Session, SnapshotStore
    from superlinear_lab.model import ModelConfig, load_model

    session = Session(load_model(config=ModelConfig.tiny()), 256, progress=False)
    session.append("raw text, no chat format", role=None)
    snap = SnapshotStore(server.snapshot_dir).save(session, title="library")
    sid = ok(http.post(f"/v1/snapshots/{snap}/load", json={}), 201)["session_id"]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("hi")})
    assert r.status_code == 409 and "transcript is empty" in r.json()["error"]["message"]
    assert ok(http.post(f"/v1/sessions/{sid}/rollback", json={"keep_messages": 0}))["current_pos"] == 0
    assert chat(http, user("hi"), sid)["session_id"] == sid


# ---------------------------------------------------------------------- disconnects
def cancelled(http) -> int:
    return ok(http.get("/v1/server"))["chat"]["cancelled"]


def test_stream_disconnect_cancels_and_rolls_back(http, long_reply):
    n_cancelled = cancelled(http)
    sid = new_session(http, max_seq_len=1024)
    chat(http, user("setup turn"), sid)
    before = state(http, sid)
    body = {"model": MODEL, "messages": LONG, "session_id": sid, "stream": True, "max_tokens": CAP, "temperature": 0,
            "stream_options": {"flush_every_n_tokens": 1}}
    got = ""
    with httpx.Client(base_url=http.base_url, timeout=120) as own:
        with own.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():  # leave as soon as some content arrived
                if line.startswith("data: {"):
                    got += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    if got:
                        break
    assert got
    # the next request on the session is served after the cancelled one rolled back
    after = chat(http, user("next"), sid)
    assert cancelled(http) == n_cancelled + 1
    control = new_session(http, max_seq_len=1024)
    chat(http, user("setup turn"), control)
    assert state(http, control) == before
    assert reply(chat(http, user("next"), control)) == reply(after)
    assert state(http, sid) == state(http, control)


def test_non_streaming_disconnect_cancels_and_rolls_back(http, server, long_reply):
    n_cancelled = cancelled(http)
    sid = new_session(http, max_seq_len=1024)
    body = json.dumps({"model": MODEL, "messages": LONG, "session_id": sid, "max_tokens": CAP,
                       "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 120  # bounded: the server notices the disconnect and cancels the job
    while cancelled(http) == n_cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled(http) == n_cancelled + 1
    assert state(http, sid) == (0, [])
    r = chat(http, user("after"), sid)
    assert state(http, sid)[1][0][:2] == ("user", "after")
    control = new_session(http, max_seq_len=1024)
    assert reply(chat(http, user("after"), control)) == reply(r)


# ---------------------------------------------------------------------- load
def test_load_8_clients_x_20_requests(http, server):
    """8 concurrent clients, 20 requests each, each in its own session: no error, and every session holds exactly
    its own conversation (messages, order, replies, token count)."""
    clients, turns = 8, 20
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 600

    def run(c: int):
        with httpx.Client(base_url=server.url, timeout=120) as h:
            sid = new_session(h, max_seq_len=2048)
            replies = []
            for t in range(turns):
                assert time.monotonic() < deadline, "load test ran out of time"
                t0 = time.perf_counter()
                r = chat(h, user(f"client {c} turn {t}"), sid, max_tokens=2)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                assert r["session_id"] == sid
                replies.append(reply(r))
            return sid, replies

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, range(clients)))
    for c, (sid, replies) in enumerate(results):
        pos, messages = state(http, sid)
        expected = []
        for t in range(turns):
            expected += [("user", f"client {c} turn {t}"), ("assistant", replies[t])]
        assert [m[:2] for m in messages] == expected
        assert pos == sum(m[2] for m in messages)
        ok(http.delete(f"/v1/sessions/{sid}"))
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    summary = {"requests": len(latencies), "p50_s": round(q[49], 3), "p95_s": round(q[94], 3),
               "p99_s": round(q[98], 3), "max_s": round(max(latencies), 3)}
    print(f"\nload test latency: {summary}")
    assert len(latencies) == clients * turns
