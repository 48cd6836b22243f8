"""Why held-out `fact_hop` scores 0 % exact (issue 13): a CPU diagnosis, torch backend, fp32, teacher forcing plus
greedy decoding; no timings.

    OMP_NUM_THREADS=1 python bench/facts_hop_diagnose.py --models small runs/s11_final --lengths 8192 \
        --seeds 0-15 --out bench/facts_s11/hop_diagnosis_cpu.json

Rows are the evaluation's own (`data.make_example("fact_hop", L, seed, "eval")`, as `evaluate` builds the
suite). Per row and model it measures:

1. **What the model answers** (greedy, KV/SSM cache), classified: ``exact``; ``intermediate`` (the chain's pointer
   name, i.e. the first hop's value, or a prefix/extension of it); ``distractor_place`` / ``distractor_name`` (a
   value of another chain of the row); ``copy_slip`` (the right first byte, then a slip); ``other_in_doc`` (a
   string that occurs elsewhere in the document); ``garbage``.
2. **Routing** of every answer query: per evidence range (0 = the pointer name in the naming statement, the first
   hop; 1 = the place in the place statement, the second hop) and per attention layer, is it reached by some head
   (`evaluate.reached`, the evaluation's reach rule), beside the chance of a random router
   (`evaluate.chance_recall`); and, from the first answer query, the reach of the other chains' names and places.
3. **First-byte probabilities** at the first answer query: on the place's first byte, on the pointer name's, on
   the other chains' places' and names' (bytes that collide with the place's or the pointer's are not counted as
   rivals; a row whose pointer starts like its place is flagged).
4. **Variants of the question** on the same document: ``second_hop`` — the pointer named in the question
   (`facts.named_hop_question`: "In which place does <Name> stay?"), the answer needing the place statement only;
   ``first_hop`` — the first hop asked alone (a held-out name question, "Which name was given to <owner>'s
   <thing>?", the answer being the pointer). Exact (teacher forcing = greedy) and p(first byte) for each; greedy
   output of the second-hop variant where it misses. "Can't compose" shows as first and second hop right, the
   chain wrong; "can't retrieve" as the second hop wrong even with the name given. ``steps`` — the first-hop
   question answered with the right pointer in the prompt, then the original question (`fact_hop_steps`'s form in
   held-out phrasings): does the pointer in the context, with the key still in the question, let it compose?
5. **The training hop data** (no model): `fact_hop` / `fact_hop_quiz` / `fact_hop_named` rows of the train split at
   the training lengths (4,096 and 8,192): the statement and question phrasings beside the eval split's, the order
   of the two statements, the distance from the question to each hop, the routing chance of each range per layer
   and the share of ranges no candidate span of a layer can reach; ``--train-rows`` also runs the models on
   train-split `fact_hop` rows (seeds 900,000+) with the original and the second-hop question.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import time
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import facts as F
from superlinear_lab.evaluate import answer_hits, capture_routing, chance_recall, reached
from superlinear_lab.loaders import open_model

QUESTION = b"\nQuestion: "
ANSWER = b"\nAnswer: "
NAMING_EVAL = [re.compile(p) for p in (rb"\n(?P<owner>[^\n]+?) calls the (?P<thing>[a-z ]+) (?P<value>[^\n]+?)\.\n",
                                         rb"\nBy the way, the name of (?P<owner>[^\n]+?)'s (?P<thing>[a-z ]+) is "
                                         rb"(?P<value>[^\n]+?)\.\n")]


def seeds_of(spec: str) -> list[int]:
    out = []
    for part in filter(None, spec.split(",")):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def doc_bytes(ex: D.Example) -> bytes:
    """The row's bytes (token i ↔ byte i - 1: the tokenizer is bytes after <|bos|>) up to the question."""
    raw = bytes(t if t < 256 else 0 for t in ex.ids)
    return raw[:raw.rindex(QUESTION)]


