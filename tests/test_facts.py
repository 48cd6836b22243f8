"""Prose-fact tasks (superlinear_lab.facts), the Debian corpus builder and the chance-recall baseline."""
import gzip
import itertools
import json
import math
import re
from fractions import Fraction

import pytest

from superlinear_kernels import SpanConfig
from superlinear_lab import data as D
from superlinear_lab import facts as F
from superlinear_lab.corpus import build_corpus, is_english_prose, strip_roff
from superlinear_lab.evaluate import chance_recall

LENGTH = 1536


def _text(ex, r):
    return bytes(ex.ids[r[0]:r[1]]).decode()


@pytest.mark.parametrize("split", D.SPLITS)
@pytest.mark.parametrize("task", F.TASKS)
def test_fact_examples_are_consistent(task, split):
    for seed in range(6):
        ex = D.make_example(task, LENGTH, seed, split)
        assert ex.length == LENGTH and ex.task == task
        assert ex.answer_text() == ex.meta["value"]
        # the answer queries are exactly those that predict an answer token, and each needs real evidence
        assert ex.queries == list(range(ex.answer[0] - 1, ex.answer[1] - 1))
        wanted = [ex.meta["middle"], ex.meta["value"]] if task == "fact_hop" else [ex.meta["value"]]
        assert [_text(ex, r) for r in ex.evidence] == wanted
        assert all(ex.needs[q] == list(range(len(wanted))) for q in ex.queries)
        # the prompt ends with the question cue; the evidence lies before the question
        prompt = bytes(ex.ids[1:ex.answer[0]]).decode()
        assert prompt.endswith("\nAnswer: ") and "\nQuestion: " in prompt
        assert all(r[1] <= ex.answer[0] - len(prompt.rsplit("\nQuestion: ", 1)[1]) for r in ex.evidence)


def _statement_texts(split: str, kind: str) -> set[str]:
    return {t.split("{")[0] + "|" + t.split("}")[-1] for t in F.STATEMENTS[split][kind]}


def test_eval_split_uses_held_out_phrasings_and_values():
    """Every question of the eval split comes from the held-out bank, none from the train bank, and eval values
    of words and names are never train values (no shortcut by memorised phrasings or values)."""
    for kind in F.KINDS:
        train_q = {F._fill(t, "OWNER", "THING") for t in F.QUESTIONS["train"][kind]}
        eval_q = {F._fill(t, "OWNER", "THING") for t in F.QUESTIONS["eval"][kind]}
        assert not train_q & eval_q
        assert not set(F.STATEMENTS["train"][kind]) & set(F.STATEMENTS["eval"][kind])
    for resource in ("words.txt", "names.txt"):
        train, held = set(F.vocabulary(resource, "train")), set(F.vocabulary(resource, "eval"))
        assert train and held and not train & held
    train_questions = {t.split("{")[0] for k in F.KINDS for t in F.QUESTIONS["train"][k]}
    for seed in range(20):
        ex = D.make_example("fact_word", LENGTH, seed, "eval")
        question = ex.text().rsplit("\nQuestion: ", 1)[1].split("\n")[0]
        assert not any(question.startswith(p) for p in train_questions if p), question
        assert ex.meta["value"] in F.vocabulary("words.txt", "eval")


def test_train_wrappers_never_make_an_eval_phrasing():
    """The train split wraps statements and questions in leads and tails; no wrapped train phrasing holds a held-out
    (eval) phrasing, and eval questions and statements come unwrapped from their own bank."""
    for kind in F.KINDS:
        train = {lead + t + tail for lead in F.STATEMENT_LEADS for t in F.STATEMENTS["train"][kind]
                 for tail in F.STATEMENT_TAILS}
        questions = {lead + t for lead in F.QUESTION_LEADS for t in F.QUESTIONS["train"][kind]}
        for held, pool in ((F.STATEMENTS["eval"][kind], train), (F.QUESTIONS["eval"][kind], questions)):
            for e in held:
                assert not any(e.rstrip(".?") in t for t in pool), (kind, e)
    for seed in range(30):
        ex = D.make_example("fact_name", 1024, seed, "eval")
        question = ex.text().rsplit("\nQuestion: ", 1)[1].split("\n")[0]
        asked = {F._fill(q, ex.meta["owner"], ex.meta["thing"]) for q in F.QUESTIONS["eval"]["name"]}
        assert question in asked, question


