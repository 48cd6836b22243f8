"""Facts planted in whole real documents: does a model answer them? (issue 13)

The evaluation suites plant facts in windows of the corpus, each statement on a line of its own. A user's
document is one whole text with the fact somewhere inside it (notebook 04). This probe takes whole Python
reference topics (`pydoc_data.topics`, present offline on every install) and, per try, plants one fact of a kind
(word, name or phrase) plus `--distractors` facts of the same kind, each at a random place in the document — at
the start of a line, or inside a paragraph right after a sentence (``--where``) — then asks the fact at the end.

Splits (`superlinear_lab.data`'s rule): ``eval`` uses the held-out topics with the held-out statement and
question templates and values (text and phrasings no training saw); ``train`` uses training topics with the
training banks (new rows: for model selection without touching the held-out split).

Accuracy is exact match of the whole value under teacher forcing (the same as greedy decoding being right);
``first_byte_accuracy`` is the byte where a fact is picked; ``recall_any`` is routing recall of the value's bytes,
with ``chance_any`` (random span choice) beside it. Writes JSON and prints one line per kind::

    python bench/facts_realdoc.py --model small --split eval --tries 64 --out realdoc.json [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import facts as F
from superlinear_lab.evaluate import run_examples, summarize
from superlinear_lab.loaders import open_model

WHERE = ("line", "sentence")
MIN_PLACES = 5  # room for a fact and up to four distractors in either kind of place
MIN_BYTES, MAX_BYTES = 1_500, 70_000  # whole topics, 1.5K-63K bytes (notebook 04's `class` topic: 2,982)


def documents(split: str) -> list[tuple[str, str]]:
    """(name, text) of the Python reference topics of `split` between MIN_BYTES and MAX_BYTES with at least
    MIN_PLACES places of each kind, sorted by name."""
    from pydoc_data.topics import topics

    docs = [(name, body.strip()) for name, body in sorted(topics.items())
            if D._held_out(name) == (split == "eval") and MIN_BYTES <= len(body.strip().encode()) <= MAX_BYTES]
    return [(name, text) for name, text in docs if all(len(places(text, w)) >= MIN_PLACES for w in WHERE)]


def places(text: str, where: str) -> list[int]:
    """Character offsets where a statement may go: line starts, or the start of a sentence after another one
    (a full stop, one or two spaces or one line break, a capital letter: inside a paragraph), never in the first or
    last 5 % of the text. Not `superlinear_lab.data._sentence_start` (which plants training needles in filler and also takes paragraph
    starts): this probe's held-out rows have been compared across sessions since session 9, so its rule stays as is."""
    pattern = r"(?<=\n)(?=\S)" if where == "line" else r"(?<=[a-z)\]`]\.)(?: {1,2}|\n)(?=[A-Z])"
    lo, hi = 0.05 * len(text), 0.95 * len(text)
    return [m.end() for m in re.finditer(pattern, text) if lo <= m.end() <= hi]


def plant(doc: str, seed: int, split: str, kind: str, n_distractors: int, where: str) -> D.Example:
    """`doc` with one asked fact of `kind` and `n_distractors` same-kind facts planted at distinct `where`
    places, then the question. Evidence: the asked value's bytes; rivals: the distractors' values;
    ``meta["statements"]``: the token ranges (start, end) of the planted statements, in document order."""
    rng = random.Random(f"realdoc:{split}:{kind}:{seed}:{n_distractors}:{where}")
    spots = places(doc, where)
    if len(spots) < n_distractors + 1:
        raise ValueError(f"document has {len(spots)} {where} places, needs {n_distractors + 1}")
    thing = rng.choice(F.THINGS[kind])
    owner = F._owner(rng, split)
    taken: set[str] = set()
    keys, facts = {(owner, thing)}, []
    for i in range(n_distractors + 1):
        key = (owner, thing)
        while i and key in keys:
            key = (F._owner(rng, split), thing) if rng.random() < 0.5 else (owner, rng.choice(F.THINGS[kind]))
        keys.add(key)
        text, value = F._statement(rng, F._statement_template(rng, split, kind), *key, kind, split, taken)
        facts.append((text, value))
    at = sorted(zip(rng.sample(spots, n_distractors + 1), range(n_distractors + 1)))
    pieces, prev, marks, spans = [], 0, {}, []
    sep = "\n" if where == "line" else " "
    for pos, i in at:
        pieces.append(doc[prev:pos])
        start = len("".join(pieces).encode())
        text, value = facts[i]
        off = len(text[:text.rindex(value)].encode())
        marks[i] = (start + off, start + off + len(value.encode()))
        spans.append((start + 1, start + 1 + len(text.encode())))  # +1: the leading <|bos|>
        pieces.append(text + sep)
        prev = pos
    pieces.append(doc[prev:])
    prompt = "".join(pieces) + F._question(rng, split, kind, owner, thing)
    value = facts[0][1]
    ids = [D._TOKENIZER.bos_id] + list(prompt.encode()) + list(value.encode())
    a0 = len(ids) - len(value.encode())
    shift = 1  # the leading <|bos|>
    evidence = [(marks[0][0] + shift, marks[0][1] + shift)]
    rivals = sorted((marks[i][0] + shift, marks[i][1] + shift) for i in range(1, n_distractors + 1))
    needs = {q: [0] for q in range(a0 - 1, len(ids) - 1)}
    return D.Example(ids, (a0, len(ids)), evidence, needs, "fact_doc",
                     {"kind": kind, "owner": owner, "thing": thing, "value": value, "where": where,
                      "statements": spans, "n_distractors": n_distractors, "seed": seed}, [], rivals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shipped name or a model folder")
    p.add_argument("--split", default="eval", choices=D.SPLITS)
    p.add_argument("--kinds", nargs="+", default=["word", "name", "phrase"])
    p.add_argument("--tries", type=int, default=64, help="tries per kind (documents taken in turn)")
    p.add_argument("--distractors", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    D.use_corpus(None)  # the topics are Python's reference docs, whatever corpus the training used
    docs = documents(args.split)
    model = open_model(args.model, device=args.device, backend=args.backend)
    layers = [i for i, _ in model.routing_layers()]
    report = {"model": args.model, "split": args.split, "documents": len(docs), "tries": args.tries,
              "distractors": args.distractors, "backend": args.backend, "kinds": {}}
    for kind in args.kinds:
        t0 = time.time()
        rows = [plant(docs[s % len(docs)][1], s, args.split, kind, args.distractors, WHERE[s % 2])
                for s in range(args.tries)]
        with torch.no_grad():
            results = [r for ex in rows for r in run_examples(model, [ex])]
        s = summarize(results, layers)
        by_where = {w: sum(r["correct"] for r, ex in zip(results, rows) if ex.meta["where"] == w) for w in WHERE}
        report["kinds"][kind] = {k: s[k] for k in ("accuracy", "first_byte_accuracy", "recall_any", "chance_any")}
        report["kinds"][kind]["correct_by_where"] = by_where
        report["kinds"][kind]["seconds"] = round(time.time() - t0, 1)
        print(kind, json.dumps(report["kinds"][kind]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