def place_pattern(template: str) -> re.Pattern:
    """A place statement template ("These days {name} stays in {value}.") as a byte regex with groups."""
    esc = re.escape(template).replace(r"\{name\}", "(?P<name>[^\n]+?)").replace(r"\{value\}", "(?P<value>[^\n]+?)")
    return re.compile(esc.encode())


def chains(ex: D.Example, place_template: str, split: str) -> list[dict]:
    """Every chain of the row: naming statements (eval split: the held-out name phrasings) linked by their value to
    a place statement of `place_template`; token ranges of the pointer name and of the place. The asked chain
    first. Train rows (composed phrasings) get the place statements only, with the name's range in them."""
    doc = doc_bytes(ex)
    places = {}
    for m in place_pattern(place_template).finditer(doc):
        places[m.group("name")] = (m.start("name") + 1, m.end("name") + 1, m.group("value"),
                                   m.start("value") + 1, m.end("value") + 1)
    out = []
    if split == "eval":
        for pat in NAMING_EVAL:
            for m in pat.finditer(doc):
                name = m.group("value")
                if name in places:
                    n0, n1, place, p0, p1 = places[name]
                    out.append({"name": name.decode(), "place": place.decode(), "name_range": (m.start("value") + 1,
                                m.end("value") + 1), "place_range": (p0, p1), "owner": m.group("owner").decode()})
    else:
        for name, (n0, n1, place, p0, p1) in places.items():
            out.append({"name": name.decode(), "place": place.decode(), "name_range": None, "place_range": (p0, p1)})
    asked = ex.meta["middle"]
    out.sort(key=lambda c: c["name"] != asked)
    if not out or out[0]["name"] != asked:
        raise RuntimeError(f"row {ex.meta}: the asked chain was not found")
    return out


def with_question(ex: D.Example, question: str, answer: str, needs: list[int], task: str) -> D.Example:
    """`ex`'s document with its question replaced (the answer follows "\\nAnswer: "); evidence ranges unchanged."""
    raw = bytes(t if t < 256 else 0 for t in ex.ids)
    cut = raw.rindex(QUESTION)
    ids = ex.ids[:cut] + list(QUESTION + question.encode() + ANSWER)
    a0 = len(ids)
    ids += list(answer.encode())
    return D.Example(ids, (a0, len(ids)), list(ex.evidence), {q: list(needs) for q in range(a0 - 1, len(ids) - 1)},
                     task, dict(ex.meta))


def asked_question(ex: D.Example) -> str:
    raw = bytes(t if t < 256 else 0 for t in ex.ids)
    return raw[raw.rindex(QUESTION) + len(QUESTION):raw.rindex(ANSWER)].decode()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> str:
    cache = model.new_cache(len(ids) + n + 1)
    logits = model(torch.tensor([ids]), cache, 0)[0, -1]
    out, pos = [], len(ids)
    for _ in range(n):
        t = int(logits.argmax())
        if t == 10 or t >= 256:
            break
        out.append(t)
        logits = model(torch.tensor([[t]]), cache, pos)[0, -1]
        pos += 1
    return bytes(out).decode(errors="replace")


def classify(answer: str, ex: D.Example, row_chains: list[dict]) -> str:
    """What a greedy answer (decoded past the value: the prompt has no end marker) is: the first of ``exact`` (the
    place, then no letter), ``intermediate`` (starts with the pointer name, or its first word is a prefix of it),
    ``distractor_place`` / ``distractor_name`` (the same for another chain's values), ``copy_slip`` (the place's
    first byte, then a slip), ``other_in_doc`` (its first word, 3+ letters, occurs in the document), ``garbage``."""
    place, middle = ex.meta["value"], ex.meta["middle"]
    word = re.match(r"[^\s,.;:!?]*", answer.strip()).group()

    def says(value: str) -> bool:
        if answer.startswith(value):
            return not answer[len(value):len(value) + 1].isalnum()
        return False

    def like(value: str) -> bool:
        return answer.startswith(value) or (len(word) >= 3 and value.startswith(word))

    if says(place):
        return "exact"
    if like(middle):
        return "intermediate"
    others = row_chains[1:]
    if any(like(c["place"]) for c in others):
        return "distractor_place"
    if any(like(c["name"]) for c in others):
        return "distractor_name"
    if answer[:1] == place[:1]:
        return "copy_slip"
    if len(word) >= 3 and word.encode() in doc_bytes(ex):
        return "other_in_doc"
    return "garbage"


