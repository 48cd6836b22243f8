"""Safe defaults of the server (Decision D8 in docs/design.md): bearer-token enforcement, refusal of a non-loopback bind without a
token, and 429 from the concurrency limit. Only loopback addresses are contacted."""
from __future__ import annotations

import json
import subprocess
import time

import httpx
import openai
import pytest

from server_process import MODEL, ServerProcess, cli_command, server_env
from superlinear_lab.server.run import UnsafeBindError, check_bind, is_loopback

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("auth"), "--api-key", TOKEN, "--http-max-concurrency", "1",
                       "--session-max-seq-len", "1024") as s:
        yield s


def test_token_required_everywhere_but_health(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        assert h.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                             ("GET", "/v1/snapshots"), ("POST", "/v1/chat/completions"),
                             ("DELETE", "/v1/sessions/x"), ("GET", "/v1/server")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):
                r = h.request(method, path, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert h.get("/v1/models", headers=good).status_code == 200
        assert h.post("/v1/sessions", headers=good, json={}).status_code == 201


def test_openai_client_with_token(server):
    denied = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        denied.models.list()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"


def test_429_when_the_concurrency_limit_is_full(server):
    """With --http-max-concurrency 1, a second request while a streamed one is in flight gets 429; once the
    first is gone, requests are served again."""
    good = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 512,
            "temperature": 0, "stream": True, "stream_options": {"flush_every_n_tokens": 1}}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    with httpx.Client(base_url=server.url, timeout=60, headers=good) as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # in flight
            r = h.post("/v1/sessions", json={})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=1)
        assert h.get("/v1/server").json()["rejected"] >= 2
        # leaving cancels the first job; its slot is freed when the job ends (bounded wait)
        deadline = time.monotonic() + 120
        while h.get("/v1/server").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert h.post("/v1/sessions", json={}).status_code == 201


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.invalid"])
def test_non_loopback_without_token_is_refused_at_start(tmp_path, host):
    env = server_env(tmp_path / "snapshots")
    proc = subprocess.run(cli_command("serve", "--random-init", "--no-warmup", "--host", host, "--port", "0"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to bind" in proc.stderr and "--api-key" in proc.stderr
    assert "ready on" not in proc.stdout


def test_bind_rules():
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "10.0.0.1", "my-host", ""):
        assert not is_loopback(host)
        with pytest.raises(UnsafeBindError, match="refusing to bind"):
            check_bind(host, None)
        check_bind(host, "a-token")  # allowed with a token (not bound here)


def test_request_body_limit_applies_before_parsing(server):
    good = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=good) as h:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (9 << 20)}]})
        r = h.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413

        def chunks():  # no Content-Length: the limit is counted while reading
            for _ in range(10):
                yield b"x" * (1 << 20)
        r = h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
