"""`MissedSpanDebugger`: given evidence in a document and the queries that needed it, show for every layer and
head whether the evidence was reached — and why.

* **Routing** — for a miss, *every* candidate stripe whose span holds evidence keys, each with its search score,
  its rank among all candidate stripes and its margin to the K-th chosen score, leading with the best-ranked one
  that holds the whole evidence; for a reached cell, the chosen branch (or the window) that reached it.
* **Read** (with `model=` and `answer=`) — inside each chosen branch of the selected head, the attention mass on
  the evidence keys, the branch's gate weight, and the answer's probability and how it changes when that branch
  is removed (an ablation through `superlinear_lab.intervene`).
* **Try it** — re-run the answer with the best covering stripe forced into the head's choice and show whether the
  evidence is then reached and the answer changes (`try_it()`, or the button in the widget).

Evidence is given in tokens, in characters, or as a string to search for in the document. Scores and ranks of
stripes that were not chosen need the full stripe profile (`profile_queries` when the trace was recorded); without
it the view still says reached/missed and which stripes would have covered the evidence.
"""
from __future__ import annotations

import contextlib
import html
import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch

from superlinear_lab.trace import RoutingTrace, branch_weights, capture_routing, evidence_reach

from ._aggregate import snippet
from ._base import COLORS, View, ViewError, base_layout, with_model
from .document import _CSS as _DOCUMENT_CSS
from .stripes import stripe_geometry


@dataclass(frozen=True)
class Evidence:
    """One evidence span in token positions (inclusive) and the queries that needed it."""

    start: int
    end: int
    label: str
    queries: tuple[int, ...]


def char_to_token(tokens: list[str], start: int, end: int) -> tuple[int, int]:
    """Token range [a, b] covering the inclusive character range [start, end] of "".join(tokens)."""
    if end < start or start < 0:
        raise ViewError(f"character range [{start}, {end}]: expected 0 <= start <= end")
    ends = np.cumsum([len(t) for t in tokens])  # exclusive end offset of each token
    if end >= ends[-1]:
        raise ViewError(f"character range [{start}, {end}]: the text has {int(ends[-1])} characters")
    return int(np.searchsorted(ends, start, side="right")), int(np.searchsorted(ends, end, side="right"))


def _text_pieces(trace: RoutingTrace, tokenizer) -> list[str] | None:
    """The raw text of each token (their concatenation is the document), for character evidence.

    With a tokenizer and recorded token ids, each id is decoded on its own; otherwise the trace's token
    strings are used, which is right only when they are the raw text (as in `demo_trace`) — a model's display
    strings escape newlines ("\\n"), so pass its tokenizer."""
    if tokenizer is not None:
        if trace.token_ids is None:
            raise ValueError("tokenizer given but the trace has no token_ids to decode")
        return [tokenizer.decode([i]) if i >= 0 else "" for i in trace.token_ids.tolist()]
    return trace.tokens


