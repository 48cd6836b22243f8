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
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"

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


sys.path.insert(0, str(ROOT / "tools"))
from browser_lab import (ALL_RUN as _ALL_RUN, CHROMIUM_ARGS, KERNEL_IDLE as _KERNEL_IDLE,  # noqa: E402
                         NOTEBOOK_JSON as _NOTEBOOK_JSON, RUN_ALL as _RUN_ALL, SAVE as _SAVE, ChromiumMissing,
                         cell_errors, chromium, lab_server, notebook)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of notebooks/ (plus the test-only notebooks): yields (base url, token)."""
    pytest.importorskip("playwright.sync_api")
    try:
        chromium()
    except ChromiumMissing as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (root / PANELS_NOTEBOOK).write_text(json.dumps(_PANELS_NOTEBOOK))
    (root / VIEWS_NOTEBOOK).write_text(json.dumps(notebook(*_VIEWS_CELLS)))
    with lab_server(root, work) as server:
        yield server


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


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
    page.wait_for_function(_ALL_RUN, timeout=300_000, polling=500)  # lesson 04 runs the model: minutes on 2 cores
    page.wait_for_function(_KERNEL_IDLE, timeout=300_000)
    _assert_no_errors(page, notebook)
    views = page.locator(".sl-view")
    try:
        page.wait_for_function("() => document.querySelectorAll('.sl-view .js-plotly-plot .main-svg').length > 0",
                               timeout=60_000)
    except Exception as exc:  # playwright's TimeoutError: say what the page did
        raise AssertionError(f"{notebook}: no view drew a plot in 60 s; {_page_log(page)}") from exc
    assert views.count() >= 1, f"{notebook}: no view rendered"
    for i in range(views.count()):
        view = views.nth(i)
        view.scroll_into_view_if_needed()
        try:  # a view scrolled into view renders its plot; 2 busy CI cores took > 30 s once
            view.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=90_000)
        except Exception as exc:  # playwright's TimeoutError: say what the page did
            raise AssertionError(f"{notebook}: view {i} drew no plot in 90 s; {_page_log(page)}") from exc
        assert view.locator(".widget-slider, .widget-dropdown, .widget-toggle-buttons, "
                            ".widget-button, .widget-text").count() > 0, f"{notebook}: view {i} has no controls"
        view.screenshot(path=str(ARTIFACTS / f"{stem}.view{i}.png"))
    return views


def _page_log(page) -> str:
    """The page's console errors and the panes' event log (render, sync sent, messages), for a failure message."""
    events = page.evaluate("() => (globalThis.__slPaneEvents || []).slice(-40)")
    return f"console errors: {getattr(page, 'console_errors', [])[-10:]}; pane events: {events}"


def _new_page(browser, height: int):
    """A page of the lab (1400 px wide) that keeps its console errors (`page.console_errors`)."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.console_errors = []
    page.on("console", lambda m: page.console_errors.append(m.text[:300]) if m.type == "error" else None)
    return page


def _assert_no_errors(page, notebook: str) -> None:
    """No cell raised, and no cell wrote to stderr (e.g. jupyter_client's red "Out of range float values are
    not JSON compliant" warning when a view sends NaN)."""
    errors = cell_errors(page)
    assert not errors, f"{notebook}: cells raised or wrote to stderr: {errors}"


def _wait_changed(page, view, before: str, timeout: int = 30_000) -> None:
    page.wait_for_function(f"([el, before]) => ({_CONTENT})(el) !== before", arg=[view.element_handle(), before],
                           timeout=timeout)


