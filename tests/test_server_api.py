"""The server's OpenAI surface and its limits, on a real `superlinear-lab serve` subprocess (loopback only):
`/v1/completions`, `logprobs` on both endpoints (checked against an independent forward of the same model),
OpenAI's default sampling, strict request bodies, tiny temperatures, the id rule, snapshot size/limit refusals,
the memory budget, short requests interleaving with a long prefill, and batched decode under concurrency.

Regression tests for issue 18 findings 2, 4, 5, 7, 8, 12 and 13 (server side) are marked in their docstrings.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from server_process import MODEL, ServerProcess

LIMIT = 2048  # --max-seq-len-limit
BUDGET_MB = 32  # --memory-budget-mb


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("api"), "--session-max-seq-len", "512", "--max-seq-len-limit",
                       str(LIMIT), "--memory-budget-mb", str(BUDGET_MB), "--prefill-slice", "64",
                       "--http-max-completion-tokens", "64") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """The served model, loaded independently in the test process (same preset, same seed)."""
    from superlinear_lab.model import load_model

    torch.set_num_threads(1)
    return load_model("tiny", random_init=True, backend="torch")


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log-softmax [len(generated), vocab] of the model before each generated token (one plain full forward)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:len(prompt) - 1 + len(generated)]
    return torch.log_softmax(logits.double(), dim=-1)


def token_id(text: str) -> int:
    """Inverse of the completions endpoint's token text (an ASCII character or ``bytes:\\xNN``)."""
    return ord(text) if len(text) == 1 else int(text.removeprefix("bytes:\\x"), 16)


# ---------------------------------------------------------------------- /v1/completions
def test_completions_streaming_equals_non_streaming(oai, reference):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = oai.completions.create(**kwargs)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0  # the comparison below needs generated text
    tok = reference.tokenizer
    assert full.usage.prompt_tokens == len(tok.encode("Once upon a time")) + 1  # <|bos|> + bytes
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # a prompt of token ids is taken as it is
    ids = tok.encode("Once upon a time", bos=True)
    assert oai.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text == \
        full.choices[0].text


def test_completion_logprobs_match_an_independent_forward(oai, reference):
    r = oai.completions.create(model=MODEL, prompt="The cat", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    generated = [token_id(t) for t in lp.tokens]
    assert len(generated) == r.usage.completion_tokens > 0
    assert bytes(generated).decode("utf-8", errors="replace") == r.choices[0].text
    ref = reference_logprobs(reference, reference.tokenizer.encode("The cat", bos=True), generated)
    for i, token in enumerate(generated):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, token]), abs=1e-4)
        best = torch.topk(ref[i], 3)
        assert list(lp.top_logprobs[i].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert token == int(best.indices[0])  # greedy picks the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_match_an_independent_forward(oai, reference):
    kwargs = dict(model=MODEL, messages=user("Hello"), max_tokens=10, temperature=0, logprobs=True,
                  top_logprobs=2)
    r = oai.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    generated = [e.bytes[0] for e in content]
    assert len(generated) == r.usage.completion_tokens == 10  # the greedy reply to "Hello" runs past 10 tokens
    tok = reference.tokenizer
    prompt = [tok.bos_id, tok.special["<|user|>"], *"Hello".encode(), tok.special["<|end|>"],
              tok.special["<|assistant|>"]]
    ref = reference_logprobs(reference, prompt, generated)
    for i, e in enumerate(content):
        assert e.logprob == pytest.approx(float(ref[i, generated[i]]), abs=1e-4)
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].bytes == [generated[i]]
    # streamed logprobs are the same entries, in order
    stream = oai.chat.completions.create(stream=True, **kwargs)
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.bytes, round(e.logprob, 5)) for e in entries] == [(e.bytes, round(e.logprob, 5)) for e in content]
    # without logprobs: null, as before
    assert oai.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2).choices[0].logprobs is None


def test_default_sampling_is_openais(oai):
    """temperature 1.0 and top_p 1.0 when not given (was 0.1 / 0.95)."""
    for create, kwargs in ((oai.chat.completions.create, dict(messages=user("Tell me a story"))),
                           (oai.completions.create, dict(prompt="Tell me a story"))):
        def text(**extra):
            r = create(model=MODEL, max_tokens=24, seed=5, **kwargs, **extra).choices[0]
            return r.message.content if hasattr(r, "message") else r.text
        default = text()
        assert default == text(temperature=1.0, top_p=1.0)
        assert default != text(temperature=0.1, top_p=0.95)