def reclassify(rows: list[dict]) -> None:
    """Classify stored greedy answers again (rows of the eval split; the row is rebuilt from its seed)."""
    for r in rows:
        if r.get("split") != "eval" or "greedy" not in r:
            continue
        ex = D.make_example("fact_hop", r["length"], r["seed"], "eval")
        row_chains = chains(ex, F.HOP["eval"][0][0], "eval")
        r["class"] = classify(r["greedy"], ex, row_chains)
        if "greedy" in r["second_hop"]:
            r["second_hop"]["class"] = classify(r["second_hop"]["greedy"], ex, row_chains)


def reach_table(records, windows, queries, ranges) -> list[list[bool]]:
    """[range][layer]: reached by some head from every query of `queries` (a list), i.e. the share of queries as a
    float per (range, layer)."""
    out = []
    layers = sorted(records)
    for a, b in ranges:
        n = len(queries)
        row = torch.zeros(n, dtype=torch.int64)
        q = torch.tensor(queries, dtype=torch.int64)
        es, ee = torch.full((n,), a, dtype=torch.int64), torch.full((n,), b, dtype=torch.int64)
        out.append([float(reached(records[i][1], windows[i], row, q, es, ee).any(-1).float().mean()) for i in layers])
    return out


@torch.no_grad()
def teacher_forced(model, ex: D.Example, extra_ranges=()) -> dict:
    """Exact (as `evaluate.run_examples` scores it), teacher-forced argmax text, first-byte distribution, and the
    reach of every evidence range from every answer query per layer (plus `extra_ranges` from the first query)."""
    windows = {i: layer.span_config for i, layer in model.routing_layers()}
    with capture_routing(model) as records:
        logits = model(torch.tensor([ex.ids]))
    hits = answer_hits(logits, [ex])[0]
    a0, a1 = ex.answer
    probs = torch.softmax(logits[0, a0 - 1].double(), -1)
    queries = list(range(a0 - 1, a1 - 1))
    layers = sorted(records)
    return {"correct": all(hits), "first_byte": bool(hits[0]), "bytes_right": sum(hits), "answer_bytes": len(hits),
            "tf_argmax": bytes(int(t) for t in logits[0, a0 - 1:a1 - 1].argmax(-1) if t < 256).decode(errors="replace"),
            "probs": probs, "layers": layers,
            "reach": reach_table(records, windows, queries, ex.evidence),
            "reach_first_query": reach_table(records, windows, [a0 - 1], list(ex.evidence) + list(extra_ranges)),
            "chance": [[chance_recall(windows[i], a0 - 1, a, b) for i in layers] for a, b in ex.evidence]}


def first_byte_mass(probs: torch.Tensor, ex: D.Example, row_chains: list[dict]) -> dict:
    place, middle = ex.meta["value"], ex.meta["middle"]
    pb, mb = place.encode()[0], middle.encode()[0]
    rival_places = {c["place"].encode()[0] for c in row_chains[1:]} - {pb, mb}
    rival_names = {c["name"].encode()[0] for c in row_chains[1:]} - {pb, mb} - rival_places
    top = probs.topk(5)
    return {"p_place": float(probs[pb]), "p_intermediate": float(probs[mb]) if mb != pb else None,
            "same_first_byte": mb == pb,
            "p_other_places": float(sum(probs[b] for b in rival_places)),
            "p_other_names": float(sum(probs[b] for b in rival_names)),
            "top5": [(chr(int(i)) if i < 256 else int(i), round(float(p), 4)) for p, i in zip(top.values, top.indices)]}