def _wait_text(page, view, text: str, timeout: int = 30_000) -> None:
    """Wait until what the kernel drew in `view` contains `text` (each widget's update arrives on its own)."""
    try:
        page.wait_for_function(f"([el, text]) => ({_CONTENT})(el).includes(text)", arg=[view.element_handle(), text],
                               timeout=timeout)
    except Exception as exc:  # playwright's TimeoutError
        raise AssertionError(f"{text!r} never appeared in the view: {_view_text(view)[:300]}") from exc


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS))
def test_notebook_runs_and_views_render(lab, browser, notebook):
    if not (ROOT / "notebooks" / notebook).exists():
        pytest.skip(f"notebooks/{notebook} does not exist yet")
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = notebook.removesuffix(".ipynb")
    page = _new_page(browser, 2400)
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
    page = _new_page(browser, 2000)
    blocked = _offline(page, base)
    try:
        views = _run_notebook(page, base, token, PANELS_NOTEBOOK, "panels")
        assert views.count() == 2
        session_view, snapshot_view = views.nth(0), views.nth(1)
        before = _view_text(session_view)
        session_view.locator("textarea").fill("appended from the browser")
        session_view.locator("button", has_text="append").click()
        _wait_changed(page, session_view, before)
        _wait_text(page, session_view, "appended from the browser")  # the figure's patch may come first
        session_view.screenshot(path=str(ARTIFACTS / "panels.view0.after.png"))
        before = _view_text(snapshot_view)
        snapshot_view.locator("input[placeholder='title']").fill("after the append")
        snapshot_view.locator("button", has_text="save session").click()
        _wait_changed(page, snapshot_view, before)
        _wait_text(page, snapshot_view, "after the append")
        snapshot_view.locator("button", has_text="delete").first.click()
        page.wait_for_function("el => el.innerText.includes('confirm or cancel')", arg=snapshot_view.element_handle(),
                               timeout=30_000)
        snapshot_view.screenshot(path=str(ARTIFACTS / "panels.view1.after.png"))
        _assert_no_errors(page, PANELS_NOTEBOOK)
        assert not blocked, f"panels: the page tried to reach the network: {blocked[:5]}"
    finally:
        page.close()


# --------------------------------------------------------------------------- visual defects and the static copy
VIEWS_NOTEBOOK = "_views_check.ipynb"
_VIEWS_CELLS = (
    # 0: two layers that route differently, and a genuinely different trace for compare mode
    "import numpy as np\n"
    "from superlinear_kernels import SpanConfig\n"
    "from superlinear_lab.widgets import CoverageMap, RoutingExplorer, StripeExplorer\n"
    "from superlinear_lab.widgets.demo import demo_trace, reference_text, stack_layers\n"
    "N = 1500\n"
    "text = reference_text(N)\n"
    "a = demo_trace(text, profile_queries=[N // 2, N - 1])\n"
    "b = demo_trace(text, SpanConfig.default().replace(search_power=1 / 3, backward_factor=3.0), seed=1,\n"
    "               profile_queries=[N // 2, N - 1])\n"
    "trace, other = stack_layers([a, b]), stack_layers([b, a])",
    # 1: compare mode at a query where B's best score lies above everything A shows (so a y-range computed
    # from A alone would cut B's marker off)
    "cmp = RoutingExplorer(trace, compare=other, labels=('A', 'B'))\n"
    "def a_scores(q):\n"
    "    cmp.set_query(q)\n"
    "    prof = cmp.profile()\n"
    "    return [r['score'] for r in cmp.chosen('A')] + ([] if prof is None else list(prof[1]))\n"
    "Q_CMP = next(q for q in (N - 1, N // 2, *range(N - 2, 100, -7))\n"
    "             if max(r['score'] for r in cmp.chosen('B') or [{'score': -1e9}]) > max(a_scores(q)) + 0.5)\n"
    "cmp.set_query(Q_CMP)\n"
    "cmp",
    # 2: single trace at a profiled query (the K-th score line is drawn)
    "single = RoutingExplorer(trace)\n"
    "assert single.profile() is not None\n"
    "single",
    # 3: the stripe explorer (gap line)
    "stripes = StripeExplorer(SpanConfig.default(), query=1000, max_query=4096)\n"
    "stripes",
    # 4: coverage map
    "CoverageMap(trace)",
    # 5: the missed-span debugger (its explanation must be fully visible)
    "from superlinear_lab.widgets import MissedSpanDebugger\n"
    "MissedSpanDebugger(trace, [(100, 112), (700, 730), (1200, 1203)], queries=[N - 1])",
)

