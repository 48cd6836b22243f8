"""Training and evaluation data, all offline: natural text from the standard library and seeded long-context tasks.

Text comes from `pydoc_data.topics` (Python's own reference docs, present on every install) and the docstrings of
a fixed list of standard-library modules. Topics are split by name into a train part and a held-out part, so
evaluation filler is text the model never trained on; docstrings go to train only.

Tasks (each a pure function of ``(length, seed, split, ...)``; `split` enters the seed, so train and eval never
share a random stream):

* ``passkey``     — one needle "The pass key is 48213." at a chosen depth; "What is the pass key?".
* ``niah``        — one keyed needle "The magic number for kadomi-ruvela is 48213." at a chosen depth.
* ``multi_key``   — several keyed needles whose keys are near-duplicates of each other (one letter changed);
                    one of them is asked for.
* ``multi_value`` — one key with several values spread through the text; all are asked for, in order.
* ``multi_hop``   — variable tracking "VAR ab = cd." … "VAR cd = 48213." … "What is ab?", with distractor chains
                    whose names are near-duplicates of the asked chain's.

Every `Example` knows its answer token range and, for each query position that predicts an answer token, which
evidence token ranges it needs (for routing recall: was that evidence inside a chosen span).
Tokens are `ByteTokenizer` ids: one UTF-8 byte each, a <|bos|> first.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import inspect
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .model.tokenizer import ByteTokenizer

TASKS = ("passkey", "niah", "multi_key", "multi_value", "multi_hop")
SPLITS = ("train", "eval")
HELD_OUT_FRACTION = 0.15  # share of pydoc topics (by hashed name) kept for evaluation filler
DOCSTRING_MODULES = (  # fixed order so the train corpus is the same on every run of one Python version
    "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "zipfile", "zlib",
)
_TOKENIZER = ByteTokenizer()
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


# --------------------------------------------------------------------------- corpus
def _held_out(name: str) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return digest[0] < 256 * HELD_OUT_FRACTION


def _docstrings() -> list[str]:
    texts = []
    for mod_name in DOCSTRING_MODULES:
        try:
            with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when touched
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mod_name)
                members = [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        except ImportError:
            continue
        seen = set()
        for obj in [mod] + members:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


_CORPUS_DIR: list[Path | None] = [None]  # a built corpus (superlinear_lab.corpus) replaces the Python-docs default


def use_corpus(path) -> None:
    """Read filler text from a corpus folder built by `superlinear_lab.corpus` (``train.txt.gz``/``eval.txt.gz``;
    Python's docs, Debian's English documentation, licences, manuals and fortunes) instead of Python's docs
    alone; `None` goes back to the default. Every task built afterwards uses it."""
    if path is not None:
        path = Path(path)
        missing = [f"{s}.txt.gz" for s in SPLITS if not (path / f"{s}.txt.gz").is_file()]
        if missing:
            raise FileNotFoundError(f"corpus={str(path)!r} lacks {missing}: build it with "
                                    f"'python -m superlinear_lab.corpus {path}'")
    _CORPUS_DIR[0] = path
    corpus.cache_clear()


@functools.lru_cache(maxsize=None)
def corpus(split: str = "train") -> bytes:
    """UTF-8 bytes of the natural-text corpus of `split`. Default ("train": most pydoc topics + stdlib
    docstrings; "eval": the held-out pydoc topics), or the folder chosen with `use_corpus`. Documents are
    joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if _CORPUS_DIR[0] is not None:
        return gzip.decompress((_CORPUS_DIR[0] / f"{split}.txt.gz").read_bytes())
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics) if _held_out(name) == (split == "eval")]
    if split == "train":
        docs += _docstrings()
    return "\n\n".join(d.strip() for d in docs).encode("utf-8")


def reference_docs() -> str:
    """All of Python's reference docs (`pydoc_data.topics`) as one document: "name\nbody" per topic, sorted by
    name, joined by blank lines. The real text that is present offline on every install."""
    from pydoc_data.topics import topics

    return "\n\n".join(f"{name}\n{body}" for name, body in sorted(topics.items()))


def corpus_source() -> str:
    """Where `corpus` reads from now: "python-docs" (the default) or the folder given to `use_corpus`."""
    return "python-docs" if _CORPUS_DIR[0] is None else str(_CORPUS_DIR[0])


def corpus_fingerprint() -> dict:
    """Source, sizes and sha256 of both corpus splits (recorded in logs and the model card)."""
    out: dict = {s: {"bytes": len(corpus(s)), "sha256": hashlib.sha256(corpus(s)).hexdigest()[:16]} for s in SPLITS}
    out["source"] = corpus_source()
    return out