def row_report(model, ex: D.Example, split: str, decode: bool) -> dict:
    where = F.HOP["eval"][0][0] if split == "eval" else None
    row_chains = chains(ex, where, split) if split == "eval" else train_chains(ex)
    place, middle = ex.meta["value"], ex.meta["middle"]
    extra = []
    for c in row_chains[1:]:
        extra += [tuple(c["name_range"]), tuple(c["place_range"])] if c["name_range"] else [tuple(c["place_range"])]
    t0 = time.time()
    orig = teacher_forced(model, ex, extra)
    q = asked_question(ex)
    name_first = ex.evidence[0][0] < ex.evidence[1][0]
    out = {"seed": ex.meta["seed"], "length": ex.length, "question": q, "value": place, "intermediate": middle,
           "owner": ex.meta["owner"], "thing": ex.meta["thing"], "n_chains": len(row_chains),
           "naming_before_place": name_first,
           "distance_to_name": ex.answer[0] - ex.evidence[0][1], "distance_to_place": ex.answer[0] - ex.evidence[1][1],
           "statements": {"naming": span_line(ex, ex.evidence[0]), "place": span_line(ex, ex.evidence[1])},
           "others": [{"name": c["name"], "place": c["place"]} for c in row_chains[1:]],
           "correct": orig["correct"], "first_byte": orig["first_byte"], "bytes_right": orig["bytes_right"],
           "answer_bytes": orig["answer_bytes"], "tf_argmax": orig["tf_argmax"],
           **first_byte_mass(orig["probs"], ex, row_chains),
           "layers": orig["layers"],
           "reach_name": orig["reach"][0], "reach_place": orig["reach"][1],
           "chance_name": orig["chance"][0], "chance_place": orig["chance"][1],
           "first_query_reach_others": orig["reach_first_query"][2:]}
    if decode:
        g = greedy(model, ex.ids[:ex.answer[0]], len(place.encode()) + 12)
        out["greedy"], out["class"] = g, classify(g, ex, row_chains)
    # variant: the first hop alone (a held-out name question) and the second hop with the pointer named
    first_q = F.QUESTIONS["eval" if split == "eval" else "train"]["name"][1 if split == "eval" else 0]
    v1 = with_question(ex, F._fill(first_q, out["owner"], out["thing"]), middle, [0], "hop_first")
    second_q = F.named_hop_question(hop_question_template(q, out["owner"], out["thing"]))
    v2 = with_question(ex, F._fill(second_q, out["owner"], out["thing"], name=middle), place, [1], "hop_second")
    v3 = with_question(ex, F._fill(first_q, out["owner"], out["thing"]) + "\nAnswer: " + middle + "\nQuestion: " + q,
                       place, [0, 1], "hop_steps")
    for key, v, target in (("first_hop", v1, middle), ("second_hop", v2, place), ("steps", v3, place)):
        r = teacher_forced(model, v)
        pb = target.encode()[0]
        out[key] = {"question": asked_question(v), "correct": r["correct"], "first_byte": r["first_byte"],
                    "p_first": float(r["probs"][pb]), "tf_argmax": r["tf_argmax"], "reach": r["reach"]}
        if key != "first_hop":
            out[key]["p_intermediate"] = float(r["probs"][middle.encode()[0]]) if middle[0] != place[0] else None
            if decode and not r["correct"] and key == "second_hop":
                g = greedy(model, v.ids[:v.answer[0]], len(place.encode()) + 12)
                out[key]["greedy"], out[key]["class"] = g, classify(g, ex, row_chains)
    out["seconds"] = round(time.time() - t0, 1)
    return out