@pytest.mark.parametrize("length", [384, 512])
def test_every_fact_task_fits_short_training_rows(length):
    """Long phrases and wrapped statements do not always fit a short row with every distractor the seed drew:
    the task drops distractors instead of failing (a failure would stop a training run)."""
    for task in F.TASKS + F.AUX_TASKS:
        for seed in range(250):
            ex = D.make_example(task, length, seed, "train")
            assert ex.length == length and ex.answer_text() == ex.meta["value"]


def test_distractors_are_facts_of_the_same_kind():
    """With distractors, the document holds other statements about the same thing (or the same owner) whose
    values are of the asked kind and differ from the answer; near-key distractors differ in the place only."""
    ex = F.fact(4096, 3, "train", kind="name", n_distractors=4)
    text = ex.text()
    statements = [line for line in text.split("\n")
                  if (re.search(rf"\b{ex.meta['thing']}\b", line) or ex.meta["owner"].lower() in line.lower())
                  and not line.startswith("Question")]
    assert len(statements) == 1 + 4  # the fact and four distractors about the same thing or owner
    assert sum(ex.meta["value"] in line for line in statements) == 1  # distractor values differ from the answer
    rivals = [_text(ex, r) for r in ex.rivals]  # the distractors' values, each inside its own statement
    assert len(rivals) == 4 and ex.meta["value"] not in rivals
    assert sorted(rivals) == sorted(next(v for v in rivals if v in line) for line in statements
                                    if ex.meta["value"] not in line)
    quiz = D.make_example("fact_quiz", 1024, 2, "train")
    assert sorted(_text(quiz, r) for r in quiz.rivals) == sorted(quiz.meta["values"])
    near = F.fact(4096, 5, "train", kind="word", n_distractors=3, near_keys=True, task="fact_multi_key")
    role = near.meta["owner"].split(" from ")[0]
    owners = {line.split(" from ")[1].split("'")[0].split(" ")[0]
              for line in near.text().split("\n") if f"{role} from " in line.lower() and "Question" not in line}
    assert len(owners) == 4  # four owners of one role, told apart by their place only


def test_values_are_marked_where_they_stand(monkeypatch):
    """A value that also occurs later in its sentence ("word" before "as the secret word") would be marked at
    the later place (the builder marks by rindex): such a value is drawn again."""
    for seed in range(50):  # in generated examples the evidence sits inside the asked statement
        ex = D.make_example("fact_word", 512, seed, "eval")
        (a, b), = ex.evidence
        line = ex.text()[ex.text().rfind("\n", 0, a) + 1:ex.text().find("\n", b)]
        assert ex.meta["owner"] in line and ex.meta["thing"] in line
    drawn = iter(["word", "apple"])
    monkeypatch.setattr(F, "_value", lambda kind, rng, split, taken: next(drawn))
    text, value = F._statement(None, 'Keep this in mind: {owner} uses "{value}" as the {thing}.', "the cook",
                               "secret word", "word", "eval", set())
    assert value == "apple" and text == 'Keep this in mind: the cook uses "apple" as the secret word.'


@pytest.mark.parametrize("split", D.SPLITS)
def test_word_lists_mark_every_word_and_its_bytes(split, monkeypatch):
    """fact_list (the dense copy aid): the answer is the asked owner's words joined by ", ", each word is
    evidence at its place in the asked statement, and exactly the queries predicting a word's bytes need it.
    (Statements on lines of their own here, to read them by line; inline planting: tests/test_facts_phrasing.py.)"""
    monkeypatch.setattr(F, "INLINE", 0.0)
    vocab = set(F.vocabulary("words.txt", split))
    for seed in range(8):
        ex = D.make_example("fact_list", 1024, seed, split)
        words = ex.meta["words"]
        assert ex.answer_text() == ", ".join(words)
        assert all(w in vocab or (w.isalpha() and w.islower() and w not in F._lower_words()) for w in words)
        assert [_text(ex, r) for r in ex.evidence] == words
        text = ex.text()
        line = text[text.rfind("\n", 0, ex.evidence[0][0]) + 1:text.find("\n", ex.evidence[-1][1])]
        assert ex.meta["owner"].lower() in line.lower() and line.endswith(", ".join(words) + ".")
        a0 = ex.answer[0]
        expected = {}
        at = 0
        for i, w in enumerate(words):
            for j in range(len(w)):
                expected[a0 + at + j - 1] = [i]
            at += len(w) + 2
        assert ex.needs == expected


