"""bench/facts_table.py's model-card table from hand-written evaluation JSON (no model, no GPU)."""
import json

from helpers import load_bench


def _facts_table():
    return load_bench("facts_table")


def _row(acc, recall, chance=0.5, first=None):
    return {"accuracy": acc, "byte_accuracy": acc, "first_byte_accuracy": first, "recall_any": recall,
            "chance_any": chance}


def _report():
    lengths = ("4096", "8192")
    return {"suites": {"m": {
        "fact_word": {n: _row(0.95, 0.98) for n in lengths},  # meets >= 90 % and recall >= 0.97 at both lengths
        "fact_name": {"4096": _row(0.95, 0.98), "8192": _row(0.95, 0.96, 0.25)},  # recall 0.96 < 0.97 at 8K
        "fact_date": {n: _row(0.10, 0.90) for n in lengths},  # no target: reported
        "niah": {"4096": _row(1.0, 1.0)},  # 8K missing: not met
    }}}


def test_card_table_cells_targets_and_status():
    ft = _facts_table()
    lines = ft.card_table(_report(), "m").splitlines()
    assert lines[0] == "| suite | 4K (1×) | 8K (2×) | target | status |"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert list(rows) == ["word", "name", "date", "NIAH (5-digit needle)"]  # CARD_SUITES order, present suites only
    assert rows["word"] == "| word | 95 % · 0.98 (0.50) | 95 % · 0.98 (0.50) | ≥ 90 %, recall ≥ 0.97 | met |"
    assert rows["name"].endswith("| 95 % · 0.96 (0.25) | ≥ 90 %, recall ≥ 0.97 | **not met** |")
    assert rows["date"].endswith("| – | reported |")
    assert rows["NIAH (5-digit needle)"] == "| NIAH (5-digit needle) | 100 % · 1.00 (0.50) | – | ≥ 99 % | **not met** |"
    plain = ft.card_table(_report(), "m", targets=False).splitlines()
    assert plain[0] == "| suite | 4K (1×) | 8K (2×) |" and plain[2] == "| word | 95 % · 0.98 (0.50) | 95 % · 0.98 (0.50) |"
    # a model trained at 1,024 tokens: 4K is 4×, not 1× (the record of the longest training length decides)
    assert ft.card_table({**_report(), "longest_training_length": 1024}, "m").splitlines()[0] == \
        "| suite | 4K (4×) | 8K (8×) | target | status |"
    assert ft.card_table({**_report(), "longest_training_length": 8192}, "m").splitlines()[0] == \
        "| suite | 4K (0.5×) | 8K (1×) | target | status |"


def test_detail_table_marks_a_missing_first_byte():
    ft = _facts_table()
    table = ft.table(_report(), "m")
    assert "| fact_word | 95 / 95 / – · 0.98 (0.50) |" in table
    report = json.loads(json.dumps(_report()))
    report["suites"]["m"]["fact_word"]["4096"]["first_byte_accuracy"] = 0.5
    assert "| fact_word | 95 / 95 / 50 · 0.98 (0.50) |" in ft.table(report, "m")
