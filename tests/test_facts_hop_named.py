"""fact_hop_named (superlinear_lab.facts): the second hop alone, the pointer name given in the question; and
fact_name_keyed, the same without the naming statements (facts keyed by a proper name)."""
import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F

KEYS = ("{owner}'s {thing}", "the {thing} of {owner}", "{owner}'s own {thing}", "the {thing} for {owner}",
        "the {thing} belonging to {owner}", "the {thing} that {owner} has")  # the key forms a hop question holds




def _bare(question: str, name: str) -> str:
    """The named form of a filled hop question, written out by hand: the key phrase replaced by the name."""
    for key in sorted(KEYS, key=len, reverse=True):
        filled = key.format(owner="the OWNERX", thing="THINGX")
        for form in (filled, filled[:1].upper() + filled[1:]):
            if form in question:
                return question.replace(form, name, 1)
    raise AssertionError(question)


def test_named_question_replaces_the_key_by_the_name():
    """Every train hop phrasing's question, and the eval bank's, named: the key (any form) gives way to the name,
    the rest of the question stays word for word."""
    for split in D.SPLITS:
        for _, question in F.hop_phrasings(split):
            named = F.named_hop_question(question)
            assert "{name}" in named and "{owner}" not in named.lower() and "{thing}" not in named
            full = F._fill(question, "the OWNERX", "THINGX")
            assert F._fill(named, "the OWNERX", "THINGX", name="NAMEX") == _bare(full, "NAMEX"), question
    with pytest.raises(ValueError, match="question="):
        F.named_hop_question("Where is it kept?")


@pytest.mark.parametrize("task", ["fact_hop_named", "fact_name_keyed"])
@pytest.mark.parametrize("split", D.SPLITS)
def test_hop_named_asks_each_place_by_its_name_with_the_place_as_evidence(split, task, planted_statements):
    """Per chain: evidence (name, place) (fact_name_keyed: the place only), the name in its chain's naming statement
    (fact_name_keyed: no naming statements), the place in "<name> <verb> <place>.";
    every chain asked once, its question naming the pointer name (not the owner); place bytes need the place
    only; question bytes nothing; rivals: the places. Train questions carry train leads, eval ones none."""
    planted = planted_statements
    naming = task == "fact_hop_named"
    sizes, led = set(), 0
    for seed in range(10):
        ex = D.make_example(task, 2048, seed, split)
        keys, names, places = [tuple(k) for k in ex.meta["keys"]], ex.meta["middles"], ex.meta["values"]
        order = ex.meta["order"]
        where, named = ex.meta["hop_phrasing"]
        assert any(w == where and F.named_hop_question(q) == named for w, q in F.hop_phrasings(split))
        sizes.add(len(keys))
        assert ex.task == task and ex.length == 2048 and ex.answer_text() == ex.meta["value"]
        assert len(set(names + places)) == 2 * len(keys) and sorted(order) == list(range(len(keys)))
        place_at = [2 * i + 1 if naming else i for i in range(len(keys))]  # each place's evidence index
        assert [bytes(ex.ids[a:b]).decode() for a, b in ex.evidence] == \
            ([v for p in zip(names, places) for v in p] if naming else places)
        raw = b"\0" + bytes(ex.ids[1:])  # ids[0] is <|bos|>: keep the indices
        for i, (owner, thing) in enumerate(keys):
            kept = where.format(name=names[i], value=places[i])
            at = raw.find(kept.encode())
            assert kept in planted and at >= 0 and at <= ex.evidence[place_at[i]][0] < ex.evidence[place_at[i]][1] \
                <= at + len(kept.encode())
            naming_statements = [t for t in planted if names[i] in t and places[i] not in t]
            if naming:
                assert len(naming_statements) == 1
                assert owner[4:] in naming_statements[0] and thing in naming_statements[0]
            else:
                assert not naming_statements
        assert len(planted) == (2 if naming else 1) * len(keys)  # fact_name_keyed: the place statements only
        assert sorted(bytes(ex.ids[a:b]).decode() for a, b in ex.rivals) == sorted(places)
        parts = ex.answer_text().split("\nAnswer: ")
        assert [p.split("\nQuestion: ")[0] for p in parts] == [places[i] for i in order]
        prompts = [bytes(ex.ids[a:b]).decode() for a, b in ex.prompts]
        asked = [bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1]] + prompts
        asked = [q.removeprefix("\nQuestion: ").removesuffix("\nAnswer: ") for q in asked]
        for q, i in zip(asked, order):
            assert names[i] in q and keys[i][0][4:] not in q and all(names[j] not in q for j in order if j != i)
            leads = ("",) if split == "eval" else F.QUESTION_LEADS
            assert any(q == lead + F._fill(named, "", "", name=names[i]) for lead in leads), q
            led += not q.startswith(F._fill(named, "", "", name=names[i]))
        at = ex.answer[0]
        for k, i in enumerate(order):
            at += len(prompts[k - 1].encode()) if k else 0
            for j in range(len(places[i].encode())):
                assert ex.needs[at + j - 1] == [place_at[i]]
            at += len(places[i].encode())
        in_prompt = {q for a, b in ex.prompts for q in range(a - 1, b - 1)}
        assert set(ex.needs) == set(range(ex.answer[0] - 1, ex.answer[1] - 1)) - in_prompt
    assert len(sizes) > 1
    assert (led > 0) == (split == "train")  # train questions come after a lead now and then
    with pytest.raises(ValueError, match="n_facts=0"):
        F.fact_hop_named(1024, 0, split, n_chains=0, naming=naming)


def test_train_named_questions_keep_off_the_eval_wording():
    """The train rows never ask in the eval hop question's frame."""
    eval_named = F.named_hop_question(F.HOP["eval"][0][1])  # "In which place does {name} stay?"
    frame = eval_named.split("{name}")
    assert all(frame)
    for seed in range(30):
        ex = D.make_example("fact_hop_named", 1024, seed, "train")
        asked = ex.text()[ex.text().rindex("\nQuestion: ", 0, len(ex.text()) - len(ex.answer_text())):]
        assert frame[0] not in asked and frame[1] not in asked
        assert ex.meta["hop_phrasing"][1] != eval_named
