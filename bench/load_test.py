"""Load test of `superlinear-lab serve` over loopback: many concurrent clients, mixed streaming, bounded time.

Two scenarios, each run against a server this script starts (``--port 0``, loopback only) or one given by ``--url``:

* **throughput** — `--clients` clients (default 64), each sending stateless chat completions back to back for
  `--duration` seconds (default 60), half of them streaming (`--stream-fraction`), `max_tokens` 16. Reports
  completed requests/s (requests that finished inside the window), p50/p99 latency, errors by kind, and the
  server's peak RSS.
* **long prompt** (``--long-prompt N``) — one streaming request with an N-token prompt starts prefilling; once it
  has `--probe-after` tokens in the cache (so the probes meet slices at deep positions), one client sends short
  requests (max_tokens 16) back to back for `--duration` seconds. Reports their p50/p99 and how far the long
  prefill got (it is cancelled at the end by closing its stream).

Results are merged into `--out` (default bench/load_test.json) under `--label`, with the machine's load average.
Every request has a timeout and every loop is bounded by the duration.

Example::

    python bench/load_test.py --label current
    python bench/load_test.py --label current --scenario long --long-prompt 131072 --duration 30
    python bench/load_test.py --label baseline --pythonpath /tmp/old-checkout   # the same test on older code
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

READY = re.compile(r"server ready on (http://127\.0\.0\.1:\d+)")
HERE = Path(__file__).resolve().parent


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERLINEAR_LAB_")}
    env["SUPERLINEAR_LAB_SNAPSHOT_DIR"] = str(Path(tempfile.mkdtemp(prefix="load-test-snapshots-")))
    env["OMP_NUM_THREADS"] = str(args.threads)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    cmd = [sys.executable, "-m", "superlinear_lab.cli", "serve", "--random-init", "--port", "0", "--threads",
           str(args.threads), "--log-level", "warning", "--http-max-concurrency", str(args.max_concurrency),
           *args.server_arg]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=args.pythonpath or None)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 300 s")


def rss_mb(pid: int | None) -> tuple[float | None, float | None]:
    """(current RSS, peak RSS) of `pid` in MiB, from /proc (None off Linux or without a pid)."""
    if pid is None:
        return None, None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    fields = dict(re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", text))
    return (int(fields["VmRSS"]) / 1024 if "VmRSS" in fields else None,
            int(fields["VmHWM"]) / 1024 if "VmHWM" in fields else None)


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of `pid` so far (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50_s": None, "p99_s": None, "max_s": None}
    if len(values) == 1:
        return {"p50_s": round(values[0], 3), "p99_s": round(values[0], 3), "max_s": round(values[0], 3)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_s": round(q[49], 3), "p99_s": round(q[98], 3), "max_s": round(max(values), 3)}


async def one_request(client: httpx.AsyncClient, model: str, text: str, stream: bool, max_tokens: int,
                      seed: int, timeout: float) -> None:
    """One chat completion; raises on any failure (status, malformed stream, timeout)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 1.0, "top_p": 1.0, "seed": seed, "stream": stream}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        r.json()["choices"][0]["message"]["content"]
        return
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        last = None
        async for line in r.aiter_lines():
            if line:
                last = line
        if last != "data: [DONE]":
            raise RuntimeError("stream did not end with [DONE]")


async def throughput(url: str, model: str, args, pid: int | None) -> dict:
    latencies, errors = [], {}
    start = time.monotonic()
    end = start + args.duration
    peak = [0.0]
    cpu_start = cpu_s(pid)
    cpu_end = [None]

    async def client(i: int):
        stream = i < round(args.clients * args.stream_fraction)
        async with httpx.AsyncClient(base_url=url) as c:
            n = 0
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    await one_request(c, model, f"client {i} request {n}: tell me something", stream,
                                      args.max_tokens, i * 100_003 + n, args.timeout)
                    if time.monotonic() <= end:
                        latencies.append(time.monotonic() - t0)
                except Exception as e:  # counted, never fatal
                    kind = str(e) or type(e).__name__
                    errors[kind] = errors.get(kind, 0) + 1
                    await asyncio.sleep(0.05)
                n += 1

    async def sample_rss():
        while time.monotonic() < end:
            cur, _ = rss_mb(pid)
            if cur:
                peak[0] = max(peak[0], cur)
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        cpu_end[0] = cpu_s(pid)

    await asyncio.gather(sample_rss(), *(client(i) for i in range(args.clients)))
    _, hwm = rss_mb(pid)
    return {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
            "stream_fraction": args.stream_fraction, "completed": len(latencies),
            "requests_per_s": round(len(latencies) / args.duration, 2), **quantiles(latencies),
            "errors": sum(errors.values()), "error_kinds": errors, "rss_peak_mb": round(max(peak[0], hwm or 0), 1),
            "server_cpu_s": None if cpu_start is None or cpu_end[0] is None else round(cpu_end[0] - cpu_start, 1),
            "server_cpu_ms_per_request": None if cpu_start is None or cpu_end[0] is None or not latencies else
            round((cpu_end[0] - cpu_start) * 1000 / len(latencies), 1)}


