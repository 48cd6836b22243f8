"""Real-browser test: JupyterLab in headless Chromium, driven by Playwright.

For each lesson notebook: open it in JupyterLab, run all cells, check that no cell produced an error, that every
view rendered (a plotly graph and widget controls inside each `.sl-view`), interact once (move a slider, pick a
query) and check that the view changed, and save PNG screenshots under `test-artifacts/browser/`.

JupyterLab runs on 127.0.0.1 on a free port with a random token, over a *copy* of the notebooks (running them in
the browser must not rewrite the repository's files), and is always stopped. Debian's `chromium` is installed
with apt when /usr/bin/chromium is missing; the test skips, saying why, only when that is impossible.
"""
from __future__ import annotations

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

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

# notebook -> the one interaction: (index of the view among the notebook's `.sl-view`s, slider label, key).
# The slider is found by its description; the key moves it one step (the opposite key is tried if the slider
# already sits at that end). A key of None means: click the button with that label instead.
NOTEBOOKS = {
    "01_structural_non_exclusion.ipynb": (0, "b_f (backward)", "ArrowLeft"),
    "03_sessions_and_snapshots.ipynb": (0, "checkpoint", None),
    "02_routing_explorer.ipynb": (0, "query", "ArrowLeft"),
    "04_debugging_missed_spans.ipynb": (0, "head", "ArrowRight"),
    "05_kernels_and_scaling.ipynb": (0, "query q (log)", "ArrowLeft"),
}
_OPPOSITE = {"ArrowLeft": "ArrowRight", "ArrowRight": "ArrowLeft"}
# A test-only notebook (written into the server's temporary copy) for the session and snapshot panels.
PANELS_NOTEBOOK = "_panels_check.ipynb"


def _ensure_chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install Debian's chromium")
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and installing it needs root (run: apt-get install -y chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(cmd)} exited {done.returncode}): "
                        f"{done.stderr.strip()[-300:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    """Lab settings for a deterministic test: render every cell (no windowing), no news or update pop-ups."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for name, content in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of notebooks/: yields (base url, token); always stopped afterwards."""
    pytest.importorskip("playwright.sync_api")
    _ensure_chromium()
    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (root / PANELS_NOTEBOOK).write_text(json.dumps(_PANELS_NOTEBOOK))
    settings = work / "settings"
    _write_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--allow-root"]
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(f"JupyterLab did not start: {(work / 'lab.log').read_text()[-2000:]}")
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


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


_NOTEBOOK_JSON = "() => window.jupyterapp.shell.currentWidget.context.model.toJSON()"
_RUN_ALL = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"
_ALL_RUN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
_KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""


# What the *kernel* drew: plot titles, HTML panels and the status line — not the controls, whose readouts change
# in the browser before the kernel has answered.
_CONTENT = """el => [...el.querySelectorAll('.js-plotly-plot .gtitle, .js-plotly-plot .xtick, .widget-html-content')]
  .map(e => e.textContent).join('|')"""


def _view_text(view) -> str:
    return view.evaluate(_CONTENT)


def _offline(page, base: str) -> list[str]:
    """Block every request that does not go to our JupyterLab server; returns the list of blocked URLs (the
    views must work offline: plotly.js and the widget code come from the installed lab extensions)."""
    blocked: list[str] = []

    def route(r):
        if r.request.url.startswith(base) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return blocked


