"""The server's ``superlinear-lab`` subcommands: `serve`, `chat`, `session …`, `snapshot …`.

Each is an ``add_<name>(subparsers)`` function in the style of `superlinear_lab.cli`; `COMMANDS` lists them.
Every client command talks to a running server over HTTP and takes ``--url`` (default $SUPERLINEAR_LAB_URL or
http://127.0.0.1:8787) and ``--api-key`` (default $SUPERLINEAR_LAB_API_KEY). Heavy imports happen inside the
commands, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys

CHAT_HELP = """\
commands inside the chat:
  /help               this list
  /exit               leave (the session stays on the server)
  /history [N]        the last N messages (all by default)
  /new                start a new session
  /switch ID          continue session ID
  /ls                 list the server's sessions
  /rollback N         keep the first N messages
  /save [TITLE]       save the session as a snapshot
  /load SNAPSHOT      load a snapshot into a new session and continue there
  /stats              the session's position, allocation and memory
"""


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", default=None,
                        help="server URL (default $SUPERLINEAR_LAB_URL or http://127.0.0.1:8787)")
    parent.add_argument("--api-key", default=None, help="bearer token (default $SUPERLINEAR_LAB_API_KEY)")
    return parent


def _client(args):
    from .client import Client

    return Client(args.url, args.api_key)


def _fail(command: str, e: Exception) -> int:
    print(f"superlinear-lab {command}: error: {e}", file=sys.stderr)
    return 1


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with a message naming the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value
    return parse


_nonneg_int, _positive_int = _int_at_least(0), _int_at_least(1)


# ---------------------------------------------------------------------- serve
SERVE_EPILOG = """\
safety: binds 127.0.0.1 by default; any other host needs --api-key (or $SUPERLINEAR_LAB_API_KEY), and then
every endpoint but /health needs "Authorization: Bearer <token>".

examples:
  superlinear-lab serve                                 # tiny model on 127.0.0.1:8787
  superlinear-lab serve --model superlinear_lab/models/tiny --port 9000 --http-max-concurrency 4
  SUPERLINEAR_LAB_API_KEY=secret superlinear-lab serve --host 0.0.0.0
