"""Start the server: refuse unsafe binds, load the model, bind, serve (docs/algorithm.md §6.5, Decision D8 in docs/design.md).

`serve(options)` checks the host *before* anything is loaded or bound: a non-loopback host needs a token. Once
the app is ready it prints one line, ``superlinear-lab server ready on http://HOST:PORT``, to stdout (flushed),
so scripts and tests can wait for it; with ``--port 0`` the line carries the port the OS picked.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "SUPERLINEAR_LAB_API_KEY"
READY_LINE = "superlinear-lab server ready on"
# The engine worker runs many small torch ops, releasing the GIL around each; with Python's default 5 ms switch
# interval it then waits behind the busy event loop thread for up to 5 ms per op (a convoy). 0.5 ms cut the
# server's CPU time per request under 64 clients by ~30% (bench/load_test.py).
SWITCH_INTERVAL_S = 0.0005


class ServeOptionError(ValueError):
    """An option `serve` cannot use (e.g. an unreadable or unusable --chat-template); a clean exit status 2."""


class UnsafeBindError(ValueError):
    """A non-loopback host was asked for without a token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); any other name counts as remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Raise UnsafeBindError for a non-loopback `host` without `api_key` (Decision D8 in docs/design.md)."""
    if not is_loopback(host) and not api_key:
        raise UnsafeBindError(
            f"refusing to bind {host!r} without a token: a non-loopback address exposes the model to the network. "
            f"Set --api-key/--token or ${API_KEY_ENV}, or bind 127.0.0.1 (the default).")


@dataclass
class ServeOptions:
    """Everything `superlinear-lab serve` takes (one field per flag)."""

    model: str = "tiny"  # a shipped model name or a model/checkpoint directory (`loaders.open_model`)
    random_init: bool = False  # the seeded random initialisation of preset `model` instead of weights
    host: str = "127.0.0.1"  # bind address (loopback by default, Decision D8 in docs/design.md)
    port: int = 8787  # 0 = any free port (printed in the ready line)
    api_key: str | None = None  # bearer token (also $SUPERLINEAR_LAB_API_KEY)
    served_model_name: str | None = None  # the id clients send as `model` (default: the model's id)
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when available)
    dtype: str = "auto"  # float32, float16, bfloat16 or auto (float16 on CUDA, float32 on CPU), printed at start
    attn_backend: str = "auto"  # attention kernels: auto, torch, triton, oracle
    chat_template: str | None = None  # a Jinja chat template file for a transformers tokenizer (replaces its own)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    chunk_size: int = 8192  # prefill chunk length of a session's own prefill (rollback)
    prefill_slice: int = 256  # prompt tokens prefilled per scheduling step (short requests interleave)
    max_concurrency: int = 16  # engine requests in flight before 429 (0 = no limit)
    max_completion_tokens: int = 1024  # cap on max_tokens
    max_request_bytes: int = 8 << 20  # cap on a request body
    max_prompt_tokens: int = 1048576  # cap on the tokens one request prefills
    session_max_seq_len: int = 131072  # allocation of a new session by default
    max_seq_len_limit: int = 1048576  # the largest allocation a request may ask for
    max_sessions: int = 64  # sessions held at once
    memory_budget_mb: int = 8192  # total MiB of all sessions' caches (0 = no budget)
    persist_sessions: bool = False  # autosave sessions (idle and on shutdown) and restore them on start
    autosave_idle_s: float = 60.0  # with persist_sessions: autosave a changed session idle this long
    snapshot_dir: str | None = None  # default $SUPERLINEAR_LAB_SNAPSHOT_DIR, else the XDG cache
    warmup: bool = True  # a short prefill + decode before serving
    log_level: str = "info"


def _load(options: ServeOptions):
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = options.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if options.random_init:
        from ..model import load_model

        model = load_model(options.model, random_init=True, device=device, dtype=dtype,
                           backend=options.attn_backend)
    else:
        from ..loaders import open_model

        model = open_model(options.model, device=device, dtype=dtype, backend=options.attn_backend)
    return model, device, dtype


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port). It is created with protocol IPPROTO_TCP: asyncio sets TCP_NODELAY
    only on sockets whose `proto` says TCP, and without it every keep-alive response waits ~40 ms for the
    client's delayed ACK (Nagle)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    return sock


def _warmup(model) -> None:
    from ..engine import Session

    s = Session(model, 512, progress=False)
    s.append([i % model.cfg.vocab_size for i in range(256)], role=None)
    s.generate(4, role=None)


def serve(options: ServeOptions) -> None:
    """Run the server in the foreground until interrupted."""
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(options.host, api_key)  # before anything is loaded or bound

    import torch
    import uvicorn

    from ..engine import SnapshotStore
    from .app import ServerSettings, create_app
    from .engine import ChatEngine

    if options.threads:
        torch.set_num_threads(options.threads)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    template = None
    if options.chat_template is not None:
        try:
            template = Path(options.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ServeOptionError(f"--chat-template {options.chat_template}: cannot read it ({e})") from None
    model, device, dtype = _load(options)
    if options.warmup:
        _warmup(model)
    store = SnapshotStore(options.snapshot_dir)
    from .chat import chat_rules

    try:
        chat_rules(model.tokenizer, template)  # refuse a template that cannot be used before starting anything
    except ValueError as e:
        raise ServeOptionError(f"--chat-template {options.chat_template}: {e}") from None
    engine = ChatEngine(model, store, session_max_seq_len=options.session_max_seq_len,
                        max_seq_len_limit=options.max_seq_len_limit, max_sessions=options.max_sessions,
                        max_prompt_tokens=options.max_prompt_tokens, chunk_size=options.chunk_size,
                        prefill_slice=options.prefill_slice,
                        memory_budget=(options.memory_budget_mb << 20) or None,
                        persist=options.persist_sessions, autosave_idle_s=options.autosave_idle_s,
                        chat_template=template)
    if options.persist_sessions:
        restored = engine.restore_autosaved()
        if restored:
            print(f"restored {len(restored)} autosaved session(s): {', '.join(restored)}", flush=True)
    served = options.served_model_name or model.model_id
    settings = ServerSettings(served_model=served, api_key=api_key, max_concurrency=options.max_concurrency,
                              max_completion_tokens=options.max_completion_tokens,
                              max_request_bytes=options.max_request_bytes)
    app = create_app(engine, settings)

    try:
        sock = bind_socket(options.host, options.port)
    except BaseException:
        engine.close()
        raise
    port = sock.getsockname()[1]
    host = f"[{options.host.strip('[]')}]" if sock.family == socket.AF_INET6 else options.host
    print(f"model {served} on {device} ({dtype}); snapshots in {store.root}; "
          f"auth {'on' if api_key else 'off'}; max concurrency {options.max_concurrency or 'unlimited'}",
          flush=True)

    config = uvicorn.Config(app, log_level=options.log_level, timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None):  # the ready line goes out once uvicorn serves the socket
        await original_startup(sockets=sockets)
        print(f"{READY_LINE} http://{host}:{port}", flush=True)

    original_shutdown = server.shutdown

    async def shutdown(sockets=None):  # uvicorn re-raises SIGTERM/SIGINT after this: stop the engine here
        await original_shutdown(sockets=sockets)
        await asyncio.to_thread(engine.close)  # cancels running work; autosaves with --persist-sessions

    server.startup, server.shutdown = startup, shutdown
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


def main_serve(options: ServeOptions) -> int:
    """`serve` with the bind refusal as a clean exit status 2."""
    try:
        serve(options)
    except (UnsafeBindError, ServeOptionError) as e:
        print(f"superlinear-lab serve: error: {e}", file=sys.stderr)
        return 2
    return 0
