"""fact_phrase_quiz (superlinear_lab.facts): a quiz of long multi-word values, every one asked in turn (a dense
copy signal for multi-word values under the split's phrasings)."""
import gzip
import hashlib
import re
from importlib import resources

import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F




def _word_list() -> tuple[set[str], set[str]]:
    """(train words, eval words) of the packaged word list, split by sha256 as the issue's design says (a fifth
    of the values, by the first digest byte, are eval-only)."""
    text = resources.files("superlinear_lab").joinpath("resources", "words.txt").read_text(encoding="utf-8")
    words = [w for w in text.split("\n") if w and not w.startswith("#")]
    held = {w for w in words if hashlib.sha256(w.encode()).digest()[0] < 256 * 0.2}
    return set(words) - held, held


@pytest.mark.parametrize("split", D.SPLITS)
def test_phrase_quiz_values_evidence_needs_and_rivals(split, planted_statements):
    """Every value is 2-5 words: in the train split words of the train corpus, of the list's train part and
    made-up ones, never a word that could be an eval value (its hash); in the eval split the eval list's words
    and made-up ones; evidence decodes to the values, each inside the statement of its own key; the answer gives the values
    in asking order with the later questions as prompts; each value byte needs its own value, question bytes
    nothing; every value is a rival."""
    planted = planted_statements
    train_words, eval_words = _word_list()
    mine, other = (train_words, eval_words) if split == "train" else (eval_words, train_words)
    corpus = set(re.findall(r"[a-z]+", D.corpus("train").decode("utf-8", "replace")))
    counts, kinds = set(), {"list": 0, "corpus": 0, "made_up": 0}
    for seed in range(12):
        ex = D.make_example("fact_phrase_quiz", 2048, seed, split)
        keys, values, order = [tuple(k) for k in ex.meta["keys"]], ex.meta["values"], ex.meta["order"]
        assert ex.task == "fact_phrase_quiz" and ex.length == 2048 and ex.answer_text() == ex.meta["value"]
        assert len(keys) == len(set(keys)) == len(values) == len(set(values))
        assert sorted(order) == list(range(len(keys)))
        for v in values:
            words = v.split(" ")
            counts.add(len(words))
            for w in words:
                assert w not in other and w == w.lower() and w.isalpha(), (split, w)
                if split == "train" and w in corpus:  # a real word, never one the eval split could hold
                    assert hashlib.sha256(w.encode()).digest()[0] >= 256 * 0.2, w
                kinds["list" if w in mine else "corpus" if w in corpus and split == "train" else "made_up"] += 1
        assert [bytes(ex.ids[a:b]).decode() for a, b in ex.evidence] == values
        raw = b"\0" + bytes(ex.ids[1:])  # ids[0] is <|bos|>: keep the indices
        for (owner, thing), (a, b) in zip(keys, ex.evidence):
            holding = [t for t in planted if raw.find(t.encode()) >= 0
                       and raw.find(t.encode()) <= a <= b <= raw.find(t.encode()) + len(t.encode())]
            assert len(holding) == 1 and owner[4:] in holding[0] and thing in holding[0]
            assert holding[0].count('"') == 2  # the value is quoted, as the phrase phrasings quote it
        if split == "eval":  # the eval split's own phrasings only, statements and questions
            assert all(any(F._fill(t, o, th, v) == s for t in F.STATEMENTS["eval"]["phrase"])
                       for s, (o, th), v in zip(planted, keys, values))
            asked = re.findall(r"\nQuestion: (.*)\nAnswer: ", ex.text())
            assert asked == [F._fill(F.QUESTIONS["eval"]["phrase"][0], *keys[i]) for i in order]
        assert sorted(bytes(ex.ids[a:b]).decode() for a, b in ex.rivals) == sorted(values)
        parts = ex.answer_text().split("\nAnswer: ")
        assert [p.split("\nQuestion: ")[0] for p in parts] == [values[i] for i in order]
        prompts = [bytes(ex.ids[a:b]).decode() for a, b in ex.prompts]
        assert all(p.startswith("\nQuestion: ") and p.endswith("\nAnswer: ") for p in prompts)
        at = ex.answer[0]
        for k, i in enumerate(order):
            at += len(prompts[k - 1].encode()) if k else 0
            for j in range(len(values[i].encode())):
                assert ex.needs[at + j - 1] == [i]
            at += len(values[i].encode())
        in_prompt = {q for a, b in ex.prompts for q in range(a - 1, b - 1)}
        assert set(ex.needs) == set(range(ex.answer[0] - 1, ex.answer[1] - 1)) - in_prompt
    assert counts == {2, 3, 4, 5}
    total = sum(kinds.values())
    if split == "train":  # half corpus words, a quarter list words, a quarter made-up (some corpus words are listed)
        assert kinds["corpus"] >= 0.3 * total and kinds["list"] >= 0.15 * total and kinds["made_up"] >= 0.12 * total
    else:
        assert kinds["corpus"] == 0 and 0.3 * total <= kinds["made_up"] <= 0.7 * total