def find_text(trace: RoutingTrace, text: str, occurrence: int = 0, tokenizer=None) -> tuple[int, int]:
    """Token range [a, b] (inclusive) of the `occurrence`-th match (0 = first, -1 = last) of `text` in the
    traced document. With a tokenizer, the encoded `text` is searched among the recorded token ids (exact for any
    bytes); otherwise `text` is searched in the tokens' text. Raises ValueError naming `text` when absent."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"evidence text: expected a non-empty string, got {text!r}")
    starts: list[tuple[int, int]] = []
    if tokenizer is not None and trace.token_ids is not None:
        ids = trace.token_ids.tolist()
        needle = tokenizer.encode(text)
        n = len(needle)
        first = needle[0]
        starts = [(i, i + n - 1) for i in range(len(ids) - n + 1) if ids[i] == first and ids[i:i + n] == needle]
    else:
        pieces = _text_pieces(trace, tokenizer)
        if pieces is None:
            raise ValueError(f"evidence text {text!r}: the trace has no tokens to search (record tokens or pass "
                             "tokenizer=)")
        doc = "".join(pieces)
        at = doc.find(text)
        while at >= 0:
            starts.append(char_to_token(pieces, at, at + len(text) - 1))
            at = doc.find(text, at + 1)
    if not starts:
        raise ValueError(f"evidence text {text!r}: not found in the traced document ({trace.length:,} tokens)")
    if not -len(starts) <= occurrence < len(starts):
        raise ValueError(f"evidence text {text!r}: occurrence={occurrence} but it occurs {len(starts)} time(s)")
    return starts[occurrence]


def _parse_evidence(trace: RoutingTrace, evidence, queries, tokenizer=None) -> list[Evidence]:
    default_q = tuple(int(q) for q in queries) if queries is not None else (int(trace.queries[-1]),)
    out = []
    if isinstance(evidence, (str, dict, Evidence)):
        evidence = [evidence]
    for n, item in enumerate(evidence):
        if isinstance(item, Evidence):
            out.append(item)
            continue
        if isinstance(item, str):
            item = dict(text=item)
        if isinstance(item, dict):
            qs = tuple(int(q) for q in item.get("queries", default_q))
            if "text" in item:
                start, end = find_text(trace, item["text"], item.get("occurrence", 0), tokenizer)
                label = item.get("label", snippet([item["text"]], 0, 0, 40))
                unit = "token"
            else:
                start, end = item["start"], item["end"]
                unit = item.get("unit", "token")
                label = item.get("label", f"evidence {n + 1}")
        else:
            start, end = item
            unit, label, qs = "token", f"evidence {n + 1}", default_q
        if unit == "char":
            pieces = _text_pieces(trace, tokenizer)
            if pieces is None:
                raise ValueError("character evidence needs the tokens' text: pass tokenizer= or record tokens")
            start, end = char_to_token(pieces, int(start), int(end))
        elif unit != "token":
            raise ValueError(f"evidence {n + 1}: unit={unit!r}, expected 'token' or 'char'")
        if not 0 <= start <= end < trace.length:
            raise ValueError(f"evidence {n + 1}: token range [{start}, {end}] outside [0, {trace.length - 1}]")
        for q in qs:
            trace.query_index(q)  # KeyError naming the query if it was not recorded
            if q < end:
                raise ValueError(f"evidence {n + 1}: query {q} comes before the evidence end {end}")
        out.append(Evidence(int(start), int(end), label, qs))
    if not out:
        raise ValueError("evidence: expected at least one span")
    return out


def _rank(values: np.ndarray, anchors: np.ndarray, candidate: np.ndarray, score: float, anchor: int) -> int:
    """Rank (1 = best) of the stripe (score, anchor) among candidates, under the docs/algorithm.md §2.3 tie rule: higher score
    first, then the earlier anchor."""
    better = candidate & ((values > score) | ((values == score) & (anchors < anchor)))
    return int(better.sum()) + 1


class MissedSpanDebugger(View):
    """Reached or missed, per evidence × query × layer × head; why (routing), what was read (read), and a
    counterfactual run that forces the covering stripe (try it).

    Args:
        trace: a `RoutingTrace` (record `profile_queries` for the needing queries to get scores and ranks).
        evidence: spans as (start, end) token pairs, strings to search for, dicts {start, end, unit:
            "token"|"char", label, queries} or {text, occurrence, label, queries}, or `Evidence` objects.
        queries: the queries that needed the evidence (default: the last recorded query).
        tokenizer: maps character/string evidence to tokens through the recorded token ids (needed for model
            traces, whose token strings are display-escaped); default: the model's tokenizer, else `trace.tokens`.
        model: the model (or a `Session`'s model) that produced the trace; enables the read diagnosis and try-it.
        answer: the expected answer text (or token ids) that follows each needing query.

    Actions: `select(evidence=, query=, layer=, head=)` (any subset; also a click on the grid), `try_it()`.
    """

    title = "Missed-span debugger"

    def __init__(self, trace: RoutingTrace, evidence, queries=None, tokenizer=None, *, model=None,
                 answer=None) -> None:
        super().__init__()
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
        self.trace = trace
        # a Session holds its model; a model (ours or a converted transformers one) is used as it is
        self.model = model if model is None or hasattr(model, "routing_layers") else getattr(model, "model", model)
        if self.model is not None and not hasattr(self.model, "routing_layers"):
            raise TypeError(f"model: expected a HybridLM or a Session, got {type(model).__name__}")
        if tokenizer is None and self.model is not None:
            tokenizer = self.model.tokenizer
        self.tokenizer = tokenizer
        try:
            self.evidence = _parse_evidence(trace, evidence, queries, tokenizer)
        except KeyError as exc:
            raise ValueError(str(exc)) from None
        self.answer_ids = self._answer_ids(answer)
        if self.answer_ids is not None and (self.model is None or trace.token_ids is None):
            raise ValueError("answer: the read diagnosis needs model= and a trace with token_ids")
        self.cases = [(e, q) for e in range(len(self.evidence)) for q in self.evidence[e].queries]
        self.case = 0
        self.layer = trace.layers[0]
        self.head = 0
        self._grid = self._reached_grid()
        self._explained: dict[tuple, dict] = {}
        self._read: dict[tuple, dict] = {}
        self._tried: dict[tuple, dict] = {}
        self._prefix_cache: dict[int, object] = {}
        self._document = None  # the document pane's text model, built on first use
        missed = np.argwhere(self._grid == 0)
        if len(missed):  # start on the first miss: that is what the user came for
            c, r, h = missed[0]
            self.case, self.layer, self.head = int(c), trace.layers[r], int(h)

    def _answer_ids(self, answer) -> list[int] | None:
        if answer is None:
            return None
        if isinstance(answer, str):
            if self.tokenizer is None:
                raise ValueError("answer: a text answer needs a tokenizer (pass model= or tokenizer=)")
            ids = list(self.tokenizer.encode(answer))
        else:
            ids = [int(i) for i in answer]
        if not ids:
            raise ValueError(f"answer={answer!r}: expected a non-empty text or id list")
        return ids

    # ------------------------------------------------------------------ routing analysis
    def _reached_grid(self) -> np.ndarray:
        """float [cases, layers, H]: fraction of evidence keys each (case, layer, head) attended (0 = missed)."""
        heads = max(self.trace.layer(i).heads for i in self.trace.layers)
        grid = np.full((len(self.cases), len(self.trace.layers), heads), np.nan)
        for c, (e, q) in enumerate(self.cases):
            ev = self.evidence[e]
            for r, layer in enumerate(self.trace.layers):
                _, reached = self.trace.reach(layer, q, ev.start, ev.end)
                grid[c, r, :reached.numel()] = reached.double().numpy() / (ev.end - ev.start + 1)
        return grid

    def reached(self, case: int, layer, head: int) -> float:
        """Fraction of the evidence keys attended by (case, layer, head); 0.0 is a miss."""
        return float(self._grid[case, self.trace.layers.index(self.trace.layer(layer).index), head])

    def _key(self, case, layer, head) -> tuple[int, int, int]:
        case = self.case if case is None else case
        layer = self.layer if layer is None else self.trace.layer(layer).index
        head = self.head if head is None else head
        return case, layer, head

    def explain(self, case: int | None = None, layer=None, head: int | None = None) -> dict:
        """Why the selected (or given) case was reached or missed, as a plain dict.

        Keys: evidence, query, layer, head, reached (fraction), in_window (evidence keys in the window),
        chosen (every chosen branch: slot, rank, anchor, qstart, qend, score, gate, keys = evidence keys inside
        that span ∪ window, text), reached_by (the chosen branches holding evidence keys, most keys first; for a
        reached cell, the branch that reached it leads), covering (every candidate stripe whose span holds
        evidence keys: index, anchor, qstart, qend, keys, whole, score, rank, margin — the ones holding the whole
        evidence first, each group by rank), covering_stripe (the lead of `covering` for a miss, the chosen branch
        that reached it otherwise, or None), score / rank / margin (of `covering_stripe`; rank 1 = best, ties →
        earlier anchor; margin = K-th chosen score − its score, > 0: it lost by that much; None for a chosen
        branch), kth_score, profile (whether scores of unchosen stripes were recorded).
        """
        key = self._key(case, layer, head)
        if key not in self._explained:
            self._explained[key] = self._explain(*key)
        return self._explained[key]

    def _profile_row(self, rec, q: int) -> int | None:
        pq = rec.profile_queries.numpy()
        p = int(np.searchsorted(pq, q)) if len(pq) else 0
        return p if p < len(pq) and pq[p] == q else None

    def _explain(self, case: int, layer: int, head: int) -> dict:
        e, q = self.cases[case]
        ev = self.evidence[e]
        rec = self.trace.layer(layer)
        i = self.trace.query_index(q)
        tokens = self.trace.tokens
        per_branch, _ = self.trace.reach(layer, q, ev.start, ev.end)
        no_span = torch.full((1,), -1, dtype=torch.int64)
        in_window = int(evidence_reach(no_span, no_span, rec.window[i], ev.start, ev.end)[1])
        chosen = []
        for k in range(rec.num_spans):
            a = int(rec.qanchor[head, i, k])
            if a >= 0:
                s, t = int(rec.qstart[head, i, k]), int(rec.qend[head, i, k])
                chosen.append(dict(slot=k, rank=k + 1, anchor=a, qstart=s, qend=t, score=float(rec.values[head, i, k]),
                                   gate=float(rec.gate[head, i, k]), keys=int(per_branch[head, k]),
                                   span_keys=max(0, min(t, ev.end) - max(s, ev.start) + 1),
                                   text=snippet(tokens, s, t, 90)))
        kth = min(c["score"] for c in chosen) if chosen else None
        p = self._profile_row(rec, q)
        g = stripe_geometry(rec.cfg, q)
        overlap = np.minimum(g.qend, ev.end) - np.maximum(g.qstart, ev.start) + 1
        covering = []
        for j in np.nonzero(overlap > 0)[0]:
            covering.append(dict(index=int(g.stripes[j]), anchor=int(g.anchors[j]), qstart=int(g.qstart[j]),
                                 qend=int(g.qend[j]), keys=int(overlap[j]),
                                 whole=bool(g.qstart[j] <= ev.start and g.qend[j] >= ev.end),
                                 chosen=any(c["anchor"] == int(g.anchors[j]) for c in chosen),
                                 score=None, rank=None, margin=None))
        if p is not None:
            anchors = rec.stripe_anchors[p].numpy()
            values = rec.stripe_values[head, p].numpy()
            cand = (anchors >= 0) & np.isfinite(values)
            col = {int(a): n for n, a in enumerate(anchors)}
            for cs in covering:
                n = col.get(cs["anchor"])
                if n is not None and cand[n]:
                    cs["score"] = float(values[n])
                    cs["rank"] = _rank(values, anchors, cand, cs["score"], cs["anchor"])
                    cs["margin"] = None if kth is None else kth - cs["score"]
        unknown = 1 << 62
        covering.sort(key=lambda cs: (not cs["whole"], cs["rank"] if cs["rank"] is not None else unknown,
                                      -cs["keys"], -cs["anchor"]))
        reached_by = sorted((c for c in chosen if c["span_keys"] > 0), key=lambda c: (-c["span_keys"], c["slot"]))
        out = dict(evidence=ev, query=q, layer=layer, head=head, reached=self.reached(case, layer, head),
                   in_window=in_window, chosen=chosen, reached_by=reached_by, covering=covering,
                   covering_stripe=None, score=None, rank=None, margin=None, kth_score=kth, profile=p is not None)
        if out["reached"] > 0:
            if reached_by:  # the chosen branch that reached it (not a stripe that was not chosen)
                lead = reached_by[0]
                out.update(covering_stripe=dict(lead, index=None, whole=lead["span_keys"] == ev.end - ev.start + 1),
                           score=lead["score"], rank=lead["rank"])
        elif covering:
            lead = covering[0]
            out.update(covering_stripe=lead, score=lead["score"], rank=lead["rank"], margin=lead["margin"])
        return out

    def table(self) -> list[dict]:
        """One row per (case, layer, head): evidence label, query, layer name, head, reached fraction and the
        explanation's lead — the chosen branch that reached it, or the best-ranked covering stripe of a miss with
        its rank and margin and how many stripes would have covered the evidence."""
        rows = []
        for c in range(len(self.cases)):
            for layer in self.trace.layers:
                for h in range(self.trace.layer(layer).heads):
                    x = self.explain(c, layer, h)
                    cs = x["covering_stripe"]
                    rows.append(dict(evidence=x["evidence"].label, query=x["query"], layer=f"layers.{layer}.routing",
                                     head=h, reached=x["reached"], how=(
                                         "window" if x["reached"] > 0 and cs is None else
                                         "chosen branch" if x["reached"] > 0 else
                                         "geometry gap" if cs is None else "not chosen"),
                                     anchor=None if cs is None else cs["anchor"],
                                     span=None if cs is None else (cs["qstart"], cs["qend"]),
                                     rank=x["rank"], margin=x["margin"],
                                     covering=len(x["covering"]) if x["reached"] == 0 else None))
        return rows

    def table_html(self) -> str:
        """`table()` as an HTML table (misses in red)."""
        body = []
        for r in self.table():
            colour = COLORS["miss"] if r["reached"] == 0 else COLORS["anchor"]
            body.append((html.escape(r["evidence"]), f"{r['query']:,}", r["layer"], str(r["head"]),
                         f"<span style='color:{colour};font-weight:600'>{r['reached']:.0%}</span>", r["how"],
                         _fmt(r["anchor"], "{:,}"),
                         "–" if r["span"] is None else f"[{r['span'][0]:,}, {r['span'][1]:,}]",
                         _fmt(r["rank"], "#{}"), _fmt(r["margin"]), _fmt(r["covering"], "{}")))
        return _table("evidence reached per layer and head (rank/margin: the chosen branch that reached it, or the "
                      "best-ranked stripe that would have covered a miss)",
                      ["evidence", "query", "layer", "head", "reached", "how", "anchor", "span", "rank", "margin",
                       "covering stripes"], body)

    # ------------------------------------------------------------------ read analysis (needs the model)
    def _prefix(self, q: int):
        """The model's cache after the document's tokens 0 … q-1 (computed once per query)."""
        if q not in self._prefix_cache:
            model = self.model
            cache = model.new_cache(q + len(self.answer_ids) + 1)
            if q > 0:
                with torch.no_grad():
                    model(self.trace.token_ids[:q][None].to(model.device), cache, 0)
            self._prefix_cache[q] = cache
        return self._prefix_cache[q]

    def _run_answer(self, q: int, force=None, ablate=None, capture_layer=None) -> dict:
        """Score the answer as the continuation of the document up to query q, optionally under an intervention
        at the answer's query positions q … q+m-1. Returns probability, log-probability, the teacher-forced
        argmax text and whether greedy decoding reproduces the answer; with `capture_layer`, also the routing,
        keys and attention queries of that layer at position q."""
        from superlinear_lab.intervene import intervene

        model = self.model
        ans = self.answer_ids
        tail = torch.tensor([[int(self.trace.token_ids[q])] + ans[:-1]], device=model.device)
        cache = self._prefix(q).clone()
        captured: dict = {}
        with contextlib.ExitStack() as stack, torch.no_grad():
            if force or ablate:
                stack.enter_context(intervene(model, force=force, ablate=ablate, queries=range(q, q + len(ans))))
            if capture_layer is not None:
                records = stack.enter_context(capture_routing(model, layers=[capture_layer]))
                layer = dict(model.routing_layers())[capture_layer]
                handle = layer.q2_proj.register_forward_hook(lambda mod, inp, out: captured.__setitem__("q2", out))
                stack.callback(handle.remove)
            logits = model(tail, cache, q)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        target = torch.tensor(ans, device=logp.device)
        total = float(logp.gather(-1, target[:, None]).sum())
        argmax = logits[0].argmax(-1).tolist()
        out = dict(logprob=total, prob=math.exp(total), correct=argmax == ans,
                   argmax_text=self.tokenizer.decode(argmax) if self.tokenizer is not None else str(argmax))
        if capture_layer is not None:
            out.update(routing=records[capture_layer][1], k=records[capture_layer][3], q2=captured["q2"])
        return out

    def read(self, case: int | None = None, layer=None, head: int | None = None) -> dict:
        """What the selected (or given) head *read*: per chosen branch (and the window alone), the attention mass on
        the evidence keys, the gate weight, and the answer's probability without that branch.

        Returns dict(base = answer score of the unmodified run (prob, logprob, correct, argmax_text), branches =
        [dict(slot, anchor, qstart, qend, gate, evidence_mass, prob_without, delta_prob, correct_without)],
        window_mass (evidence mass of a window-only softmax), read_mass (Σ gate · evidence mass: the share of the
        head's output at the query that comes from evidence keys)). Needs `model=` and `answer=`.
        """
        if self.model is None or self.answer_ids is None:
            raise ViewError("the read diagnosis needs model= and answer= (the expected answer text)")
        key = self._key(case, layer, head)
        if key not in self._read:
            self._read[key] = self._compute_read(*key)
        return self._read[key]

    def _branch_masses(self, run: dict, layer: int, head: int, q: int, ev: Evidence) -> tuple[list[dict], float]:
        """Per valid slot of `head` at query q in a captured run (`_run_answer(capture_layer=layer)`): slot, anchor,
        span, gate and the attention mass on the evidence keys inside that branch (span ∪ window, `branch_weights`);
        and the mass of a window-only softmax."""
        routing, k, q2 = run["routing"], run["k"], run["q2"]
        att = dict(self.model.routing_layers())[layer]
        heads, d = att.cfg.n_heads, att.cfg.head_dim
        group = heads // att.cfg.n_kv_heads
        qvec = q2[0, 0].view(heads, d)[head][None, None]  # [1, 1, D]: head `head` at query q (tail row 0)
        keys = k[0, head // group, :q + 1][None]  # [1, q+1, D]
        window = self.trace.layer(layer).window[self.trace.query_index(q)][None]  # [1, 2]
        qs, qe = routing.qstart[0, head, :1][None].cpu(), routing.qend[0, head, :1][None].cpu()  # [1, 1, K]
        no_span = torch.full((1, 1, 1), -1)
        weights = branch_weights(qvec, keys, torch.cat([qs, no_span], -1), torch.cat([qe, no_span], -1), window)
        on_evidence = weights[0, 0, :, ev.start:ev.end + 1].sum(-1).tolist()  # [K + 1]: branches, then window
        out = []
        for slot in range(routing.qstart.shape[-1]):
            a = int(routing.qanchor[0, head, 0, slot])
            if a < 0:
                continue
            out.append(dict(slot=slot, anchor=a, qstart=int(qs[0, 0, slot]), qend=int(qe[0, 0, slot]),
                            gate=float(routing.gate[0, head, 0, slot]), evidence_mass=float(on_evidence[slot])))
        return out, float(on_evidence[-1])

    def _compute_read(self, case: int, layer: int, head: int) -> dict:
        e, q = self.cases[case]
        ev = self.evidence[e]
        run = self._run_answer(q, capture_layer=layer)
        branches, window_mass = self._branch_masses(run, layer, head, q, ev)
        base = {k: run[k] for k in ("logprob", "prob", "correct", "argmax_text")}
        for b in branches:
            without = self._run_answer(q, ablate={(f"layers.{layer}", head): [b["slot"]]})
            b.update(prob_without=without["prob"], delta_prob=without["prob"] - base["prob"],
                     correct_without=without["correct"])
        read_mass = sum(b["gate"] * b["evidence_mass"] for b in branches)
        return dict(base=base, branches=branches, window_mass=window_mass, read_mass=read_mass)

    # ------------------------------------------------------------------ counterfactual: force the covering stripe
    def try_it(self) -> bool:
        """Re-run the answer with the lead covering stripe of the selected miss forced into the selected head's
        choice (action). The result is in `tried()`; refused (error set) when there is nothing to force."""
        def action():
            key = (self.case, self.layer, self.head)
            if key not in self._tried:
                self._tried[key] = self._compute_try(*key)
        return self._act(action)

    def tried(self, case: int | None = None, layer=None, head: int | None = None) -> dict | None:
        """Result of `try_it` for the selected (or given) cell, or None if not tried: force (the `intervene`
        argument), anchor, base and forced answer scores, branches (the head's branches in the forced run, as in
        `read`), forced_gate and forced_evidence_mass (of the forced branch), reached_after (fraction of evidence
        keys the head attends with the stripe forced), answer_changed (the teacher-forced argmax text differs)."""
        return self._tried.get(self._key(case, layer, head))

    def force_spec(self, case: int | None = None, layer=None, head: int | None = None) -> dict:
        """The `intervene(force=...)` argument that forces the lead covering stripe of a missed cell."""
        x = self.explain(case, layer, head)
        if x["reached"] > 0:
            raise ViewError("this head reached the evidence: there is no stripe to force")
        if not x["covering"]:
            raise ViewError("no candidate stripe of this query holds the evidence (a geometry gap): nothing to force")
        return {(f"layers.{x['layer']}", x["head"]): [x["covering"][0]["anchor"]]}

    def _compute_try(self, case: int, layer: int, head: int) -> dict:
        if self.model is None or self.answer_ids is None:
            raise ViewError("try it needs model= and answer= (the expected answer text)")
        force = self.force_spec(case, layer, head)
        anchor = next(iter(force.values()))[0]
        e, q = self.cases[case]
        ev = self.evidence[e]
        base = self._run_answer(q)
        run = self._run_answer(q, force=force, capture_layer=layer)
        routing = run["routing"]
        lo, hi = (int(x) for x in self.trace.layer(layer).window[self.trace.query_index(q)])
        _, reached = evidence_reach(routing.qstart[0, head, 0].cpu(), routing.qend[0, head, 0].cpu(),
                                    torch.tensor([lo, hi]), ev.start, ev.end)
        branches, _ = self._branch_masses(run, layer, head, q, ev)
        forced_branch = next((b for b in branches if b["anchor"] == anchor), None)
        forced = {k: run[k] for k in ("logprob", "prob", "correct", "argmax_text")}
        return dict(force=force, anchor=anchor, base=base, forced=forced, branches=branches,
                    forced_gate=None if forced_branch is None else forced_branch["gate"],
                    forced_evidence_mass=None if forced_branch is None else forced_branch["evidence_mass"],
                    reached_after=float(reached) / (ev.end - ev.start + 1),
                    answer_changed=forced["argmax_text"] != base["argmax_text"])

    def counterfactual_trace(self, force: dict | None = None, case: int | None = None) -> RoutingTrace:
        """A trace of the whole document recorded with `force` (default: the selected cell's covering stripe) applied
        at the case's query — comparable with the original in `RoutingExplorer(trace, compare=...)`."""
        from superlinear_lab.intervene import intervene

        if self.model is None or self.trace.token_ids is None:
            raise ViewError("a counterfactual trace needs model= and a trace with token_ids")
        force = self.force_spec(case) if force is None else force
        q = self.cases[self.case if case is None else case][1]
        ids = self.trace.token_ids[None].to(self.model.device)
        with torch.no_grad(), intervene(self.model, force=force, queries=[q]), \
                self.model.trace(queries=self.trace.queries, profile_queries=self.trace.layer(
                    self.trace.layers[0]).profile_queries) as cf:
            self.model(ids)
        return cf

    # ------------------------------------------------------------------ actions
    def select(self, evidence: int | None = None, query: int | None = None, layer=None, head: int | None = None
               ) -> bool:
        """Choose what the detail shows: evidence index, query position, layer, head (any subset)."""
        def action():
            e = self.cases[self.case][0] if evidence is None else evidence
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < len(self.evidence):
                raise ViewError(f"evidence={e!r}: expected an index in 0 … {len(self.evidence) - 1}")
            q = query if query is not None else (self.cases[self.case][1] if self.cases[self.case][0] == e
                                                 else self.evidence[e].queries[0])
            if (e, q) not in self.cases:
                raise ViewError(f"query {q} did not need evidence {e} (its queries: {list(self.evidence[e].queries)})")
            new_layer = self.layer if layer is None else self.trace.layer(layer).index
            h = self.head if head is None else head
            heads = self.trace.layer(new_layer).heads
            if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < heads:
                raise ViewError(f"head={h!r}: expected an int in 0 … {heads - 1}")
            self.case, self.layer, self.head = self.cases.index((e, q)), new_layer, int(h)
        return self._act(action)

    # ------------------------------------------------------------------ text and figures
    def summary(self) -> str:
        total = np.isfinite(self._grid).sum()
        missed = int((self._grid == 0).sum())
        return with_model(f"{len(self.evidence)} evidence span(s) × {len(self.cases)} (evidence, query) case(s) × "
                          f"{len(self.trace.layers)} layer(s) × heads: {missed} of {int(total)} missed", self.trace)

    def _case_label(self, c: int) -> str:
        e, q = self.cases[c]
        return f"{self.evidence[e].label} · q {q:,}"

    def panels_html(self, style: bool = True) -> list[str]:
        """One panel: the explanation (wrapping, never clipped), every covering stripe, the chosen branches, and —
        with a model — the read diagnosis and the try-it result. `style=False` leaves out the text's `<style>`
        (the live view loads it once, `panel_css`, instead of restyling the page on every click)."""
        x = self.explain()
        ev = x["evidence"]
        tokens = self.trace.tokens
        lines = [f"<b>{html.escape(ev.label)}</b> — tokens [{ev.start:,}, {ev.end:,}]"
                 + (f": <code>{html.escape(snippet(tokens, ev.start, ev.end, 90))}</code>" if tokens else ""),
                 f"query {x['query']:,} · layers.{x['layer']}.routing · head {x['head']}: "]
        cs = x["covering_stripe"]
        if x["reached"] > 0:
            lines[-1] += (f"<span style='color:{COLORS['anchor']};font-weight:600'>REACHED</span> "
                          f"({x['reached']:.0%} of the evidence keys attended)")
            if cs is not None:
                lines.append(f"by chosen branch #{cs['rank']} (anchor {cs['anchor']:,}, span [{cs['qstart']:,}, "
                             f"{cs['qend']:,}], score {cs['score']:.3f}, gate {cs['gate']:.2f}), which holds "
                             f"{cs['span_keys']:,} of the {ev.end - ev.start + 1:,} evidence keys")
            if x["in_window"]:
                lines.append(f"the sliding window holds {x['in_window']:,} evidence keys (every branch reads them)")
        else:
            lines[-1] += f"<span style='color:{COLORS['miss']};font-weight:600'>MISSED</span>"
            if cs is None:
                lines.append("no candidate span of this query contains the evidence (a geometry gap: see lesson 01)")
            else:
                n_cov = len(x["covering"])
                line = (f"{n_cov} candidate stripe{'s' if n_cov > 1 else ''} would have covered it; the best-ranked, "
                        f"stripe i={cs['index']} (anchor {cs['anchor']:,}, span [{cs['qstart']:,}, {cs['qend']:,}]), "
                        f"holds {'all' if cs['whole'] else cs['keys']} of the {ev.end - ev.start + 1:,} evidence keys")
                if cs["rank"] is not None:
                    line += f"; its score {cs['score']:.3f} ranked <b>#{cs['rank']}</b>"
                    if cs["margin"] is not None:
                        line += f", {cs['margin']:.3f} below the K-th chosen score {x['kth_score']:.3f}"
                else:
                    line += " (no stripe profile recorded for this query: scores and ranks unknown)"
                lines.append(line)
        parts = ["<br>".join(lines)]
        if x["reached"] == 0 and x["covering"]:
            rows = [(f"{c['index']}", f"{c['anchor']:,}", f"[{c['qstart']:,}, {c['qend']:,}]",
                     "all" if c["whole"] else f"{c['keys']:,}", _fmt(c["score"]), _fmt(c["rank"], "#{}"),
                     _fmt(c["margin"])) for c in x["covering"]]
            parts.append(_table("every stripe covering the evidence (best-ranked first)",
                                ["stripe", "anchor", "span", "evidence keys", "score", "rank", "margin"], rows))
        rows = [(f"#{c['rank']}", f"{c['anchor']:,}", f"[{c['qstart']:,}, {c['qend']:,}]", f"{c['score']:.3f}",
                 f"{c['gate']:.2f}", f"{c['keys']:,}", f"<code>{html.escape(c['text'])}</code>") for c in x["chosen"]]
        parts.append(_table("chosen branches" + (" (text attended instead)" if x["reached"] == 0 else ""),
                            ["chosen", "anchor", "span", "score", "gate", "evidence keys (span ∪ window)", "text"],
                            rows) if rows else "<i>no span chosen (window only)</i>")
        if self.model is not None and self.answer_ids is not None:
            parts.append(self._read_html())
        parts.append(self._document_html(x, style))
        return ["<div class='sl-explain' style='white-space:normal;overflow-wrap:anywhere;max-width:100%'>"
                + "".join(parts) + "</div>"]

    def panel_css(self) -> str:
        return _DOCUMENT_CSS

    def _widget_panels_html(self) -> list[str]:
        return self.panels_html(style=False)

    def _document_html(self, x: dict, style: bool = True) -> str:
        """The text around the query, the evidence and the selected head's chosen spans, highlighted (the document
        pane's rendering, as static HTML with its style, so it also shows in exports and reports)."""
        if not self.trace.tokens:
            return ""
        from .document import Document

        if self._document is None:
            self._document = Document(self.trace.tokens)
        rec = self.trace.layer(x["layer"])
        lo, hi = (int(v) for v in rec.window[self.trace.query_index(x["query"])])
        ev = x["evidence"]
        body = self._document.render(query=x["query"], window=(lo, hi) if lo >= 0 else None,
                                     spans=[(c["qstart"], c["qend"]) for c in x["chosen"]],
                                     evidence=[(ev.start, ev.end)], context=60, max_tokens=600)
        return (f"<style>{_DOCUMENT_CSS}</style>" if style else "") + (
            f"<p><b>The text</b></p><div class='sl-document'>{body}</div>")

    def _read_html(self) -> str:
        r = self.read()
        base = r["base"]
        answer = html.escape(self.tokenizer.decode(self.answer_ids)) if self.tokenizer is not None else "answer"
        greedy = ("greedy reproduces it" if base["correct"]
                  else f"greedy says <code>{html.escape(base['argmax_text'])}</code>")
        head = (f"<p><b>Read</b> — P(<code>{answer}</code>) = {base['prob']:.3g} ({greedy}); "
                f"evidence share of this head's read: {r['read_mass']:.1%} (window alone: {r['window_mass']:.1%})</p>")
        rows = [(f"#{b['slot'] + 1}", f"[{b['qstart']:,}, {b['qend']:,}]", f"{b['gate']:.2f}",
                 f"{b['evidence_mass']:.1%}", f"{b['prob_without']:.3g}", f"{b['delta_prob']:+.3g}")
                for b in r["branches"]]
        out = head + _table("each chosen branch", ["branch", "span", "gate", "attention on evidence",
                                                   "P(answer) without it", "change"], rows)
        t = self.tried()
        if t is not None:
            share = ("" if t["forced_gate"] is None else f" (the forced branch gets gate {t['forced_gate']:.2f} and "
                     f"puts {t['forced_evidence_mass']:.1%} of its attention on the evidence)")
            out += (f"<p><b>Try it</b> — forcing the stripe at anchor {t['anchor']:,}: the head reaches "
                    f"{t['reached_after']:.0%} of the evidence{share}; P(answer) {t['base']['prob']:.3g} → "
                    f"{t['forced']['prob']:.3g}; the answer {'CHANGES to' if t['answer_changed'] else 'stays'} "
                    f"<code>{html.escape(t['forced']['argmax_text'])}</code></p>")
        return out

    def figures(self) -> list[go.Figure]:
        """The reached/missed grid (every evidence × query × layer row, one column per head; the selected cell
        boxed) and the selected head's search scores at the query: every stripe, the chosen K, the stripes that
        would have covered a missed evidence, the evidence shaded and the K-th chosen score dotted. Built as plain
        dicts (no per-property validation): a click redraws in a few ms."""
        n_cases, n_layers, heads = self._grid.shape
        z = self._grid.reshape(n_cases * n_layers, heads)
        ylabels = [f"{self._case_label(c)} · L{layer}" for c in range(n_cases) for layer in self.trace.layers]
        row = self.case * n_layers + self.trace.layers.index(self.layer)
        grid_layout = base_layout("Was the evidence attended? (red = missed; click a cell to explain it)",
                                  height=110 + 32 * len(ylabels), showlegend=False)
        grid_layout.update(margin=dict(l=230, r=20, t=50, b=40), xaxis=dict(title=dict(text="head"), dtick=1),
                           yaxis=dict(autorange="reversed"))
        # the heatmap never changes (same uid: not resent); the selected cell is a layout shape, so a click is a
        # relayout of one rectangle in the browser, not a redraw of the grid
        grid_layout["shapes"] = [dict(type="rect", xref="x", yref="y", x0=self.head - 0.5, x1=self.head + 0.5,
                                      y0=row - 0.5, y1=row + 0.5, line=dict(color="black", width=3))]
        grid = go.Figure(dict(data=[
            dict(type="heatmap", z=z.tolist(), x=list(range(heads)), y=ylabels, zmin=0, zmax=1, xgap=2, ygap=2,
                 colorscale=[[0, COLORS["miss"]], [1e-9, "#c7e9c0"], [1, COLORS["anchor"]]], showscale=False,
                 texttemplate="%{z:.0%}", uid=f"missedgrid{n_cases}x{n_layers}x{heads}",
                 hovertemplate="%{y} · head %{x}<br>evidence attended: %{z:.0%}<extra></extra>")],
            layout=grid_layout))

        x = self.explain()
        rec = self.trace.layer(self.layer)
        q = x["query"]
        ev = x["evidence"]
        p = self._profile_row(rec, q)
        if p is not None:
            anchors = rec.stripe_anchors[p].numpy()
            values = rec.stripe_values[self.head, p].numpy()
            ok = (anchors >= 0) & np.isfinite(values)
            order = np.argsort(anchors[ok])
            every = dict(type="scatter", x=anchors[ok][order].tolist(), y=values[ok][order].tolist(),
                         mode="lines+markers", name="score of every stripe",
                         line=dict(color=COLORS["muted"], width=1), marker=dict(size=4, color="#888"))
        else:
            every = dict(type="scatter", x=[], y=[], mode="lines+markers", name="score of every stripe (not recorded)",
                         line=dict(color=COLORS["muted"], width=1), marker=dict(size=4, color="#888"))
        scored = [c for c in x["covering"] if c["score"] is not None] if x["reached"] == 0 else []
        data = [every,
                dict(type="scatter", x=[c["anchor"] for c in x["chosen"]], y=[c["score"] for c in x["chosen"]],
                     mode="markers+text", text=[f"#{c['rank']}" for c in x["chosen"]], textposition="top center",
                     name="chosen top-K",
                     marker=dict(size=12, color=COLORS["span"], line=dict(color="black", width=1))),
                dict(type="scatter", x=[c["anchor"] for c in scored], y=[c["score"] for c in scored],
                     mode="markers+text", text=[f"#{c['rank']}" for c in scored], textposition="bottom center",
                     name="stripes covering the evidence",
                     marker=dict(size=[14] + [9] * (len(scored) - 1) if scored else 9, color=COLORS["miss"],
                                 symbol="x"))]
        shapes = [dict(type="rect", xref="x", yref="paper", x0=ev.start - 0.5, x1=ev.end + 0.5, y0=0, y1=1,
                       fillcolor=COLORS["miss"], opacity=0.18, line=dict(width=0), layer="below")]
        if x["kth_score"] is not None:
            shapes.append(dict(type="line", xref="paper", yref="y", x0=0, x1=1, y0=x["kth_score"], y1=x["kth_score"],
                               line=dict(color=COLORS["span"], dash="dot", width=1)))
        layout = base_layout(f"Query {q:,} · layers.{self.layer}.routing · head {self.head}: search scores "
                             "(evidence shaded red)", height=300)
        yaxis = dict(title=dict(text="score"))
        ys = [float(v) for t in data for v in t["y"]]
        if ys:  # room above the top marker for its "#1" label
            lo, hi = min(ys), max(ys)
            pad = 0.15 * max(hi - lo, 1e-6)
            yaxis["range"] = [lo - pad, hi + 2 * pad]
        layout.update(shapes=shapes, yaxis=yaxis,
                      xaxis=dict(title=dict(text="anchor position"), range=[-0.03 * q - 1, 1.03 * q + 1]))
        return [grid, go.Figure(dict(data=data, layout=layout))]

    def _wire_figures(self, widgets) -> None:
        # a click anywhere in a grid cell selects it (sent on pointer-up, before plotly's own click handling)
        widgets[0].on_area_click(lambda subplot, x, y: self.click_cell(x, y) if subplot == "xy" else None)

    def click_cell(self, x: float, y: float) -> bool:
        """A click on the grid at data coordinates (x = head, y = row index of the category axis): select that
        (evidence, query, layer, head)."""
        n_layers = len(self.trace.layers)
        row, head = int(round(y)), int(round(x))
        if not 0 <= row < len(self.cases) * n_layers:
            def refuse():
                raise ViewError(f"grid row {row} (y={y!r}): expected 0 … {len(self.cases) * n_layers - 1}")
            return self._act(refuse)
        c, r = divmod(row, n_layers)
        e, q = self.cases[c]
        return self.select(evidence=e, query=q, layer=self.trace.layers[r], head=head)

    def _build_controls(self):
        import ipywidgets as w

        case = w.Dropdown(options=[(self._case_label(c), c) for c in range(len(self.cases))], value=self.case,
                          description="case", layout=w.Layout(width="320px"), style={"description_width": "40px"})
        layer = w.Dropdown(options=[(f"layers.{i}.routing", i) for i in self.trace.layers], value=self.layer,
                           description="layer", layout=w.Layout(width="220px"), style={"description_width": "40px"})
        heads = self.trace.layer(self.layer).heads
        head = w.IntSlider(value=self.head, min=0, max=heads - 1, description="head", continuous_update=False,
                           layout=w.Layout(width="260px"), style={"description_width": "40px"})
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                case.value, layer.value, head.value = self.case, self.layer, self.head
            finally:
                syncing[0] = False

        def on_case(ch):
            if not syncing[0]:
                e, q = self.cases[ch["new"]]
                self.select(evidence=e, query=q)

        case.observe(on_case, names="value")
        layer.observe(lambda ch: None if syncing[0] else self.select(layer=ch["new"]), names="value")
        head.observe(lambda ch: None if syncing[0] else self.select(head=ch["new"]), names="value")
        self.subscribe(sync)
        self._controls = dict(case=case, layer=layer, head=head)
        if self.model is None or self.answer_ids is None:
            return w.HBox([case, layer, head])
        button = w.Button(description="try it: force the covering stripe", layout=w.Layout(width="260px"),
                          tooltip="re-run the answer with the best covering stripe forced into this head's choice")
        button.on_click(lambda _: self.try_it())
        self._controls["try_it"] = button
        return w.HBox([case, layer, head, button])


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def _table(caption: str, header: list[str], rows: list[tuple]) -> str:
    """A small HTML table whose cells wrap (nothing is clipped)."""
    cell = "style='padding:2px 10px 2px 0;vertical-align:top;text-align:left'"
    head = "".join(f"<th {cell}>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td {cell}>{v}</td>" for v in row) + "</tr>" for row in rows)
    return (f"<table style='border-collapse:collapse;font-size:12px;margin-top:6px'><caption style='text-align:left;"
            f"font-weight:600'>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>")