"""


def add_serve(subparsers) -> None:
    from .run import ServeOptions

    d = ServeOptions()
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server (sessions, snapshots)",
                              description="Serve a model over an OpenAI-compatible HTTP API with stateful sessions "
                                          "and verified snapshots.",
                              epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model,
                   help=f"shipped model name, model directory or Superlinear-Exp checkpoint (default {d.model})")
    p.add_argument("--random-init", action="store_true",
                   help="the seeded random initialisation of preset --model instead of weights")
    p.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    p.add_argument("--port", type=_nonneg_int, default=d.port, help=f"port (default {d.port}; 0 = any free port)")
    p.add_argument("--api-key", "--token", dest="server_api_key", default=None,
                   help="bearer token required on every endpoint but /health (default $SUPERLINEAR_LAB_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "float16", "bfloat16"),
                   help="model dtype (default auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--attn-backend", default=d.attn_backend, choices=("auto", "torch", "triton", "oracle"),
                   help="attention kernels (default auto: triton on CUDA, torch on CPU)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for a transformers model's tokenizer (replaces its own; needed for "
                        "chat when its tokenizer has none)")
    p.add_argument("--threads", type=_nonneg_int, default=d.threads, help="torch CPU threads (default: torch's)")
    p.add_argument("--chunk-size", type=_positive_int, default=d.chunk_size,
                   help=f"prefill chunk (default {d.chunk_size})")
    p.add_argument("--prefill-slice", type=_positive_int, default=d.prefill_slice,
                   help=f"prompt tokens prefilled per scheduling step, so short requests interleave with a long "
                        f"prompt (default {d.prefill_slice})")
    p.add_argument("--http-max-concurrency", type=_nonneg_int, default=d.max_concurrency,
                   help=f"requests in flight before 429 (default {d.max_concurrency}; 0 = no limit)")
    p.add_argument("--http-max-completion-tokens", type=_positive_int, default=d.max_completion_tokens,
                   help=f"cap on max_tokens (default {d.max_completion_tokens})")
    p.add_argument("--max-request-bytes", type=_positive_int, default=d.max_request_bytes,
                   help=f"cap on a request body (default {d.max_request_bytes})")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=d.max_prompt_tokens,
                   help=f"cap on the tokens one request prefills (default {d.max_prompt_tokens})")
    p.add_argument("--session-max-seq-len", type=_int_at_least(2), default=d.session_max_seq_len,
                   help=f"allocation of a new session (default {d.session_max_seq_len})")
    p.add_argument("--max-seq-len-limit", type=_int_at_least(2), default=d.max_seq_len_limit,
                   help=f"largest allocation a request may ask for (default {d.max_seq_len_limit})")
    p.add_argument("--max-sessions", type=_positive_int, default=d.max_sessions,
                   help=f"sessions held at once (default {d.max_sessions})")
    p.add_argument("--memory-budget-mb", type=_nonneg_int, default=d.memory_budget_mb,
                   help=f"total MiB of all sessions' caches; beyond it new sessions get 507 and stateless requests "
                        f"429 (default {d.memory_budget_mb}; 0 = no budget)")
    p.add_argument("--persist-sessions", action=argparse.BooleanOptionalAction, default=d.persist_sessions,
                   help="autosave sessions to the snapshot store (when idle and on shutdown) and restore them on "
                        "start (default off)")
    p.add_argument("--autosave-idle-s", type=_nonneg_int, default=int(d.autosave_idle_s),
                   help=f"with --persist-sessions: autosave a changed session idle this many seconds "
                        f"(default {int(d.autosave_idle_s)})")
    p.add_argument("--snapshot-dir", default=None,
                   help="snapshot root (default $SUPERLINEAR_LAB_SNAPSHOT_DIR, else the XDG cache)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=d.warmup,
                   help="a short prefill + decode before serving (default on)")
    p.add_argument("--log-level", default=d.log_level, choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from .run import ServeOptions, main_serve

    options = ServeOptions(
        model=args.model, random_init=args.random_init, host=args.host, port=args.port,
        api_key=args.server_api_key, served_model_name=args.served_model_name, device=args.device,
        dtype=args.dtype, attn_backend=args.attn_backend, threads=args.threads, chunk_size=args.chunk_size,
        max_concurrency=args.http_max_concurrency, max_completion_tokens=args.http_max_completion_tokens,
        max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
        session_max_seq_len=args.session_max_seq_len, max_seq_len_limit=args.max_seq_len_limit,
        max_sessions=args.max_sessions, snapshot_dir=args.snapshot_dir, warmup=args.warmup,
        prefill_slice=args.prefill_slice, memory_budget_mb=args.memory_budget_mb,
        persist_sessions=args.persist_sessions, autosave_idle_s=float(args.autosave_idle_s),
        chat_template=args.chat_template, log_level=args.log_level)
    return main_serve(options)


# ---------------------------------------------------------------------- chat
def add_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", parents=[_client_options()], help="chat with a server session (REPL)",
                              description="Chat in a stateful server session: each turn sends only the new message.",
                              epilog=CHAT_HELP + "\nexamples:\n  superlinear-lab chat --new\n"
                                     "  superlinear-lab chat --session sess_… -m 'one question' --temperature 0",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--session", default=None, help="continue this session")
    which.add_argument("--new", action="store_true", help="start a new session (the default without --session)")
    p.add_argument("--max-seq-len", type=_int_at_least(2), default=None, help="allocation of a new session")
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy (default 0.1)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95; 1 disables)")
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="reply length cap (default 256)")
    p.add_argument("--system-prompt", default=None, help="system message of a new session")
    p.add_argument("-m", "--message", action="append", default=None,
                   help="send this message, print the reply and exit (repeatable; no REPL)")
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    from .client import ClientError

    client = _client(args)
    try:
        sid = args.session or client.create_session(max_seq_len=args.max_seq_len)["session_id"]
        pending_system = args.system_prompt if not args.session else None
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}

        def turn(text: str) -> None:
            nonlocal pending_system
            messages = [{"role": "user", "content": text}]
            if pending_system:
                messages.insert(0, {"role": "system", "content": pending_system})
            for piece in client.chat_stream(messages, session_id=sid, **sampling):
                print(piece, end="", flush=True)
            print()
            pending_system = None

        if args.message:
            for text in args.message:
                turn(text)
            print(f"[session {sid}]", file=sys.stderr)
            return 0
        print(f"session {sid} on {client.url} — /help for commands, /exit to leave")
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                try:
                    result = _repl_command(client, line, sid)
                except ClientError as e:
                    print(f"error: {e}")
                    continue
                if result == "exit":
                    return 0
                if result:
                    sid = result
                continue
            try:
                turn(line)
            except ClientError as e:
                print(f"\nerror: {e}")
            except KeyboardInterrupt:
                print("\n[interrupted: the turn was cancelled and the session rolled back]")
    except ClientError as e:
        return _fail("chat", e)
    finally:
        client.close()


def _repl_command(client, line: str, sid: str) -> str | None:
    """Run one /command; returns "exit", a new session id to switch to, or None."""
    cmd, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if cmd == "/help":
        print(CHAT_HELP)
    elif cmd == "/exit":
        return "exit"
    elif cmd == "/history":
        tail = int(rest) if rest.isdigit() else None
        for m in client.history(sid, tail)["messages"]:
            print(f"[{m['role']}] {m['content']}")
    elif cmd == "/new":
        new = client.create_session()["session_id"]
        print(f"session {new}")
        return new
    elif cmd == "/switch" and rest:
        client.session(rest)
        print(f"session {rest}")
        return rest
    elif cmd == "/ls":
        for s in client.sessions():
            print(f"{s['id']}  pos {s['current_pos']}/{s['max_seq_len']}  {s['messages']} messages")
    elif cmd == "/rollback" and rest.isdigit():
        info = client.rollback(sid, int(rest))
        print(f"kept {info['messages']} messages (position {info['current_pos']})")
    elif cmd == "/save":
        snap = client.save(sid, title=rest)
        print(f"snapshot {snap['id']}")
    elif cmd == "/load" and rest:
        new = client.load_snapshot(rest)["session_id"]
        print(f"snapshot {rest} loaded as session {new}")
        return new
    elif cmd == "/stats":
        print(json.dumps(client.session(sid), indent=2))
    else:
        print(f"unknown command {line.strip()!r}; /help lists them")
    return None


# ---------------------------------------------------------------------- session
def add_session(subparsers) -> None:
    client = _client_options()
    p = subparsers.add_parser("session", help="list, inspect, create, roll back and delete server sessions",
                              description="Manage the sessions of a running server.")
    sub = p.add_subparsers(dest="session_command", metavar="ACTION", required=True)
    q = sub.add_parser("ls", parents=[client], help="list sessions", description="List the server's sessions.")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser("info", parents=[client], help="one session", description="Show one session.")
    q.add_argument("id")
    q = sub.add_parser("new", parents=[client], help="create a session", description="Create an empty session.")
    q.add_argument("--session-id", default=None, help="its id (default sess_<uuid>)")
    q.add_argument("--max-seq-len", type=_nonneg_int, default=None, help="allocation (default: the server's)")
    q = sub.add_parser("rm", parents=[client], help="delete sessions", description="Delete sessions.")
    q.add_argument("ids", nargs="*")
    q.add_argument("--all", action="store_true", help="delete every session")
    q = sub.add_parser("history", parents=[client], help="a session's messages",
                       description="Print a session's transcript.")
    q.add_argument("id")
    q.add_argument("--tail", type=_nonneg_int, default=None, help="only the last N messages")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser("rollback", parents=[client], help="keep the first N messages",
                       description="Truncate a session to its first KEEP messages (the cache is re-prefilled).")
    q.add_argument("id")
    q.add_argument("keep", type=_nonneg_int)
    p.set_defaults(func=run_session)


def run_session(args) -> int:
    from .client import ClientError

    c = _client(args)
    try:
        action = args.session_command
        if action == "ls":
            rows = c.sessions()
            if args.json:
                print(json.dumps(rows, indent=2))
            for s in [] if args.json else rows:
                print(f"{s['id']}  pos {s['current_pos']}/{s['max_seq_len']}  {s['messages']} messages  "
                      f"{s['origin']}")
        elif action == "info":
            print(json.dumps(c.session(args.id), indent=2))
        elif action == "new":
            print(c.create_session(args.session_id, args.max_seq_len)["session_id"])
        elif action == "rm":
            if not args.ids and not args.all:
                return _fail("session rm", "name session ids or pass --all")
            ids = [s["id"] for s in c.sessions()] if args.all else args.ids
            for sid in ids:
                c.delete_session(sid)
                print(f"deleted {sid}")
        elif action == "history":
            h = c.history(args.id, args.tail)
            if args.json:
                print(json.dumps(h, indent=2))
            for m in [] if args.json else h["messages"]:
                print(f"[{m['role']}] {m['content']}")
        elif action == "rollback":
            info = c.rollback(args.id, args.keep)
            print(f"{info['id']}: {info['messages']} messages, position {info['current_pos']}")
        return 0
    except ClientError as e:
        return _fail(f"session {args.session_command}", e)
    finally:
        c.close()


# ---------------------------------------------------------------------- snapshot
def add_snapshot(subparsers) -> None:
    client = _client_options()
    p = subparsers.add_parser("snapshot", help="save, list, load, edit and delete snapshots",
                              description="Manage the snapshots of a running server (verified safetensors + JSON).")
    sub = p.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    q = sub.add_parser("ls", parents=[client], help="list snapshots", description="List snapshots of the served model.")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser("info", parents=[client], help="one snapshot", description="Show one snapshot's manifest.")
    q.add_argument("id")
    q = sub.add_parser("save", parents=[client], help="save a session", description="Save a session as a snapshot.")
    q.add_argument("--session", required=True, help="the session to save")
    q.add_argument("--title", default="")
    q.add_argument("--description", default="")
    q.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    q = sub.add_parser("load", parents=[client], help="load into a session",
                       description="Verify a snapshot and load it into a session.")
    q.add_argument("id")
    q.add_argument("--session", default=None, help="session id (default sess_<uuid>)")
    q.add_argument("--force", action="store_true", help="replace an existing session of that id")
    q = sub.add_parser("update", parents=[client], help="edit metadata", description="Edit a snapshot's metadata.")
    q.add_argument("id")
    q.add_argument("--title", default=None)
    q.add_argument("--description", default=None)
    q.add_argument("--tag", action="append", default=None, help="replace the tags (repeatable)")
    q = sub.add_parser("rm", parents=[client], help="delete snapshots", description="Delete snapshots.")
    q.add_argument("ids", nargs="*")
    q.add_argument("--all", action="store_true", help="delete every snapshot of the served model")
    p.set_defaults(func=run_snapshot)


def run_snapshot(args) -> int:
    from .client import ClientError

    c = _client(args)
    try:
        action = args.snapshot_command
        if action == "ls":
            rows = c.snapshots()
            if args.json:
                print(json.dumps(rows, indent=2))
            for s in [] if args.json else rows:
                print(f"{s['id']}  pos {s['current_pos']}  {s['title']!r}  {','.join(s['tags'])}")
        elif action == "info":
            print(json.dumps(c.snapshot(args.id), indent=2))
        elif action == "save":
            print(c.save(args.session, args.title, args.description, args.tag)["id"])
        elif action == "load":
            print(c.load_snapshot(args.id, args.session, args.force)["session_id"])
        elif action == "update":
            info = c.update_snapshot(args.id, title=args.title, description=args.description, tags=args.tag)
            print(json.dumps(info, indent=2))
        elif action == "rm":
            if not args.ids and not args.all:
                return _fail("snapshot rm", "name snapshot ids or pass --all")
            ids = [s["id"] for s in c.snapshots()] if args.all else args.ids
            for snap in ids:
                c.delete_snapshot(snap)
                print(f"deleted {snap}")
        return 0
    except ClientError as e:
        return _fail(f"snapshot {args.snapshot_command}", e)
    finally:
        c.close()


COMMANDS = [add_serve, add_chat, add_session, add_snapshot]
