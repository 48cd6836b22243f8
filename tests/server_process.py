"""Test helper: run `superlinear-lab serve` in a subprocess on a free loopback port and always stop it.

The server picks its own port (``--port 0``) and announces it in its ready line; its output goes to a log file
(so a full pipe can never block it). Every wait here is bounded.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY = re.compile(r"superlinear-lab server ready on (http://127\.0\.0\.1:\d+)")
MODEL = "superlinear-lab/tiny-random-init"
START_TIMEOUT_S = 180  # model import + init on a busy 2-core machine


def server_env(snapshot_dir: Path, **extra: str) -> dict:
    """The environment of a test server: no inherited token or URL, snapshots under `snapshot_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERLINEAR_LAB_")}
    env["SUPERLINEAR_LAB_SNAPSHOT_DIR"] = str(snapshot_dir)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it if the test process dies without stopping it (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def cli_command(*args: str) -> list[str]:
    """The `superlinear-lab` command line, run by this interpreter."""
    return [sys.executable, "-m", "superlinear_lab.cli", *args]


class ServerProcess:
    """A running test server. Use as a context manager; `url` is its base URL.

    Args:
        tmp: a directory for the log (and snapshots unless `snapshot_dir` is given).
        args: extra `serve` flags.
    """

    def __init__(self, tmp: Path, *args: str, snapshot_dir: Path | None = None, env: dict | None = None):
        self.tmp = Path(tmp)
        self.snapshot_dir = snapshot_dir or self.tmp / "snapshots"
        self.log_path = self.tmp / f"server-{time.monotonic_ns()}.log"
        self.args = ["serve", "--random-init", "--port", "0", "--no-warmup", "--threads", "1",
                     "--log-level", "warning", *args]
        self.env = env or server_env(self.snapshot_dir)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "ServerProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cli_command(*self.args), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = READY.search(self.log())
            if match:
                self.url = match.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"server not ready within {START_TIMEOUT_S}s:\n{self.log()}")
        r = httpx.get(f"{self.url}/health", timeout=30)
        r.raise_for_status()
        return self

    def stop(self) -> None:
        """Terminate (then kill) the server process; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
