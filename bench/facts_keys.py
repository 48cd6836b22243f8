"""Key discrimination: is the right fact picked when facts of the same kind stand beside it? (issue 13)

Session 6 found the prose-fact model copying *a* value of the right kind, often the wrong one: the first answer
byte is where a fact is picked (the rest is copied from the reached span). This probe measures that byte, with
teacher forcing, grouped by how many other facts of the same kind the row holds:

* ``fact_word`` / ``fact_name`` rows (one question; ``meta["n_distractors"]`` same-kind distractors);
* ``fact_quiz`` rows (a grid of same-kind facts, every one asked in turn): each asked value counts, with
  ``n_facts - 1`` distractors.

Both splits: "train" (phrasings and values the training saw, new rows) and "eval" (held-out phrasings and
values). Prints a table and writes JSON::

    python bench/facts_keys.py --model runs/facts_s6C --length 512 --rows 64 --out keys.json [--device cuda]
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab.loaders import open_model
from superlinear_lab.train import loss_weights

TASKS = ("fact_word", "fact_name", "fact_quiz")
SEED_BASE = {"train": 900_000, "eval": 20_000}  # train-split rows far from any training step's seeds


def bucket(n: int) -> str:
    return str(n) if n < 3 else "3+"


@torch.no_grad()
def first_bytes(model, examples: list[D.Example], device: str) -> list[list[bool]]:
    """Per example, per asked value: is the argmax at the query before the value's first byte that byte?"""
    ids, _, first = loss_weights(examples, device)
    logits = model(ids)[:, :-1]
    right = logits.argmax(-1) == ids[:, 1:]
    return [right[b][first[b].bool()].tolist() for b in range(len(examples))]


def probe(model, length: int, rows: int, device: str, batch: int = 8) -> dict:
    """{split: {task: {bucket: [right, total]}}} over `rows` rows per task and split."""
    out: dict = {}
    for split, base in SEED_BASE.items():
        for task in TASKS:
            agg = collections.defaultdict(lambda: [0, 0])
            exs = [D.make_example(task, length, base + i, split) for i in range(rows)]
            for b0 in range(0, rows, batch):
                chunk = exs[b0:b0 + batch]
                for ex, hits in zip(chunk, first_bytes(model, chunk, device)):
                    for key in (bucket(ex.meta["n_distractors"]), "all"):
                        agg[key][0] += sum(hits)
                        agg[key][1] += len(hits)
            out.setdefault(split, {})[task] = dict(sorted(agg.items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", default="runs/corpus", help="filler text folder (superlinear_lab.corpus)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.corpus and Path(args.corpus).exists():
        D.use_corpus(args.corpus)
    model = open_model(args.model, device=args.device, backend="torch")
    result = probe(model, args.length, args.rows, args.device)
    for split, tasks in result.items():
        for task, cells in tasks.items():
            row = "  ".join(f"{k}: {r}/{n} ({100 * r / max(n, 1):.0f}%)" for k, (r, n) in cells.items())
            print(f"{split:5} {task:10} {row}")
    Path(args.out).write_text(json.dumps({"model": str(args.model), "length": args.length, "rows": args.rows,
                                          "first_byte_by_distractors": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
