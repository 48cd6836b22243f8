"""bench/facts_realdoc.py: facts planted in whole Python reference topics (issue 13's real-document probe).

The probe is only worth its number if every row marks the right bytes: the asked value as evidence, the same-kind
distractor values as rivals, the question last, and the held-out split built from held-out topics only.
"""
from __future__ import annotations

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F

from helpers import load_bench

R = load_bench("facts_realdoc")


@pytest.fixture(scope="module", params=D.SPLITS)
def split(request):
    return request.param


def test_documents_follow_the_split(split):
    from pydoc_data.topics import topics

    docs = R.documents(split)
    assert len(docs) >= 8
    held_out = {name for name in topics if D._held_out(name)}
    assert all((name in held_out) == (split == "eval") for name, _ in docs)


@pytest.mark.parametrize("kind", ["word", "name", "phrase"])
@pytest.mark.parametrize("where", R.WHERE)
def test_rows_mark_the_asked_value_and_its_rivals(split, kind, where):
    name, doc = R.documents(split)[1]
    for seed in range(6):
        ex = R.plant(doc, seed, split, kind, 2, where)
        text = bytes(ex.ids[1:]).decode()
        value = ex.meta["value"]
        assert ex.ids[0] == D._TOKENIZER.bos_id and len(ex.ids) == len(text.encode()) + 1
        assert bytes(ex.ids[ex.answer[0]:ex.answer[1]]).decode() == value
        (s, e), = ex.evidence
        assert bytes(ex.ids[s:e]).decode() == value
        rivals = [bytes(ex.ids[a:b]).decode() for a, b in ex.rivals]
        assert len(rivals) == 2 and value not in rivals and len(set(rivals)) == 2
        words = F.vocabulary("words.txt", split)
        if kind == "word":
            assert value in words and all(r in words for r in rivals)
        assert sorted(ex.needs) == list(range(ex.answer[0] - 1, ex.answer[1] - 1))
        assert all(v == [0] for v in ex.needs.values())
        prompt = text[:len(text) - len(value)]
        assert prompt.endswith("\nAnswer: ") and ex.meta["owner"] in prompt.rsplit("\nQuestion: ", 1)[1]
        # the document is all there, in order: taking the statements (and their separators) out gives it back
        rest, prev, sep = b"", 1, b"\n" if where == "line" else b" "
        for a, b in ex.meta["statements"]:
            assert bytes(ex.ids[b:b + 1]) == sep
            if where == "line":  # a line of its own
                assert bytes(ex.ids[a - 1:a]) == b"\n"
            else:  # inside a paragraph: after a sentence's full stop and white space, before the next capital
                assert bytes(ex.ids[a - 1:a]).isspace() and bytes(ex.ids[b + 1:b + 2]).isupper()
                assert b"." in bytes(ex.ids[a - 3:a])
            rest += bytes(ex.ids[prev:a])
            prev = b + 1
        rest += bytes(ex.ids[prev:ex.answer[0]])
        assert rest.decode() == doc + prompt.rsplit(doc[-20:], 1)[1]
        assert any(s <= e0 and e1 <= t for (s, t) in ex.meta["statements"] for (e0, e1) in ex.evidence + ex.rivals)

def test_eval_rows_use_held_out_phrasings():
    _, doc = R.documents("eval")[0]
    for seed in range(8):
        ex = R.plant(doc, seed, "eval", "word", 0, "line")
        question = bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1]
        owner, thing = ex.meta["owner"], ex.meta["thing"]
        held = {F._fill(t, owner, thing) for t in F.QUESTIONS["eval"]["word"]}
        assert question.removesuffix("\nAnswer: ") in held


def test_too_few_places_is_a_clear_error():
    with pytest.raises(ValueError, match="places"):
        R.plant("One line only.", 0, "eval", "word", 2, "line")
