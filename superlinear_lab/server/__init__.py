"""superlinear_lab.server: an OpenAI-compatible HTTP server with stateful sessions and verified snapshots
(SPEC §6.5), safe by default (loopback bind, optional bearer token, size/token/concurrency limits).

* `chat` — the chat format (messages → tokens) and the transcript/cache consistency check;
* `engine` — `ChatEngine`: sessions, snapshots and chat turns on one worker thread, atomic per request;
* `app` — `create_app`: the FastAPI app and its middleware (needs the ``server`` extra);
* `run` — `serve`: bind checks, model loading, uvicorn;
* `client` — `Client`: the HTTP client the CLI uses; `commands` — the CLI subcommands.

Submodules are imported on use, so the CLI's ``--help`` needs neither torch nor FastAPI.
"""
