"""Issue 16 in one run: every speed and correctness figure of the H200 round, then one table against the targets.

Runs the benchmark scripts beside it, each in its own process (a crash or an out-of-memory in one part does not
lose the others), writes their JSON under one folder and prints a Markdown table of the issue's targets with the
measured value and met / not met, also written as ``h200_summary.md`` beside the JSON:

    python bench/h200.py --out DIR                              # everything (~15 min on an H200)
    python bench/h200.py --out DIR --parts prefill decode       # a subset
    python bench/h200.py --out DIR --summary-only               # only the table, from JSON already in DIR

Parts (each script's own docstring says exactly what it measures):

=========  ==============================================================  ==================
part       what                                                            JSON
=========  ==============================================================  ==================
check      ``gpu_check.py``: Triton vs oracle, both presets, bf16/fp16,    gpu_check.json
           gradients, chunked, decode, graph replay
prefill    ``speed.py --mode prefill`` 16K–1M, dense side by side          speed_prefill.json
train      ``speed.py --mode train`` 16K–256K (dense side by side), 1M     speed_train.json
decode     ``speed.py --mode decode`` 128K and 1M (graph replay, L2        speed_decode.json
           flushed)
session    ``session_decode.py``: the public call, the decode entry, the   session_decode.json
           graph, and the tiny model's `Session` tokens/s at 128K and 1M
grads      ``model_grad_check.py``: bf16 whole-model gradients vs the      model_grad_check.json
           fp32 oracle, and a short training run's loss curves
=========  ==============================================================  ==================

Dense train-step time at 1M is extrapolated from an L² fit of the measured dense rows (it does not fit in the
time budget); the table says so where it is used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PREFILL_LENGTHS = [16384, 32768, 65536, 131072, 262144, 524288, 1048576]
TRAIN_LENGTHS = [16384, 32768, 65536, 131072, 262144]


def _commands(out: Path) -> dict[str, list[list[str]]]:
    """The command lines of each part; JSON lands in ``out`` (the scripts write under $OUT)."""
    py = sys.executable
    lengths = [str(n) for n in PREFILL_LENGTHS]
    return {
        "check": [[py, str(BENCH / "gpu_check.py"), "--no-timing"]],
        "prefill": [[py, str(BENCH / "speed.py"), "--mode", "prefill", "--reps", "2", "--lengths", *lengths,
                     "--json", "speed_prefill.json"]],
        "train": [[py, str(BENCH / "speed.py"), "--mode", "train", "--reps", "2", "--lengths",
                   *[str(n) for n in TRAIN_LENGTHS], "1048576", "--dense-max", str(TRAIN_LENGTHS[-1]),
                   "--json", "speed_train.json"]],
        "decode": [[py, str(BENCH / "speed.py"), "--mode", "decode", "--lengths", "131072", "1048576",
                    "--json", "speed_decode.json"]],
        "session": [[py, str(BENCH / "session_decode.py"), "--out", str(out / "session_decode.json"),
                     "--session-lengths", "131072,1048576"]],
        "grads": [[py, str(BENCH / "model_grad_check.py"), "--train-steps", "150"]],
    }


def run_parts(parts: list[str], out: Path) -> dict[str, dict]:
    """Run each part's commands; return {part: {"rc", "seconds", "log"}} and write each log beside the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OUT=str(out))
    status = {}
    for part in parts:
        start, rc = time.perf_counter(), 0
        log_path = out / f"{part}.log"
        with log_path.open("w") as log:
            for cmd in _commands(out)[part]:
                print(f"[h200] {part}: {' '.join(cmd[1:])}", flush=True)
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc:
                    break
        status[part] = {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "log": log_path.name}
        tail = log_path.read_text().splitlines()[-8:]
        print(f"[h200] {part}: rc {rc}, {status[part]['seconds']} s\n  " + "\n  ".join(tail), flush=True)
    return status


def _load(out: Path, name: str):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def _rows(data, mode: str) -> dict[int, dict]:
    if not data:
        return {}
    return {r["length"]: r for r in data.get("rows", []) if r.get("mode") == mode and "error" not in r}


def _dense_train_fit(rows: dict[int, dict]) -> float | None:
    """Least-squares c in dense_s ≈ c·L² over the measured dense train rows of ≥ 64K (None if none)."""
    pts = [(n, r["dense_s"]) for n, r in rows.items() if r.get("dense_s") and n >= 65536]
    if not pts:
        return None
    return sum(t * n * n for n, t in pts) / sum(float(n) ** 4 for n, _ in pts)