def text_window(rng: random.Random, n: int, split: str) -> list[int]:
    """`n` consecutive byte tokens of the split's corpus from a random offset (wrapping), cut so it starts after
    a newline or space when one is near."""
    text = corpus(split)
    start = rng.randrange(len(text))
    boundary = text.find(b"\n", start, start + 200)
    start = boundary + 1 if boundary >= 0 else start
    out = bytearray()
    while len(out) < n:
        out += text[start:start + n - len(out)]
        start = 0
    return list(out)


# --------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One task instance. ``ids`` = prompt + answer (the answer is the last part).

    Attributes:
        ids: token ids [L] (<|bos|> first).
        answer: (start, end): the answer tokens are ids[start:end].
        evidence: token ranges (start, end) (end exclusive) holding what the answer depends on.
        needs: query position -> indices into `evidence` that the query needs. A query at position q predicts
            token q + 1, so the queries are answer[0]-1 … answer[1]-2.
        task: the task name; meta: depth, key, value(s) and the like.
        prompts: token ranges (start, end) inside the answer that are prompt, not answer: `fact_quiz` asks its
            later questions there. Training scores the answer tokens outside them.
        rivals: token ranges (start, end) of values the asked one can be confused with: the values of the other
            facts of the same kind (`superlinear_lab.facts`). A rival range may also be evidence (a `fact_quiz` asks
            every fact); for a query it is a rival unless that query needs it. Training's routing loss contrasts
            the evidence's stripes with the rivals' (`superlinear_lab.train.routing_loss`).
    """

    ids: list[int]
    answer: tuple[int, int]
    evidence: list[tuple[int, int]]
    needs: dict[int, list[int]]
    task: str
    meta: dict = field(default_factory=dict)
    prompts: list[tuple[int, int]] = field(default_factory=list)
    rivals: list[tuple[int, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def queries(self) -> list[int]:
        return sorted(self.needs)

    def text(self) -> str:
        return _TOKENIZER.decode(self.ids)

    def answer_text(self) -> str:
        return _TOKENIZER.decode(self.ids[self.answer[0]:self.answer[1]])


def _rng(task: str, length: int, seed: int, split: str, extra="") -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return random.Random(f"{split}:{task}:{length}:{seed}:{extra}")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _key(rng: random.Random) -> str:
    return f"{_word(rng, 3)}-{_word(rng, 3)}"


def _near_duplicate(rng: random.Random, name: str, taken: set[str]) -> str:
    """`name` with one letter changed (same shape: consonant for consonant, vowel for vowel), not in `taken`."""
    for _ in range(100):
        i = rng.choice([j for j, c in enumerate(name) if c.isalpha()])
        pool = _VOWELS if name[i] in _VOWELS else _CONSONANTS
        out = name[:i] + rng.choice(pool.replace(name[i], "")) + name[i + 1:]
        if out not in taken:
            return out
    raise RuntimeError(f"no near-duplicate of {name!r} left")


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10000, 100000))
        if value not in taken:
            taken.add(value)
            return value


class TooShort(ValueError):
    """The task's statements, question and answer do not fit the requested length."""


SENTENCE_REACH = 400  # how far (bytes) an inline needle may move from its depth to reach a sentence start


def _sentence_start(filler: list[int], at: int) -> int | None:
    """The sentence start in `filler` (byte ids) nearest to `at`, within `SENTENCE_REACH`: the filler's start, a
    paragraph's start (after a blank line), or the byte after a letter and ". ", "? ", "! " or the same mark at a
    line's end (hard-wrapped text); None when there is none. A line start inside a sentence does not count."""
    best = None
    for p in range(max(0, at - SENTENCE_REACH), min(len(filler), at + SENTENCE_REACH) + 1):
        if p == 0 or (p >= 2 and filler[p - 1] == 10 == filler[p - 2]) or (
                p >= 3 and filler[p - 1] in (10, 32) and filler[p - 2] in b".?!" and chr(filler[p - 3]).isalpha()):
            if best is None or abs(p - at) < abs(best - at):
                best = p
    return best