# The chain asked in other words (same document, same answer): the wh-word and the verb of the held-out question
# ("In which place does {owner}'s {thing} stay?") apart. "where is …?" is how every train hop question starts.
NEUTRAL_QUESTIONS = {"where_no_verb": "Where is {owner}'s {thing}?",
                     "where_eval_verb": "Where does {owner}'s {thing} stay?",
                     "which_place_no_verb": "In which place is {owner}'s {thing}?",
                     "where_train_verb": "Where is {owner}'s {thing} kept?"}


def neutral_report(model, ex: D.Example, form: str = "where_no_verb") -> dict:
    """The chain asked with question `NEUTRAL_QUESTIONS[form]`: exact, first-byte mass, which layers reach which
    hop. Tells which words of the question make the model treat it as a two-hop question."""
    row_chains = chains(ex, F.HOP["eval"][0][0], "eval")
    place = ex.meta["value"]
    v = with_question(ex, F._fill(NEUTRAL_QUESTIONS[form], ex.meta["owner"], ex.meta["thing"]), place, [0, 1],
                      "hop_" + form)
    r = teacher_forced(model, v)
    return {"seed": ex.meta["seed"], "length": ex.length, "form": form, "question": asked_question(v),
            "correct": r["correct"], "n_chains": len(row_chains),
            **first_byte_mass(r["probs"], ex, row_chains), "tf_argmax": r["tf_argmax"], "layers": r["layers"],
            "reach_name": r["reach"][0], "reach_place": r["reach"][1]}


def summarize_neutral(rows: list[dict]) -> dict:
    """Per question form: exact, first-byte mass on the place / the pointer / the other chains' places, and, on rows
    with several chains, the place's share of the mass on place first bytes beside 1 / chains (a pick of a place
    at random: the class of the answer is found, the chain is not)."""
    mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None  # noqa: E731
    layers = rows[0]["layers"]
    multi = [r for r in rows if r["n_chains"] > 1]
    return {"rows": len(rows), "exact": sum(r["correct"] for r in rows),
            "mean_p_place_first_byte": mean([r["p_place"] for r in rows]),
            "mean_p_other_places_first_bytes": mean([r["p_other_places"] for r in rows]),
            "rows_several_chains": len(multi),
            "exact_several_chains": sum(r["correct"] for r in multi),
            "place_share_of_place_mass_several_chains": mean([r["p_place"] / max(r["p_place"] + r["p_other_places"],
                                                                                 1e-12) for r in multi]),
            "chance_share_several_chains": mean([1 / r["n_chains"] for r in multi]),
            "mean_p_intermediate_first_byte": mean([r["p_intermediate"] for r in rows if r["p_intermediate"] is not None]),
            "reach_name_per_layer": {f"layers.{l}": mean([r["reach_name"][k] for r in rows]) for k, l in enumerate(layers)},
            "reach_place_per_layer": {f"layers.{l}": mean([r["reach_place"][k] for r in rows]) for k, l in enumerate(layers)}}


def hop_question_template(question: str, owner: str, thing: str) -> str:
    """The template of a filled hop question: the key back to "{owner}'s {thing}" (or the train grammar's form)."""
    for key in sorted(set(F._KEY_FORMS), key=len, reverse=True):
        filled = F._fill(key, owner, thing)
        for form, tmpl in ((filled, key), (filled[:1].upper() + filled[1:], F._sentence(key))):
            if form in question:
                return question.replace(form, tmpl, 1)
    raise ValueError(f"no key of ({owner!r}, {thing!r}) in {question!r}")


def train_chains(ex: D.Example) -> list[dict]:
    """Train rows: the asked chain from the evidence, the others unknown (composed phrasings)."""
    return [{"name": ex.meta["middle"], "place": ex.meta["value"], "name_range": tuple(ex.evidence[0]),
             "place_range": tuple(ex.evidence[1])}]


def span_line(ex: D.Example, rg) -> str:
    raw = bytes(t if t < 256 else 0 for t in ex.ids)
    a, b = rg[0] - 1, rg[1] - 1
    lo = raw.rfind(b"\n", 0, a) + 1
    hi = raw.find(b"\n", b)
    return raw[lo:hi if hi >= 0 else b].decode(errors="replace")


