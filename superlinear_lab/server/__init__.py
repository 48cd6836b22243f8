"""superlinear_lab.server: an OpenAI-compatible HTTP server with stateful sessions and verified snapshots
(docs/algorithm.md §6.5), safe by default (loopback bind, optional bearer token, size/token/concurrency/memory limits).

* `chat` — the chat format (messages → tokens) and the transcript/cache consistency check;
* `engine` — `ChatEngine`: sessions, snapshots and generations scheduled on one worker thread (sliced prefill,
  batched decode, memory budget, optional persistence), atomic per request;
* `app` — `create_app`: one router per resource (`routes`), typed errors (`errors`), strict request bodies
  (`schemas`), middleware (`middleware`) and streaming (`streaming`); needs the ``server`` extra;
* `run` — `serve`: bind checks, model loading, uvicorn;
* `client` — `Client`: the HTTP client the CLI uses; `commands` — the CLI subcommands.

Submodules are imported on use, so the CLI's ``--help`` needs neither torch nor FastAPI.
"""
