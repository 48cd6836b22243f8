"""bench/h200.py's table of issue-16 targets, from hand-written JSON (no GPU, no timing thresholds)."""
import json

from helpers import load_bench


def _h200():
    return load_bench("h200")


def _train_row(n, ours, dense, bwd_over_fwd=2.0, peak=1.0, dense_peak=2.0):
    return {"mode": "train", "length": n, "ours_s": ours, "dense_s": dense, "ours_bwd_over_fwd": bwd_over_fwd,
            "peak_extra_gb": peak, "dense_peak_extra_gb": None if dense is None else dense_peak}


def test_targets_from_json(tmp_path):
    h200 = _h200()
    # dense 64K..256K follow 1e-9·L² exactly, so the 1M dense time is extrapolated as 1e-9·(2^20)² = 1099.5 s
    rows = [_train_row(n, 1.0, 1e-9 * n * n) for n in (65536, 131072, 262144)]
    rows.append(_train_row(32768, 2.0, 1e-9 * 32768 ** 2, bwd_over_fwd=3.5))
    rows.append(_train_row(1 << 20, 100.0, None))
    (tmp_path / "speed_train.json").write_text(json.dumps({"rows": rows}))
    prefill = [{"mode": "prefill", "length": n, "ours_s": t, "ratio": r}
               for n, t, r in ((16384, 0.01, 0.9), (32768, 0.02, 1.2), (131072, 0.08, 3.0), (1 << 20, 0.75, 23.0))]
    (tmp_path / "speed_prefill.json").write_text(json.dumps({"rows": prefill}))
    table = {t["target"]: t for t in h200.summary(tmp_path)}

    one_m = table["train step 1024K ≥ 10× dense"]
    assert one_m["measured"].startswith("11.00×") and "extrapolated" in one_m["measured"] and one_m["met"]
    assert table["train step 256K ≥ 4× dense"]["met"]  # 68.7 s dense / 1 s ours
    assert table["train step 32K faster than dense"]["met"] is False  # 1.07 s dense / 2 s ours
    assert not table["backward ≤ 3× forward (every length)"]["met"]  # 3.5 at 32K
    assert table["peak memory ≤ dense (every length)"]["met"]
    assert table["prefill 1M ≤ 0.8 s and ≥ 22× dense"]["met"]
    assert table["prefill crossover with dense at ≤ 16K"]["met"] is False  # 16K is 0.9×
    assert table["layer decode 1M ≤ 0.085 ms graphed and ≥ 3× dense"]["met"] is None  # not measured
    assert "**not met**" in h200.render(list(table.values()))
