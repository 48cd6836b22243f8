"""The routing report: a document traced through the model, written as one offline HTML file; its CLI."""
from __future__ import annotations

import re

import pytest

from superlinear_lab.cli import main
from superlinear_lab.report import routing_report, trace_document


def test_report_is_self_contained_and_lists_every_layer(model, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 30
    out = routing_report(text, tmp_path / "r.html", model, max_tokens=1000, progress=False)
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inlined: the page loads nothing
    assert page.count("Plotly.newPlot") >= 3  # routing map, query detail, coverage figures
    for index in model.cfg.attention_layers:
        assert f"layers.{index}.routing" in page
    assert "1,000 tokens" in page


def test_trace_document_truncates_and_records_all_queries(model):
    trace, session = trace_document("abc " * 100, model, max_tokens=123, progress=False)
    assert trace.length == 123 == session.cursor
    assert trace.queries.tolist() == list(range(123))
    with pytest.raises(ValueError, match="max_tokens"):
        trace_document("abc", model, max_tokens=0)
    with pytest.raises(ValueError, match="text"):
        trace_document("", model)


def test_report_cli(tmp_path, capsys):
    out = tmp_path / "pydoc.html"
    assert main(["report", "pydoc", "--max-tokens", "1K", "--backend", "torch", "-o", str(out)]) == 0
    assert re.search(r"wrote .*pydoc\.html", capsys.readouterr().out)
    assert "1,024 tokens" in out.read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x.html")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    doc = tmp_path / "doc.txt"
    doc.write_text("Alpha beta. " * 40 + "The code word is heron.\n" + "Gamma delta. " * 40 + "The code word is ")
    marked = tmp_path / "marked.html"
    assert main(["report", str(doc), "--evidence", "heron", "--backend", "torch", "-o", str(marked)]) == 0
    page = marked.read_text(encoding="utf-8")
    assert "<h2>Evidence" in page and "<code>heron</code>" in page
    assert "superlinear-lab/small" in page  # the CLI's default model for real documents
    assert main(["report", str(doc), "--evidence", "osprey", "-o", str(tmp_path / "y.html")]) == 2
    assert "osprey" in capsys.readouterr().err


def test_exported_trace_uids_are_css_safe(model):
    # plotly.js builds CSS selectors from trace uids; a ':' or '.' in one blanked the whole exported map.
    from superlinear_lab.widgets import CoverageMap, RoutingExplorer

    trace, _ = trace_document("needle in a haystack " * 40, model, progress=False)
    for view in (RoutingExplorer(trace, trace.tokens), CoverageMap(trace)):
        for fig in view.figures():
            for t in fig.data:
                assert t.uid is None or re.fullmatch(r"[A-Za-z0-9_-]+", t.uid), f"{view.title}: uid {t.uid!r}"


def test_report_marks_evidence_for_every_layer_and_head_and_names_the_model(model, tmp_path):
    text = ("Alpha beta gamma delta. " * 20 + "The magic number for Apache is 4817.\n" + "Epsilon zeta eta. " * 20
            + "What is the magic number for Apache? The magic number for Apache is ")
    out = routing_report(text, tmp_path / "ev.html", model, evidence=["4817"], progress=False)
    page = out.read_text(encoding="utf-8")
    assert "superlinear-lab/tiny" in page and "weights sha256" in page  # the model and its weights
    assert "<code>4817</code>" in page
    heads = model.cfg.n_heads
    section = _evidence_section(page)
    for index in model.cfg.attention_layers:  # one table row per layer and head
        assert len(re.findall(rf"<td[^>]*>layers\.{index}\.routing</td>", section)) == heads
    assert "covering stripes" in page and "reached" in page
    with pytest.raises(ValueError, match="not found"):
        routing_report(text, tmp_path / "x.html", model, evidence=["no such text"], progress=False)


def test_report_page_of_an_unnamed_trace_says_so(tmp_path):
    from superlinear_kernels import SpanConfig
    from superlinear_lab.report import write_report
    from superlinear_lab.widgets.demo import demo_trace

    doc = "one two three four five six seven eight nine ten " * 8
    tr = demo_trace(doc, SpanConfig.default(), profile_queries=[len(doc) - 1])
    page = write_report(tr, tmp_path / "d.html", evidence=["five six"]).read_text(encoding="utf-8")
    rows = re.findall(r"<td[^>]*>layers\.\d+\.routing</td>", _evidence_section(page))
    assert "unknown model" in page and len(rows) == sum(tr.layer(i).heads for i in tr.layers)


def _evidence_section(page: str) -> str:
    start = page.index("<h2>Evidence")
    return page[start:page.index("<h2>", start + 1)]
