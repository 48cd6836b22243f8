"""Markdown table of a `bench/facts_gpu.py` evaluation (facts_eval.json): one row per suite, one column per length,
cells "exact / byte / first-byte accuracy % · routing recall (chance)".

    python bench/facts_table.py results/facts_eval.json [--model new]
"""
from __future__ import annotations

import argparse
import json


def cell(row: dict) -> str:
    pct = lambda x: f"{100 * x:.0f}"  # noqa: E731
    return (f"{pct(row['accuracy'])} / {pct(row['byte_accuracy'])} / {pct(row['first_byte_accuracy'])} · "
            f"{row['recall_any']:.2f} ({row['chance_any']:.2f})")


def table(report: dict, model: str) -> str:
    suites = report["suites"][model]
    lengths = sorted({int(n) for rows in suites.values() for n in rows})
    lines = ["| suite | " + " | ".join(f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for task, rows in suites.items():
        lines.append(f"| {task} | " + " | ".join(cell(rows[str(n)]) if str(n) in rows else "–" for n in lengths)
                     + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--model", help="which model's suites (default: the first)")
    args = p.parse_args()
    report = json.loads(open(args.report).read())
    model = args.model or next(iter(report["suites"]))
    print(table(report, model))
    if "bits_per_byte" in report:
        print("\nbits per byte:", report["bits_per_byte"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
