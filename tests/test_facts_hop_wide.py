"""`fact_hop_wide` (issue 13 session 12): the hop quiz's chains asked with place questions that name the key in many
wh-forms and never with the row's place verb; held-out phrasings stay unseen; the eval split and `fact_hop_quiz`
are unchanged."""
from __future__ import annotations

import re

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F
from test_facts_phrasing import _assert_unseen

STATEMENT_VERBS = ("kept", "winter", "live", "sleep", "looked after", "last seen", "housed", "stay")
ASKED = re.compile(r"\nQuestion: (.*?)\nAnswer: ")


def _asked(ex: D.Example) -> list[str]:
    return ASKED.findall(bytes(t for t in ex.ids if t < 256).decode())


def _lead_free(question: str) -> str:
    for lead in sorted(F.QUESTION_LEADS, key=len, reverse=True):
        if lead and question.startswith(lead):
            return question[len(lead):]
    return question


def test_wide_questions_are_many_unseen_and_carry_no_statement_verb():
    questions = F.hop_wide_questions()
    assert len(questions) >= 300
    for q in questions:
        assert q.lower().count("{owner}") == 1 and q.count("{thing}") == 1 and q.endswith(("?", ".")), q
        assert not any(v in q for v in STATEMENT_VERBS), q  # no verb of any train or eval place statement
        assert "which place" not in q.lower(), q  # kept apart from the held-out "In which place does … stay?"
    assert not {q.lower() for q in questions} & {q.lower() for _, q in F.hop_phrasings("train")}
    _assert_unseen({lead + q for lead in F.QUESTION_LEADS for q in questions})


@pytest.mark.parametrize("length", [1024, 4096])
def test_wide_rows_ask_every_chain_in_other_words_and_need_both_hops(length):
    wide = {F._fill(q, "\0", "\1") for q in F.hop_wide_questions()}
    seen = set()
    for seed in range(12):
        ex = D.make_example("fact_hop_wide", length, seed, "train")
        keys, names, places, order = (ex.meta[k] for k in ("keys", "middles", "values", "order"))
        asked = _asked(ex)
        assert len(asked) == len(order) >= 1
        for question, i in zip(asked, order):
            owner, thing = keys[i]
            template = _lead_free(question).replace(owner[:1].upper() + owner[1:], "\0", 1).replace(owner, "\0", 1)
            template = template.replace(thing, "\1", 1)
            assert template in wide, question
            seen.add(template)
        assert ex.answer_text() == ex.meta["value"]
        # every place byte needs its chain's pointer name, then its place (the evidence decodes to them)
        text = bytes(t if t < 256 else 0 for t in ex.ids)
        for q, needs in ex.needs.items():
            got = [text[a:b].decode() for a, b in (ex.evidence[e] for e in needs)]
            assert len(got) == 2 and got[0] in names and got[1] in places and names.index(got[0]) == places.index(got[1])
    assert len(seen) >= 20  # drawn from the bank, not one form


def test_hop_quiz_and_eval_rows_keep_their_questions():
    for seed in range(8):
        quiz = D.make_example("fact_hop_quiz", 2048, seed, "train")
        verb = next(v for v in STATEMENT_VERBS if v in bytes(t for t in quiz.ids[:quiz.answer[0]] if t < 256)
                    .decode().split("\nQuestion: ")[-1])  # the quiz still asks with its statement's verb
        assert verb
        held = D.make_example("fact_hop_wide", 2048, seed, "eval")
        assert all(re.fullmatch(r"In which place does .+ stay\?", q) for q in _asked(held)), _asked(held)
    rows = [D.make_example("fact_hop_wide", 1024, s, "train") for s in range(3)]
    assert rows[0].ids != D.make_example("fact_hop_quiz", 1024, 0, "train").ids


def test_wide_task_is_a_task_mix_name():
    from superlinear_lab import train as T

    cfg = T.TrainConfig(stages=[[1024, 1, 2]], task_mix={"fact_hop_wide": 1.0})
    assert [ex.task for ex in T.make_batch(cfg, 0)] == ["fact_hop_wide"] * 2
    assert "fact_hop_wide" in F.AUX_TASKS and "fact_hop_wide" not in F.TASKS