def _run_notebook(page, base: str, token: str, notebook: str, stem: str):
    """Open `notebook`, run all cells, check for error outputs and rendered views; returns the views locator."""
    page.goto(f"{base}/lab/tree/{notebook}?token={token}&reset", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(_KERNEL_IDLE, timeout=60_000)
    page.evaluate(_RUN_ALL)
    page.wait_for_function(_ALL_RUN, timeout=120_000, polling=500)
    page.wait_for_function(_KERNEL_IDLE, timeout=120_000)
    _assert_no_errors(page, notebook)
    views = page.locator(".sl-view")
    page.wait_for_function("() => document.querySelectorAll('.sl-view .js-plotly-plot .main-svg').length > 0",
                           timeout=60_000)
    assert views.count() >= 1, f"{notebook}: no view rendered"
    for i in range(views.count()):
        view = views.nth(i)
        view.scroll_into_view_if_needed()
        view.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        assert view.locator(".widget-slider, .widget-dropdown, .widget-toggle-buttons, "
                            ".widget-button, .widget-text").count() > 0, f"{notebook}: view {i} has no controls"
        view.screenshot(path=str(ARTIFACTS / f"{stem}.view{i}.png"))
    return views


def _assert_no_errors(page, notebook: str) -> None:
    nb = page.evaluate(_NOTEBOOK_JSON)
    errors = [(i, o.get("ename"), o.get("evalue")) for i, cell in enumerate(nb["cells"])
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{notebook}: cells raised {errors}"


def _wait_changed(page, view, before: str, timeout: int = 30_000) -> None:
    page.wait_for_function(f"([el, before]) => ({_CONTENT})(el) !== before", arg=[view.element_handle(), before],
                           timeout=timeout)


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS))
def test_notebook_runs_and_views_render(lab, browser, notebook):
    if not (ROOT / "notebooks" / notebook).exists():
        pytest.skip(f"notebooks/{notebook} does not exist yet")
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = notebook.removesuffix(".ipynb")
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    blocked = _offline(page, base)
    try:
        views = _run_notebook(page, base, token, notebook, stem)
        index, label, key = NOTEBOOKS[notebook]
        view = views.nth(index)
        view.scroll_into_view_if_needed()
        before = _view_text(view)
        if key is None:
            view.locator("button", has_text=label).first.click()
            _wait_changed(page, view, before)
        else:
            slider = view.locator(".widget-slider", has=page.locator(".widget-label", has_text=label)).first
            handle = slider.locator(".noUi-handle").first
            for attempt in (key, _OPPOSITE[key]):
                handle.focus()
                page.keyboard.press(attempt)
                try:
                    _wait_changed(page, view, before, timeout=20_000)
                    break
                except Exception:  # playwright's TimeoutError: the slider may sit at that end; try the other way
                    continue
        view.screenshot(path=str(ARTIFACTS / f"{stem}.view{index}.after.png"))
        page.screenshot(path=str(ARTIFACTS / f"{stem}.page.png"), full_page=False)
        assert _view_text(view) != before, f"{notebook}: using '{label}' did not change the view"
        _assert_no_errors(page, notebook)
        assert not blocked, f"{notebook}: the page tried to reach the network: {blocked[:5]}"
    finally:
        page.close()


_PANELS_NOTEBOOK = {
    "cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": src}
              for src in (
        "import tempfile\n"
        "from superlinear_lab.engine import Session, SnapshotStore\n"
        "from superlinear_lab.model import load_model\n"
        "from superlinear_lab.widgets import SessionPanel, SnapshotPanel\n"
        "model = load_model('tiny', backend='torch')\n"
        "panel = SessionPanel(Session(model, max_len=2048), chunk_size=128)\n"
        "assert panel.append('Superlinear attention routes every query to a few spans. ' * 8)\n"
        "panel",
        "snapshots = SnapshotPanel(SnapshotStore(tempfile.mkdtemp()), model=model, session=lambda: panel.session)\n"
        "assert snapshots.save('first context', ['demo'])\n"
        "snapshots",
    )],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_session_and_snapshot_panels(lab, browser):
    """The engine panels (shown in lesson 03 by its author): append through the panel, save a snapshot."""
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    blocked = _offline(page, base)
    try:
        views = _run_notebook(page, base, token, PANELS_NOTEBOOK, "panels")
        assert views.count() == 2
        session_view, snapshot_view = views.nth(0), views.nth(1)
        before = _view_text(session_view)
        session_view.locator("textarea").fill("appended from the browser")
        session_view.locator("button", has_text="append").click()
        _wait_changed(page, session_view, before)
        assert "appended from the browser" in _view_text(session_view)
        session_view.screenshot(path=str(ARTIFACTS / "panels.view0.after.png"))
        before = _view_text(snapshot_view)
        snapshot_view.locator("input[placeholder='title']").fill("after the append")
        snapshot_view.locator("button", has_text="save session").click()
        _wait_changed(page, snapshot_view, before)
        assert "after the append" in _view_text(snapshot_view)
        snapshot_view.locator("button", has_text="delete").first.click()
        page.wait_for_function("el => el.innerText.includes('confirm or cancel')", arg=snapshot_view.element_handle(),
                               timeout=30_000)
        snapshot_view.screenshot(path=str(ARTIFACTS / "panels.view1.after.png"))
        _assert_no_errors(page, PANELS_NOTEBOOK)
        assert not blocked, f"panels: the page tried to reach the network: {blocked[:5]}"
    finally:
        page.close()