class _Builder:
    """Assembles filler + inserted needles + question + answer to exactly `length` tokens, tracking ranges."""

    def __init__(self, rng: random.Random, length: int, split: str, inline: float = 0.0):
        """`inline`: chance that a needle is planted inside the running text at a sentence boundary ("… end.
        <statement> Next …", as a fact stands in a real document) instead of on a line of its own; each needle
        draws from `rng` only when `inline` > 0, so the default leaves every row as it was."""
        if not 0.0 <= inline <= 1.0:
            raise ValueError(f"inline={inline!r}: expected a probability in [0, 1]")
        self.rng, self.length, self.split, self.inline = rng, length, split, inline
        # (depth, text, char ranges to mark, planted inline)
        self.needles: list[tuple[float, str, list[tuple[int, int]], bool]] = []
        self.rival_marks: dict[int, list[tuple[int, int]]] = {}  # needle index -> char ranges of rival values

    def needle(self, depth: float, text: str, marks: list[str], rivals: tuple[str, ...] = ()) -> list[int]:
        """Queue sentence `text` at relative `depth`; `marks` are substrings whose token ranges become evidence,
        `rivals` substrings whose ranges become `Example.rivals` (each at its last occurrence in `text`).
        Returns the indices the marks will have in `evidence`."""
        def last(m: str) -> tuple[int, int]:
            at = text.rindex(m)
            return at, at + len(m)

        if rivals:
            self.rival_marks[len(self.needles)] = [last(m) for m in rivals]
        inline = self.inline > 0 and self.rng.random() < self.inline
        self.needles.append((depth, text, [last(m) for m in marks], inline))
        return list(range(sum(len(n[2]) for n in self.needles[:-1]),
                          sum(len(n[2]) for n in self.needles)))

    def build(self, question: str, answer: str, needs_of, task: str, meta: dict,
              prompts: tuple[tuple[int, int], ...] = ()) -> Example:
        """`needs_of(i)` -> evidence indices needed by the query that predicts answer byte i; `prompts`: byte
        ranges (start, end) of `answer` that are prompt text (`Example.prompts`)."""
        q_ids = list(question.encode())
        a_ids = list(answer.encode())
        # a needle on its own line is "\n<text>\n"; one planted inline is "<text> " at the start of a sentence
        pieces = [list((t + " " if inline else "\n" + t + "\n").encode()) for _, t, _, inline in self.needles]
        fixed = 1 + len(q_ids) + len(a_ids) + sum(len(p) for p in pieces)
        n_filler = self.length - fixed
        if n_filler < 8:
            raise TooShort(f"length={self.length}: too short for this task (needs more than {fixed + 8} tokens)")
        filler = text_window(self.rng, n_filler, self.split)
        cuts = []
        for depth, _, _, inline in self.needles:  # insertion points in the filler
            at = min(n_filler, max(0, round(depth * n_filler)))
            sentence = _sentence_start(filler, at) if inline else None
            if sentence is not None:
                at = sentence
            else:  # snapped back to a line/word start
                for back in range(min(at, 48)):
                    if filler[at - back - 1] in (10, 32):
                        at -= back
                        break
            cuts.append(at)
        order = sorted(range(len(self.needles)), key=lambda i: (cuts[i], i))
        ids, evidence_by_needle, rivals, prev = [_TOKENIZER.bos_id], {}, [], 0
        for i in order:
            ids += filler[prev:cuts[i]]
            prev = cuts[i]
            base = len(ids) + (0 if self.needles[i][3] else 1)  # after the leading "\n" of a needle on its own line
            evidence_by_needle[i] = [(base + a, base + b) for a, b in self.needles[i][2]]
            rivals += [(base + a, base + b) for a, b in self.rival_marks.get(i, [])]
            ids += pieces[i]
        ids += filler[prev:]
        evidence = [r for i in range(len(self.needles)) for r in evidence_by_needle[i]]
        ids += q_ids
        a0 = len(ids)
        ids += a_ids
        assert len(ids) == self.length
        needs = {a0 + j - 1: needs_of(j) for j in range(len(a_ids)) if needs_of(j)}
        return Example(ids, (a0, len(ids)), evidence, needs, task, meta, [(a0 + a, a0 + b) for a, b in prompts],
                       sorted(rivals))


def passkey(length: int, depth: float, seed: int, split: str = "train") -> Example:
    """One unkeyed needle "The pass key is V." at `depth` (0 = start of the text, 1 = end)."""
    rng = _rng("passkey", length, seed, split, depth)
    value = _number(rng, set())
    b = _Builder(rng, length, split)
    b.needle(depth, f"The pass key is {value}. Remember it.", [value])
    return b.build("\nWhat is the pass key? The pass key is ", value, lambda j: [0], "passkey",
                   {"depth": depth, "value": value, "seed": seed})


def niah(length: int, depth: float, seed: int, split: str = "train", n_distractors: int = 0) -> Example:
    """One keyed needle at `depth`, optionally with `n_distractors` near-duplicate keys at random depths."""
    return _keyed("niah", length, depth, seed, split, n_distractors)


def multi_key(length: int, seed: int, split: str = "train", n_keys: int = 4) -> Example:
    """`n_keys` keyed needles at random depths; keys are near-duplicates of the asked one; one is asked for."""
    rng = _rng("multi_key_depth", length, seed, split)
    return _keyed("multi_key", length, rng.random(), seed, split, n_keys - 1)


