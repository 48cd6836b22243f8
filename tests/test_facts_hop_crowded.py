"""The crowded hop aids (`fact_hop_crowded`, `fact_hop_quiz_crowded`, `fact_hop_wide_crowded`) and
`fact_hop_contrast` (issue 13 session 14): at least `HOP_CROWD` other chains in every row, the first hop asked beside
another chain's place with the evidence in hop order, no held-out phrasing or value in the new rows, and every
held-out row (and the uncrowded tasks' train rows) byte for byte as before."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F
from test_facts_phrasing import _assert_unseen, _row, stand_in_corpus  # noqa: F401 - stand_in_corpus: a fixture

CROWDED = ("fact_hop_crowded", "fact_hop_quiz_crowded", "fact_hop_wide_crowded", "fact_hop_contrast")
ASKED = re.compile(r"\nQuestion: (.*?)\nAnswer: ")
CONFIG = Path(__file__).resolve().parents[1] / "bench" / "facts_s14_hop.json"

# sha256 of rows over the stand-in corpus of test_facts_phrasing, recorded at dc0f529 (before the crowded aids):
# (task, split, lengths, seeds) -> digest. The eval rows of every hop task, and the train rows of the hop tasks whose
# builders took the new options, must stay as they were.
UNCHANGED = {
    ("fact_hop", "eval", (1024, 4096, 8192), 8): "82a6c205b179402a28d1af3da0477a5072abae2d030ed4ab43474fd40d233b3f",
    ("fact_hop_quiz", "eval", (2048, 8192), 4): "eb298f19a6fc16cf95c4c6579856f5f321ec09bab5a2ccc4a2af77813e1a661f",
    ("fact_hop_wide", "eval", (2048, 8192), 4): "6126791426057f3e6edf698f2ffc1ae312b1a99c52bba5752d148fe52089b922",
    ("fact_hop_steps", "eval", (2048,), 4): "1c1ff95a10f162007372d74c57156f8a705b40d018a8454695bfc0d0ec320a95",
    ("fact_hop", "train", (1024, 4096), 6): "6460328ce450795457ff8f4b4d7a38b04ad0b92186d53a9d0db471e13b797812",
    ("fact_hop_quiz", "train", (2048, 4096), 4): "200f27cb08a6fe4db44e5e3f20bed98b68ed25c82bc558e5dc525bc57d6ec727",
    ("fact_hop_wide", "train", (2048, 4096), 4): "0007ed27821592b90b2976ec16785c76c619417d557807fe6180f96be526d04d",
    ("fact_hop_steps", "train", (2048,), 4): "85c908ae59fa29aad6b3dbff7db9a2379eaba749149a35c12624288680ba21a2",
}


def _text(ex: D.Example) -> bytes:
    return bytes(t if t < 256 else 0 for t in ex.ids)


def _ranges(ex: D.Example, ranges) -> list[str]:
    text = _text(ex)
    return [text[a:b].decode() for a, b in ranges]


def _asked(ex: D.Example) -> list[str]:
    return ASKED.findall(bytes(t for t in ex.ids if t < 256).decode())


@pytest.mark.parametrize("task,split,lengths,seeds", list(UNCHANGED), ids=lambda v: str(v))
def test_rows_of_the_existing_hop_tasks_are_unchanged(stand_in_corpus, task, split, lengths, seeds):
    h = hashlib.sha256()
    for length in lengths:
        for seed in range(seeds):
            h.update(_row(D.make_example(task, length, seed, split)))
    assert h.hexdigest() == UNCHANGED[(task, split, lengths, seeds)]


@pytest.mark.parametrize("task", CROWDED)
@pytest.mark.parametrize("length", [1024, 4096, 8192])
def test_crowded_rows_hold_at_least_n_other_chains(stand_in_corpus, planted_statements, task, length):
    seen = set()
    for seed in range(16):
        ex = D.make_example(task, length, seed, "train")
        assert ex.task == task
        others = ex.meta["n_distractors"]
        assert others >= F.HOP_CROWD
        seen.add(others)
        # what the document holds, counted from the planted statements: a naming and a place statement per chain
        assert len(planted_statements) == 2 * (others + 1)
        if task != "fact_hop_crowded":
            assert len(ex.meta["keys"]) == len(set(ex.meta["keys"])) == others + 1
            assert sorted(ex.meta["order"]) == list(range(others + 1))  # every chain asked once
    if length >= 4096:
        assert len(seen) >= 3, seen  # a spread of chain counts, not always the least


@pytest.mark.parametrize("length", [1024, 4096])
def test_crowded_fact_hop_asks_one_place_and_marks_the_other_chains_as_rivals(stand_in_corpus, planted_statements,
                                                                              length):
    for seed in range(12):
        ex = D.make_example("fact_hop_crowded", length, seed, "train")
        name, place = ex.meta["middle"], ex.meta["value"]
        assert ex.answer_text() == place
        assert {tuple(v) for v in ex.needs.values()} == {(0, 1)}
        assert _ranges(ex, ex.evidence) == [name, place]  # the pointer first, then the place
        rivals = _ranges(ex, ex.rivals)
        assert len(rivals) == 2 * ex.meta["n_distractors"] and name not in rivals and place not in rivals
        for other in rivals:  # each rival is a value of another chain's statement
            assert sum(other in s for s in planted_statements) >= 1
        plain = D.make_example("fact_hop", length, seed, "train")
        assert plain.rivals == [] or plain.rivals == ()  # fact_hop itself still marks none


@pytest.mark.parametrize("task", ["fact_hop_quiz_crowded", "fact_hop_wide_crowded"])
def test_crowded_quizzes_are_their_tasks_with_more_chains(stand_in_corpus, task):
    base = task.removesuffix("_crowded")
    wide = {F._fill(q, "\0", "\1") for q in F.hop_wide_questions()}
    for seed in range(8):
        ex = D.make_example(task, 4096, seed, "train")
        keys, names, places, order = (ex.meta[k] for k in ("keys", "middles", "values", "order"))
        asked = _asked(ex)
        assert len(asked) == len(order)
        for q, needs in ex.needs.items():
            got = _ranges(ex, [ex.evidence[e] for e in needs])
            assert len(got) == 2 and names.index(got[0]) == places.index(got[1])
        for question, i in zip(asked, order):
            owner, thing = keys[i]
            if task == "fact_hop_wide_crowded":
                lead_free = next(question[len(lead):] for lead in sorted(F.QUESTION_LEADS, key=len, reverse=True)
                                 if question.startswith(lead))
                t = lead_free.replace(owner[:1].upper() + owner[1:], "\0", 1).replace(owner, "\0", 1)
                assert t.replace(thing, "\1", 1) in wide, question
            else:
                assert not any(q.rstrip("?") in question for q in ("where can", "what place is")), question
    assert D.make_example(task, 4096, 0, "train").ids != D.make_example(base, 4096, 0, "train").ids


@pytest.mark.parametrize("length", [1024, 4096, 8192])
def test_contrast_asks_names_and_places_with_the_evidence_in_hop_order(stand_in_corpus, length):
    from superlinear_lab import train as T

    kinds = set()
    for seed in range(16):
        ex = D.make_example("fact_hop_contrast", length, seed, "train")
        names, places, steps = ex.meta["middles"], ex.meta["values"], ex.meta["steps"]
        asked_by = dict(steps)
        assert len(asked_by) == len(steps) == len(names)  # every chain asked once, by name or by place
        assert {"name", "place"} <= set(asked_by.values())
        expected = [names[i] if how == "name" else places[i] for i, how in steps]
        answer = ex.answer_text()
        for value in expected:
            assert value in answer
        queries = sorted(ex.needs)  # the answer queries in order; one answer part per step
        parts = []
        for q in queries:
            got = tuple(_ranges(ex, [ex.evidence[e] for e in ex.needs[q]]))
            if not parts or parts[-1] != got:
                parts.append(got)
        assert len(parts) == len(steps)
        for (i, how), got in zip(steps, parts):
            assert got == ((names[i],) if how == "name" else (names[i], places[i])), (how, got)
        # a name query's rivals hold its own chain's place; a place query's rivals hold neither of its hops
        rivals = _ranges(ex, ex.rivals)
        assert sorted(rivals) == sorted(names + places)
        # route_in_order: the pointer is rank 0, the place rank 1
        ranks = T.pair_ranks([ex], {"fact_hop_contrast"}).tolist()
        assert ranks == [r for q in ex.queries for r in range(len(ex.needs[q]))]
        place_bytes = sum(len(places[i].encode()) for i, how in steps if how == "place")
        name_bytes = sum(len(names[i].encode()) for i, how in steps if how == "name")
        assert ranks.count(1) == place_bytes and ranks.count(0) == place_bytes + name_bytes
        kinds |= {how for _, how in steps}
    assert kinds == {"name", "place"}


def test_contrast_ranks_follow_the_needs():
    from superlinear_lab import train as T

    ex = F.fact_hop_contrast(4096, 5, "train", n_chains=4)
    ranks = T.pair_ranks([ex], {"fact_hop_contrast"}).tolist()
    expect = []
    for q in ex.queries:
        expect += [0] if len(ex.needs[q]) == 1 else [0, 1]
    assert ranks == expect and 1 in ranks and ranks.count(0) > ranks.count(1)
    assert T.pair_ranks([ex], set()).tolist() == [0] * len(expect)  # off unless listed
    one = F.fact_hop_contrast(4096, 0, "train", n_chains=1)  # the short-row fallback: the name alone
    assert one.meta["steps"] == [(0, "name")] and one.answer_text() == one.meta["middles"][0]
    with pytest.raises(ValueError):
        F.fact_hop_contrast(4096, 0, "train", n_chains=0)


@pytest.mark.parametrize("task", CROWDED)
def test_new_rows_hold_no_held_out_phrasing_or_value(stand_in_corpus, planted_statements, task):
    names = set(F._entries("names.txt"))
    words = set(F._entries("words.txt"))
    for seed in range(16):
        ex = D.make_example(task, 4096, seed, "train")
        statements = list(planted_statements)
        questions = _asked(ex)
        held = [q for q in questions if "stay" in q or q.startswith("Which name was given to")
                or q.startswith("Do you recall what")]
        assert not held, held
        _assert_unseen({s.replace("{", "(").replace("}", ")") for s in statements + questions})
        values = ex.meta.get("middles", [ex.meta.get("middle")]) + ex.meta.get("values", [ex.meta.get("value")])
        for v in values:
            assert not ((v in names or v in words) and F._in_eval(v)), v  # a listed value is a train one
        owners = [o for o, _ in ex.meta["keys"]] if "keys" in ex.meta else [ex.meta["owner"]]
        for o in owners:
            if " from " in o:
                assert not F._in_eval(o.split(" from ", 1)[1]), o


def test_crowded_tasks_are_task_mix_names():
    from superlinear_lab import train as T

    for task in CROWDED:
        assert task in F.AUX_TASKS and task not in F.TASKS
        cfg = T.TrainConfig(stages=[[1024, 1, 2]], task_mix={task: 1.0}, route_in_order=[task])
        batch = T.make_batch(cfg, 0)
        assert [ex.task for ex in batch] == [task] * 2
        assert 1 in T.pair_ranks(batch, set(cfg.route_in_order)).tolist()


def test_s14_config_mix():
    cfg = json.loads(CONFIG.read_text())
    mix = cfg["task_mix"]
    assert math.isclose(sum(mix.values()), 1.0, abs_tol=1e-9)
    hop_questions = sum(mix.get(t, 0) for t in ("fact_hop_quiz", "fact_hop_wide", "fact_hop_quiz_crowded",
                                                  "fact_hop_wide_crowded", "fact_hop_contrast"))
    assert 0.08 - 1e-9 <= hop_questions <= 0.10 + 1e-9
    assert not {"fact_hop", "fact_hop_quiz", "fact_hop_wide"} & set(mix)  # every hop row crowded
    chain_tasks = {t for t in mix if t.startswith("fact_hop") or t == "multi_hop"} - {"fact_hop_named"}
    assert chain_tasks <= set(cfg["route_in_order"])
    assert cfg["init_from"] == "small" and cfg["seed"] == 181
    a = json.loads((CONFIG.parent / "facts_s12_A.json").read_text())
    assert [s[0] for s in cfg["stages"]] == [s[0] for s in a["stages"]]
    assert [s[2] for s in cfg["stages"]] == [s[2] for s in a["stages"]]
    assert {k: v for k, v in cfg.items() if k not in ("task_mix", "seed", "init_from", "route_in_order")} == \
        {k: v for k, v in a.items() if k not in ("task_mix", "seed", "init_from", "route_in_order")}


@pytest.mark.parametrize("length", [384, 512])
def test_crowded_tasks_fit_short_training_rows(length):
    """As tests/test_facts.py asks of every fact task: a row too short for `HOP_CROWD` other chains holds fewer
    instead of failing (a failure would stop a training run); the answer is the whole asked value text."""
    for task in CROWDED:
        for seed in range(250):
            ex = D.make_example(task, length, seed, "train")
            assert ex.length == length and ex.answer_text() == ex.meta["value"]
