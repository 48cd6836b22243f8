"""Markdown tables of a `bench/facts_gpu.py` evaluation (facts_eval.json).

* default: one row per suite, one column per length, cells "exact / byte / first-byte accuracy % · routing recall
  (chance)" (BENCHMARKS.md);
* ``--card``: the table for a prose-fact model's card (issue 13): exact answer accuracy and routing recall with the
  chance-recall baseline beside it, issue 13's target per suite, and whether every length meets it
  (`tests/test_facts_table.py`).

    python bench/facts_table.py results/facts_eval.json [--model new] [--card]
"""
from __future__ import annotations

import argparse
import json

# suite -> (card label, target: (min exact accuracy, min recall) or None). Issue 13's Must-show: word/name/phrase
# >= 90 % and recall >= 0.97; number needles (the digit NIAH) >= 99 %; multi_key >= 90 %; multi-hop >= 80 %.
CARD_SUITES = {
    "fact_word": ("word", (0.90, 0.97)),
    "fact_name": ("name", (0.90, 0.97)),
    "fact_phrase": ("phrase", (0.90, 0.97)),
    "fact_date": ("date", None),
    "fact_number": ("number", None),
    "fact_multi_key": ("multi_key (prose, near-duplicate owners)", (0.90, None)),
    "fact_hop": ("hop (prose, two facts)", (0.80, None)),
    "niah": ("NIAH (5-digit needle)", (0.99, None)),
    "multi_key": ("multi_key (digits)", (0.90, None)),
    "multi_hop": ("multi_hop (digits)", (0.80, None)),
}


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _lengths(suites: dict) -> list[int]:
    return sorted({int(n) for rows in suites.values() for n in rows})


def cell(row: dict) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.0f}"  # noqa: E731  (None: not recorded for that cell)
    return (f"{pct(row['accuracy'])} / {pct(row['byte_accuracy'])} / {pct(row['first_byte_accuracy'])} · "
            f"{row['recall_any']:.2f} ({row['chance_any']:.2f})")


def table(report: dict, model: str) -> str:
    suites = report["suites"][model]
    lengths = _lengths(suites)
    lines = ["| suite | " + " | ".join(_length_label(n) for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for task, rows in suites.items():
        lines.append(f"| {task} | " + " | ".join(cell(rows[str(n)]) if str(n) in rows else "–" for n in lengths)
                     + " |")
    return "\n".join(lines)


def _meets(row: dict, target) -> bool:
    acc, recall = target
    return row["accuracy"] >= acc and (recall is None or row["recall_any"] >= recall)


def card_table(report: dict, model: str, targets: bool = True) -> str:
    """The card's table: per suite (in `CARD_SUITES` order, those present), per length "exact % · recall
    (chance)", and with `targets` the target and "met"/"not met" (met only when every length meets it). Lengths are
    labelled as multiples of ``report["longest_training_length"]`` (the model's 1×; the shipping step records it)
    or, without it, of the first length."""
    suites = report["suites"][model]
    lengths = _lengths(suites)
    trained = report.get("longest_training_length", lengths[0])
    head = ["suite"] + [f"{_length_label(n)} ({n / trained:g}×)" for n in lengths]
    head += ["target", "status"] if targets else []
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task, (label, target) in CARD_SUITES.items():
        if task not in suites:
            continue
        rows = suites[task]
        cells = [f"{100 * rows[str(n)]['accuracy']:.0f} % · {rows[str(n)]['recall_any']:.2f} "
                 f"({rows[str(n)]['chance_any']:.2f})" if str(n) in rows else "–" for n in lengths]
        if target is None:
            goal, status = "–", "reported"
        else:
            goal = f"≥ {100 * target[0]:.0f} %" + (f", recall ≥ {target[1]:.2f}" if target[1] is not None else "")
            status = "met" if all(str(n) in rows and _meets(rows[str(n)], target) for n in lengths) else "**not met**"
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {goal} | {status} |" if targets else " |"))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--model", help="which model's suites (default: the first)")
    p.add_argument("--card", action="store_true", help="the model card's table (accuracy · recall (chance), targets)")
    args = p.parse_args()
    report = json.loads(open(args.report).read())
    model = args.model or next(iter(report["suites"]))
    print(card_table(report, model) if args.card else table(report, model))
    if "bits_per_byte" in report and not args.card:
        print("\nbits per byte:", report["bits_per_byte"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
