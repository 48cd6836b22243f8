"""Train-split phrasing variety and inline planting of fact statements (superlinear_lab.facts, data._Builder).

The eval split must stay as it was (same seeds, same rows: the shipping evaluation compares sessions on it) and
must keep phrasings the train split never shows."""
import hashlib
import json
import random
import re
import textwrap

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F

# sha256 of eval rows (fact tasks) and of the digit tasks' rows (both splits) over a fixed stand-in corpus, recorded
# at 14cb29f before the train-split phrasings and inline planting were added: those changes leave them as they were.
EVAL_FACTS_SHA256 = "819762bb900a047a0ae95a57ba8d25ae0c88b1504280dca356381cd09b0a29fd"
DIGIT_SHA256 = "e6c984665eef69016604c1bed9584b533340e3689ac882830cd22da478806332"
FACT_TASKS_S8 = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "fact_hop",
                 "fact_list", "fact_needle", "fact_quiz", "fact_hop_quiz")
OWNER, THING, VALUE, NAME = "OWNERX", "THINGX", "VALUEX", "NAMEX"


def _stand_in(split: str) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "lamp"]
    out = []
    for i in range(4000):
        s = " ".join(words[(i * 7 + j) % 8] for j in range(3 + i % 5))
        out.append(f"{split} line {i} says {s}." + ("\n" if i % 3 == 0 else " "))
    return "".join(out).encode()


@pytest.fixture
def stand_in_corpus(monkeypatch):
    texts = {s: _stand_in(s) for s in D.SPLITS}
    monkeypatch.setattr(D, "corpus", lambda split="train": texts[split])
    return texts


def _row(ex) -> bytes:
    return json.dumps([ex.ids, ex.answer, ex.evidence, sorted(ex.needs.items()), ex.prompts, ex.rivals]).encode()


def test_eval_rows_and_digit_rows_are_unchanged(stand_in_corpus):
    h = hashlib.sha256()
    for task in FACT_TASKS_S8:
        for length in (512, 1536):
            for seed in range(3):
                h.update(_row(D.make_example(task, length, seed, "eval")))
    assert h.hexdigest() == EVAL_FACTS_SHA256
    h = hashlib.sha256()
    for split in D.SPLITS:
        for task in D.TASKS + ("text",):
            for seed in range(3):
                h.update(_row(D.make_example(task, 1024, seed, split)))
    assert h.hexdigest() == DIGIT_SHA256


# ----------------------------------------------------------------------------------------------- phrasings
def _filled(template: str) -> str:
    return template.format(Owner=OWNER, owner=OWNER, thing=THING, value=VALUE, name=NAME, items=VALUE)


def _held_out() -> list[str]:
    """Every eval-split template: statements and questions of every kind, hop and list phrasings."""
    out = [t for k in F.KINDS for t in F.STATEMENTS["eval"][k] + F.QUESTIONS["eval"][k]]
    return out + [t for pair in F.HOP["eval"] + F.LISTS["eval"] for t in pair]


def _frame(template: str) -> re.Pattern:
    """The template's fixed words in order, anything in its slots: a train phrasing that matches it says the
    held-out sentence with other words around or inside the slots."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts), re.IGNORECASE)


def _distinctive(template: str) -> list[str]:
    """The template's fixed stretches of three or more words ("as the records show")."""
    return [p.strip(" ,.:?\"").lower() for p in re.split(r"\{\w+\}", template)
            if len(re.findall(r"[A-Za-z']+", p)) >= 3]


def _assert_unseen(phrasings: set[str]) -> None:
    held = _held_out()
    frames = [_frame(t) for t in held]
    stretches = [s for t in held for s in _distinctive(t)]
    filled_held = {_filled(t) for t in held}
    for p in phrasings:
        text = _filled(p)
        assert text not in filled_held, p
        assert not any(f.search(text) for f in frames), (p, [f.pattern for f in frames if f.search(text)])
        assert not any(s in text.lower() for s in stretches), p


def test_frames_catch_held_out_phrasings():
    """The checks below would see an eval phrasing wrapped in a train lead and tail, or with words inserted."""
    for t in _held_out():
        assert _frame(t).search(_filled("Listen. " + t + " Nobody forgot it."))
        with pytest.raises(AssertionError):
            _assert_unseen({"From the diary: " + t})