def summary(out: Path) -> list[dict]:
    """One row per target of issue 16: what was asked, what was measured, whether it is met (None: not measured)."""
    targets: list[dict] = []

    def add(target: str, measured: str | None, met: bool | None) -> None:
        targets.append({"target": target, "measured": measured or "not measured", "met": met})

    prefill = _rows(_load(out, "speed_prefill.json"), "prefill")
    one_m = prefill.get(1 << 20)
    add("prefill 1M ≤ 0.8 s and ≥ 22× dense",
        one_m and f"{one_m['ours_s']:.3f} s, {one_m['ratio']:.2f}× dense" if one_m and one_m.get("ratio") else
        one_m and f"{one_m['ours_s']:.3f} s", one_m and one_m["ours_s"] <= 0.8 and (one_m.get("ratio") or 0) >= 22)
    measured = sorted(n for n, r in prefill.items() if r.get("ratio"))
    if measured:
        faster = [n for n in measured if prefill[n]["ratio"] >= 1]
        crossover = min(faster) if faster and all(prefill[n]["ratio"] >= 1 for n in measured if n >= min(faster)) else None
        add("prefill crossover with dense at ≤ 16K",
            "ratios " + ", ".join(f"{n // 1024}K {prefill[n]['ratio']:.2f}" for n in measured),
            crossover is not None and crossover <= 16384)
    big = [(n, r["ours_s"]) for n, r in prefill.items() if n >= 131072]
    if len(big) >= 2:
        xs, ys = [math.log(n) for n, _ in big], [math.log(t) for _, t in big]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        add("prefill time exponent 128K→1M (reported)", f"{slope:.3f}", True)

    train = _rows(_load(out, "speed_train.json"), "train")
    fit = _dense_train_fit(train)
    for n, goal in ((32768, 1.0), (65536, 1.0), (131072, 1.0), (262144, 4.0), (1 << 20, 10.0)):
        row = train.get(n)
        if row is None:
            add(f"train step {n // 1024}K ≥ {goal:g}× dense", None, None)
            continue
        dense, note = row.get("dense_s"), ""
        if dense is None and fit is not None:
            dense, note = fit * n * n, " (dense extrapolated from its L² fit)"
        ratio = dense / row["ours_s"] if dense else None
        add(f"train step {n // 1024}K {'faster than' if goal == 1 else f'≥ {goal:g}×'} dense",
            f"{ratio:.2f}×{note}" if ratio else f"ours {row['ours_s']:.3f} s", ratio is not None and ratio > goal
            if goal == 1 else ratio is not None and ratio >= goal)
    if train:
        worst = max(train.values(), key=lambda r: r["ours_bwd_over_fwd"])
        add("backward ≤ 3× forward (every length)",
            f"max {worst['ours_bwd_over_fwd']:.2f} at {worst['length'] // 1024}K",
            all(r["ours_bwd_over_fwd"] <= 3 for r in train.values()))
        peaks = [(n, r["peak_extra_gb"], r["dense_peak_extra_gb"]) for n, r in sorted(train.items())
                 if r.get("dense_peak_extra_gb") is not None]
        if peaks:
            add("peak memory ≤ dense (every length)",
                ", ".join(f"{n // 1024}K {p:.2f}/{d:.2f} GB" for n, p, d in peaks), all(p <= d for _, p, d in peaks))

    decode = _rows(_load(out, "speed_decode.json"), "decode")
    row = decode.get(1 << 20)
    add("layer decode 1M ≤ 0.085 ms graphed and ≥ 3× dense",
        row and f"{row['ours_s'] * 1e3:.3f} ms, {row['ratio']:.2f}× dense",
        row and row["ours_s"] * 1e3 <= 0.085 and row["ratio"] >= 3)

    session = _load(out, "session_decode.json")
    if session:
        for s in session.get("session", []):
            if s.get("L") == 1 << 20 or s.get("L", 0) >= 1_000_000:
                auto = s["modes"]["auto"]
                tps = auto["tokens"] / auto["seconds"]
                add("tiny Session decode at 1M ≥ 1,500 tok/s (graph path)", f"{tps:,.0f} tok/s", tps >= 1500)
        for a in session.get("attention", []):
            if a.get("L") == 1 << 20 and "public_ms" in a and "graph_ms" in a:
                ratio = a["public_ms"] / a["graph_ms"]
                add("eager public single-step call ≤ 1.5× graph replay (1M)",
                    f"{a['public_ms']:.3f} vs {a['graph_ms']:.3f} ms ({ratio:.2f}×)", ratio <= 1.5)

    grads = _load(out, "model_grad_check.json")
    if grads:
        bf16 = [r for r in grads.get("rows", []) if r.get("run") == "triton-bf16" and r.get("reference") == "oracle-fp32"]
        if bf16:
            worst = max(r["max_grad_rel"] for r in bf16)
            add("bf16 autocast gradients within 2% of the fp32 oracle (max per parameter)", f"{worst:.1%}", worst <= 0.02)
    check = _load(out, "gpu_check.json")
    if check:
        rows = check.get("rows", [])
        ok = sum(bool(r.get("ok")) for r in rows)
        add("gpu_check.py passes (all presets, bf16/fp16, gradients)", f"{ok}/{len(rows)}", bool(rows) and ok == len(rows))
    return targets


def render(targets: list[dict]) -> str:
    lines = ["| target | measured | status |", "|---|---|---|"]
    for t in targets:
        status = "—" if t["met"] is None else "met" if t["met"] else "**not met**"
        lines.append(f"| {t['target']} | {t['measured']} | {status} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every part's JSON, log and the summary")
    parser.add_argument("--parts", nargs="+", choices=list(_commands(Path("."))), default=list(_commands(Path("."))))
    parser.add_argument("--summary-only", action="store_true", help="render the table from JSON already in --out")
    args = parser.parse_args()
    status = {}
    if not args.summary_only:
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench/h200.py needs a CUDA device (use --summary-only to render existing JSON)")
        status = run_parts(args.parts, args.out)
    targets = summary(args.out)
    table = render(targets)
    print(table)
    (args.out / "h200_summary.md").write_text(table)
    (args.out / "h200_summary.json").write_text(json.dumps({"parts": status, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
