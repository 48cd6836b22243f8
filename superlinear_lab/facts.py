"""Fact-retrieval tasks in prose: values that are words, names, phrases, dates and numbers, keyed by natural phrases.

The digit needles of `superlinear_lab.data` let a router learn "find the digits" instead of "find the evidence for
this question". These tasks take that shortcut away:

* values are real English words and names (Debian's wamerican/wbritish lists, `superlinear_lab/resources/`),
  generated names, multi-word phrases, dates and numbers of varied length;
* keys are natural phrases — an owner ("the harbour master", "the baker from Ardley") and a thing ("boat",
  "password", "motto") — and every document holds several facts, with distractor facts of the *same kind*
  (same thing, other owner; same owner, other thing; or, for ``fact_multi_key``, owners that differ in one word);
* statements and questions are drawn from a template bank whose templates are split: the ``"eval"`` split uses
  phrasings and values that the ``"train"`` split never shows, so an accuracy on it is on unseen phrasings; the
  train split adds a few hundred composed phrasings per kind (`composed_statements`, `composed_questions`: the
  value before, inside or after the key, the owner as subject, object or possessive), and plants a statement
  inside the running text after a sentence end with chance `INLINE` (the eval split: each on a line of its own);
* ``fact_hop`` chains two facts (the thing's name, then where that name is kept);
* ``fact_needle`` (training aid) is the digit NIAH of `superlinear_lab.data` with a word value ("The magic word
  for kadomi-ruvela is heron."), asked with the statement's own prefix: the bridge from the digit copying `tiny`
  learned to copying letters, which it cannot do at all (0 % first byte in that very format);
* ``fact_quiz`` (training aid) holds a grid of same-kind facts (every owner with every thing: each fact shares
  its owner with some facts and its thing with others) and asks for all of them, one question after another: every
  value's first byte is a choice between facts that only the whole key tells apart, several per row, where the
  single-question tasks give one (session 6 found the model copying the wrong fact of the right kind);
* ``fact_hop_quiz`` (training aid) is ``fact_quiz`` for ``fact_hop``'s chains: a grid of same-kind two-hop facts
  ("<owner>'s <thing> is called <Name>." and "<Name> is kept in <Place>."), every place asked in turn, each
  answer needing both of its hops, the other places being its rivals (``fact_hop`` is one question per row);
* ``fact_hop_wide`` (training aid) is ``fact_hop_quiz`` asked in other words: each chain's question drawn from
  `hop_wide_questions` (a place question that names the key but not the row's place verb, in many wh-forms:
  "What place is <key> in?", "Where can <key> be found?"), not the verb-matched "where" question that every other
  train hop row pairs with its place statements (issue 13 session 12: every train hop question says "where", and
  the held-out "In which place does <key> stay?" is answered with the pointer name, as a name question; asked
  "Where does <key> stay?" session 11's candidate answers a place instead — bench/BENCHMARKS.md);
* ``fact_hop_steps`` (training aid) is ``fact_hop_quiz`` with the first hop asked as a question of its own: per
  chain, mostly "What is <owner>'s <thing> called?" (-> the pointer name) and then where it is kept (-> the
  place), sometimes the place alone;
* ``fact_phrase_quiz`` (training aid) is ``fact_quiz`` for long multi-word values: a grid of phrase facts whose
  values are 2–5 words (real words of the split and made-up ones, often all starting with the same word), every
  one asked in turn: tens of multi-word copy targets per row under the split's phrasings, where a byte slip
  inside a later word costs a phrase its exact match (session 9's candidate: first byte 91 %, exact 59 %);
* ``fact_hop_named`` (training aid) is the second hop alone: ``fact_hop_quiz``'s chains, each asked with its pointer
  name in the question ("Where is <Name> kept?", the row's place question with the key replaced by the name), the
  answer being the place, which needs the place statement only;
* ``fact_name_keyed`` (training aid) is ``fact_hop_named`` without the naming statements: facts keyed by a proper
  name ("Heara is kept in Gibriwen."), all asked by name: the name-keyed lookup that the second hop needs;
* ``fact_hop_crowded``, ``fact_hop_quiz_crowded`` and ``fact_hop_wide_crowded`` (training aids) are ``fact_hop``,
  ``fact_hop_quiz`` and ``fact_hop_wide`` with at least `HOP_CROWD` (2) other chains in every row that can hold
  them (``make_fact`` draws ``fact_hop``'s 0–3 distractor chains and the quizzes' 1–5 other chains, and drops
  chains from a row that is too short; the crowded aids redraw such a row and hold fewer only below ~1K tokens),
  so a place picked by its form alone is right at most a third of the time and only binding the key to its
  chain pays (issue 13 session 13: most hop misses answered another chain's place). ``fact_hop_crowded`` also
  marks the other chains' names and places as rivals (``fact_hop`` marks none). Same phrasings, questions and
  evidence as the task each crowds; the uncrowded tasks' rows are unchanged;
* ``fact_hop_contrast`` (training aid) asks "which name" and "which place" side by side on one hop document: at
  least `HOP_CROWD` + 1 chains as in ``fact_hop_quiz``, each asked once in turn, some by their first hop alone ("What
  is <owner>'s <thing> called?" -> the pointer name, a name question of the split) and the others by their place
  (the row's place question or, with chance `CONTRAST_WIDE`, one of `hop_wide_questions`), at least one of each.
  A chain asked by name never has its place asked in the row, so its own place is that query's rival (every name
  and place is a rival). Unlike ``fact_hop_steps``, whose place question always follows its own chain's pointer
  just answered, every place here needs both hops from the key (issue 13 session 13: arm H answered the held-out
  first-hop name question with a place's first byte);
* ``fact_list`` (training aid, not an evaluation suite) asks for a whole list of words: every answer byte is a
  copy of a word in the evidence, so one row gives tens of copy targets instead of one value's few bytes. A small
  byte-level model learns to copy letters (not only digits, which are rare in prose) from this dense signal far
  sooner than from single values (bench/BENCHMARKS.md, #13 "Why 0 % answer accuracy").

Every task returns a `superlinear_lab.data.Example` with the evidence ranges (the value's tokens inside its
statement; for ``fact_hop`` the pointer name and the place) and the answer queries that need them, as the digit
tasks do, so training's routing loss and evaluation's routing recall apply unchanged.

The prompt ends with ``"\\nQuestion: <question>\\nAnswer: "`` and the answer is the value.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import random
import re
from importlib import resources

from . import data as D

KINDS = ("word", "name", "phrase", "date", "number")
TASKS = tuple(f"fact_{k}" for k in KINDS) + ("fact_multi_key", "fact_hop")  # the evaluation suites
AUX_TASKS = ("fact_list", "fact_needle", "fact_quiz", "fact_hop_quiz", "fact_hop_steps", "fact_phrase_quiz",
             "fact_hop_named", "fact_name_keyed", "fact_hop_wide", "fact_hop_crowded", "fact_hop_quiz_crowded",
             "fact_hop_wide_crowded", "fact_hop_contrast")  # training aids (make_fact builds them too)
HOP_CROWD = 2  # the *_crowded hop aids and fact_hop_contrast: the fewest other chains in a row
EVAL_FRACTION = 0.2  # share of words and names (by hash) that only the "eval" split uses as values
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

OWNERS = (  # roles a fact can belong to; with an optional "from <Place>" they make natural, varied keys
    "harbour master", "baker", "night nurse", "ferry captain", "village doctor", "schoolteacher", "librarian",
    "lighthouse keeper", "postman", "blacksmith", "innkeeper", "shepherd", "station master", "bookbinder",
    "clockmaker", "fisherman", "gardener", "mayor", "carpenter", "beekeeper", "miller", "potter", "tailor",
    "weaver", "butcher", "cook", "painter", "pilot", "sailor", "chemist", "judge", "banker", "farmer", "priest",
    "student", "engineer", "architect", "composer", "violinist", "dancer", "grocer", "locksmith", "mechanic",
    "nurse", "ranger", "surgeon", "tutor", "widow", "twins", "old captain", "new neighbour", "eldest daughter",
    "youngest son", "landlady", "gamekeeper", "ship's cook", "court clerk", "forester", "glassblower", "jeweller",
)
THINGS = {  # kind -> things whose value is of that kind
    "name": ("boat", "dog", "cat", "horse", "goat", "parrot", "bicycle", "shop", "cottage", "tortoise", "donkey",
             "mare", "barge", "caravan", "violin"),
    "word": ("password", "secret word", "code word", "favourite word", "signal word", "safe word"),
    "phrase": ("motto", "favourite saying", "toast", "slogan", "family motto", "marching song"),
    "date": ("birthday", "wedding day", "first day at work", "moving day", "day of arrival"),
    "number": ("locker number", "house number", "number of sheep", "phone extension", "lucky number",
               "ticket number"),
}
# Statements: {owner} {thing} {value}; "{Owner}" = owner with a capital first letter. Split by phrasing.
STATEMENTS = {
    "train": {
        "name": ("{Owner}'s {thing} is called {value}.", "Remember: {owner}'s {thing} is called {value}.",
                 "The {thing} that belongs to {owner} goes by the name {value}.",
                 "Everyone in town knows that {owner} named the {thing} {value}.",
                 "{Owner} has a {thing} named {value}.",
                 "There is a {thing} called {value}; it belongs to {owner}.",
                 "{value} is the name of {owner}'s {thing}.",
                 "Ask anyone: {owner}'s {thing} answers to {value}.",
                 "{Owner} gave the {thing} the name {value}.",
                 "{Owner} owns a {thing}, and it is named {value}.",
                 "Last spring {owner} bought a {thing} and named it {value}.",
                 "In the village, {owner}'s {thing} is known as {value}.",
                 "The {thing} of {owner} is named {value}.",
                 "Children wave at {owner}'s {thing}, {value}, every morning."),
        "word": ("{Owner}'s {thing} is \"{value}\".", "Remember: the {thing} of {owner} is \"{value}\".",
                 "For the record, {owner} chose \"{value}\" as the {thing}.",
                 "{Owner} picked the {thing} \"{value}\" and told nobody else.",
                 "The {thing} that {owner} settled on was \"{value}\".",
                 "Note for later: \"{value}\" is the {thing} of {owner}.",
                 "{Owner} whispered the {thing}, \"{value}\", to the guard.",
                 "If you meet {owner}, the {thing} is \"{value}\".",
                 "The {thing} for {owner} is \"{value}\".",
                 "{Owner} set the {thing} to \"{value}\".",
                 "It was agreed that the {thing} of {owner} would be \"{value}\".",
                 "{Owner} changed the {thing} to \"{value}\" last week.",
                 "On the card of {owner}, the {thing} was written as \"{value}\".",
                 "Only {owner} knew that the {thing} was \"{value}\"."),
        "phrase": ("{Owner}'s {thing} is \"{value}\".", "The {thing} of {owner} goes: \"{value}\".",
                   "Whenever asked, {owner} answers with the {thing} \"{value}\".",
                   "{Owner} always ends a letter with the {thing} \"{value}\".",
                   "\"{value}\" is the {thing} of {owner}.",
                   "The {thing} {owner} made famous is \"{value}\".",
                   "Written above the door of {owner} is the {thing}: \"{value}\".",
                   "{Owner} often repeats the {thing}: \"{value}\".",
                   "The {thing} that {owner} chose reads \"{value}\".",
                   "{Owner} signs every note with the {thing} \"{value}\".",
                   "The {thing} of {owner} has always been \"{value}\".",
                   "Above the fireplace of {owner} hangs the {thing}, \"{value}\"."),
        "date": ("{Owner}'s {thing} is {value}.", "Note that the {thing} of {owner} is {value}.",
                 "According to the letter, {owner}'s {thing} fell on {value}.",
                 "{Owner} was happy on the {thing}, {value}.",
                 "On {value} came the {thing} of {owner}.",
                 "The {thing} of {owner} is remembered as {value}.",
                 "{Owner} wrote down {value} as the {thing}.",
                 "{Owner}'s {thing} was on {value}.",
                 "The {thing} of {owner} came on {value}.",
                 "Mark the calendar: the {thing} of {owner} is {value}.",
                 "{Owner} still remembers the {thing}, {value}.",
                 "The {thing} for {owner} was set for {value}."),
        "number": ("{Owner}'s {thing} is {value}.", "Remember: the {thing} of {owner} is {value}.",
                   "It is written that {owner}'s {thing} is {value}.",
                   "{Owner} keeps {value} as the {thing}.",
                   "The {thing} belonging to {owner} is {value}.",
                   "We were told that {value} is the {thing} of {owner}.",
                   "For {owner}, the {thing} has always been {value}.",
                   "The {thing} of {owner} is {value}.",
                   "{Owner} wrote {value} down as the {thing}.",
                   "The {thing} for {owner} reads {value}.",
                   "{Owner}'s {thing} turned out to be {value}.",
                   "Nobody else has {value}: it is the {thing} of {owner}."),
    },
    "eval": {
        "name": ("{Owner} calls the {thing} {value}.", "By the way, the name of {owner}'s {thing} is {value}."),
        "word": ("Keep this in mind: {owner} uses \"{value}\" as the {thing}.",),
        "phrase": ("As {owner} likes to say, the {thing} is \"{value}\".",),
        "date": ("The {thing} of {owner} was {value}, as the records show.",),
        "number": ("As it happens, {owner} has {value} as the {thing}.",),
    },
}
QUESTIONS = {  # question templates (the prompt continues "\nAnswer: ")
    "train": {
        "name": ("What is {owner}'s {thing} called?", "What name does {owner}'s {thing} have?",
                 "What do they call {owner}'s {thing}?", "How is the {thing} of {owner} named?",
                 "Name the {thing} that belongs to {owner}.", "{Owner} has a {thing}. What is it called?",
                 "By what name is {owner}'s {thing} known?", "What did {owner} name the {thing}?",
                 "What is the {thing} of {owner} called?"),
        "word": ("What is {owner}'s {thing}?", "Which {thing} did {owner} choose?",
                 "What {thing} does {owner} use?", "What did {owner} pick as the {thing}?",
                 "Do you know the {thing} of {owner}?", "Which word is {owner}'s {thing}?",
                 "What is the {thing} of {owner}?", "Which {thing} belongs to {owner}?",
                 "What {thing} did {owner} set?", "Say the {thing} of {owner}."),
        "phrase": ("What is {owner}'s {thing}?", "How does {owner}'s {thing} go?",
                   "What {thing} does {owner} repeat?", "Recite {owner}'s {thing}.",
                   "What are the words of {owner}'s {thing}?", "What is the {thing} of {owner}?",
                   "Which {thing} belongs to {owner}?", "What does the {thing} of {owner} say?"),
        "date": ("When is {owner}'s {thing}?", "On which date is the {thing} of {owner}?",
                 "What date is {owner}'s {thing}?", "When did the {thing} of {owner} take place?",
                 "Which day was {owner}'s {thing}?", "When was {owner}'s {thing}?",
                 "On what date was the {thing} of {owner}?"),
        "number": ("What is {owner}'s {thing}?", "Which {thing} does {owner} have?",
                   "What {thing} does {owner} keep?", "What number is {owner}'s {thing}?",
                   "Can you say the {thing} of {owner}?", "What is the {thing} of {owner}?",
                   "Which number is the {thing} of {owner}?", "Say the {thing} of {owner}."),
    },
    "eval": {
        "name": ("Do you recall what {owner}'s {thing} is called?", "Which name was given to {owner}'s {thing}?"),
        "word": ("Tell me the {thing} that {owner} uses.",),
        "phrase": ("Quote the {thing} of {owner}.",),
        "date": ("Give the date of {owner}'s {thing}.",),
        "number": ("Tell me the {thing} of {owner}.",),
    },
}
# Train-only wrappers around a statement (lead + template + tail) and a question (lead + template): the words
# around a fact vary, so what stays the same is the owner and the thing. The eval split never uses them.
STATEMENT_LEADS = ("", "", "", "", "Listen. ", "One more detail. ", "From the diary: ", "An old letter says: ",
                   "Here is something useful. ", "Write this down. ", "A small detail: ", "Later that year. ")
STATEMENT_TAILS = ("", "", "", "", " Nobody forgot it.", " That was years ago.", " It surprised nobody.",
                   " The whole street knew.", " It is an odd choice.", " So it was settled.")
QUESTION_LEADS = ("", "", "", "Now a question. ", "Think back to the text. ", "One more thing. ", "Quick check: ",
                  "From memory: ", "A question about the story. ")
LISTS = {  # (statement with {items}, question) per split; the answer is the items joined by ", "
    "train": (("{Owner}'s shopping list reads: {items}.", "What is on {owner}'s shopping list?"),
              ("On the board, {owner} wrote these words: {items}.", "Which words did {owner} write on the board?")),
    "eval": (("The words {owner} keeps repeating are {items}.", "Repeat the words {owner} keeps repeating."),),
}
HOP = {  # (where the named thing is: {name} the pointer, {value} the place; the question): the answer is the place
    "train": (("{name} is kept in {value}.", "Where is {owner}'s {thing} kept?"),
              ("{name} spends the winter in {value}.", "Where does {owner}'s {thing} spend the winter?")),
    "eval": (("These days {name} stays in {value}.", "In which place does {owner}'s {thing} stay?"),),
}


INLINE = 0.5  # train split: chance that a fact statement is planted inside the running text (`D._Builder`)

# Train-only composed phrasings. Besides the fixed train bank above, the train split draws statements and questions
# from a grammar of parts: the key as a noun phrase in several forms (possessive, "of", relative clause), the value
# before, inside or after the key, the owner as subject, object or possessive, several verbs per kind, framing
# clauses. A few hundred phrasings per kind: the model cannot learn "the one sentence a fact comes in", only what
# the key says. The eval split never draws from it (tests/test_facts_phrasing.py checks that no composed phrasing,
# wrapped or not, holds a held-out template's frame).
_KEY_FORMS = ("{owner}'s {thing}", "the {thing} of {owner}", "{owner}'s own {thing}", "the {thing} for {owner}",
              "the {thing} belonging to {owner}", "the {thing} that {owner} has")
_KEY_FORMS_DATE = _KEY_FORMS[:4] + ("the {thing} of {owner} in question",)
_AFTER = {  # kind -> verbs between the key and the value ("<key> <verb> <value>.")
    "word": ("is", "was", "is still", "has long been", "turned out to be", "had become", "remains"),
    "name": ("is called", "is named", "was named", "goes by", "is known as", "answers to", "was christened"),
    "phrase": ("is", "was", "reads", "runs", "has always been", "remains", "goes like this:"),
    "date": ("is", "was", "falls on", "fell on", "is on", "was fixed for", "was held on"),
    "number": ("is", "was", "reads", "is still", "turned out to be", "has been", "came out as"),
}
_BEFORE = {  # kind -> links between the value and the key ("<value> <link> <key>.")
    "word": ("is", "was", "has long been", "became", "remains"),
    "name": ("is the name of", "was the name picked for", "has always been the name of", "became the name of"),
    "phrase": ("is", "was", "has long been", "became", "remains"),
    "date": ("is", "was", "marks", "was the date of", "is the date of"),
    "number": ("is", "was", "became", "remains", "has long been"),
}
_ACTS = {  # kind -> "<Owner> <act> <value> <prep> the <thing>" (the value between owner and thing)
    "word": (("chose", "as"), ("picked", "for"), ("settled on", "for"), ("wrote", "down as"), ("went with", "for")),
    "name": (("picked", "as the name for"), ("chose", "as a name for"), ("wanted", "as the name of"),
             ("settled on", "as the name of")),
    "phrase": (("chose", "as"), ("picked", "for"), ("carved", "into"), ("printed", "on"), ("went with", "for")),
    "date": (("circled", "as"), ("set", "for"), ("marked", "as"), ("put down", "as")),
    "number": (("chose", "as"), ("wrote", "down as"), ("picked", "for"), ("was given", "as"), ("got", "as")),
}
_FRAMES = ("", "By all accounts, ", "At the time, ", "Since then, ", "As far as anyone knows, ", "In those days, ",
           "To be exact, ")
_MIDDLE_TAILS = ("was no secret", "came up again today", "appears in the ledger", "was known to all",
                 "is written on a card")
_Q_FRAMES = ("", "According to the text, ", "In the story, ", "Going by the notes, ", "Looking back, ")
_Q_PLAIN = ("what is {key}?", "what was {key}?", "do you remember {key}?", "can you recall {key}?",
            "{key}: what is it?", "please repeat {key}.", "write down {key}.", "remind me of {key}.")
_Q_KIND = {  # kind -> kind-specific question forms of {key}, and forms with owner and thing apart
    "word": ("which word is {key}?", "what word was {key}?", "which word did {owner} pick for the {thing}?",
             "what did {owner} choose as the {thing}?"),
    "name": ("what is {key} called?", "what is {key} named?", "by which name is {key} known?",
             "what name did {owner} pick for the {thing}?", "what did {owner} name the {thing}?"),
    "phrase": ("how does {key} go?", "what does {key} say?", "what are the words of {key}?",
               "which words did {owner} choose as the {thing}?"),
    "date": ("when is {key}?", "when was {key}?", "on which day was {key}?", "what date was {key}?",
             "on what date did {key} fall?"),
    "number": ("which number is {key}?", "what number is {key}?", "how does {key} read?",
               "which number did {owner} pick as the {thing}?"),
}


def _sentence(template: str) -> str:
    """`template` with a capital first letter ("{owner}" -> "{Owner}")."""
    if template.startswith("{owner}"):
        return "{Owner}" + template[len("{owner}"):]
    return template[:1].upper() + template[1:]


@functools.lru_cache(maxsize=None)
def composed_statements(kind: str) -> tuple[str, ...]:
    """Every train-only statement phrasing the grammar above makes for `kind` (sorted; the fixed train bank's
    templates are not in it). Each holds {value} once, and the owner and the thing."""
    value = '"{value}"' if kind in ("word", "phrase") else "{value}"
    keys = _KEY_FORMS_DATE if kind == "date" else _KEY_FORMS
    out = set()
    for key in keys:
        for frame in _FRAMES:
            out |= {_sentence(frame + f"{key} {verb} {value}.") for verb in _AFTER[kind]}
        out |= {_sentence(f"{value} {link} {key}.") for link in _BEFORE[kind]}
        out |= {_sentence(f"{key}, {value}, {tail}.") for tail in _MIDDLE_TAILS}
    for frame in _FRAMES:
        out |= {_sentence(frame + f"{{owner}} {act} {value} {prep} the {{thing}}.") for act, prep in _ACTS[kind]}
    out |= {_sentence(f"for {{owner}}, the {{thing}} {verb} {value}.") for verb in _AFTER[kind]}
    out |= {_sentence(f"people who know {{owner}} say the {{thing}} {verb} {value}.") for verb in _AFTER[kind]}
    return tuple(sorted(out))


@functools.lru_cache(maxsize=None)
def composed_questions(kind: str) -> tuple[str, ...]:
    """Every train-only question phrasing the grammar above makes for `kind` (sorted), each naming the owner and
    the thing."""
    keys = _KEY_FORMS_DATE if kind == "date" else _KEY_FORMS
    out = set()
    for frame in _Q_FRAMES:
        for form in _Q_PLAIN + _Q_KIND[kind]:
            for key in keys if "{key}" in form else ("",):
                q = form.replace("{key}", key)
                out.add(frame + q if frame else _sentence(q))
    return tuple(sorted(out))


def _train_statements(kind: str) -> tuple[str, ...]:
    return STATEMENTS["train"][kind] + composed_statements(kind)


def _train_questions(kind: str) -> tuple[str, ...]:
    return QUESTIONS["train"][kind] + composed_questions(kind)


_HOP_VERBS = (  # train-only hop phrasings: (what the pointer does in the place, the question of it with {key})
    ("is kept in", "where is {key} kept?"), ("spends the winter in", "where does {key} spend the winter?"),
    ("lives in", "where does {key} live?"), ("sleeps in", "where does {key} sleep?"),
    ("is looked after in", "where is {key} looked after?"), ("was last seen in", "where was {key} last seen?"),
    ("is housed in", "where is {key} housed?"),
)
_HOP_FRAMES = ("{name} {verb} {value}.", "Most of the year, {name} {verb} {value}.", "As a rule, {name} {verb} {value}.",
               "{name}, for what it is worth, {verb} {value}.")


@functools.lru_cache(maxsize=None)
def hop_phrasings(split: str) -> tuple[tuple[str, str], ...]:
    """(place statement with {name} and {value}, its question with {owner} and {thing}) pairs of `split`: the eval
    split's `HOP` bank, or (train) every pairing of `_HOP_VERBS`, statement frames, key forms and question
    frames (the fixed train `HOP` pairs among them)."""
    if split == "eval":
        return HOP["eval"]
    if split != "train":
        raise ValueError(f"split={split!r}: expected one of {D.SPLITS}")
    out = set(HOP["train"])
    for verb, question in _HOP_VERBS:
        for frame in _HOP_FRAMES:
            for key in _KEY_FORMS:
                for q_frame in _Q_FRAMES:
                    q = question.replace("{key}", key)
                    out.add((frame.replace("{verb}", verb), q_frame + q if q_frame else _sentence(q)))
    return tuple(sorted(out))


# Train-only place questions for `fact_hop_wide`: the key, no verb of the row's place statement (the verbs in them
# are bare ones never paired with a statement of the row, and never the held-out "stay"), and wh-forms other than
# the "where is/does …" that `_HOP_VERBS` ties to each statement verb.
_HOP_WIDE_FORMS = ("where is {key}?", "where is {key} now?", "where can {key} be found?",
                   "where would one find {key}?", "what place is {key} in?", "in what place is {key}?",
                   "which spot is {key} in?", "at what place is {key}?", "in which town is {key}?",
                   "what is the place of {key}?", "what spot holds {key}?", "name the place where {key} is.",
                   "tell me where {key} is.", "say where {key} can be found.")
_HOP_WIDE_VERB_FORMS = ("in what place does {key} {verb}?", "what place does {key} {verb} in?",
                        "which town does {key} {verb} in?")
_HOP_WIDE_VERBS = ("reside", "rest", "belong", "end up", "turn up", "wait")


@functools.lru_cache(maxsize=None)
def hop_wide_questions() -> tuple[str, ...]:
    """Every `fact_hop_wide` question (sorted): `_HOP_WIDE_FORMS` and `_HOP_WIDE_VERB_FORMS` × `_HOP_WIDE_VERBS`,
    each with every key form of `_KEY_FORMS` and question frame of `_Q_FRAMES`; {owner} and {thing} once each."""
    forms = _HOP_WIDE_FORMS + tuple(f.replace("{verb}", v) for f in _HOP_WIDE_VERB_FORMS for v in _HOP_WIDE_VERBS)
    out = set()
    for form in forms:
        for key in _KEY_FORMS:
            q = form.replace("{key}", key)
            out |= {frame + q if frame else _sentence(q) for frame in _Q_FRAMES}
    return tuple(sorted(out))


@functools.lru_cache(maxsize=None)
def _entries(resource: str) -> tuple[str, ...]:
    text = resources.files("superlinear_lab").joinpath("resources", resource).read_text(encoding="utf-8")
    return tuple(line for line in text.split("\n") if line and not line.startswith("#"))


def _in_eval(value: str) -> bool:
    return hashlib.sha256(value.encode()).digest()[0] < 256 * EVAL_FRACTION


@functools.lru_cache(maxsize=None)
def vocabulary(resource: str, split: str) -> tuple[str, ...]:
    """The entries of `resource` ("words.txt" or "names.txt") whose values belong to `split` (by hash)."""
    if split not in D.SPLITS:
        raise ValueError(f"split={split!r}: expected one of {D.SPLITS}")
    return tuple(w for w in _entries(resource) if _in_eval(w) == (split == "eval"))


def _generated_name(rng: random.Random) -> str:
    """A pronounceable capitalised name of 5+ letters that is not an English word ("Elowen", "Brairic")."""
    while True:
        name = _syllables(rng)
        if len(name) >= 5 and name.lower() not in _lower_words():
            return name


@functools.lru_cache(maxsize=None)
def _lower_words() -> frozenset[str]:
    return frozenset(_entries("words.txt"))


def _syllables(rng: random.Random) -> str:
    onsets = ("b", "br", "d", "el", "f", "g", "h", "j", "k", "l", "m", "n", "or", "p", "r", "s", "t", "th", "v", "w")
    nuclei = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
    codas = ("", "n", "l", "r", "s", "th", "wen", "ric", "na", "ra", "mo")
    return "".join(rng.choice(onsets) + rng.choice(nuclei) for _ in range(rng.randint(1, 2))).capitalize() + \
        rng.choice(codas)


def _value(kind: str, rng: random.Random, split: str, taken: set[str]) -> str:
    for _ in range(1000):
        if kind == "word":
            v = rng.choice(vocabulary("words.txt", split))
        elif kind == "name":
            v = rng.choice(vocabulary("names.txt", split)) if rng.random() < 0.6 else _generated_name(rng)
        elif kind == "phrase":
            v = " ".join(rng.choice(vocabulary("words.txt", split)) for _ in range(rng.randint(2, 4)))
        elif kind == "date":
            v = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1850, 2030)}"
        elif kind == "pseudo":  # a made-up lower-case word: no word list holds it, so it can only be copied
            v = _generated_name(rng).lower()
        elif kind == "number":
            digits = rng.randint(2, 6)
            v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        else:
            raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
        if v not in taken and not any(v in t or t in v for t in taken):  # no value inside another one
            taken.add(v)
            return v
    raise RuntimeError(f"no fresh {kind} value left")


def _owner(rng: random.Random, split: str, place: bool | None = None, role: str | None = None) -> str:
    """"the <role>" or "the <role> from <Place>" (a random role unless given; a place with chance 0.4 unless
    `place` says)."""
    role = role or rng.choice(OWNERS)
    if place is None:
        place = rng.random() < 0.4
    return f"the {role} from {rng.choice(vocabulary('names.txt', split))}" if place else f"the {role}"


def _fill(template: str, owner: str, thing: str, value: str = "", name: str = "") -> str:
    cap = owner[:1].upper() + owner[1:]
    return template.format(Owner=cap, owner=owner, thing=thing, value=value, name=name)


def _statement(rng: random.Random, template: str, owner: str, thing: str, kind: str, split: str,
               taken: set[str], name: str = "", draw=None) -> tuple[str, str]:
    """A fresh value of `kind` (or ``draw()``'s, which must add it to `taken`) and `template` filled with it, the
    value being its statement's last occurrence of that string (the builder marks evidence by `rindex`): a
    value that also occurs later in the sentence (the word "word" before "as the secret word") is drawn again."""
    for _ in range(100):
        value = draw() if draw else _value(kind, rng, split, taken)
        text = _fill(template, owner, thing, value, name)
        if text.rindex(value) == _fill(template, owner, thing, "\0", name).index("\0"):
            return text, value
        taken.discard(value)
    raise RuntimeError(f"no value of kind {kind!r} fits {template!r}")


def _statement_template(rng: random.Random, split: str, kind: str) -> str:
    """A statement template of `kind` from the split's bank; in the train split wrapped in a random lead and tail."""
    if split == "eval":
        return rng.choice(STATEMENTS[split][kind])
    return rng.choice(STATEMENT_LEADS) + rng.choice(_train_statements(kind)) + rng.choice(STATEMENT_TAILS)


def _builder(rng: random.Random, length: int, split: str) -> D._Builder:
    """The row builder of a fact task: in the train split a statement is planted inline with chance `INLINE`."""
    return D._Builder(rng, length, split, inline=INLINE if split == "train" else 0.0)


def _ask(lead: str, template: str, owner: str, thing: str, name: str = "") -> str:
    """The end of a prompt: "\nQuestion: <lead><template filled>\nAnswer: "."""
    return "\nQuestion: " + lead + _fill(template, owner, thing, name=name) + "\nAnswer: "


def _question(rng: random.Random, split: str, kind: str, owner: str, thing: str, template: str | None = None) -> str:
    """A question about `owner`'s `thing`: `template` if given (a hop question), else one of the split's bank for
    `kind`; in the train split after a random lead."""
    if split == "eval":
        return _ask("", template or rng.choice(QUESTIONS[split][kind]), owner, thing)
    return _ask(rng.choice(QUESTION_LEADS), template or rng.choice(_train_questions(kind)), owner, thing)


def fact(length: int, seed: int, split: str = "train", kind: str = "word", n_distractors: int = 3,
         near_keys: bool = False, task: str | None = None, attempt: int = 0) -> D.Example:
    """One asked fact of `kind` plus `n_distractors` facts of the same kind at random depths.

    Distractors share the asked thing with another owner, or the asked owner with another thing of the same
    kind; with `near_keys` every distractor's owner differs from the asked owner in one word only (same role,
    another place), the prose form of near-duplicate keys. Evidence: the value's tokens in the asked statement.
    `attempt` > 0 draws the row anew (phrasings, values): for a short row that the first draw does not fit.
    """
    task = task or f"fact_{kind}"
    extra = f"{kind}:{n_distractors}:{near_keys}" + (f":{attempt}" if attempt else "")
    rng = D._rng(task, length, seed, split, extra)
    thing = rng.choice(THINGS[kind])
    role = rng.choice(OWNERS)
    owner = _owner(rng, split, place=True, role=role) if near_keys else _owner(rng, split)
    taken: set[str] = set()
    keys = {(owner, thing)}
    text, value = _statement(rng, _statement_template(rng, split, kind), owner, thing, kind, split, taken)
    b = _builder(rng, length, split)
    depth = rng.random()
    b.needle(depth, text, [value])
    for _ in range(n_distractors):
        for _ in range(100):
            if near_keys:
                key = (_owner(rng, split, place=True, role=role), thing)
            elif rng.random() < 0.5:
                key = (_owner(rng, split), thing)
            else:
                key = (owner, rng.choice(THINGS[kind]))
            if key not in keys:
                break
        keys.add(key)
        text, rival = _statement(rng, _statement_template(rng, split, kind), key[0], key[1], kind, split, taken)
        b.needle(rng.random(), text, [], rivals=(rival,))
    return b.build(_question(rng, split, kind, owner, thing), value, lambda j: [0], task,
                   {"depth": depth, "kind": kind, "owner": owner, "thing": thing, "value": value,
                    "n_distractors": n_distractors, "near_keys": near_keys, "seed": seed})


def fact_hop(length: int, seed: int, split: str = "train", n_distractors: int = 2, crowded: bool = False,
             attempt: int = 0) -> D.Example:
    """Two hops: "<owner>'s <thing> is called <Name>." and "<Name> is kept in <Place>." (either order, random
    depths), plus `n_distractors` chains of other owners' things of the same kind. The question asks where the
    owner's thing is; every answer query needs both the pointer name and the place.
    With `crowded` (task ``fact_hop_crowded``, a training aid; `make_fact` gives it at least `HOP_CROWD`
    distractor chains) the distractor chains' names and places are rivals too, and `attempt` > 0 draws the row
    anew; without it the row is ``fact_hop``'s as before."""
    task = "fact_hop_crowded" if crowded else "fact_hop"
    rng = D._rng(task, length, seed, split, f"{n_distractors}:{attempt}" if crowded else n_distractors)
    thing = rng.choice(THINGS["name"])
    owner = _owner(rng, split)
    taken: set[str] = set()
    named, name = _statement(rng, _statement_template(rng, split, "name"), owner, thing, "name", split, taken)
    where, question = rng.choice(hop_phrasings(split))
    kept, place = _statement(rng, where, owner, thing, "name", split, taken, name=name)
    b = _builder(rng, length, split)
    b.needle(rng.random(), named, [name])
    b.needle(rng.random(), kept, [place])
    owners = {owner}
    for _ in range(n_distractors):
        other = _owner(rng, split)
        while other in owners:
            other = _owner(rng, split)
        owners.add(other)
        named2, n2 = _statement(rng, _statement_template(rng, split, "name"), other, thing, "name", split, taken)
        b.needle(rng.random(), named2, [], rivals=(n2,) if crowded else ())
        depth = rng.random()  # drawn before the place statement, as before: fact_hop's rows stay as they were
        kept2, p2 = _statement(rng, where, other, thing, "name", split, taken, name=n2)
        b.needle(depth, kept2, [], rivals=(p2,) if crowded else ())
    return b.build(_ask("", question, owner, thing), place, lambda j: [0, 1], task,
                   {"owner": owner, "thing": thing, "middle": name, "value": place,
                    "n_distractors": n_distractors, "seed": seed})


def _copy_kind(rng: random.Random) -> str:
    """Values of the copy aids: half real words of the split, half made-up words. A fine-tune copied train-list words
    far better than held-out ones (byte accuracy 0.85 vs 0.56 on fact_needle): it had partly learnt the value list
    itself. Made-up words cannot be learnt that way."""
    return "word" if rng.random() < 0.5 else "pseudo"


def fact_list(length: int, seed: int, split: str = "train", n_words: int = 4, n_distractors: int = 0) -> D.Example:
    """`n_words` distinct words (real words of the split's vocabulary or made-up ones, `_copy_kind`) in one statement, asked back in order (joined by ", "),
    plus `n_distractors` lists of other owners with the same phrasing. Evidence: each word in the asked
    statement; the queries predicting a word's bytes need that word (separators need nothing)."""
    task = "fact_list"
    rng = D._rng(task, length, seed, split, f"{n_words}:{n_distractors}")
    statement, question = rng.choice(LISTS[split])
    owner = _owner(rng, split)
    taken: set[str] = set()
    owners = {owner}

    def listed(who: str) -> tuple[str, list[str]]:
        for _ in range(100):
            words = [_value(_copy_kind(rng), rng, split, taken) for _ in range(n_words)]
            text = _fill(statement.replace("{items}", ", ".join(words)), who, "")
            tail = text[text.rindex(", ".join(words)):]
            if all(tail.count(w) == 1 for w in words):  # each word's last occurrence is its list entry
                return text, words
            taken.difference_update(words)
        raise RuntimeError(f"no word list fits {statement!r}")

    text, words = listed(owner)
    b = _builder(rng, length, split)
    b.needle(rng.random(), text, words)
    for _ in range(n_distractors):
        other = _owner(rng, split)
        while other in owners:
            other = _owner(rng, split)
        owners.add(other)
        b.needle(rng.random(), listed(other)[0], [])
    answer = ", ".join(words)
    word_of = []  # answer byte -> word index (separators need nothing)
    for i, w in enumerate(words):
        word_of += [i] * len(w) + ([None, None] if i < n_words - 1 else [])
    q = "\nQuestion: " + _fill(question, owner, "") + "\nAnswer: "
    return b.build(q, answer, lambda j: [] if word_of[j] is None else [word_of[j]], task,
                   {"owner": owner, "value": answer, "words": words, "n_distractors": n_distractors,
                    "seed": seed})


def fact_needle(length: int, seed: int, split: str = "train", n_distractors: int = 0) -> D.Example:
    """"The magic word for <key> is <word>." (a real or made-up word, `_copy_kind`) at a random depth plus `n_distractors` needles whose keys differ by one
    letter, asked as "What is the magic word for <key>? The magic word for <key> is ". Evidence: the word."""
    task = "fact_needle"
    rng = D._rng(task, length, seed, split, n_distractors)
    key = D._key(rng)
    keys, taken = {key}, set()
    value = _value(_copy_kind(rng), rng, split, taken)
    b = _builder(rng, length, split)
    depth = rng.random()
    b.needle(depth, f"The magic word for {key} is {value}.", [value])
    for _ in range(n_distractors):
        other = D._near_duplicate(rng, key, keys)
        keys.add(other)
        b.needle(rng.random(), f"The magic word for {other} is {_value(_copy_kind(rng), rng, split, taken)}.", [])
    return b.build(f"\nWhat is the magic word for {key}? The magic word for {key} is ", value, lambda j: [0], task,
                   {"depth": depth, "key": key, "value": value, "n_distractors": n_distractors, "seed": seed})


QUIZ_KINDS = {"word": 3, "name": 3, "phrase": 2, "date": 1, "number": 1}  # kind -> draw weight in fact_quiz


def _key_grid(rng: random.Random, split: str, things: tuple[str, ...], n_facts: int) -> tuple[list, bool]:
    """`n_facts` distinct (owner, thing) keys drawn from a grid of 1–3 of `things` × enough owners, so facts share
    owners and things; with chance 0.3 the owners are one role from different places (the prose form of
    near-duplicate keys). Returns (keys, near)."""
    n_things = rng.randint(1, min(3, len(things), n_facts))
    n_owners = -(-n_facts // n_things)
    near = rng.random() < 0.3
    role = rng.choice(OWNERS)
    owners: list[str] = []
    while len(owners) < n_owners:
        o = _owner(rng, split, place=True, role=role) if near else _owner(rng, split)
        if o not in owners:
            owners.append(o)
    grid_things = rng.sample(things, n_things)
    return rng.sample([(o, t) for o in owners for t in grid_things], n_facts), near


def _in_turn(questions: list[str], values: list[str], needs: list[list[int]]):
    """A quiz's answer: ``values[0]``, then ``questions[k] + values[k]`` for k ≥ 1 (``questions[0]`` ends the
    prompt). `needs[k]`: the evidence indices value k's bytes copy from.

    Returns (answer text, need: per answer byte its evidence indices ([] for a question byte), prompts: the byte
    ranges (start, end) of the later questions inside the answer)."""
    answer, need, prompts = b"", [], []
    for k, (value, wanted) in enumerate(zip(values, needs)):
        if k:
            asked = questions[k].encode()
            prompts.append((len(answer), len(answer) + len(asked)))
            answer += asked
            need += [[]] * len(asked)
        answer += value.encode()
        need += [wanted] * len(value.encode())
    return answer.decode(), need, prompts


def _check_n_facts(n_facts: int) -> None:
    if n_facts < 1:
        raise ValueError(f"n_facts={n_facts}: expected at least 1 fact to ask")


def _quiz(rng: random.Random, length: int, split: str, kind: str, keys: list, draw=None, ask=None):
    """The facts of a quiz row (`fact_quiz`, `fact_phrase_quiz`): per key a statement of `kind` in the split's
    phrasings (value from ``draw(taken)`` when given) at a random depth, every value a rival of the other
    questions; then every fact asked in turn in a random order (the question ``ask(owner, thing)`` when given,
    else one of the split's for `kind`).

    Returns (builder, values, order, questions, answer, need, prompts) as `_in_turn` makes them."""
    taken: set[str] = set()
    b = _builder(rng, length, split)
    values = []
    for owner, thing in keys:
        text, value = _statement(rng, _statement_template(rng, split, kind), owner, thing, kind, split, taken,
                                 draw=(lambda: draw(taken)) if draw else None)
        b.needle(rng.random(), text, [value], rivals=(value,))  # each value is a rival of every other question
        values.append(value)
    n_facts = len(keys)
    order = rng.sample(range(n_facts), n_facts)
    questions = [ask(*keys[i]) if ask else _question(rng, split, kind, *keys[i]) for i in order]
    answer, need, prompts = _in_turn(questions, [values[i] for i in order], [[i] for i in order])
    return b, values, order, questions, answer, need, prompts


def fact_quiz(length: int, seed: int, split: str = "train", n_facts: int = 4) -> D.Example:
    """`n_facts` facts of one kind whose keys come from a grid of owners × things (so facts share owners and
    things), then every fact asked in turn: "Question: … Answer: <value>" repeated. The answer range holds all the
    later questions too, as `Example.prompts`; the value bytes need evidence (each its own statement's value).
    ``meta["n_distractors"]`` is ``n_facts - 1``: every other fact is of the same kind."""
    _check_n_facts(n_facts)
    task = "fact_quiz"
    rng = D._rng(task, length, seed, split, n_facts)
    kind = rng.choices(list(QUIZ_KINDS), list(QUIZ_KINDS.values()))[0]
    keys, near = _key_grid(rng, split, THINGS[kind], n_facts)
    b, values, order, questions, answer, need, prompts = _quiz(rng, length, split, kind, keys)
    return b.build(questions[0], answer, lambda j: need[j], task,
                   {"kind": kind, "keys": keys, "values": values, "order": order, "value": answer,
                    "near_keys": near, "n_distractors": n_facts - 1, "seed": seed}, prompts)


_RECITE = ("recite {key}, word for word.", "spell out {key}.", "read out {key}.", "copy out {key} exactly.",
           "cite {key}.", "write out {key} in full.", "say {key} back, word for word.", "reproduce {key}.")
RECITE_ASKED = 0.5  # fact_phrase_quiz (train): chance that a fact is asked with a `recite_questions` phrasing


@functools.lru_cache(maxsize=None)
def recite_questions() -> tuple[str, ...]:
    """Train-only imperative questions of `fact_phrase_quiz` ("Spell out the motto of {owner}.", sorted): the
    held-out phrase question is an imperative ("Quote ..."), and session 9's candidate copied held-out phrases
    worse under it than under a train question (13 vs 10 of 16 exact on the same eval rows). Not drawn by any
    other task, so their rows stay as they were."""
    out = set()
    for frame in _Q_FRAMES:
        for form in _RECITE:
            for key in _KEY_FORMS:
                q = form.replace("{key}", key)
                out.add(frame + q if frame else _sentence(q))
    return tuple(sorted(out))


PHRASE_QUIZ_WORDS = (2, 5)  # fact_phrase_quiz: fewest and most words of a value (the phrase suite's are 2-4)
SHARED_START = 0.4  # fact_phrase_quiz: chance that a row's values all begin with the same word


CORPUS_WORD_MIN = 5  # corpus_words: occurrences a word needs (real words, which the model has a prior for)
PROBE_FRACTION = 0.1  # share of the corpus words (by a second hash byte) kept out of training for probe_words


@functools.lru_cache(maxsize=4)
def _word_pools(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(`corpus_words`, `probe_words`) of the train corpus now in use (`source`: `D.corpus_source()`, the cache
    key): its lower-case words (4-12 letters, at least `CORPUS_WORD_MIN` times) less every word that could be an
    eval value (`_in_eval`), sorted, split by a second hash byte (`PROBE_FRACTION`); probe words also leave out the
    packaged list's words."""
    counts = collections.Counter(re.findall(rb"\b[a-z]{4,12}\b", D.corpus("train")))
    words = sorted(w.decode() for w, n in counts.items() if n >= CORPUS_WORD_MIN and not _in_eval(w.decode()))
    probe = {w for w in words if hashlib.sha256(w.encode()).digest()[1] < 256 * PROBE_FRACTION}
    listed = set(_entries("words.txt"))
    return tuple(w for w in words if w not in probe), tuple(w for w in words if w in probe and w not in listed)


def corpus_words() -> tuple[str, ...]:
    """The train corpus's words that `fact_phrase_quiz` values use: on runs/corpus 9,208 words, far more than the
    packaged list's train part (4,230 entries: the list was subsampled by the same hash as the eval split, so two
    thirds of it is eval-only), so a value word is rarely seen twice as a value."""
    return _word_pools(D.corpus_source())[0]


def probe_words() -> tuple[str, ...]:
    """Train-split words that no training row uses as a value (1,030 on runs/corpus): real words of the train
    corpus outside the packaged word list, kept out of `corpus_words`. A train-split selection probe can ask for
    values made of them: words the model has a prior for but never copied as a value, as the eval split's
    held-out words are."""
    return _word_pools(D.corpus_source())[1]


def _copy_word(rng: random.Random, split: str) -> str:
    """A word of a `fact_phrase_quiz` value: in the train split half words of the train corpus (`corpus_words`),
    a quarter words of the packaged list's train part, a quarter made-up; in the eval split a word of the eval
    list or a made-up one (half each)."""
    r = rng.random()
    if split == "train" and r < 0.5:
        return rng.choice(corpus_words())
    if r < (0.75 if split == "train" else 0.5):
        return rng.choice(vocabulary("words.txt", split))
    return _generated_name(rng).lower()


def _long_phrase(rng: random.Random, split: str, first: str | None, taken: set[str]) -> str:
    """A fresh value of `PHRASE_QUIZ_WORDS` words (`_copy_word`), beginning with `first` when given; added to
    `taken` (no value inside another one, as `_value`)."""
    for _ in range(1000):
        n = rng.randint(*PHRASE_QUIZ_WORDS)
        words = [first] if first else []
        while len(words) < n:
            words.append(_copy_word(rng, split))
        v = " ".join(words)
        if v not in taken and not any(v in t or t in v for t in taken):
            taken.add(v)
            return v
    raise RuntimeError("no fresh long phrase left")


def fact_phrase_quiz(length: int, seed: int, split: str = "train", n_facts: int = 4, attempt: int = 0) -> D.Example:
    """`fact_quiz` for long multi-word values (training aid): `n_facts` phrase facts whose keys come from a grid of
    owners × phrase things, each value `PHRASE_QUIZ_WORDS` words (`_long_phrase`: in the train split words of the
    train corpus, of the packaged list's train part and made-up ones, never a word that could be an eval value;
    with chance `SHARED_START` every value of the row begins with the same word, so the first byte picks nothing
    and the rest must be copied from the right statement), in the split's phrase phrasings; then every fact asked
    in turn (train: with chance `RECITE_ASKED` in a `recite_questions` phrasing). Evidence per fact: its value;
    each value byte needs its own value; rivals: every value. ``meta``: kind ("phrase"), keys, values, order,
    value (the whole answer), shared_start, near_keys. `attempt` > 0 draws the row anew (for a short row that the
    first draw does not fit)."""
    _check_n_facts(n_facts)
    task = "fact_phrase_quiz"
    rng = D._rng(task, length, seed, split, f"{n_facts}:{attempt}")
    keys, near = _key_grid(rng, split, THINGS["phrase"], n_facts)
    first = None
    if rng.random() < SHARED_START:
        first = _copy_word(rng, split)
    def ask(owner: str, thing: str) -> str:
        if split == "train" and rng.random() < RECITE_ASKED:
            return _ask(rng.choice(QUESTION_LEADS), rng.choice(recite_questions()), owner, thing)
        return _question(rng, split, "phrase", owner, thing)

    b, values, order, questions, answer, need, prompts = _quiz(
        rng, length, split, "phrase", keys, draw=lambda taken: _long_phrase(rng, split, first, taken), ask=ask)
    return b.build(questions[0], answer, lambda j: need[j], task,
                   {"kind": "phrase", "keys": keys, "values": values, "order": order, "value": answer,
                    "shared_start": first, "near_keys": near, "n_distractors": n_facts - 1, "seed": seed},
                   prompts)


def _hop_chains(rng: random.Random, length: int, split: str, n: int, name_rivals: bool, naming: bool = True):
    """The chains of the hop quizzes: `n` keys from an owner × thing grid (things of kind name), one place phrasing
    of the split for the row, and per key "<owner>'s <thing> is called <Name>." (the split's name statements) and
    the place statement of that name, each at a random depth of a new row builder. The names are rivals too when
    `name_rivals` (they are asked then); the places always are. Without `naming` the naming statements are left
    out (a name is drawn fresh, the place statement alone is planted).

    Returns (builder, keys, near, (place statement, place question), names, places, hops: per chain the evidence
    indices [name, place], or [place] without `naming`)."""
    keys, near = _key_grid(rng, split, THINGS["name"], n)
    phrasing = rng.choice(hop_phrasings(split))
    taken: set[str] = set()
    b = _builder(rng, length, split)
    names, places, hops = [], [], []
    for owner, thing in keys:
        if naming:
            named, name = _statement(rng, _statement_template(rng, split, "name"), owner, thing, "name", split,
                                     taken)
        else:
            name = _value("name", rng, split, taken)
        kept, place = _statement(rng, phrasing[0], owner, thing, "name", split, taken, name=name)
        hops.append((b.needle(rng.random(), named, [name], rivals=(name,) if name_rivals else ()) if naming else [])
                    + b.needle(rng.random(), kept, [place], rivals=(place,)))
        names.append(name)
        places.append(place)
    return b, keys, near, phrasing, names, places, hops


def fact_hop_quiz(length: int, seed: int, split: str = "train", n_facts: int = 3, wide: bool = False,
                  crowded: bool = False, attempt: int = 0) -> D.Example:
    """`fact_quiz` for two-hop facts: `n_facts` chains whose keys come from a grid of owners × things of kind
    name, each "<owner>'s <thing> is called <Name>." (a statement of the split's bank) and "<Name> is kept in
    <Place>." (one `HOP` phrasing per row, as in `fact_hop`, so no question matches its place statement by
    wording), all at random depths; then every chain asked in turn ("Where is <owner>'s <thing> kept?"), the
    answer being its place. Evidence per chain: the pointer name in the naming statement, then the place; each
    place's bytes need both. Rivals: the places (for a query, every place but its own).
    ``meta``: keys, middles (the pointer names), values (the places), order (asking order).
    With `wide` (task ``fact_hop_wide``) the train split asks each chain with a question of `hop_wide_questions`
    (after a question lead) instead of the row's verb-matched place question; the eval split is unchanged.
    `crowded` names the task ``fact_hop_quiz_crowded`` / ``fact_hop_wide_crowded`` (training aids whose rows
    `make_fact` gives at least `HOP_CROWD` + 1 chains; the row is built the same way from its own seed stream) and
    lets `attempt` > 0 draw the row anew."""
    _check_n_facts(n_facts)
    task = ("fact_hop_wide" if wide else "fact_hop_quiz") + ("_crowded" if crowded else "")
    rng = D._rng(task, length, seed, split, f"{n_facts}:{attempt}" if crowded else n_facts)
    b, keys, near, (_, question), names, places, needs = _hop_chains(rng, length, split, n_facts, name_rivals=False)
    order = rng.sample(range(n_facts), n_facts)
    if wide and split == "train":
        questions = [_ask(rng.choice(QUESTION_LEADS), rng.choice(hop_wide_questions()), *keys[i]) for i in order]
    else:
        questions = [_question(rng, split, "name", *keys[i], template=question) for i in order]
    answer, need, prompts = _in_turn(questions, [places[i] for i in order], [needs[i] for i in order])
    return b.build(questions[0], answer, lambda j: need[j], task,
                   {"keys": keys, "middles": names, "values": places, "order": order, "value": answer,
                    "near_keys": near, "n_distractors": n_facts - 1, "seed": seed}, prompts)


FIRST_HOP_ASKED = 0.7  # fact_hop_steps: chance that a chain's pointer is asked before its place


def _step_chains(task: str, length: int, seed: int, split: str, n_chains: int, attempt: int):
    """The start of a step-wise hop row: the row's rng, `_hop_chains`' chains (names as rivals) and the order the
    chains are asked in."""
    _check_n_facts(n_chains)
    rng = D._rng(task, length, seed, split, f"{n_chains}:{attempt}")
    b, keys, near, phrasing, names, places, hops = _hop_chains(rng, length, split, n_chains, name_rivals=True)
    return rng, b, keys, near, phrasing, names, places, hops, rng.sample(range(n_chains), n_chains)


class _HopQuestions:
    """The questions of a step-wise hop row (`fact_hop_steps`, `fact_hop_contrast`), in asking order: a chain's
    first hop ("name": its pointer, needing the naming statement) or its place (needing both hops, pointer first)."""

    def __init__(self, names: list, places: list, hops: list):
        self.names, self.places, self.hops = names, places, hops
        self.questions, self.values, self.needs, self.steps = [], [], [], []

    def add(self, chain: int, kind: str, question: str) -> None:
        self.questions.append(question)
        self.values.append(self.names[chain] if kind == "name" else self.places[chain])
        self.needs.append(self.hops[chain][:1] if kind == "name" else self.hops[chain])
        self.steps.append((chain, kind))

    def build(self, b, task: str, keys, near, order, hop_phrasing, seed: int) -> D.Example:
        answer, need, prompts = _in_turn(self.questions, self.values, self.needs)
        return b.build(self.questions[0], answer, lambda j: need[j], task,
                       {"keys": keys, "middles": self.names, "values": self.places, "order": order,
                        "steps": self.steps, "hop_phrasing": hop_phrasing, "value": answer, "near_keys": near,
                        "n_distractors": len(keys) - 1, "seed": seed}, prompts)


def fact_hop_steps(length: int, seed: int, split: str = "train", n_chains: int = 2, attempt: int = 0) -> D.Example:
    """Two-hop chains asked step by step (training aid): `n_chains` chains as in `fact_hop_quiz` ("<owner>'s
    <thing> is called <Name>." and "<Name> is kept in <Place>.", keys from an owner × thing grid, one place
    phrasing per row), then every chain asked in turn, with chance `FIRST_HOP_ASKED` first its pointer ("What is
    <owner>'s <thing> called?" -> Name, a name question of the split) and right after it its place ("Where is
    <owner>'s <thing> kept?" -> Place), else the place alone (as `fact_hop` asks). The first hop is taught as a
    question of its own, then the second with the first just answered.

    Evidence per chain: the pointer name in the naming statement, then the place. A pointer's bytes need its
    name; a place's bytes need both hops. Rivals: every name and place (for a query, all but what it needs).
    ``meta``: keys, middles (the pointer names), values (the places), order (chain asking order), steps (per
    answer, in order: (chain, "name" or "place")), hop_phrasing (the place statement and question templates),
    value (the whole answer). `attempt` > 0 draws the row anew
    (for a short row that the first draw does not fit)."""
    task = "fact_hop_steps"
    rng, b, keys, near, (where, place_question), names, places, hops, order = _step_chains(task, length, seed,
                                                                                          split, n_chains, attempt)
    asked = _HopQuestions(names, places, hops)
    for i in order:
        if rng.random() < FIRST_HOP_ASKED:
            asked.add(i, "name", _question(rng, split, "name", *keys[i]))
        asked.add(i, "place", _question(rng, split, "name", *keys[i], template=place_question))
    return asked.build(b, task, keys, near, order, (where, place_question), seed)


CONTRAST_WIDE = 0.3  # fact_hop_contrast (train): chance that a place is asked with a `hop_wide_questions` form


def fact_hop_contrast(length: int, seed: int, split: str = "train", n_chains: int = 3,
                      attempt: int = 0) -> D.Example:
    """"Which name" beside "which place" on one hop document (training aid): `n_chains` (≥ 2) chains as in
    `fact_hop_quiz` ("<owner>'s <thing> is called <Name>." and "<Name> is kept in <Place>.", keys from an owner ×
    thing grid, one place phrasing per row), then every chain asked once, in a random order: between 1 and
    `n_chains` - 1 of them (drawn) by their first hop alone ("What is <owner>'s <thing> called?" -> the pointer
    name, a name question of the split), the others by their place (the row's place question; in the train split
    with chance `CONTRAST_WIDE` one of `hop_wide_questions` instead). A chain asked by name is never asked its
    place in the row, and no place question follows its own chain's pointer, so every place needs both hops from
    the key (`make_fact` gives a row at least `HOP_CROWD` + 1 chains where they fit).

    Evidence per chain: the pointer name in the naming statement, then the place. A pointer's bytes need its name
    only; a place's bytes need both hops, in that order (`TrainConfig.route_in_order` applies). Rivals: every name
    and place (for a query, all but what it needs: a name query's own place is its rival). ``meta``: keys, middles
    (the pointer names), values (the places), order (chain asking order), steps (per answer, in order: (chain,
    "name" or "place")), hop_phrasing (the place statement and question templates), value (the whole answer).
    `attempt` > 0 draws the row anew (for a short row that the first draw does not fit). A row of one chain (what
    `make_fact` falls back to where two do not fit) asks its name only."""
    task = "fact_hop_contrast"
    rng, b, keys, near, (where, place_question), names, places, hops, order = _step_chains(task, length, seed,
                                                                                          split, n_chains, attempt)
    by_name = set(rng.sample(range(n_chains), rng.randint(1, max(1, n_chains - 1))))
    asked = _HopQuestions(names, places, hops)
    for i in order:
        if i in by_name:
            asked.add(i, "name", _question(rng, split, "name", *keys[i]))
        elif split == "train" and rng.random() < CONTRAST_WIDE:
            asked.add(i, "place", _ask(rng.choice(QUESTION_LEADS), rng.choice(hop_wide_questions()), *keys[i]))
        else:
            asked.add(i, "place", _question(rng, split, "name", *keys[i], template=place_question))
    return asked.build(b, task, keys, near, order, (where, place_question), seed)


def named_hop_question(question: str) -> str:
    """A hop place question (`hop_phrasings`, with a key of `_KEY_FORMS` or the eval bank's "{owner}'s {thing}")
    with its key replaced by the pointer ("Where is the {thing} of {owner} kept?" -> "Where is {name} kept?")."""
    for key in sorted(set(_KEY_FORMS + _KEY_FORMS_DATE), key=len, reverse=True):
        for form in (key, _sentence(key)):
            if form in question:
                out = question.replace(form, "{name}", 1)
                if "{owner}" not in out.lower() and "{thing}" not in out:
                    return out
    raise ValueError(f"question={question!r}: expected a hop question with one key of the grammar's forms")


def fact_hop_named(length: int, seed: int, split: str = "train", n_chains: int = 3, attempt: int = 0,
                   naming: bool = True) -> D.Example:
    """The second hop alone (training aid, the rung below `fact_hop_steps`): `n_chains` chains as in
    `fact_hop_quiz` ("<owner>'s <thing> is called <Name>." and "<Name> is kept in <Place>.", keys from an owner ×
    thing grid, one place phrasing per row), then every chain asked in turn with its pointer name in the question
    (`named_hop_question`: "Where is <Name> kept?"), the answer being its place. Each place's bytes need the place
    statement's place only (the name is in the question); the naming statements stay in the row as context.
    Rivals: the places. ``meta``: keys, middles (the pointer names), values (the places), order, hop_phrasing
    (the place statement, the named question), value (the whole answer). `attempt` > 0 draws the row anew.
    Without `naming` (task ``fact_name_keyed``, the rung below this one) the row holds the place statements only:
    facts keyed by a proper name, each name once in the text, and the places of the other names as rivals."""
    _check_n_facts(n_chains)
    task = "fact_hop_named" if naming else "fact_name_keyed"
    rng = D._rng(task, length, seed, split, f"{n_chains}:{attempt}")
    b, keys, near, (where, place_question), names, places, hops = _hop_chains(rng, length, split, n_chains,
                                                                             name_rivals=False, naming=naming)
    named = named_hop_question(place_question)
    lead = split == "train"
    order = rng.sample(range(n_chains), n_chains)
    questions = [_ask(rng.choice(QUESTION_LEADS) if lead else "", named, *keys[i], name=names[i]) for i in order]
    answer, need, prompts = _in_turn(questions, [places[i] for i in order], [hops[i][-1:] for i in order])
    return b.build(questions[0], answer, lambda j: need[j], task,
                   {"keys": keys, "middles": names, "values": places, "order": order,
                    "hop_phrasing": (where, named), "value": answer, "near_keys": near,
                    "n_distractors": n_chains - 1, "seed": seed}, prompts)


def _fewer_if_too_short(build, n_distractors: int, least: int = 0) -> D.Example:
    """`build(n_distractors)`, with one distractor fewer each time the row is too short (long phrases and
    wrapped statements may not fit a short row with every distractor the seed drew), down to `least`."""
    while True:
        try:
            return build(n_distractors)
        except D.TooShort:
            if n_distractors <= least:
                raise
            n_distractors -= 1


def _redrawn(build, tries: int = 20) -> D.Example:
    """`build(attempt)` for attempt 0, 1, …: a row whose first draw (long composed phrasings) does not fit a short
    row even with the fewest facts is drawn anew; attempt 0 is the task's usual row."""
    for attempt in range(tries - 1):
        try:
            return build(attempt)
        except D.TooShort:
            pass
    return build(tries - 1)


def _crowded(build, most: int) -> D.Example:
    """A crowded hop row: ``build(d, attempt)`` with `most` down to `HOP_CROWD` other chains, each count drawn anew
    up to 20 times (`_redrawn`) before the row holds fewer; only a row too short for `HOP_CROWD` other chains in
    any draw (under ~1K tokens; training rows are 4K and longer) falls back to fewer, down to none, so that a short
    training row never fails."""
    try:
        return _redrawn(lambda attempt: _fewer_if_too_short(lambda d: build(d, attempt), most, least=HOP_CROWD))
    except D.TooShort:
        return _redrawn(lambda attempt: _fewer_if_too_short(lambda d: build(d, attempt), HOP_CROWD - 1))


def make_fact(task: str, length: int, seed: int, split: str = "train") -> D.Example:
    """Any fact task by name; the number of distractors is drawn from the seed, capped by what fits `length`."""
    room = max(1, length // 160)  # a statement is ~50-90 tokens: short rows hold fewer of them
    n = D._rng("fact_n", length, seed, split, task)
    if task == "fact_hop":
        return _fewer_if_too_short(lambda d: fact_hop(length, seed, split, n_distractors=d),
                                   n.randint(0, max(0, min(3, room // 2 - 1))))
    if task == "fact_hop_crowded":  # fact_hop with HOP_CROWD to 4 other chains
        return _crowded(lambda d, attempt: fact_hop(length, seed, split, n_distractors=d, crowded=True,
                                                    attempt=attempt),
                        n.randint(HOP_CROWD, max(HOP_CROWD, min(4, room // 2 - 1))))
    if task in ("fact_hop_quiz_crowded", "fact_hop_wide_crowded"):  # HOP_CROWD + 1 to 6 chains
        wide = task == "fact_hop_wide_crowded"
        return _crowded(lambda d, attempt: fact_hop_quiz(length, seed, split, n_facts=d + 1, wide=wide, crowded=True,
                                                         attempt=attempt),
                        n.randint(HOP_CROWD, max(HOP_CROWD, min(5, room // 2))))
    if task == "fact_hop_contrast":  # HOP_CROWD + 1 to 6 chains, each asked once (by name or by place)
        return _crowded(lambda d, attempt: fact_hop_contrast(length, seed, split, n_chains=d + 1, attempt=attempt),
                        n.randint(HOP_CROWD, max(HOP_CROWD, min(5, room // 2))))
    if task == "fact_multi_key":
        kind = n.choice(("name", "word", "number"))
        most = n.randint(1, max(1, min(5, room - 1)))
        return _redrawn(lambda attempt: _fewer_if_too_short(
            lambda d: fact(length, seed, split, kind=kind, n_distractors=d, near_keys=True, task=task,
                           attempt=attempt), most, least=1))
    if task == "fact_needle":
        return _fewer_if_too_short(lambda d: fact_needle(length, seed, split, n_distractors=d),
                                   n.randint(0, max(0, min(3, room - 1))))
    if task == "fact_quiz":
        return _fewer_if_too_short(lambda d: fact_quiz(length, seed, split, n_facts=d + 1),
                                   n.randint(1, max(1, min(7, room - 1))))
    if task == "fact_hop_quiz":  # two statements per chain: half as many chains as quiz facts
        return _fewer_if_too_short(lambda d: fact_hop_quiz(length, seed, split, n_facts=d + 1),
                                   n.randint(1, max(1, min(5, room // 2))))
    if task == "fact_hop_wide":  # the hop quiz's chains, asked in other words
        return _fewer_if_too_short(lambda d: fact_hop_quiz(length, seed, split, n_facts=d + 1, wide=True),
                                   n.randint(1, max(1, min(5, room // 2))))
    if task == "fact_hop_steps":  # two statements per chain and up to two answers: fewer chains than the hop quiz
        most = n.randint(0, max(0, min(4, room // 3)))
        return _redrawn(lambda attempt: _fewer_if_too_short(
            lambda d: fact_hop_steps(length, seed, split, n_chains=d + 1, attempt=attempt), most))
    if task == "fact_phrase_quiz":  # values of up to 5 words: as many facts as fact_quiz, redrawn if none fits
        most = n.randint(1, max(1, min(7, room - 1)))
        return _redrawn(lambda attempt: _fewer_if_too_short(
            lambda d: fact_phrase_quiz(length, seed, split, n_facts=d + 1, attempt=attempt), most))
    if task == "fact_hop_named":  # two statements per chain, one answer each: as many chains as the hop quiz
        most = n.randint(1, max(1, min(5, room // 2)))
        return _redrawn(lambda attempt: _fewer_if_too_short(
            lambda d: fact_hop_named(length, seed, split, n_chains=d + 1, attempt=attempt), most))
    if task == "fact_name_keyed":  # one statement and one answer per fact: as many as a quiz
        most = n.randint(1, max(1, min(7, room - 1)))
        return _redrawn(lambda attempt: _fewer_if_too_short(
            lambda d: fact_hop_named(length, seed, split, n_chains=d + 1, attempt=attempt, naming=False), most))
    if task == "fact_list":  # as many words and distractor lists as fit: fewer when the row is too short
        words, lists = n.randint(3, max(3, min(12, length // 48))), n.randint(0, max(0, min(2, room // 3)))
        while True:
            try:
                return fact_list(length, seed, split, n_words=words, n_distractors=lists)
            except D.TooShort:
                if lists == 0 and words == 1:
                    raise
                lists, words = (lists - 1, words) if lists else (0, words - 1)
    if task in TASKS:
        return _fewer_if_too_short(lambda d: fact(length, seed, split, kind=task.removeprefix("fact_"),
                                                  n_distractors=d), n.randint(0, max(0, min(5, room - 1))))
    raise ValueError(f"task={task!r}: expected one of {TASKS + AUX_TASKS}")
