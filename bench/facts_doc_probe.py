"""Facts planted inside long stretches of the training corpus: a train-split real-document probe (issue 13).

For model selection without the held-out split: each row is one stretch of the *train* split of a built corpus
(``--corpus``, default ``runs/corpus``: Python's docs, Debian's documentation, licences, manuals, fortunes; read
through `superlinear_lab.data`'s corpus reader), from a paragraph start to a paragraph end, about ``--length``
tokens with the facts in it. One fact of a kind (word, name, phrase) plus ``--distractors`` facts of the same kind
are planted inside paragraphs right after a sentence (``bench/facts_realdoc.plant``, where "sentence"), in the
train split's phrasings, and the fact is asked at the end with a train-split question. The eval split, notebook
documents and literary or religious texts are never used (stretches matching `superlinear_lab.corpus.RESERVED` are
skipped; the corpus builder drops them already).

Accuracy is exact match of the whole value under teacher forcing (the same as greedy decoding being right);
``first_byte_accuracy`` is the byte where a fact is picked; ``recall_any`` is routing recall of the value's bytes,
with ``chance_any`` beside it. Writes JSON and prints one line per kind and one for all::

    python bench/facts_doc_probe.py --model DIR --length 4096 --rows 64 --device cuda --out doc_probe.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab.corpus import RESERVED
from superlinear_lab.evaluate import run_examples, summarize
from superlinear_lab.loaders import open_model

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ is a folder of scripts; also when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from facts_realdoc import MIN_PLACES, places, plant  # noqa: E402  (the planting and marking of the real-doc probe)

KINDS = ("word", "name", "phrase")
SPLIT = "train"  # the only split this probe reads
FIELDS = ("accuracy", "first_byte_accuracy", "byte_accuracy", "recall_any", "chance_any")


def stretch(seed: int, n_bytes: int) -> str:
    """A stretch of the train corpus of at most `n_bytes` UTF-8 bytes, chosen by `seed`: from a paragraph start
    (after a blank line) to the last paragraph end inside it (a line end when the last paragraph is long), with
    at least MIN_PLACES sentence places and no reserved (literary, religious) text."""
    text = D.corpus(SPLIT)
    if len(text) < 2 * n_bytes:
        raise ValueError(f"n_bytes={n_bytes}: the train corpus ({len(text)} bytes) is too small for such stretches")
    rng = random.Random(f"doc_probe:{seed}:{n_bytes}")
    for _ in range(200):
        start = text.find(b"\n\n", rng.randrange(len(text) - n_bytes))
        if start < 0:
            continue
        chunk = text[start + 2:start + 2 + n_bytes]
        end = chunk.rfind(b"\n\n")
        if end < 0.85 * n_bytes:  # a long last paragraph: end at a line's end instead
            end = chunk.rfind(b"\n")
        if end < n_bytes // 2:
            continue
        doc = chunk[:end].decode("utf-8", errors="ignore").strip()
        if not RESERVED.search(doc) and len(places(doc, "sentence")) >= MIN_PLACES:
            return doc
    raise RuntimeError(f"no stretch of {n_bytes} bytes with {MIN_PLACES} sentence places found (seed {seed})")


def row(seed: int, kind: str, length: int, n_distractors: int) -> D.Example:
    """A probe row of at most `length` tokens (the stretch is shortened until the planted row fits)."""
    n_bytes = length
    for _ in range(20):
        ex = plant(stretch(seed, n_bytes), seed, SPLIT, kind, n_distractors, "sentence")
        if ex.length <= length:
            return ex
        n_bytes -= ex.length - length + 64
    raise RuntimeError(f"length={length}: no row fits (seed {seed}, kind {kind})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shipped name or a model folder")
    p.add_argument("--length", type=int, default=4096, help="tokens per row (at most; about this many)")
    p.add_argument("--rows", type=int, default=64, help="rows per kind")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--distractors", type=int, default=2, help="same-kind facts planted beside the asked one")
    p.add_argument("--corpus", default="runs/corpus", help="a corpus folder (superlinear_lab.corpus)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    D.use_corpus(args.corpus)
    model = open_model(args.model, device=args.device, backend=args.backend)
    layers = [i for i, _ in model.routing_layers()]
    report = {"model": args.model, "split": SPLIT, "corpus": D.corpus_fingerprint()[SPLIT], "length": args.length,
              "rows": args.rows, "distractors": args.distractors, "backend": args.backend, "kinds": {}}
    everything = []
    for kind in args.kinds:
        t0 = time.time()
        rows = [row(s, kind, args.length, args.distractors) for s in range(args.rows)]
        with torch.no_grad():
            results = [r for ex in rows for r in run_examples(model, [ex])]
        everything += results
        report["kinds"][kind] = {k: summarize(results, layers)[k] for k in FIELDS}
        report["kinds"][kind]["tokens"] = [min(ex.length for ex in rows), max(ex.length for ex in rows)]
        report["kinds"][kind]["seconds"] = round(time.time() - t0, 1)
        print(kind, json.dumps(report["kinds"][kind]), flush=True)
    report["all"] = {k: summarize(everything, layers)[k] for k in FIELDS}
    print("all", json.dumps(report["all"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