def summarize_rows(rows: list[dict]) -> dict:
    n = len(rows)
    mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None  # noqa: E731
    classes = {}
    for r in rows:
        if "class" in r:
            classes[r["class"]] = classes.get(r["class"], 0) + 1
    layers = rows[0]["layers"]
    s = {"rows": n, "exact": sum(r["correct"] for r in rows), "first_byte": sum(r["first_byte"] for r in rows),
         "greedy_classes": classes,
         "mean_p_place_first_byte": mean([r["p_place"] for r in rows]),
         "mean_p_intermediate_first_byte": mean([r["p_intermediate"] for r in rows if r["p_intermediate"] is not None]),
         "rows_intermediate_first_byte_distinct": sum(not r["same_first_byte"] for r in rows),
         "mean_p_other_places": mean([r["p_other_places"] for r in rows]),
         "mean_p_other_names": mean([r["p_other_names"] for r in rows]),
         "argmax_first_byte_is_intermediate": sum(r["tf_argmax"][:1] == r["intermediate"][:1] and not r["same_first_byte"]
                                                  for r in rows),
         "reach_name_per_layer": {f"layers.{l}": mean([r["reach_name"][k] for r in rows]) for k, l in enumerate(layers)},
         "reach_place_per_layer": {f"layers.{l}": mean([r["reach_place"][k] for r in rows]) for k, l in enumerate(layers)},
         "chance_name_per_layer": {f"layers.{l}": mean([r["chance_name"][k] for r in rows]) for k, l in enumerate(layers)},
         "chance_place_per_layer": {f"layers.{l}": mean([r["chance_place"][k] for r in rows]) for k, l in enumerate(layers)},
         "reach_name_any_layer": mean([max(r["reach_name"]) for r in rows]),
         "reach_place_any_layer": mean([max(r["reach_place"]) for r in rows]),
         "rows_place_reached_after_name_layer": sum(
             any(r["reach_name"][i] > 0.5 and any(r["reach_place"][j] > 0.5 for j in range(i + 1, len(layers)))
                 for i in range(len(layers))) for r in rows),
         "naming_before_place": {"rows": sum(r["naming_before_place"] for r in rows),
                                 "mean_p_place": mean([r["p_place"] for r in rows if r["naming_before_place"]]),
                                 "mean_p_place_other_order": mean([r["p_place"] for r in rows
                                                                   if not r["naming_before_place"]])}}
    for key in ("first_hop", "second_hop", "steps"):
        v = [r[key] for r in rows]
        s[key] = {"exact": sum(x["correct"] for x in v), "first_byte": sum(x["first_byte"] for x in v),
                  "mean_p_first_byte": mean([x["p_first"] for x in v])}
        if key != "first_hop":
            s[key]["mean_p_intermediate_first_byte"] = mean([x["p_intermediate"] for x in v
                                                             if x["p_intermediate"] is not None])
            s[key]["reach_place_any_layer"] = mean([max(x["reach"][1]) for x in v])
            s[key]["reach_place_per_layer"] = [mean([x["reach"][1][k] for x in v]) for k in range(len(layers))]
            if key == "second_hop":
                cls = {}
                for x in v:
                    if "class" in x:
                        cls[x["class"]] = cls.get(x["class"], 0) + 1
                s[key]["greedy_classes_of_misses"] = cls
        else:
            s[key]["reach_name_any_layer"] = mean([max(x["reach"][0]) for x in v])
    s["both_hops_right_alone"] = sum(r["first_hop"]["correct"] and r["second_hop"]["correct"] for r in rows)
    s["both_hops_right_alone_chain_wrong"] = sum(r["first_hop"]["correct"] and r["second_hop"]["correct"]
                                                 and not r["correct"] for r in rows)
    return s