# Every part of the debugger's explanation is visible: no element of its panel that clips (overflow other than
# visible) holds more than it shows, and every line of text (outside the scrollable text excerpt) lies inside
# the view and inside every clipping ancestor up to it. Returns the problems found (empty: fully visible).
_CLIPPED = """el => {
  const ex = el.querySelector('.sl-explain');
  if (!ex || !ex.innerText.trim()) return ['no explanation shown'];
  const out = [];
  const clips = [];
  const panel = ex.closest('.widget-html');
  for (let a = ex; a && a !== el.parentElement; a = a.parentElement) {
    const cs = getComputedStyle(a), name = a.className || a.tagName;
    if (cs.overflowX !== 'visible' || cs.overflowY !== 'visible') clips.push(a);
    if (!panel.contains(a)) continue;  // above the panel: only where the text lands counts (below)
    if (cs.overflowX !== 'visible' && a.scrollWidth > a.clientWidth + 1)
      out.push(`${name}: ${a.scrollWidth} px wide content in ${a.clientWidth} px (overflow-x ${cs.overflowX})`);
    if (cs.overflowY !== 'visible' && a.scrollHeight > a.clientHeight + 1)
      out.push(`${name}: ${a.scrollHeight} px high content in ${a.clientHeight} px (overflow-y ${cs.overflowY})`);
  }
  if (ex.scrollWidth > ex.clientWidth + 1) out.push(`explanation: content ${ex.scrollWidth} px > ${ex.clientWidth} px`);
  const boxes = [el, ...clips].map(a => [a.className || a.tagName, a.getBoundingClientRect()]);
  const walker = document.createTreeWalker(ex, NodeFilter.SHOW_TEXT);
  let n = 0;
  for (let t = walker.nextNode(); t; t = walker.nextNode()) {
    if (!t.textContent.trim() || t.parentElement.closest('.sl-document, style')) continue;
    const range = document.createRange();
    range.selectNodeContents(t);
    for (const r of range.getClientRects()) {
      n++;
      for (const [name, b] of boxes)
        if (r.left < b.left - 1 || r.right > b.right + 1 || r.top < b.top - 1 || r.bottom > b.bottom + 1)
          out.push(`text "${t.textContent.slice(0, 40)}" at x ${Math.round(r.left)}–${Math.round(r.right)}, `
                   + `y ${Math.round(r.top)}–${Math.round(r.bottom)} outside ${name}`);
    }
  }
  const doc = ex.querySelector('.sl-document');
  if (doc && doc.scrollWidth > doc.clientWidth + 1) out.push(`text excerpt: ${doc.scrollWidth} px > ${doc.clientWidth} px`);
  if (n === 0) out.push('no text line measured');
  return out.slice(0, 8);
}"""
# what a panel that does not wrap looks like (the defect of issue 15): the check above must see it
_BREAK_WRAPPING = ".sl-explain { white-space: nowrap !important; } .widget-html-content { overflow: hidden !important; }"

_PANE_STATE = """el => {
  const gd = el.matches('.js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
  const fl = gd._fullLayout;
  const ys = gd._fullData.filter(t => t.visible !== false && (t.yaxis || 'y') === 'y' && t.type === 'scatter')
                         .flatMap(t => Array.from(t.y || []).filter(v => v !== null && isFinite(v)));
  return {range: fl.yaxis.range, ys, shapes: (gd.layout.shapes || []).length,
          shapePaths: gd.querySelectorAll('.shapelayer path').length, title: fl.title.text};
}"""


def _pane(view, i):
    return view.locator(".sl-pane").nth(i)


def _wait_title_change(page, pane, before: str) -> None:
    page.wait_for_function("([el, t]) => { const g = el.matches('.js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');"
                           " return g && g._fullLayout && g._fullLayout.title.text !== t; }",
                           arg=[pane.element_handle(), before], timeout=30_000)


def _hover_texts(page, pane) -> list[str]:
    """Hover a grid of points over the pane's first subplot; the hover labels plotly drew."""
    box = pane.locator(".nsewdrag").first.bounding_box()
    texts = []
    for fx in (0.05, 0.3, 0.6, 0.95):
        for fy in (0.05, 0.4, 0.8):
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
            page.wait_for_timeout(60)
            texts.append(pane.locator(".hoverlayer").text_content() or "")
    page.mouse.move(2, 2)
    return texts