@pytest.mark.parametrize("kind", F.KINDS)
def test_composed_phrasings_are_many_and_never_held_out(kind):
    """Hundreds of train phrasings per kind, each naming owner, thing and (statements) the value once; none of them,
    wrapped in any lead and tail, holds an eval template's frame; and what the train split draws is one of them."""
    statements, questions = F.composed_statements(kind), F.composed_questions(kind)
    assert len(statements) >= 300 and len(questions) >= 300
    assert not set(statements) & set(F.STATEMENTS["eval"][kind])
    for t in statements:
        assert t.count("{value}") == 1 and "wner}" in t and t.count("{thing}") == 1, t
        assert t[0].isupper() or t.startswith(("{Owner}", "{value}", '"{value}"')), t
    for t in questions:
        assert "{value}" not in t and "wner}" in t and "{thing}" in t and t.endswith(("?", ".")), t
    wrapped = {lead + t + tail for lead in F.STATEMENT_LEADS for t in statements + F.STATEMENTS["train"][kind]
               for tail in F.STATEMENT_TAILS}
    asked = {lead + t for lead in F.QUESTION_LEADS for t in questions + F.QUESTIONS["train"][kind]}
    _assert_unseen(wrapped | asked)
    rng = random.Random(kind)
    drawn = {F._statement_template(rng, "train", kind) for _ in range(3000)}
    assert len(drawn) > 1000 and drawn <= wrapped
    questions_drawn = {F._question(rng, "train", kind, "the cook", "boat") for _ in range(3000)}
    assert len(questions_drawn) > 300
    assert all(q.startswith("\nQuestion: ") and "the cook" in q.lower() and "boat" in q for q in questions_drawn)
    eval_drawn = {F._statement_template(rng, "eval", kind) for _ in range(200)}
    assert eval_drawn == set(F.STATEMENTS["eval"][kind])  # the eval split keeps its own bank, unwrapped


def test_recite_questions_are_many_and_never_held_out():
    """fact_phrase_quiz's imperative questions: a few hundred, each naming owner and thing once, none (after any
    question lead) holding an eval template's frame or stretch."""
    questions = F.recite_questions()
    assert len(questions) >= 200 and not set(questions) & set(F._train_questions("phrase"))
    for t in questions:
        assert t.lower().count("{owner}") == 1 and t.count("{thing}") == 1 and t.endswith("."), t
    _assert_unseen({lead + t for lead in F.QUESTION_LEADS for t in questions})


def test_composed_hop_phrasings_are_many_and_never_held_out():
    """Train hop phrasings (place statement, question): the fixed train pairs and hundreds of composed ones, none
    holding an eval frame (wrapped in any question lead); the eval split keeps its own bank."""
    pairs = F.hop_phrasings("train")
    assert set(F.HOP["train"]) <= set(pairs) and len(pairs) >= 500
    assert len({w for w, _ in pairs}) >= 20
    for where, question in pairs:
        assert where.count("{name}") == 1 and where.count("{value}") == 1 and where.endswith(".")
        assert "wner}" in question and "{thing}" in question and question.endswith("?")
    _assert_unseen({w for w, _ in pairs} | {lead + q for lead in F.QUESTION_LEADS for _, q in pairs})
    assert F.hop_phrasings("eval") == F.HOP["eval"]
    kept = set()
    for seed in range(40):
        ex = F.fact_hop(1024, seed, "train", n_distractors=0)
        text = ex.text()
        kept |= {w for w, _ in pairs if w.format(name=ex.meta["middle"], value=ex.meta["value"]) in text}
    assert len(kept) >= 15  # train rows draw from the composed statements


def test_train_rows_show_composed_phrasings_and_answer_their_question():
    """In train rows the asked statement is often a composed phrasing, its value is the evidence, and the
    question is a composed or fixed train question of the row's owner and thing."""
    composed = 0
    for seed in range(40):
        ex = D.make_example("fact_word", 1024, seed, "train")
        (a, b), = ex.evidence
        assert bytes(ex.ids[a:b]).decode() == ex.meta["value"] == ex.answer_text()
        question = ex.text().rsplit("\nQuestion: ", 1)[1].split("\nAnswer: ")[0]
        bare = {F._fill(t, ex.meta["owner"], ex.meta["thing"]) for t in
                F.composed_questions("word") + F.QUESTIONS["train"]["word"]}
        assert any(question.endswith(q) and question.removesuffix(q) in F.QUESTION_LEADS for q in bare), question
        text = ex.text()
        said = {F._fill(t, ex.meta["owner"], ex.meta["thing"], ex.meta["value"]) for t in F.composed_statements("word")}
        composed += any(s in text for s in said)
    assert composed >= 30  # about 400 of ~414 phrasings are composed


