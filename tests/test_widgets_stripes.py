"""Controller tests for `StripeExplorer` (no browser): every action changes state, errors are reported in the
view and leave the state unchanged, the vectorised geometry equals the kernels' `query_geometry`, and the thin
widget follows the controller."""
from __future__ import annotations

import pytest

from superlinear_kernels import SpanConfig, query_geometry
from superlinear_lab.widgets import StripeExplorer, stripe_geometry

CONFIGS = {
    "default": SpanConfig.default(),
    "release": SpanConfig.release(),
    "bf1-ff1-s3": SpanConfig(sw_index=3, backward_factor=1.0, forward_factor=1.0),
    "N3": SpanConfig(search_power=1 / 3, sw_index=0),
    "p055-s0": SpanConfig(search_power=0.55, span_power=0.55, backward_factor=3.0, forward_factor=1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("q", [0, 1, 2, 16, 17, 21, 100, 898, 2031, 2033, 2999])
def test_vectorised_geometry_equals_query_geometry(name, q):
    cfg = CONFIGS[name]
    got, ref = stripe_geometry(cfg, q), query_geometry(cfg, q)
    cands = ref.candidates
    assert got.stripes.tolist() == [s.index for s in cands]
    assert got.anchors.tolist() == [s.anchor for s in cands]
    assert got.qstart.tolist() == [s.qstart for s in cands]
    assert got.qend.tolist() == [s.qend for s in cands]
    assert got.window == ref.window
    assert list(got.union) == ref.covered()
    assert got.first_uncovered == ref.first_uncovered()
    assert (got.backward_len, got.forward_len) == (ref.backward_len, ref.forward_len)


def test_set_query_changes_state_and_figure():
    ex = StripeExplorer(SpanConfig.default(), query=100)
    title = ex.static().layout.title.text
    assert ex.set_query(2000) and ex.query == 2000 and ex.error is None
    assert ex.static().layout.title.text != title
    assert "q = 2,000" in ex.summary()


@pytest.mark.parametrize("bad", [-1, 1 << 20, 1.5, "10", True])
def test_bad_query_is_reported_and_state_kept(bad):
    ex = StripeExplorer(query=100)
    assert not ex.set_query(bad)
    assert ex.query == 100 and ex.error and "q=" in ex.error
    assert ex.set_query(50) and ex.error is None  # a good action clears the error


def test_breaking_coverage_shows_the_first_gap_in_red():
    """docs/algorithm.md §1.8 test vector: N=2, b_f=1.9 misses key 0 at q=898."""
    ex = StripeExplorer(SpanConfig.default(), query=1000)
    assert ex.coverage_report.ok
    assert not ex.go_to_gap() and "no gap" in ex.error
    assert ex.set_params(backward_factor=1.9)
    assert ex.cfg.backward_factor == 1.9 and ex.coverage_report.first_gap == (898, 0)
    assert "BROKEN" in ex.summary()
    assert ex.go_to_gap() and ex.query == 898 and ex.geometry.first_uncovered == 0
    fig = ex.static()
    miss = [t for t in fig.data if t.name == "unreachable keys"][0]
    assert 0 in [x for x in miss.x if x is not None]
    assert any(shape.x0 == 0 for shape in fig.layout.shapes)  # the dashed red line at key 0
    assert "NOT reachable" in fig.layout.title.text


def test_sw_and_forward_vector():
    """docs/algorithm.md §1.8: N=2, b_f=1, f_f=1, σ=3 misses key 0 at q=21."""
    ex = StripeExplorer(SpanConfig.default().replace(backward_factor=1.0, forward_factor=1.0), query=30)
    assert ex.coverage_report.first_gap == (21, 0)


@pytest.mark.parametrize("changes, message", [
    ({"span_power": 1.5}, "span_power"),
    ({"backward_factor": 0}, "backward_factor"),
    ({"search_power": 0.123456789}, "search_power"),
    ({"bogus": 1}, "unknown parameter"),
])
def test_bad_params_are_reported_and_state_kept(changes, message):
    ex = StripeExplorer(query=100)
    before = ex.cfg
    assert not ex.set_params(**changes)
    assert ex.cfg == before and message in ex.error


def test_presets_axis_and_errors():
    ex = StripeExplorer(query=100_000)
    assert ex.use_preset("release") and ex.cfg == SpanConfig.release()
    assert ex.keys_per_query() == 3 * (ex.geometry.backward_len + ex.geometry.forward_len + 1) + 2032
    assert not ex.use_preset("nope") and "preset" in ex.error and ex.cfg == SpanConfig.release()
    assert ex.set_x_axis("distance") and ex.static().layout.xaxis2.type == "log"
    assert not ex.set_x_axis("sideways") and ex.x_axis == "distance"


def test_release_worked_numbers():
    """docs/algorithm.md §1.9 table: at t = 2^20 the release preset reads at most 26,611 keys with 1,983 stripes (B = 6144, Fw = 2048: the exact ceiling)."""
    ex = StripeExplorer(SpanConfig.release(), query=(1 << 20) - 1)
    assert len(ex.geometry.stripes) == 1983 and ex.keys_per_query() == 26_611


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError):
        StripeExplorer("default")
    with pytest.raises(ValueError):
        StripeExplorer(max_query=1)
    with pytest.raises(ValueError):
        StripeExplorer(query=-5)


def test_widget_follows_controller_and_controls_drive_it():
    ex = StripeExplorer(SpanConfig.default(), query=1000)
    ex.view  # builds the ipywidgets view
    fw = ex._view.figure_widgets[0]
    controls = ex._controls
    controls["backward_factor"].value = 1.9  # as if the user dragged the slider
    assert ex.cfg.backward_factor == 1.9 and "BROKEN" in ex._view.status.value
    assert controls["gap"].disabled is False
    controls["gap"].click()
    assert ex.query == 898 and controls["query_text"].value == 898
    assert "898" in fw.figure.layout.title.text
    controls["query_text"].value = 500
    assert ex.query == 500 and "500" in fw.figure.layout.title.text
    assert not ex.set_params(span_power=2.0)
    assert "span_power" in ex._view.status.value  # the error is shown in the view, not only in the log


def test_static_fallback_and_html_export(tmp_path):
    ex = StripeExplorer(query=300)
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "q = 300" in bundle["text/plain"]
    path = ex.to_html(tmp_path / "stripes.html")
    text = path.read_text()
    assert "<script src=" not in text  # nothing is fetched: plotly.js is inlined, not linked
    assert "Plotly.newPlot" in text or "Plotly.react" in text
    assert len(text) > 3_000_000  # plotly.js itself is inlined


def test_figure_size_stays_bounded_for_long_contexts():
    """Thousands of stripes are one trace each for spans and anchors, not one trace per stripe."""
    ex = StripeExplorer(SpanConfig.default().replace(search_power=2 / 3), query=(1 << 20) - 1)
    fig = ex.static()
    assert len(fig.data) == 6 and len(ex.geometry.stripes) > 10_000


def test_kernels_do_not_import_views():
    """Arrows go notebooks → superlinear_lab → superlinear_kernels: the kernels never load widget libraries."""
    import subprocess
    import sys

    code = ("import sys, superlinear_kernels; "
            "bad = [m for m in ('ipywidgets', 'plotly', 'anywidget', 'superlinear_lab') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_html_export_has_an_offline_query_slider(tmp_path):
    ex = StripeExplorer(SpanConfig.default(), query=500, max_query=4096)
    text = ex.to_html(tmp_path / "stripes.html").read_text()
    assert "<script src=" not in text and '"sliders"' in text
    assert text.count('"method":"animate"') >= 16 and ex.query == 500  # the export leaves the state alone
    with pytest.raises(ValueError):
        ex.to_html(tmp_path / "bad.html", queries=[5000])