def test_views_visual_defects(lab, browser):
    """Each visual defect of issue 15 checked in the browser, on views of two-layer traces."""
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = _new_page(browser, 1000)
    blocked = _offline(page, base)
    try:
        views = _run_notebook(page, base, token, VIEWS_NOTEBOOK, "views")  # no error, nothing on stderr
        cmp, single, stripes, coverage, dbg = (views.nth(i) for i in range(5))

        # compare mode: every marker of the score panel (A's, the profile, B's) lies inside its y range
        state = _pane(cmp, 1).evaluate(_PANE_STATE)
        lo, hi = sorted(state["range"])
        assert state["ys"] and all(lo <= y <= hi for y in state["ys"]), state

        # no "NaN" in hover labels over the maps (empty cells are not hoverable) nor anywhere in the views
        for view in (cmp, single):
            view.scroll_into_view_if_needed()
            texts = _hover_texts(page, _pane(view, 0))
            assert any(texts), "no hover label appeared over the map"  # the NaN check below sees real labels
            assert not [t for t in texts if "NaN" in t], texts
        assert "NaN" not in page.locator(".jp-Notebook").inner_text()

        # the K-th chosen score line is drawn at a profiled query and gone after stepping to one without profile
        single.scroll_into_view_if_needed()
        detail = _pane(single, 1)
        state = detail.evaluate(_PANE_STATE)
        assert state["shapes"] == 1 and state["shapePaths"] == 1, state
        handle = single.locator(".widget-slider", has=page.locator(".widget-label", has_text="query")).first \
            .locator(".noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowLeft")
        _wait_title_change(page, detail, state["title"])
        state = detail.evaluate(_PANE_STATE)
        assert state["shapes"] == 0 and state["shapePaths"] == 0, f"stale K-th score line: {state}"

        # the document pane: newlines shown as ⏎ (never a literal \n), a click on a token picks it
        doc = single.locator(".sl-document")
        text = doc.inner_text()
        assert "⏎" in text and "\\n" not in text
        title = detail.evaluate(_PANE_STATE)["title"]
        doc.locator(".sl-ex i").nth(5).click()
        _wait_title_change(page, detail, title)
        single.locator("input[placeholder='search the text']").fill("the")
        single.locator("button", has_text="mark as evidence").click()
        page.wait_for_function("el => el.querySelectorAll('i.e').length > 0", arg=doc.element_handle(),
                               timeout=30_000)
        single.screenshot(path=str(ARTIFACTS / "views.single.after.png"))

        # StripeExplorer: the gap line appears with a gap and is gone once coverage holds again
        stripes.scroll_into_view_if_needed()
        fig = _pane(stripes, 0)
        bf = stripes.locator(".widget-slider", has=page.locator(".widget-label", has_text="b_f")).first \
            .locator(".noUi-handle").first
        title = fig.evaluate(_PANE_STATE)["title"]
        bf.focus()
        page.keyboard.press("ArrowLeft")  # b_f 2.0 -> 1.9: coverage breaks
        page.wait_for_function("el => /go to first gap/.test(el.innerText)", arg=stripes.element_handle(),
                               timeout=30_000)
        stripes.locator("button", has_text="go to first gap").click()
        _wait_title_change(page, fig, title)
        page.wait_for_function("el => el.querySelectorAll('.js-plotly-plot .shapelayer path').length > 0",
                               arg=fig.element_handle(), timeout=30_000)
        title = fig.evaluate(_PANE_STATE)["title"]
        bf.focus()
        page.keyboard.press("ArrowRight")  # back to 2.0: coverage holds at this query again
        _wait_title_change(page, fig, title)
        state = fig.evaluate(_PANE_STATE)
        assert state["shapes"] == 0 and state["shapePaths"] == 0, f"stale gap line: {state}"
        stripes.screenshot(path=str(ARTIFACTS / "views.stripes.after.png"))

        # CoverageMap: no "(below 0)" legend; unreached keys have their own axis
        assert "below 0" not in coverage.inner_text()

        # the debugger's explanation is fully visible: on the first miss, and after a click on another cell
        dbg.scroll_into_view_if_needed()
        assert dbg.evaluate(_CLIPPED) == []
        grid = _pane(dbg, 0).locator(".nsewdrag").first.bounding_box()
        before = _view_text(dbg)
        page.mouse.click(grid["x"] + 0.9 * grid["width"], grid["y"] + 0.9 * grid["height"])
        _wait_changed(page, dbg, before)
        assert dbg.evaluate(_CLIPPED) == []
        dbg.screenshot(path=str(ARTIFACTS / "views.debugger.png"))
        # … and the check sees clipping when the panel stops wrapping (so its silence above means something)
        style = page.add_style_tag(content=_BREAK_WRAPPING)
        assert dbg.evaluate(_CLIPPED), "the visibility check did not notice a clipped explanation"
        style.evaluate("s => s.remove()")
        assert dbg.evaluate(_CLIPPED) == []
        cmp.screenshot(path=str(ARTIFACTS / "views.compare.png"))
        coverage.screenshot(path=str(ARTIFACTS / "views.coverage.png"))
        _assert_no_errors(page, VIEWS_NOTEBOOK)
        assert not blocked, f"views: the page tried to reach the network: {blocked[:5]}"
    finally:
        page.close()