# ----------------------------------------------------------------------------------------------- inline planting
def _wrapped(split: str) -> bytes:
    """Hard-wrapped paragraphs (lines break inside sentences, as in manuals and licences)."""
    rng = random.Random(split)
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "lamp", "e.g.", "v2.1"]
    paragraphs = []
    for _ in range(300):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 6))]
        paragraphs.append("\n".join(textwrap.wrap(" ".join(sentences), 60)))
    return "\n\n".join(paragraphs).encode()


def test_builder_plants_inline_at_sentence_starts_with_exact_evidence(monkeypatch):
    """inline=1: every statement stands inside the running text right after a sentence end (or a blank line),
    followed by a space, never on a line of its own; the evidence ranges decode to their marks. inline=0: each
    statement is "\\n<statement>\\n" as before."""
    wrapped = {s: _wrapped(s) for s in D.SPLITS}
    monkeypatch.setattr(D, "corpus", lambda split="train": wrapped[split])
    for seed in range(30):
        for inline in (0.0, 1.0):
            rng = random.Random(seed)
            b = D._Builder(rng, 2048, "train", inline=inline)
            texts = [f"Fact {i}: the keeper of lamp {i} is called Vorlan{i}x." for i in range(4)]
            for i, t in enumerate(texts):
                assert b.needle(rng.random(), t, [f"Vorlan{i}x", f"lamp {i}"]) == [2 * i, 2 * i + 1]
            ex = b.build("\nQuestion: who?\nAnswer: ", "Vorlan0x", lambda j: [0], "probe", {})
            assert ex.length == 2048
            assert [bytes(ex.ids[r[0]:r[1]]).decode() for r in ex.evidence] == \
                [m for i in range(4) for m in (f"Vorlan{i}x", f"lamp {i}")]
            raw = bytes(ex.ids[1:])
            for t in texts:
                at = raw.index(t.encode())
                before, after = raw[max(0, at - 3):at], raw[at + len(t):at + len(t) + 1]
                if inline:  # after a sentence end (a letter, ".", "?" or "!", a space or newline), a blank line or bos
                    assert after == b" ", (t, after)
                    assert at == 0 or before.endswith(b"\n\n") or re.fullmatch(rb"[A-Za-z][.?!][ \n]", before), \
                        (before, t)
                else:
                    assert before.endswith(b"\n") and after == b"\n"
    with pytest.raises(ValueError, match="inline=1.5"):
        D._Builder(random.Random(0), 512, "train", inline=1.5)


def test_train_fact_rows_plant_about_half_inline_and_keep_evidence_exact(monkeypatch):
    """Train rows of every fact task: evidence decodes to the values; about INLINE of the statements are planted
    inside the running text (followed by a space, not a newline); eval rows never are."""
    planted: list[str] = []
    build = D._Builder.build

    def spy(self, *args, **kwargs):  # the statements of the row that is built (not of a draw that did not fit)
        planted[:] = [n[1] for n in self.needles]
        return build(self, *args, **kwargs)

    monkeypatch.setattr(D._Builder, "build", spy)
    inline = {"train": 0, "eval": 0}
    total = {"train": 0, "eval": 0}
    for seed in range(12):
        for task in F.TASKS + F.AUX_TASKS:
            for split in D.SPLITS:
                ex = D.make_example(task, 1024, seed, split)
                if task in ("fact_quiz", "fact_list", "fact_hop_quiz", "fact_hop_steps", "fact_phrase_quiz",
                            "fact_hop_named", "fact_name_keyed", "fact_hop_wide", "fact_hop_quiz_crowded",
                            "fact_hop_wide_crowded", "fact_hop_contrast"):
                    values = ex.meta["words"] if task == "fact_list" else ex.meta["values"]
                    if task in ("fact_hop_quiz", "fact_hop_steps", "fact_hop_named", "fact_hop_wide",
                                "fact_hop_quiz_crowded", "fact_hop_wide_crowded", "fact_hop_contrast"):
                        values = [v for pair in zip(ex.meta["middles"], values) for v in pair]
                else:
                    values = [ex.meta["middle"], ex.meta["value"]] if task in ("fact_hop", "fact_hop_crowded") \
                        else [ex.meta["value"]]
                assert [bytes(ex.ids[a:b]).decode() for a, b in ex.evidence] == values, (task, split, seed)
                raw = bytes(ex.ids[1:])
                for text in planted:
                    at = raw.index(text.encode()) + len(text.encode())
                    assert raw[at:at + 1] in (b" ", b"\n"), (task, text)
                    inline[split] += raw[at:at + 1] == b" "
                    total[split] += 1
    assert inline["eval"] == 0
    assert 0.4 * total["train"] <= inline["train"] <= 0.6 * total["train"], (inline, total)