async def long_prompt(url: str, model: str, args, pid: int | None) -> dict:
    latencies, errors = [], {}
    async with httpx.AsyncClient(base_url=url) as long_client, httpx.AsyncClient(base_url=url) as probe, \
            httpx.AsyncClient(base_url=url) as info:
        body = {"model": model, "messages": [{"role": "user", "content": "z" * args.long_prompt}], "max_tokens": 1,
                "stream": True}
        opened = asyncio.Event()
        finished = {}

        async def long_request():
            t0 = time.monotonic()
            try:
                async with long_client.stream("POST", "/v1/chat/completions", json=body,
                                              timeout=args.duration + 600) as r:
                    opened.set()
                    async for _ in r.aiter_lines():
                        pass
                finished["s"] = time.monotonic() - t0
            finally:
                opened.set()

        task = asyncio.ensure_future(long_request())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the long request is in the engine
            if (await info.get("/v1/server", timeout=30)).json()["in_flight"] >= 1:
                break
            await asyncio.sleep(0.05)
        reached, waited = 0, time.monotonic()
        deadline = time.monotonic() + args.wait_limit
        while time.monotonic() < deadline and "s" not in finished:  # let the long prefill get deep first
            gens = (await info.get("/v1/server", timeout=30)).json().get("generations", [])
            reached = max((g["prefilled"] for g in gens), default=0)
            if reached >= args.probe_after:
                break
            await asyncio.sleep(1.0)
        waited = time.monotonic() - waited
        end = time.monotonic() + args.duration
        n = 0
        while time.monotonic() < end and "s" not in finished:
            t0 = time.monotonic()
            try:
                await one_request(probe, model, f"short request {n}", False, args.max_tokens, n, args.timeout)
                latencies.append(time.monotonic() - t0)
            except Exception as e:
                kind = str(e) or type(e).__name__
                errors[kind] = errors.get(kind, 0) + 1
            n += 1
        still_prefilling = "s" not in finished
        gens = (await info.get("/v1/server", timeout=30)).json().get("generations", [])
        reached_end = max((g["prefilled"] for g in gens), default=None)
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    _, hwm = rss_mb(pid)
    return {"long_prompt_tokens": args.long_prompt, "duration_s": args.duration, "short_requests": len(latencies),
            **quantiles(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "long_prefill_still_running_at_end": still_prefilling, "prefilled_when_probing_began": reached,
            "prefilled_at_end": reached_end, "waited_before_probing_s": round(waited, 1),
            "rss_peak_mb": hwm and round(hwm, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=("throughput", "long"), default="throughput")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-fraction", type=float, default=0.5)
    p.add_argument("--long-prompt", type=int, default=131072, help="prompt tokens of the long request")
    p.add_argument("--probe-after", type=int, default=0,
                   help="long scenario: start probing once the long prompt has this many tokens prefilled")
    p.add_argument("--wait-limit", type=float, default=600.0, help="long scenario: most seconds to wait for that")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--model", default="superlinear-lab/tiny-random-init")
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--max-concurrency", type=int, default=0, help="server --http-max-concurrency (0 = no limit)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    p.add_argument("--pythonpath", default=None, help="run the server from this source tree (e.g. older code)")
    p.add_argument("--label", default="current")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(HERE / "load_test.json"))
    args = p.parse_args(argv)

    proc, pid = None, None
    url = args.url
    log_path = Path(tempfile.mkdtemp(prefix="load-test-")) / "server.log"
    if url is None:
        proc, url = start_server(args, log_path)
        pid = proc.pid
    try:
        load_before = os.getloadavg()
        run = throughput if args.scenario == "throughput" else long_prompt
        result = asyncio.run(run(url, args.model, args, pid))
        result["load_average_before"] = [round(x, 2) for x in load_before]
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update({"scenario": args.scenario, "server_threads": args.threads, "cpus": os.cpu_count(),
                   "server_args": args.server_arg, "source": args.pythonpath or "this checkout", "note": args.note,
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("runs", {})[f"{args.label}/{args.scenario}"] = result
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