def test_word_needles_are_digit_needles_with_a_word():
    """fact_needle: the NIAH sentence and question of `data.niah` with a held-out-by-split word as the value; the
    question restates the statement's prefix; distractor keys differ by one letter and hold other words."""
    for split in D.SPLITS:
        for seed in range(6):
            ex = D.make_example("fact_needle", 1024, seed, split)
            value, key = ex.meta["value"], ex.meta["key"]
            assert ex.answer_text() == value
            assert value in F.vocabulary("words.txt", split) or value not in F._lower_words()
            assert [_text(ex, r) for r in ex.evidence] == [value]
            assert _text(ex, (1, ex.evidence[0][0])).endswith(f"The magic word for {key} is ")
            assert _text(ex, (1, ex.answer[0])).endswith(f"What is the magic word for {key}? The magic word for {key} is ")
            # statements stand on their own lines or (train split) inside the running text
            said = re.findall(r"The magic word for ([a-z]+-[a-z]+) is ([A-Za-z]+)\.", ex.text())
            assert len(said) == 1 + ex.meta["n_distractors"] and said.count((key, value)) == 1
            assert all(sum(a != b for a, b in zip(k, key)) == 1 and v != value for k, v in said if k != key)


def test_copy_aids_mix_real_and_made_up_words():
    """Half of the copy aids' values are made-up words (no word list holds them), so they can only be copied."""
    words = [w for seed in range(30) for w in D.make_example("fact_list", 1024, seed, "train").meta["words"]]
    words += [D.make_example("fact_needle", 512, seed, "train").meta["value"] for seed in range(30)]
    made_up = sum(w not in F._lower_words() for w in words) / len(words)
    assert 0.3 < made_up < 0.7, made_up


def test_word_lists_fit_short_rows():
    """fact_list drops distractor lists, then words, until the row fits (a 5-word list does not fit 256 tokens);
    the seed's own choice is kept where it fits, so long rows still hold long lists."""
    for length in (200, 256, 384, 512, 1100):
        sizes = [len(D.make_example("fact_list", length, seed, "train").meta["words"]) for seed in range(16)]
        assert min(sizes) >= 1
    assert max(len(D.make_example("fact_list", 1100, seed, "train").meta["words"]) for seed in range(16)) >= 10
    with pytest.raises(D.TooShort):
        F.fact_list(256, 0, "train", n_words=12)


# --------------------------------------------------------------------------- chance recall
def _naive_offsets(p: Fraction, up_to: int) -> list[int]:
    u, v = p.numerator, p.denominator
    out = [0]
    for i in range(1, up_to + 1):
        n = 0
        while (n + 1) ** u <= i ** v:
            n += 1
        out.append(n)
    return out


def _ceil_exact(factor: Fraction, t: int, rho: Fraction) -> int:
    # smallest n with n ≥ factor · t^rho, by exact integer powers
    n = 0
    while Fraction(n) ** rho.denominator < factor ** rho.denominator * Fraction(t) ** rho.numerator:
        n += 1
    return n


def _naive_chance(sw: int, k: int, bf: Fraction, rho: Fraction, p: Fraction, q: int, ev: range) -> float:
    offsets = _naive_offsets(p, 200)
    w = offsets[sw + 1] - 1
    window = set(range(max(0, q - w + 1), q + 1)) if w > 0 else set()
    t = q + 1
    back = _ceil_exact(bf, t, rho)
    spans = []
    for i in range(sw + 1, len(offsets)):
        a = q + 1 - offsets[i]
        if a < 0:
            break
        end = min(a, q, (max(0, q - w + 1) - 1) if w > 0 else q)
        spans.append(set(range(max(a - back, 0), end + 1)))
    subsets = list(itertools.combinations(range(len(spans)), min(k, len(spans))))
    hits = sum(any(set(ev) <= spans[j] | window for j in sub) or set(ev) <= window for sub in subsets)
    return hits / len(subsets)