# ---------------------------------------------------------------------- strict bodies and parameters
def test_loose_types_are_refused(http):
    """Issue 18 #12: a bool is not an int, a string is not an int or a bool."""
    sid = ok(http.post("/v1/sessions", json={}), 201)["session_id"]
    for _ in range(2):
        ok(http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("hi"),
                                                   "max_tokens": 2}))
    before = ok(http.get(f"/v1/sessions/{sid}/history"))
    bad = [("POST", f"/v1/sessions/{sid}/rollback", {"keep_messages": True}),
           ("POST", "/v1/chat/completions", {"model": MODEL, "messages": user("x"), "max_tokens": "5"}),
           ("POST", "/v1/chat/completions", {"model": MODEL, "messages": user("x"), "stream": "yes"}),
           ("POST", "/v1/chat/completions", {"model": MODEL, "messages": user("x"), "temperature": "0"}),
           ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": True}),
           ("POST", "/v1/sessions", {"max_seq_len": "512"}),
           ("POST", f"/v1/sessions/{sid}/save", {"tags": "one"})]
    for method, path, body in bad:
        r = http.request(method, path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert ok(http.get(f"/v1/sessions/{sid}/history")) == before


def test_tiny_temperature_is_a_clear_400_and_the_connection_survives(server):
    """Issue 18 #7: temperature 1e-40 was accepted, the sampler raised (500) and the connection was reset."""
    with httpx.Client(base_url=server.url, timeout=120) as h:  # one keep-alive connection
        for endpoint, body in (("/v1/chat/completions", {"messages": user("hi")}),
                               ("/v1/completions", {"prompt": "hi"})):
            for stream in (False, True):
                r = h.post(endpoint, json={"model": MODEL, "temperature": 1e-40, "max_tokens": 3, "stream": stream,
                                           **body})
                assert r.status_code == 400 and "temperature" in r.json()["error"]["message"], r.text
                assert h.post(endpoint, json={"model": MODEL, "temperature": 1e-6, "max_tokens": 3,
                                              **body}).status_code == 200


def test_session_ids_follow_the_one_id_rule(http):
    """Issue 18 #8: "dup\\n" was accepted next to "dup"."""
    ok(http.post("/v1/sessions", json={"session_id": "dup"}), 201)
    for sid in ("dup\n", "dup\r\n", "\ndup", "du p", "x" * 129):
        r = http.post("/v1/sessions", json={"session_id": sid})
        assert r.status_code == 400 and "session_id" in r.json()["error"]["message"], (sid, r.text)
        r = http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("x")})
        assert r.status_code == 400, (sid, r.text)
    assert http.get("/v1/sessions/dup%0A").status_code == 400
    assert [s["id"] for s in ok(http.get("/v1/sessions"))["data"]].count("dup") == 1


# ---------------------------------------------------------------------- snapshots
def files_under(root) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_save_with_a_huge_title_is_refused_and_writes_nothing(http, server):
    """Issue 18 #2: a 1.1 MB title gave 500 and wrote a snapshot nobody could list or delete."""
    sid = ok(http.post("/v1/sessions", json={}), 201)["session_id"]
    ok(http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("hi"),
                                               "max_tokens": 2}))
    before = files_under(server.snapshot_dir)
    r = http.post(f"/v1/sessions/{sid}/save", json={"title": "t" * 1_100_000})
    assert 400 <= r.status_code < 500, r.text
    assert "manifest" in r.json()["error"]["message"]
    assert files_under(server.snapshot_dir) == before
    assert ok(http.post(f"/v1/sessions/{sid}/save", json={"title": "fine"}), 201)["title"] == "fine"


def test_snapshot_listing_reports_bad_entries_and_still_works(http, server):
    """A broken manifest does not break GET /v1/snapshots: the entry is skipped and named in `problems`."""
    sid = ok(http.post("/v1/sessions", json={}), 201)["session_id"]
    ok(http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("hi"),
                                               "max_tokens": 2}))
    snap = ok(http.post(f"/v1/sessions/{sid}/save", json={"title": "to break"}), 201)["id"]
    (manifest,) = server.snapshot_dir.rglob(f"{snap}/manifest.json")
    manifest.write_text('{"created_at": ' + "[" * 100_000 + "]" * 100_000 + "}")
    listing = ok(http.get("/v1/snapshots"))
    assert snap not in [s["id"] for s in listing["data"]]
    assert any(snap in p["path"] for p in listing["problems"]), listing["problems"]
    assert http.get(f"/v1/snapshots/{snap}").status_code == 422


def test_loading_respects_the_max_seq_len_limit(http, server, reference):
    """Issue 18 #4: a snapshot larger than --max-seq-len-limit loaded anyway."""
    from superlinear_lab.engine import Session, SnapshotStore

    big = Session(reference, LIMIT * 2, progress=False)
    big.append("a snapshot allocated beyond the server's limit", role=None)
    snap = SnapshotStore(server.snapshot_dir).save(big, title="too big")
    sessions = ok(http.get("/v1/sessions"))["data"]
    r = http.post(f"/v1/snapshots/{snap}/load", json={"session_id": "too-big"})
    assert 400 <= r.status_code < 500 and str(LIMIT) in r.json()["error"]["message"], r.text
    assert http.get("/v1/sessions/too-big").status_code == 404
    assert ok(http.get("/v1/sessions"))["data"] == sessions
    small = Session(reference, LIMIT, progress=False)
    small.append("this one fits", role=None)
    fits = SnapshotStore(server.snapshot_dir).save(small)
    assert ok(http.post(f"/v1/snapshots/{fits}/load", json={}), 201)["max_seq_len"] == LIMIT


