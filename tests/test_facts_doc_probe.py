"""bench/facts_doc_probe.py: facts planted inside stretches of the train corpus (a train-split real-document probe).

Rows must come from the train split only (never the eval split, never reserved literary/religious text), fit the
asked length, mark the asked value exactly and ask it with a train-split question."""
from __future__ import annotations

import gzip
import json
import random
import sys

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F

from helpers import load_bench

P = load_bench("facts_doc_probe")


def _paragraphs(rng: random.Random, n: int, marker: str = "") -> str:
    words = ["river", "stone", "lamp", "window", "option", "file", "value", "signal", "process", "table"]
    out = []
    for i in range(n):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 7))]
        if marker and i % 7 == 3:
            sentences.insert(1, marker)
        text = " ".join(sentences)
        out.append("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))  # hard-wrapped
    return "\n\n".join(out)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    (tmp_path / "train.txt.gz").write_bytes(gzip.compress(_paragraphs(rng, 900, "As Shakespeare wrote it.").encode()))
    (tmp_path / "eval.txt.gz").write_bytes(gzip.compress(_paragraphs(rng, 300, "HELDOUT sentence here.").encode()))
    D.use_corpus(tmp_path)
    yield tmp_path
    D.use_corpus(None)


def test_stretches_are_train_paragraphs_without_reserved_text(corpus):
    text = D.corpus("train").decode()
    reserved = 0
    for seed in range(30):
        doc = P.stretch(seed, 3000)
        assert 1500 <= len(doc.encode()) <= 3000 and ("\n\n" + doc) in text  # from a paragraph start
        assert "Shakespeare" not in doc and "HELDOUT" not in doc
        assert len(P.places(doc, "sentence")) >= P.MIN_PLACES
        at = text.index("\n\n" + doc) + 2
        reserved += "Shakespeare" in text[at:at + 3000]  # how often the unfiltered stretch held reserved text
    assert reserved >= 5  # the filter had work to do


def test_rows_fit_the_length_and_ask_a_planted_train_fact(corpus):
    for kind in P.KINDS:
        for seed in range(5):
            ex = P.row(seed, kind, 1024, 2)
            assert 0.75 * 1024 <= ex.length <= 1024
            value, owner, thing = ex.meta["value"], ex.meta["owner"], ex.meta["thing"]
            assert ex.answer_text() == value
            (a, b), = ex.evidence
            assert bytes(ex.ids[a:b]).decode() == value and len(ex.rivals) == 2
            assert value in F.vocabulary("words.txt", "train") or kind != "word"
            for s, e in ex.meta["statements"]:  # inside a paragraph, right after a sentence, followed by a space
                assert bytes(ex.ids[s - 2:s]) in (b". ", b".\n") and bytes(ex.ids[e:e + 1]) == b" "
            question = bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer: ")
            bare = {F._fill(t, owner, thing) for t in F._train_questions(kind)}
            assert any(question == lead + q for lead in F.QUESTION_LEADS for q in bare), question
            assert "HELDOUT" not in bytes(ex.ids[1:]).decode(errors="replace")


def test_main_writes_the_accuracies(corpus, tmp_path, monkeypatch):
    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["facts_doc_probe.py", "--model", "tiny", "--length", "768", "--rows", "2",
                                      "--kinds", "word", "--corpus", str(corpus), "--out", str(out)])
    P.main()
    report = json.loads(out.read_text())
    assert report["split"] == "train" and report["rows"] == 2
    for part in (report["kinds"]["word"], report["all"]):
        assert set(P.FIELDS) <= set(part) and 0 <= part["accuracy"] <= part["byte_accuracy"] <= 1
        assert 0 <= part["first_byte_accuracy"] <= 1 and 0 < part["chance_any"] <= 1
    assert report["corpus"]["bytes"] == len(D.corpus("train"))