@pytest.mark.parametrize("q,ev", [(120, (3, 7)), (120, (100, 104)), (250, (40, 41)), (250, (230, 248)),
                                  (90, (86, 90)), (300, (0, 2)), (64, (10, 60))])
@pytest.mark.parametrize("sw,k,bf,rho,p", [(3, 2, Fraction(3), Fraction(1, 2), Fraction(3, 5)),
                                           (2, 3, Fraction(2), Fraction(1, 2), Fraction(1, 2))])
def test_chance_recall_equals_enumeration(q, ev, sw, k, bf, rho, p):
    cfg = SpanConfig(sw_index=sw, num_spans=k, backward_factor=float(bf), forward_factor=0.0,
                     span_power=float(rho), search_power=float(p))
    got = chance_recall(cfg, q, ev[0], ev[1])
    want = _naive_chance(sw, k, bf, rho, p, q, range(*ev))
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12), (got, want)


def test_chance_recall_lands_in_summaries(model):
    from superlinear_lab.evaluate import run_examples, summarize

    exs = [D.make_example("fact_name", 512, s, "eval") for s in range(2)]
    results = run_examples(model, exs)
    summary = summarize(results, [i for i, _ in model.routing_layers()])
    assert 0.0 <= summary["chance_head"] <= summary["chance_any"] <= 1.0
    assert summary["chance_any"] > 0.0  # at 512 tokens some candidate always holds a short value


# --------------------------------------------------------------------------- corpus
def test_corpus_builder_filters_reserved_duplicate_and_non_prose(tmp_path):
    prose = ("The program reads the configuration file and writes a report for each of the users that are "
             "listed in it. This is done once a day, and the report is kept for a week. ") * 4
    doc = tmp_path / "doc" / "pkg"
    doc.mkdir(parents=True)
    (doc / "README").write_text(prose)
    (doc / "README.Debian.gz").write_bytes(gzip.compress(prose.replace("report", "summary").encode()))
    (tmp_path / "doc" / "other").mkdir()
    (tmp_path / "doc" / "other" / "copyright").write_text(prose)  # a duplicate licence text
    (doc / "NEWS").write_text("0x1f 0x2e 0x3a = == != {} [] ;; " * 40)  # not prose
    (doc / "FAQ").write_text(prose + " This text came from Project Gutenberg.")  # reserved for evaluation
    fortunes = tmp_path / "fortune"
    fortunes.mkdir()
    (fortunes / "fortunes").write_text("A short fortune.\n%\nAnother one.\n%\n")
    (fortunes / "literature").write_text("To be, or not to be.\n%\n")
    out = tmp_path / "out"
    manifest = build_corpus(out, roots={"doc": tmp_path / "doc", "fortune": fortunes}, include_python=False)
    assert manifest["dropped"] == {"reserved": 1, "duplicate": 1, "not_prose": 1}
    text = b"".join(gzip.decompress((out / f"{s}.txt.gz").read_bytes()) for s in D.SPLITS).decode()
    assert "summary" in text and "A short fortune." in text
    assert "Gutenberg" not in text and "To be, or not" not in text and "0x1f" not in text
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["sha256"]
    D.use_corpus(out)
    try:
        assert D.corpus("train") + D.corpus("eval") != b"" and D.corpus_fingerprint()["source"] == str(out)
    finally:
        D.use_corpus(None)
    assert D.corpus_fingerprint()["source"] == "python-docs"
    with pytest.raises(FileNotFoundError, match="python -m superlinear_lab.corpus"):
        D.use_corpus(tmp_path / "nowhere")


def test_roff_and_prose_filters():
    page = ".TH LS 1\n.SH NAME\nls \\- list directory contents\n.B \\-\\-all\n.\\\" a comment\n.PP\n" \
           "do not ignore entries starting with \\fB.\\fR"
    assert strip_roff(page) == "NAME\nls - list directory contents\n--all\ndo not ignore entries starting with ."
    assert not is_english_prose("x = [1, 2, 3]; y = {a: b} " * 30)
    assert is_english_prose("This is the text of the manual, and it is written for the users of the tool. " * 5)


