"""Task generators: determinism, exact lengths, evidence ranges that hold what they claim, held-out splits."""
from __future__ import annotations

import pytest

from superlinear_lab import data as D
from superlinear_lab.model import ByteTokenizer

TOK = ByteTokenizer()
CASES = [(task, length, seed) for task in D.TASKS for length, seed in ((512, 0), (777, 3), (2048, 11))]


@pytest.mark.parametrize("task,length,seed", CASES, ids=lambda v: str(v))
def test_example_is_deterministic_and_exact_length(task, length, seed):
    a = D.make_example(task, length, seed, "train")
    b = D.make_example(task, length, seed, "train")
    assert a.ids == b.ids and a.evidence == b.evidence and a.needs == b.needs
    assert len(a.ids) == length and a.ids[0] == TOK.bos_id and a.answer[1] == length
    assert D.make_example(task, length, seed + 1, "train").ids != a.ids


@pytest.mark.parametrize("task,length,seed", CASES, ids=lambda v: str(v))
def test_evidence_ranges_hold_the_answer(task, length, seed):
    ex = D.make_example(task, length, seed, "eval")
    evidence = [TOK.decode(ex.ids[s:e]) for s, e in ex.evidence]
    answer = ex.answer_text()
    if task == "multi_value":
        assert answer == ", ".join(evidence)
    elif task == "multi_hop":
        pointer, value = evidence
        assert value == answer
        text = ex.text()
        assert f"VAR {ex.meta['start']} = {pointer}." in text and f"VAR {pointer} = {value}." in text
    else:
        assert evidence == [answer]
    # every query predicts an answer token and needs evidence that lies before it
    assert ex.queries and all(ex.answer[0] - 1 <= q < ex.answer[1] - 1 for q in ex.queries)
    for q, needed in ex.needs.items():
        assert all(ex.evidence[i][1] <= q for i in needed)


def test_depth_places_the_needle():
    for depth in (0.0, 0.5, 1.0):
        ex = D.niah(4096, depth, 5, "eval")
        start = ex.evidence[0][0]
        assert abs(start / ex.answer[0] - depth) < 0.05, (depth, start)


def test_near_duplicate_keys_in_multi_key():
    ex = D.multi_key(2048, 2, "eval", n_keys=5)
    text, key = ex.text(), ex.meta["key"]
    keys = [line.split("The magic number for ")[1].split(" is ")[0] for line in text.split("\n")
            if line.startswith("The magic number for ")]
    assert len(keys) == 5 and key in keys
    assert all(sum(a != b for a, b in zip(k, key)) == 1 for k in keys if k != key)


def test_splits_are_disjoint():
    assert D.make_example("niah", 1024, 0, "train").ids != D.make_example("niah", 1024, 0, "eval").ids
    train, held_out = D.corpus("train"), D.corpus("eval")
    assert len(held_out) > 50_000 and held_out[1000:1200] not in train
    with pytest.raises(ValueError, match="split"):
        D.make_example("niah", 1024, 0, "test")


def test_too_short_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        D.make_example("multi_hop", 64, 0)
