"""fact_hop_steps (superlinear_lab.facts): two-hop chains whose first hop is asked as a question of its own."""
import pytest

from superlinear_lab import data as D
from superlinear_lab import facts as F




def _inside(raw: bytes, statement: str, r: tuple[int, int]) -> bool:
    """Whether token range `r` (ids index; ids[0] is bos) lies inside an occurrence of `statement` in the row."""
    s = statement.encode()
    at = raw.find(s)
    while at >= 0:
        if at + 1 <= r[0] and r[1] <= at + 1 + len(s):
            return True
        at = raw.find(s, at + 1)
    return False


@pytest.mark.parametrize("split", D.SPLITS)
def test_hop_steps_ask_the_pointer_then_the_place_with_both_hops_as_evidence(split, planted_statements):
    """Every chain is asked once for its place, most right after a question for its pointer name. Evidence decodes
    to (name, place) per chain; the name sits in a statement naming that chain's owner and thing, the place in
    the row's place statement of that name. Name bytes need the name only; place bytes need both hops; question
    bytes need nothing. Rivals: every name and place. Train questions carry train leads; eval ones are bare."""
    from superlinear_lab import train as T

    planted = planted_statements
    sizes, firsts, chains = set(), 0, 0
    for seed in range(10):
        ex = D.make_example("fact_hop_steps", 2048, seed, split)
        keys, names, places = [tuple(k) for k in ex.meta["keys"]], ex.meta["middles"], ex.meta["values"]
        steps = [tuple(s) for s in ex.meta["steps"]]
        where, place_question = ex.meta["hop_phrasing"]
        assert (where, place_question) in F.hop_phrasings(split)
        sizes.add(len(keys))
        assert ex.task == "fact_hop_steps" and ex.length == 2048 and ex.answer_text() == ex.meta["value"]
        assert len(set(names + places)) == 2 * len(keys) == 2 * len(set(keys))
        # the asking plan: each chain's place once, its name (if asked) just before it
        assert sorted(i for i, s in steps if s == "place") == list(range(len(keys)))
        for k, (i, s) in enumerate(steps):
            if s == "name":
                assert steps[k + 1] == (i, "place")
        firsts += sum(s == "name" for _, s in steps)
        chains += len(keys)
        # evidence: the name inside its chain's naming statement, the place inside "<name> <verb> <place>."
        raw = bytes(ex.ids[1:])
        assert [bytes(ex.ids[a:b]).decode() for a, b in ex.evidence] == [v for p in zip(names, places) for v in p]
        for i, (owner, thing) in enumerate(keys):
            named = [t for t in planted if _inside(raw, t, ex.evidence[2 * i])]
            assert len(named) == 1 and owner[4:] in named[0] and thing in named[0] and places[i] not in named[0]
            kept = where.format(name=names[i], value=places[i])
            assert kept in planted and _inside(raw, kept, ex.evidence[2 * i + 1])
        assert sorted(bytes(ex.ids[a:b]).decode() for a, b in ex.rivals) == sorted(names + places)
        # the answer: values in step order, the later questions as prompts, each question about its chain
        values = [names[i] if s == "name" else places[i] for i, s in steps]
        parts = ex.answer_text().split("\nAnswer: ")
        assert [p.split("\nQuestion: ")[0] for p in parts] == values
        prompts = [bytes(ex.ids[a:b]).decode() for a, b in ex.prompts]
        asked = [bytes(ex.ids[1:ex.answer[0]]).decode().rsplit("\nQuestion: ", 1)[1]] + prompts
        asked = [q.removeprefix("\nQuestion: ").removesuffix("\nAnswer: ") for q in asked]
        assert len(asked) == len(steps)
        for q, (i, s) in zip(asked, steps):
            bank = ([place_question] if s == "place" else
                    F.QUESTIONS["eval"]["name"] if split == "eval" else F._train_questions("name"))
            bare = {F._fill(t, *keys[i]) for t in bank}
            leads = ("",) if split == "eval" else F.QUESTION_LEADS
            assert any(q == lead + b for lead in leads for b in bare), (split, s, q)
        # needs: per answer byte, in step order
        at, k = ex.answer[0], 0
        for k, ((i, s), v) in enumerate(zip(steps, values)):
            at += len(prompts[k - 1].encode()) if k else 0
            wanted = [2 * i] if s == "name" else [2 * i, 2 * i + 1]
            for j in range(len(v.encode())):
                assert ex.needs[at + j - 1] == wanted, (s, j)
            at += len(v.encode())
        in_prompt = {q for a, b in ex.prompts for q in range(a - 1, b - 1)}
        assert set(ex.needs) == set(range(ex.answer[0] - 1, ex.answer[1] - 1)) - in_prompt
        # training scores the names and places only, with a first-token weight on each
        _, mask, first = T.loss_weights([ex], "cpu")
        scored = bytes(ex.ids[q + 1] for q in mask[0].nonzero().flatten().tolist()).decode()
        assert scored == "".join(values)
        assert bytes(ex.ids[q + 1] for q in first[0].nonzero().flatten().tolist()).decode() == \
            "".join(v[0] for v in values)
    assert len(sizes) > 2
    assert 0.5 * chains <= firsts < chains  # the pointer is mostly asked first, sometimes not
    with pytest.raises(ValueError, match="n_facts=0"):
        F.fact_hop_steps(1024, 0, split, n_chains=0)


def test_hop_steps_fit_short_rows():
    """Short rows hold at least one chain (drawn anew if needed); its task-mix name: tests/test_facts.py."""
    for seed in range(60):
        ex = D.make_example("fact_hop_steps", 384, seed, "train")
        assert ex.length == 384 and len(ex.evidence) == 2 * len(ex.meta["keys"]) >= 2