# --------------------------------------------------------------------------- training on facts
def test_train_starts_from_given_weights_and_refuses_another_architecture(tmp_path, model):
    import dataclasses
    import torch

    from superlinear_lab import train as T

    cfg = T.TrainConfig(model=model.cfg.to_dict(), stages=[[256, 1, 1]], task_mix={"fact_word": 1.0},
                        probe_every=0, init_from="tiny", lr=0.0, weight_decay=0.0)
    T.train(cfg, tmp_path / "ck", backend="torch", progress=False)
    trained = T.load_file(str(tmp_path / "ck" / "model.safetensors"))
    reference = model.state_dict()
    assert set(trained) == set(reference)
    assert all(torch.equal(trained[k], reference[k].float()) for k in reference)  # lr 0: still the given weights
    wider = dataclasses.replace(cfg, model={**cfg.model, "d_ff": cfg.model["d_ff"] + 8})
    with pytest.raises(ValueError, match="init_from='tiny'"):
        T.train(wider, tmp_path / "ck2", backend="torch", progress=False)


@pytest.mark.parametrize("split", D.SPLITS)
def test_quiz_asks_every_fact_of_a_key_grid_in_turn(split):
    """fact_quiz: same-kind facts whose keys share owners and things, each asked once; the answer interleaves the
    values (in asking order) with the later questions, which are marked as prompts; value bytes need their own
    statement's value and question bytes need nothing."""
    sizes = set()
    for seed in range(12):
        ex = D.make_example("fact_quiz", 1024, seed, split)
        keys, values, order = [tuple(k) for k in ex.meta["keys"]], ex.meta["values"], ex.meta["order"]
        sizes.add(len(keys))
        assert ex.length == 1024 and len(set(keys)) == len(keys) >= 2 and sorted(order) == list(range(len(keys)))
        for owner, thing in keys:  # no fact can be told apart by its owner alone or its thing alone
            assert any(o == owner or t == thing for o, t in keys if (o, t) != (owner, thing))
        assert [_text(ex, r) for r in ex.evidence] == values
        parts = ex.answer_text().split("\nAnswer: ")
        assert [p.split("\nQuestion: ")[0] for p in parts] == [values[i] for i in order]
        prompts = [bytes(ex.ids[a:b]).decode() for a, b in ex.prompts]
        assert len(prompts) == len(keys) - 1
        assert all(p.startswith("\nQuestion: ") and p.endswith("\nAnswer: ") for p in prompts)
        asked = [bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1]] + prompts
        for text, i in zip(asked, order):  # each question names its own fact's owner and thing
            owner, thing = keys[i]
            assert owner[4:] in text and thing in text
        in_prompt = {q for a, b in ex.prompts for q in range(a - 1, b - 1)}
        assert set(ex.queries) == set(range(ex.answer[0] - 1, ex.answer[1] - 1)) - in_prompt
        for q in ex.queries:
            (e,) = ex.needs[q]
            assert chr(ex.ids[q + 1]) in values[e]
    assert len(sizes) > 2
    with pytest.raises(ValueError, match="n_facts=0"):
        F.fact_quiz(1024, 0, split, n_facts=0)


