"""Why word-valued facts get 0 % answer accuracy: two CPU measurements (issue 13; BENCHMARKS.md #13).

    OMP_NUM_THREADS=1 python bench/facts_diagnose.py --model tiny --model runs/facts_export --seen-phrasings \
        --out bench/facts_diagnose.json

1. **Letter copying in the digit format.** Held-out NIAH rows in exactly the training format of `tiny` ("The magic
   number for kadomi-ruvela is V." … "The magic number for kadomi-ruvela is "), with V five digits, an English word,
   a capitalised word or five random letters. Same prefix, same position: only the value's alphabet changes.
2. **Which held-out factor breaks a word fact.** ``fact_word`` rows built with the train or eval split for each of
   phrasings (statement and question templates), values (word lists) and filler text separately.

Answer accuracy (greedy exact match), answer-byte accuracy and first-byte accuracy (the byte that must come from the
evidence), plus routing recall; 16 rows per cell, `--length` tokens (default 512).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import facts as F
from superlinear_lab.evaluate import run_examples, summarize
from superlinear_lab.loaders import open_model

# The train banks as they stood when runs/facts_export was trained (session 4's first slice): the first templates of
# each kind; the later ones were added after it (commit 3d44fe8). `--seen-phrasings` restricts "train" to these.
SEEN = {"statements": {"name": 4, "word": 3, "phrase": 3, "date": 3, "number": 3}, "questions": 2}
KEYS = ("accuracy", "byte_accuracy", "first_byte_accuracy", "recall_any", "chance_any")


def niah_value(length: int, seed: int, alphabet: str) -> D.Example:
    rng = D._rng("niah_value", length, seed, "eval", alphabet)
    key = D._key(rng)
    words = F.vocabulary("words.txt", "eval")
    value = {"digits": str(rng.randrange(10000, 100000)), "word": rng.choice(words),
             "Word": rng.choice(words).capitalize(),
             "letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))}[alphabet]
    b = D._Builder(rng, length, "eval")
    b.needle(rng.random(), f"The magic number for {key} is {value}.", [value])
    return b.build(f"\nWhat is the magic number for {key}? The magic number for {key} is ", value, lambda j: [0],
                   f"niah_{alphabet}", {"value": value})


def word_fact(length: int, seed: int, phrasing: str, values: str, text: str) -> D.Example:
    """fact_word with phrasings from split `phrasing`, values from split `values`, filler from split `text`."""
    vocabulary, banks = F.vocabulary, (F.STATEMENTS, F.QUESTIONS)
    saved = [dict(bank) for bank in banks]
    try:
        F.vocabulary = lambda resource, split: vocabulary(resource, values)
        for bank in banks:
            bank[text] = bank[phrasing]
        return D.make_example("fact_word", length, seed, text)
    finally:
        F.vocabulary = vocabulary
        for bank, old in zip(banks, saved):
            bank.clear()
            bank.update(old)


def cell(model, examples) -> dict:
    s = summarize(run_examples(model, examples, batch_size=8), [i for i, _ in model.routing_layers()])
    return {k: round(s[k], 4) for k in KEYS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="shipped name or model folder (repeatable)")
    p.add_argument("--corpus", default="runs/corpus")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--seen-phrasings", action="store_true",
                   help="train phrasings = only those of SEEN (what the session-4 slice was trained with)")
    args = p.parse_args()
    D.use_corpus(args.corpus)
    if args.seen_phrasings:
        for kind, n in SEEN["statements"].items():
            F.STATEMENTS["train"][kind] = F.STATEMENTS["train"][kind][:n]
            F.QUESTIONS["train"][kind] = F.QUESTIONS["train"][kind][:SEEN["questions"]]
    report = {"length": args.length, "rows": args.rows, "torch": torch.__version__,
              "seen_phrasings": args.seen_phrasings, "models": {}}
    for name in args.model:
        model = open_model(name, backend="torch")
        rows = {}
        for alphabet in ("digits", "word", "Word", "letters"):
            rows[f"niah_{alphabet}"] = cell(model, [niah_value(args.length, s, alphabet) for s in range(args.rows)])
        for phrasing, values, text in (("train", "train", "train"), ("eval", "train", "train"),
                                       ("train", "eval", "train"), ("train", "train", "eval"),
                                       ("eval", "eval", "eval")):
            label = f"fact_word phrasing={phrasing} values={values} text={text}"
            rows[label] = cell(model, [word_fact(args.length, 900_000 + s, phrasing, values, text)
                                       for s in range(args.rows)])
        for label, row in rows.items():
            print(name, label, row, flush=True)
        report["models"][name] = rows
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