# how many figures of the open notebook's static copies carry a PNG
_STATIC_PNGS = """(() => window.jupyterapp.shell.currentWidget.context.model.toJSON().cells
  .flatMap(c => c.outputs || []).filter(o => o.data && o.data['application/vnd.plotly.v1+json'] && o.data['image/png'])
  .length)()"""


# anywidget (0.11) gives each model's front-end set-up 2 s (`AbortSignal.timeout(2000)`) and then drops every
# message the kernel sends that model; on 2 busy cores lesson 03's session panel lost its figure that way. This
# init script ends that budget at once for every model, as a page far busier than CI's would: the views must draw
# and follow the kernel anyway (their messages travel over the plain-widget channel, `widgets/_channel.py`).
_LATE_SETUP = """(() => {
  const timeout = AbortSignal.timeout.bind(AbortSignal);
  AbortSignal.timeout = (ms) => {
    if (ms !== 2000) return timeout(ms);
    const c = new AbortController();
    setTimeout(() => c.abort(new DOMException("set-up budget spent (test)", "TimeoutError")), 0);
    return c.signal;
  };
})();"""


def test_views_work_when_anywidget_gives_up_on_their_setup(lab, browser):
    """Every view draws, and a query change reaches the figure and the document pane, when anywidget has given
    up on every model's set-up (the failure behind lesson 03's blank session panel on busy CI cores)."""
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = _new_page(browser, 1000)
    page.add_init_script(_LATE_SETUP)
    blocked = _offline(page, base)
    try:
        views = _run_notebook(page, base, token, VIEWS_NOTEBOOK, "late")  # every view draws its plot
        single = views.nth(1)
        single.scroll_into_view_if_needed()
        detail, doc = _pane(single, 1), single.locator(".sl-document")
        page.wait_for_function("el => el.querySelectorAll('i').length > 0", arg=doc.element_handle(), timeout=30_000)
        title, text = detail.evaluate(_PANE_STATE)["title"], doc.inner_html()
        handle = single.locator(".widget-slider", has=page.locator(".widget-label", has_text="query")).first \
            .locator(".noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowLeft")
        _wait_title_change(page, detail, title)  # a patch of the figure arrived
        page.wait_for_function("([el, t]) => el.innerHTML !== t", arg=[doc.element_handle(), text],
                               timeout=30_000)  # the document pane's new HTML arrived
        single.screenshot(path=str(ARTIFACTS / "late.single.after.png"))
        _assert_no_errors(page, VIEWS_NOTEBOOK)
        assert not blocked, f"late set-up: the page tried to reach the network: {blocked[:5]}"
    finally:
        page.close()