@pytest.mark.parametrize("split", D.SPLITS)
def test_hop_quiz_asks_every_chain_with_both_hops_as_evidence(split, monkeypatch):
    """fact_hop_quiz: two-hop chains whose keys share owners and things, each place asked once. Every value
    byte needs exactly its own chain's two hops (the pointer name in the statement naming the asked owner's
    thing, then the place in the statement that names that pointer); question bytes need nothing; the rivals are
    the places; the split's own HOP phrasing is used (one per row) and the eval split's questions are bare.
    (Statements on lines of their own here, to read them by line.)"""
    from superlinear_lab import train as T

    monkeypatch.setattr(F, "INLINE", 0.0)

    sizes = set()
    for seed in range(12):
        ex = D.make_example("fact_hop_quiz", 1536, seed, split)
        keys, names, places = [tuple(k) for k in ex.meta["keys"]], ex.meta["middles"], ex.meta["values"]
        order = ex.meta["order"]
        sizes.add(len(keys))
        assert ex.task == "fact_hop_quiz" and ex.length == 1536 and ex.answer_text() == ex.meta["value"]
        assert len(set(keys)) == len(keys) == len(names) == len(places) and sorted(order) == list(range(len(keys)))
        assert len(set(names + places)) == 2 * len(keys)
        for owner, thing in keys:
            assert thing in F.THINGS["name"]
            assert len(keys) == 1 or any(o == owner or t == thing for o, t in keys if (o, t) != (owner, thing))
        text = ex.text()
        line = lambda r: text[text.rfind("\n", 0, r[0]) + 1:text.find("\n", r[1])]  # noqa: E731
        assert [_text(ex, r) for r in ex.evidence] == [v for pair in zip(names, places) for v in pair]
        kept_lines = set()
        for i, (owner, thing) in enumerate(keys):
            named, kept = line(ex.evidence[2 * i]), line(ex.evidence[2 * i + 1])
            assert owner[4:] in named and re.search(rf"\b{thing}\b", named), named  # the hop from the key
            assert places[i] not in named and named != kept
            phrasings = [w for w, _ in F.hop_phrasings(split) if w.format(name=names[i], value=places[i]) == kept]
            assert phrasings, kept  # the hop from the pointer: "<Name> is kept in <Place>." of the split's phrasings
            kept_lines.add(phrasings[0])
        assert len(kept_lines) == 1  # one phrasing per row
        assert sorted(_text(ex, r) for r in ex.rivals) == sorted(places)
        # the answer: places in asking order, the later questions marked as prompts
        parts = ex.answer_text().split("\nAnswer: ")
        assert [p.split("\nQuestion: ")[0] for p in parts] == [places[i] for i in order]
        prompts = [bytes(ex.ids[a:b]).decode() for a, b in ex.prompts]
        assert len(prompts) == len(keys) - 1
        asked = [bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer: ")]
        asked += [p.removeprefix("\nQuestion: ").removesuffix("\nAnswer: ") for p in prompts]
        hop_questions = {q for w, q in F.hop_phrasings(split) if w in kept_lines}  # those paired with the statement
        for q, i in zip(asked, order):
            bare = {F._fill(t, *keys[i]) for t in hop_questions}
            if split == "eval":
                assert q in bare, q  # held-out phrasing, unwrapped
            else:
                assert any(q.endswith(b) and q.removesuffix(b) in F.QUESTION_LEADS for b in bare), q
        if split == "eval":
            assert len(hop_questions) == 1
        in_prompt = {q for a, b in ex.prompts for q in range(a - 1, b - 1)}
        assert set(ex.queries) == set(range(ex.answer[0] - 1, ex.answer[1] - 1)) - in_prompt
        at = ex.answer[0]
        for k, i in enumerate(order):  # each value byte needs its own chain's two hops
            at += len(prompts[k - 1].encode()) if k else 0
            for j in range(len(places[i].encode())):
                assert ex.needs[at + j - 1] == [2 * i, 2 * i + 1]
            at += len(places[i].encode())
        # training scores the places only, with a first-token weight on each
        _, mask, first = T.loss_weights([ex], "cpu")
        scored = bytes(ex.ids[q + 1] for q in mask[0].nonzero().flatten().tolist()).decode()
        assert scored == "".join(places[i] for i in order)
        assert bytes(ex.ids[q + 1] for q in first[0].nonzero().flatten().tolist()).decode() == \
            "".join(places[i][0] for i in order)
    assert len(sizes) > 2
    with pytest.raises(ValueError, match="n_facts=0"):
        F.fact_hop_quiz(1024, 0, split, n_facts=0)


@pytest.mark.parametrize("task", ["fact_hop_quiz", "fact_hop_steps", "fact_phrase_quiz", "fact_hop_named",
                                  "fact_name_keyed"])
def test_hop_quiz_is_a_task_mix_name(task):
    """A training config names the hop quizzes in its task mix, as any other task."""
    from superlinear_lab import train as T

    cfg = T.TrainConfig(stages=[[1024, 1, 3]], task_mix={task: 1.0})
    rows = T.make_batch(cfg, 0)
    assert [ex.task for ex in rows] == [task] * 3 and all(ex.length == 1024 for ex in rows)
    assert task in F.AUX_TASKS and task not in F.TASKS  # a training aid, no eval suite