def test_phrase_quiz_rows_often_share_the_first_word():
    """In about SHARED_START of the rows every value begins with the same word (named in meta), so a value's first
    byte picks nothing; in the others the values begin with different words."""
    shared, rows, recited, asked = 0, 0, 0, 0
    for seed in range(80):
        ex = F.fact_phrase_quiz(4096, seed, "train", n_facts=4)
        questions = re.findall(r"\nQuestion: (.*)\nAnswer: ", ex.text())
        keys = [tuple(ex.meta["keys"][i]) for i in ex.meta["order"]]
        for q, (owner, thing) in zip(questions, keys):
            bare = q
            for lead in sorted(F.QUESTION_LEADS, key=len, reverse=True):
                if lead and q.startswith(lead):
                    bare = q[len(lead):]
                    break
            recited += any(F._fill(t, owner, thing) == bare for t in F.recite_questions())
            asked += 1
        firsts = {v.split(" ")[0] for v in ex.meta["values"]}
        if ex.meta["shared_start"] is not None:
            assert firsts == {ex.meta["shared_start"]}
            shared += 1
        else:
            assert len(firsts) > 1
        rows += 1
    assert 0.25 * rows <= shared <= 0.55 * rows
    assert asked == 4 * rows and 0.35 * asked <= recited <= 0.65 * asked  # about RECITE_ASKED of the questions
    with pytest.raises(ValueError, match="n_facts=0"):
        F.fact_phrase_quiz(1024, 0, "train", n_facts=0)


def test_probe_words_are_real_train_words_that_no_training_value_uses():
    """probe_words: words of the train corpus, none a possible eval value, none in the packaged list (whose train
    part fact_word / fact_phrase values use) and none in corpus_words (fact_phrase_quiz's); no training row's value
    holds one."""
    probe, pool = set(F.probe_words()), set(F.corpus_words())
    corpus = set(re.findall(r"[a-z]+", D.corpus("train").decode("utf-8", "replace")))
    listed = set().union(*_word_list())
    assert len(probe) > 50 and len(pool) > 5 * len(probe)
    assert probe <= corpus and not probe & listed and not probe & pool
    assert all(hashlib.sha256(w.encode()).digest()[0] >= 256 * 0.2 for w in probe)
    for seed in range(40):
        for task in ("fact_phrase_quiz", "fact_phrase", "fact_word", "fact_quiz", "fact_list"):
            ex = D.make_example(task, 1024, seed, "train")
            values = ex.meta.get("values") or ex.meta.get("words") or [ex.meta["value"]]
            assert not {w for v in values for w in v.split(" ")} & probe, (task, seed)


def test_corpus_words_follow_the_corpus_in_use(tmp_path):
    """corpus_words / probe_words are cached per corpus source: after `use_corpus` switches to another folder they
    come from that folder's train text, and switching back gives the first pools again (a cache keyed on anything
    but the source would keep the old words)."""
    before = F.corpus_words()
    words = [f"zq{a}{b}{c}x" for a in "bcdfg" for b in "hjklm" for c in "nprst"]  # made-up 6-letter words
    text = " ".join(w for w in words for _ in range(F.CORPUS_WORD_MIN)).encode()
    for split in D.SPLITS:
        (tmp_path / f"{split}.txt.gz").write_bytes(gzip.compress(text))
    previous = D.corpus_source()
    D.use_corpus(tmp_path)
    try:
        assert D.corpus_source() == str(tmp_path)
        pools = set(F.corpus_words()) | set(F.probe_words())
        assert pools and pools <= set(words)
    finally:
        D.use_corpus(None if previous == "python-docs" else previous)
    assert F.corpus_words() == before
