"""bench/cpu_trace.py's `--with`: the time of a model shape that is not shipped (random weights, the shipped config
with some fields changed). A bug here would put a wrong shape's time in the model card's size argument."""
from __future__ import annotations

import sys
from pathlib import Path

from helpers import load_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # cpu_trace imports cpu_torch from there
CT = load_bench("cpu_trace")


def test_with_builds_the_changed_shape_and_traces_it(one_thread):
    doc = CT.reference_document(300)
    shipped, _ = CT.run(doc, 128, "tiny")
    wider, session = CT.run(doc, 128, "tiny", {"d_model": 256, "pattern": "M*M*M*M*"})
    assert session.model.cfg.d_model == 256 and session.model.cfg.pattern == "M*M*M*M*"
    # counted by hand from the layer shapes would duplicate the model; the shipped count and the trace suffice:
    assert wider["parameters"] > shipped["parameters"] == 2_813_964
    assert len(wider["trace_layers"]) == 4 and len(shipped["trace_layers"]) == 3  # one routed layer per '*'
    assert wider["tokens"] == shipped["tokens"] == 300
