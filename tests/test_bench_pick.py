"""The pick rules the GPU request scripts use between phases (bench/h200_s11/script_C.sh): which backward setting of
a bwd_tune run beats the defaults, and whether train_variants' command-line variant beat the defaults. No GPU."""
import json
import subprocess
import sys
from pathlib import Path

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


def test_backward_pick_needs_a_one_percent_win_over_the_defaults(tmp_path):
    tune = load_bench("bwd_tune")
    rows = [{"setting": {}, "backward_s": 1.000},
            {"setting": {"window.KV_ROTATE": 0}, "backward_s": 0.995},  # 0.5 % faster: not enough
            {"setting": {"window.KV_ROTATE": 132}, "backward_s": 0.980},
            {"setting": {"span.KV_WARPS": 8}, "backward_s": 0.970},
            {"setting": {"span.KV_TILE": 32}, "error": "out of resources"},
            {"setting": {"span.DQ_WARPS": 8}, "backward_s": 1.200}]
    assert tune.faster_than_defaults(rows) == {"span.KV_WARPS": 8}
    assert tune.faster_than_defaults(rows[:3]) == {"window.KV_ROTATE": 132}
    assert tune.faster_than_defaults(rows[:2]) is None
    assert tune.faster_than_defaults(rows[1:]) is None  # no defaults row: nothing to beat
    path = tmp_path / "bwd.json"
    path.write_text(json.dumps({"rows": rows[:3]}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bwd_tune.py"), "--pick", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["window.KV_ROTATE=132"]  # words for --set


def test_faster_variant_sums_128k_and_256k():
    variants = load_bench("train_variants")

    def row(variant, n, s):
        return {"variant": variant, "length": n, "ours_s": s}

    rows = [row("new", 131072, 1.0), row("new", 262144, 3.0), row("set", 131072, 0.8), row("set", 262144, 3.1),
            row("new again", 131072, 9.0), row("set", 32768, 9.0)]
    assert variants.faster_variant(rows) == "set"  # 3.9 s against 4.0 s; 32K and other variants do not count
    rows[3] = row("set", 262144, 3.3)
    assert variants.faster_variant(rows) == "new"
    assert variants.faster_variant(rows[:3]) == "new"  # 'set' lacks 256K