def training_data(lengths=(4096, 8192), rows: int = 64, layer_cfgs=None) -> dict:
    """Train-split hop rows at the training lengths, no model: phrasings, statement order, distances, routing chance
    per range and layer, and the share of ranges no candidate span of a layer can reach (chance exactly 0)."""
    out = {"phrasings": {"eval_place_statements": [h[0] for h in F.HOP["eval"]],
                         "eval_questions": [h[1] for h in F.HOP["eval"]],
                         "train_place_statement_count": len({p for p, _ in F.hop_phrasings("train")}),
                         "train_question_count": len({q for _, q in F.hop_phrasings("train")}),
                         "train_place_verbs": [v for v, _ in F._HOP_VERBS],
                         "eval_verb_in_train": any("stays in" in p for p, _ in F.hop_phrasings("train")),
                         "eval_naming_statements": list(F.STATEMENTS["eval"]["name"]),
                         "train_hop_questions_with_where": sum("where" in q.lower()
                                                               for q in {q for _, q in F.hop_phrasings("train")}),
                         "train_name_questions": len(F._train_questions("name")),
                         "train_name_questions_with_which_or_what": sum(
                             any(w in q.lower() for w in ("which", "what")) for q in F._train_questions("name")),
                         "wide_questions (fact_hop_wide)": len(F.hop_wide_questions())}}
    for task in ("fact_hop", "fact_hop_quiz", "fact_hop_named"):
        for length in lengths:
            order, d_name, d_place, n_ans, chance_n, chance_p, zero_n, zero_p, n_chains = ([] for _ in range(9))
            for s in range(rows):
                ex = D.make_example(task, length, 900_000 + s, "train")
                q0 = ex.answer[0] - 1
                pairs = ex.needs[q0]
                if task == "fact_hop_named":  # the place only is needed; the naming statements are context
                    n_chains.append(len(ex.meta["values"]))
                    n_ans.append(len(ex.meta["values"]))
                    continue
                name_ev, place_ev = ex.evidence[pairs[0]], ex.evidence[pairs[1]]
                order.append(name_ev[0] < place_ev[0])
                d_name.append(ex.answer[0] - name_ev[1])
                d_place.append(ex.answer[0] - place_ev[1])
                n_chains.append(len(ex.meta.get("values", [ex.meta["value"]])))
                n_ans.append(len(ex.meta.get("values", [ex.meta["value"]])))
                if layer_cfgs:
                    cn = [chance_recall(c, q0, *name_ev) for c in layer_cfgs]
                    cp = [chance_recall(c, q0, *place_ev) for c in layer_cfgs]
                    chance_n.append(cn)
                    chance_p.append(cp)
                    zero_n.append([c == 0.0 for c in cn])
                    zero_p.append([c == 0.0 for c in cp])
            cell = {"rows": rows, "mean_chains": statistics.fmean(n_chains), "mean_answers": statistics.fmean(n_ans)}
            if order:
                cell.update({"naming_before_place": statistics.fmean(order),
                             "median_distance_to_name": statistics.median(d_name),
                             "median_distance_to_place": statistics.median(d_place)})
            if chance_n:
                k = len(layer_cfgs)
                cell.update({"chance_name_per_layer": [round(statistics.fmean(c[i] for c in chance_n), 4) for i in range(k)],
                             "chance_place_per_layer": [round(statistics.fmean(c[i] for c in chance_p), 4) for i in range(k)],
                             "unreachable_name_per_layer": [round(statistics.fmean(z[i] for z in zero_n), 4) for i in range(k)],
                             "unreachable_place_per_layer": [round(statistics.fmean(z[i] for z in zero_p), 4) for i in range(k)]})
            out[f"{task}@{length}"] = cell
    return out


