"""JupyterLab in headless Chromium for the browser tests and the browser benchmark (one launcher, two users).

`lab_server(root)` starts JupyterLab over the folder `root` on 127.0.0.1 (free port, random token, test
settings: every cell rendered, no news pop-ups) and always stops it; `chromium()` finds Debian's
/usr/bin/chromium (installing it with apt when missing and allowed). Nothing here reaches the network.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

# Page-side helpers shared by the tests and the benchmark.
NOTEBOOK_JSON = "() => window.jupyterapp.shell.currentWidget.context.model.toJSON()"
RUN_ALL = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"
SAVE = "() => window.jupyterapp.commands.execute('docmanager:save')"
ALL_RUN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""


class ChromiumMissing(RuntimeError):
    """/usr/bin/chromium is missing and could not be installed (the message says why)."""


def chromium(install: bool = True) -> str:
    """Path of Debian's chromium; installs it with apt-get when missing (root only), else ChromiumMissing."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if not install or shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ChromiumMissing(f"{CHROMIUM} is missing (install it as root: apt-get install -y chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ChromiumMissing(f"could not install chromium ({' '.join(cmd)} exited {done.returncode}): "
                                  f"{done.stderr.strip()[-300:]}")
    if not os.path.exists(CHROMIUM):
        raise ChromiumMissing(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    """Lab settings for a deterministic run: render every cell (no windowing), no news or update pop-ups."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for name, content in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


@contextlib.contextmanager
def lab_server(root: Path, work: Path):
    """JupyterLab serving `root` (state under `work`): yields (base url, token); always stopped afterwards."""
    settings = work / "settings"
    _write_settings(settings)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--allow-root"]
    log_path = work / "lab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(f"JupyterLab did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        yield base, token
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group) — politely, then for sure."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def notebook(*sources: str) -> dict:
    """An nbformat-4 notebook (as a dict) of code cells with these sources."""
    return {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": s}
                      for s in sources],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def open_and_run(page, base: str, token: str, path: str, timeout_ms: int = 300_000) -> None:
    """Open notebook `path` in JupyterLab, run all cells and wait until every cell ran and the kernel is idle."""
    page.goto(f"{base}/lab/tree/{path}?token={token}&reset", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(KERNEL_IDLE, timeout=60_000)
    page.evaluate(RUN_ALL)
    page.wait_for_function(ALL_RUN, timeout=timeout_ms, polling=500)
    page.wait_for_function(KERNEL_IDLE, timeout=timeout_ms)


def cell_errors(page) -> list:
    """(cell index, ename, evalue) of every error output, plus stderr streams, of the open notebook."""
    nb = page.evaluate(NOTEBOOK_JSON)
    return [(i, o.get("ename") or o.get("name"), o.get("evalue") or o.get("text"))
            for i, cell in enumerate(nb["cells"]) for o in cell.get("outputs", [])
            if o.get("output_type") == "error" or (o.get("output_type") == "stream" and o.get("name") == "stderr")]