def _check_saved_without_javascript(base: str, token: str, n_views: int, n_figures: int) -> None:
    """The saved .ipynb (read back from the server) shows every view to a reader that runs no JavaScript (GitHub,
    nbconvert): each static copy's text panels as HTML and each figure as a PNG; rendered by nbconvert with every
    script removed, the page holds those pictures and panels, and no figure is left as a text placeholder."""
    import base64
    import re
    import struct
    import urllib.request

    import nbformat
    from nbconvert import HTMLExporter

    with urllib.request.urlopen(f"{base}/api/contents/{VIEWS_NOTEBOOK}?content=1&token={token}") as r:
        nb = nbformat.from_dict(json.loads(r.read())["content"])
    outputs = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "display_data"]
    statics = [o for o in outputs if "sl-static'" in o["data"].get("text/html", "")]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o["data"]]
    assert len(statics) == n_views and len(figures) == n_figures, (len(statics), len(figures))
    for o in figures:
        png = base64.b64decode(o["data"].get("image/png", ""))
        assert png[:8] == b"\x89PNG\r\n\x1a\n", "a figure of the static copy has no PNG"
        w, h = struct.unpack(">II", png[16:24])
        layout = o["data"]["application/vnd.plotly.v1+json"]["layout"]
        assert (w, h) == (layout.get("width", w), layout["height"]) and len(png) > 8_000, (w, h, len(png))
    # the live views' own fallbacks add nothing (the static copy shows the panels once)
    assert all(o["data"].get("text/html", "") == "" for o in outputs if
               "application/vnd.jupyter.widget-view+json" in o["data"])
    page, _ = HTMLExporter().from_notebook_node(nb)
    page = re.sub(r"<script\b.*?</script>", "", page, flags=re.S | re.I)
    assert len(re.findall(r"<img [^>]*src=\"data:image/png;base64,", page)) >= n_figures
    assert "&lt;figure:" not in page and "<figure:" not in page  # no figure fell back to its text placeholder
    assert page.count("static copy: the live view needs a running kernel") == n_views
    assert "Chosen spans of query" in page and "evidence keys" in page  # explorer and debugger panels


def test_saved_notebook_shows_views_without_kernel(lab, browser):
    """Run, save, shut the kernel down, reopen: every view's figures and panels are still shown (the static
    copy), and no "Error displaying widget: model not found" line is visible."""
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = _new_page(browser, 1000)
    try:
        views = _run_notebook(page, base, token, VIEWS_NOTEBOOK, "saved")
        n_views, n_figures = views.count(), page.locator(".sl-view .sl-pane").count()
        # the static copy follows the view 2 s after its last change, with a picture of each figure (PNG)
        page.wait_for_function(_STATIC_PNGS + f" >= {n_figures}", timeout=120_000, polling=500)
        page.evaluate(_SAVE)
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)
        _check_saved_without_javascript(base, token, n_views, n_figures)
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        page.wait_for_timeout(500)
        page.goto(f"{base}/lab/tree/{VIEWS_NOTEBOOK}?token={token}&reset", wait_until="domcontentloaded")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_function(_KERNEL_IDLE, timeout=60_000)
        # every figure is shown: drawn by plotly from its JSON, or its picture (JupyterLab may prefer the PNG)
        page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output')].filter(o => o.offsetWidth"
                               " > 0 && (o.querySelector('.js-plotly-plot .main-svg') || [...o.querySelectorAll('img')]"
                               f".some(i => i.naturalWidth > 300))).length >= {n_figures}", timeout=60_000)
        # the widget manager has given up on the old models (its error nodes exist) …
        page.wait_for_function(f"() => document.querySelectorAll('.jp-OutputArea-output.jupyter-widgets').length"
                               f" >= {n_views}", timeout=60_000)
        notebook_text = page.locator(".jp-Notebook").inner_text()
        assert "model not found" not in notebook_text  # … and none of them is visible
        assert "Loading widget" not in notebook_text
        assert page.locator(".sl-view").count() == 0  # no live view: what shows is the static copy
        assert page.locator(".sl-static").count() == n_views
        assert "Chosen spans of query" in notebook_text  # the panels (span table) survived too
        page.screenshot(path=str(ARTIFACTS / "saved.reopened.png"), full_page=False)
    finally:
        page.close()