# ---------------------------------------------------------------------- resources
def test_memory_budget_refuses_with_507_and_recovers(http):
    """Issue 18 #5: sessions were bounded by count only. Create sessions until the budget refuses one."""
    budget = ok(http.get("/v1/server"))["memory_budget_bytes"]
    assert budget == BUDGET_MB << 20
    created, refused = [], None
    for i in range(40):
        used = ok(http.get("/v1/server"))["memory_bytes"]
        r = http.post("/v1/sessions", json={"session_id": f"budget-{i}", "max_seq_len": LIMIT})
        if r.status_code != 201:
            refused = (r, used)
            break
        created.append(r.json())
    assert refused is not None, "the budget never refused a session"
    r, used = refused
    assert r.status_code == 507 and r.json()["error"]["type"] == "memory_budget_error", r.text
    assert created and used + created[0]["memory_bytes"] > budget  # refused only when it would not fit
    assert ok(http.get("/v1/server"))["memory_bytes"] <= budget
    for s in created:
        ok(http.delete(f"/v1/sessions/{s['id']}"))
    ok(http.post("/v1/sessions", json={"session_id": "budget-again", "max_seq_len": LIMIT}), 201)
    ok(http.delete("/v1/sessions/budget-again"))


def test_short_request_is_not_starved_by_a_long_prefill(server, http):
    """Issue 18 #5: a long prompt held the only worker until it was done; now it is prefilled in slices and a
    short request finishes first. (Order only; the timing is in bench/load_test.py.)"""
    done = {}

    def long_request():
        with httpx.Client(base_url=server.url, timeout=300) as h:
            r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": user("z" * 8000), "max_tokens": 1})
            done["long"] = (time.monotonic(), r.status_code)

    t = threading.Thread(target=long_request)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while ok(http.get("/v1/server"))["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("quick"), "max_tokens": 4})
        short_done = time.monotonic()
        assert r.status_code == 200
        assert "long" not in done, "the short request waited for the whole long prefill"
    finally:
        t.join(timeout=300)
    assert done["long"][1] == 200 and done["long"][0] > short_done


def test_concurrent_requests_share_batched_decode_steps(server, http):
    """Issue 18 #13: decode steps of concurrent requests run as one forward."""
    before = ok(http.get("/v1/server"))["chat"]
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0}

    def one(i):
        with httpx.Client(base_url=server.url, timeout=120) as h:
            return ok(h.post("/v1/completions", json={**body, "prompt": f"client {i} says"}))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    after = ok(http.get("/v1/server"))["chat"]
    tokens = after["decoded_tokens"] - before["decoded_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens == sum(r["usage"]["completion_tokens"] for r in results)
    assert after["batched_steps"] > before["batched_steps"] and steps < tokens


def test_concurrent_turns_on_one_session_run_one_after_another(server, http):
    """Work on one session keeps its order while other sessions' work interleaves: four concurrent turns on one
    session all succeed and the transcript holds them one after another, consistent with the cache."""
    sid = ok(http.post("/v1/sessions", json={"max_seq_len": 1024}), 201)["session_id"]

    def turn(i):
        with httpx.Client(base_url=server.url, timeout=120) as h:
            return ok(h.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "max_tokens": 6,
                                                           "stream": False, "messages": user(f"turn {i}")}))

    with ThreadPoolExecutor(4) as pool:
        replies = {f"turn {i}": r["choices"][0]["message"]["content"] for i, r in enumerate(pool.map(turn, range(4)))}
    hist = ok(http.get(f"/v1/sessions/{sid}/history"))
    messages = [(m["role"], m["content"]) for m in hist["messages"]]
    assert [r for r, _ in messages] == ["user", "assistant"] * 4
    assert sorted(c for r, c in messages if r == "user") == sorted(replies)
    for (_, question), (_, answer) in zip(messages[::2], messages[1::2]):
        assert answer == replies[question]
    assert hist["current_pos"] == sum(m["tokens"] for m in hist["messages"])
    ok(http.post("/v1/chat/completions", json={"model": MODEL, "session_id": sid, "messages": user("after"),
                                               "max_tokens": 2}))


# ---------------------------------------------------------------------- socket
def test_listening_socket_gets_tcp_nodelay_on_accepted_connections():
    """Issue 18 #6: `serve()` created its socket with protocol 0, so asyncio never set TCP_NODELAY and every
    keep-alive response waited ~40 ms for a delayed ACK."""
    from superlinear_lab.server.run import bind_socket

    async def main():
        sock = bind_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            s = writer.get_extra_info("socket")
            seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 30)
            writer.close()
        return value

    assert asyncio.run(main()) != 0