def layer_configs(spec: str) -> list:
    return [layer.span_config for _, layer in open_model(spec, device="cpu", backend="torch").routing_layers()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["small", "runs/s11_final"])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--seeds", default="0-15", help="held-out seeds, e.g. 0-15 (per length: --seeds-at 16384=0-3)")
    p.add_argument("--seeds-at", nargs="*", default=[], help="LENGTH=SPEC overrides of --seeds")
    p.add_argument("--train-rows", type=int, default=0, help="train-split fact_hop rows per model at --train-length")
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--corpus", default="runs/corpus")
    p.add_argument("--jsonl", help="append every row here as it is measured")
    p.add_argument("--from-jsonl", nargs="*", default=[], help="summarize rows already measured (no model run)")
    p.add_argument("--neutral-only", nargs="*", default=None, metavar="FORM",
                   help="only the chain asked in other words (`NEUTRAL_QUESTIONS` forms; none given: "
                        "where_no_verb), rows to --jsonl")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    D.use_corpus(a.corpus)
    if a.from_jsonl:
        rows = [json.loads(line) for f in a.from_jsonl for line in open(f)]
        reclassify(rows)
        n_chains = {(r["length"], r["seed"]): r["n_chains"] for r in rows if r.get("split") == "eval"}
        for r in rows:  # question-form rows measured before they recorded it: the same row's chain count
            if "n_chains" not in r:
                r["n_chains"] = n_chains[(r["length"], r["seed"])]
        report = {"models": sorted({r["model"] for r in rows}), "corpus": a.corpus, "rows": {}, "summary": {},
                  "training_data": training_data(layer_cfgs=layer_configs(rows[0]["model"]))}
        for r in rows:
            report["rows"].setdefault(f"{r['model']}|{r['split']}|{r['length']}", []).append(r)
        for key, rs in report["rows"].items():
            report["summary"][key] = summarize_neutral(rs) if "eval_question_" in key else summarize_rows(rs)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
        return 0
    models = {m: open_model(m, device="cpu", backend="torch") for m in a.models}
    per_len = dict(x.split("=") for x in a.seeds_at)
    if a.neutral_only is not None:
        with open(a.jsonl, "a") as sink:
            for L in a.lengths:
                for seed in seeds_of(per_len.get(str(L), a.seeds)):
                    ex = D.make_example("fact_hop", L, seed, "eval")
                    for (name, model), form in itertools.product(models.items(), a.neutral_only or ["where_no_verb"]):
                        r = neutral_report(model, ex, form)
                        r["model"], r["split"] = name, f"eval_question_{form}"
                        sink.write(json.dumps(r) + "\n")
                        sink.flush()
                        print(name, L, seed, form, r["correct"], round(r["p_place"], 4), r["p_intermediate"],
                              r["reach_name"], r["reach_place"], flush=True)
        return 0
    first = next(iter(models.values()))
    cfgs = [layer.span_config for _, layer in first.routing_layers()]
    report = {"models": a.models, "corpus": a.corpus, "split": "eval", "rows": {}, "summary": {},
              "training_data": training_data(layer_cfgs=cfgs)}
    sink = open(a.jsonl, "a") if a.jsonl else None
    jobs = [(L, s, "eval") for L in a.lengths for s in seeds_of(per_len.get(str(L), a.seeds))]
    jobs += [(a.train_length, 900_000 + s, "train") for s in range(a.train_rows)]
    for length, seed, split in jobs:
        ex = D.make_example("fact_hop", length, seed, split)
        for name, model in models.items():
            r = row_report(model, ex, split, decode=not a.no_decode and split == "eval")
            r["model"], r["split"] = name, split
            report["rows"].setdefault(f"{name}|{split}|{length}", []).append(r)
            if sink:
                sink.write(json.dumps(r) + "\n")
                sink.flush()
            print(name, split, length, seed, r["correct"], repr(r["value"]), repr(r["intermediate"]),
                  repr(r.get("greedy")), r.get("class"), "2nd:", r["second_hop"]["correct"],
                  "1st:", r["first_hop"]["correct"], "steps:", r["steps"]["correct"], r["seconds"], flush=True)
    for key, rows in report["rows"].items():
        report["summary"][key] = summarize_rows(rows)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