def _keyed(task: str, length: int, depth: float, seed: int, split: str, n_distractors: int) -> Example:
    rng = _rng(task, length, seed, split, f"{depth}:{n_distractors}")
    key = _key(rng)
    keys, values = {key}, set()
    value = _number(rng, values)
    b = _Builder(rng, length, split)
    b.needle(depth, f"The magic number for {key} is {value}.", [value])
    for _ in range(n_distractors):
        other = _near_duplicate(rng, key, keys)
        keys.add(other)
        b.needle(rng.random(), f"The magic number for {other} is {_number(rng, values)}.", [])
    return b.build(f"\nWhat is the magic number for {key}? The magic number for {key} is ", value, lambda j: [0],
                   task, {"depth": depth, "key": key, "value": value, "n_distractors": n_distractors, "seed": seed})


def multi_value(length: int, seed: int, split: str = "train", n_values: int = 3) -> Example:
    """One key with `n_values` values at increasing random depths; the answer lists them in order of appearance."""
    rng = _rng("multi_value", length, seed, split, n_values)
    key = _key(rng)
    taken: set[str] = set()
    values = [_number(rng, taken) for _ in range(n_values)]
    depths = sorted(rng.random() for _ in range(n_values))
    b = _Builder(rng, length, split)
    for d, v in zip(depths, values):
        b.needle(d, f"One of the lucky numbers of {key} is {v}.", [v])
    answer = ", ".join(values)
    owner = []  # answer byte -> value index (separators need nothing)
    for i, v in enumerate(values):
        owner += [i] * len(v) + ([None, None] if i < n_values - 1 else [])
    return b.build(f"\nList all lucky numbers of {key}, in order. The lucky numbers of {key} are ", answer,
                   lambda j: [] if owner[j] is None else [owner[j]], "multi_value",
                   {"depths": depths, "key": key, "values": values, "seed": seed})


def multi_hop(length: int, seed: int, split: str = "train", n_distractors: int = 2) -> Example:
    """Two-hop variable tracking: "VAR a = b." and "VAR b = V." (in either order, random depths) plus
    `n_distractors` chains whose names are near-duplicates of a and b. Evidence: the pointer "b" in the first
    statement and the value V in the second; every answer query needs both."""
    rng = _rng("multi_hop", length, seed, split, n_distractors)
    names: set[str] = set()
    a, mid = _word(rng, 2), _word(rng, 2)
    while mid == a:
        mid = _word(rng, 2)
    names |= {a, mid}
    values: set[str] = set()
    value = _number(rng, values)
    b = _Builder(rng, length, split)
    b.needle(rng.random(), f"VAR {a} = {mid}.", [f"= {mid}"[2:]])
    b.needle(rng.random(), f"VAR {mid} = {value}.", [value])
    for _ in range(n_distractors):
        a2, m2 = _near_duplicate(rng, a, names), None
        names.add(a2)
        m2 = _near_duplicate(rng, mid, names)
        names.add(m2)
        b.needle(rng.random(), f"VAR {a2} = {m2}.", [])
        b.needle(rng.random(), f"VAR {m2} = {_number(rng, values)}.", [])
    return b.build(f"\nWhat is the value of {a}? The value of {a} is ", value, lambda j: [0, 1], "multi_hop",
                   {"start": a, "middle": mid, "value": value, "n_distractors": n_distractors, "seed": seed})


def text_example(length: int, seed: int, split: str = "train") -> Example:
    """Plain natural text (LM loss only): no answer, no evidence."""
    rng = _rng("text", length, seed, split)
    ids = [_TOKENIZER.bos_id] + text_window(rng, length - 1, split)
    return Example(ids, (length, length), [], {}, "text", {"seed": seed})


def make_example(task: str, length: int, seed: int, split: str = "train", depth: float | None = None) -> Example:
    """Any task by name (the digit tasks here, the prose-fact tasks of `superlinear_lab.facts` by their
    ``fact_…`` names); `depth` (for passkey/niah) is drawn from the seed when None. Needle counts (keys, values,
    distractor chains) are drawn from the seed too, capped by what fits `length`."""
    if task.startswith("fact_"):
        from .facts import make_fact  # facts builds on this module

        return make_fact(task, length, seed, split)
    if task in ("passkey", "niah"):
        if depth is None:
            depth = _rng("depth", length, seed, split).random()
        return passkey(length, depth, seed, split) if task == "passkey" else niah(length, depth, seed, split)
    room = max(1, length // 128)  # needles are ~40 tokens: short rows get fewer of them
    n = _rng("n", length, seed, split)
    if task == "multi_key":
        return multi_key(length, seed, split, n_keys=n.randint(2, max(2, min(6, room))))
    if task == "multi_value":
        return multi_value(length, seed, split, n_values=n.randint(2, max(2, min(4, room))))
    if task == "multi_hop":
        return multi_hop(length, seed, split, n_distractors=n.randint(1, max(1, min(3, room // 2))))
    if task == "text":
        return text_example(length, seed, split)
    raise ValueError(f"task={task!r}: expected one of {TASKS + ('text',)} or a fact task ('fact_word', …)")
