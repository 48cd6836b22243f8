"""Train the hybrid model on natural text mixed with long-context retrieval tasks; resumable in slices.

Loss per step = w_lm · mean CE over all tokens + w_answer · mean CE over answer tokens + w_first · mean CE over each
answer's first token + w_route · routing loss + w_rival · rival contrast. (The first answer token is where a fact is
picked: once it is right, the rest of a word is mostly copied from the reached span, so a model that confuses facts
of one kind misses there.)

**Routing loss.** The router (Q1 and K at the anchors) learns through the gate only (docs/algorithm.md §2.6, §3.2): gradient
reaches the K chosen anchors and nothing else, so a router that never picks the evidence's stripe gets no signal
to start picking it. Because every task example knows its evidence ranges and the queries that need them, we
add a supervised term on the full stripe profile at those queries: for each attention layer, query head and
(query, evidence) pair, −log of the softmax mass (over the query's candidate stripes, raw search values
⟨Q1, K(anchor)⟩) that falls on stripes whose span contains the whole evidence range. It trains the same
quantities the search ranks, so at inference the top-K picks those stripes; the model itself is unchanged.

**Rival contrast** (w_rival). The stripe loss spreads its push over every other stripe, mostly filler; what a
model of facts gets wrong is the stripe of *another fact of the same kind*, whose span the gate then mixes in
(each branch is normalised on its own, docs/algorithm.md §3.2, so a distractor's value wins its own branch). Where
an example records `rivals` (the values of the other same-kind facts), a second term is −log of the mass on the
evidence's stripes within the evidence's and the rivals' stripes only.

**Curriculum.** `stages` lists (context length, steps, batch rows); lengths grow, so the model first learns the
tasks on short rows and then on long ones.

**Resumable.** `--ckpt DIR` holds ``model.safetensors``, ``optimizer_exp_avg.safetensors`` and
``optimizer_exp_avg_sq.safetensors`` (AdamW moments keyed by parameter name), ``state.json`` (step, config, tokens
seen, wall time, AdamW step counts) and ``log.jsonl`` (one JSON line per step: losses, lr, routing metrics). Every batch is a pure function
of (config seed, step), so a run cut into slices (``--time-limit``) gives the same weights as one long run.
Nothing is pickled.

CLI::

    superlinear-lab train --ckpt runs/tiny --device cuda --time-limit 500     # start or resume
    superlinear-lab train --ckpt runs/tiny --export superlinear_lab/models/tiny  # write shipped weights
    superlinear-lab train --plan 800 --plan-out runs/plan.json --device cuda  # size stages to a budget
    superlinear-lab train --check-backends --device cuda                      # triton vs oracle
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from superlinear_kernels import SpanConfig
from superlinear_kernels.geometry import span_bounds, stripe_table, window_bounds

from . import data as D
from .evaluate import capture_routing, evidence_pairs, reached
from .model import HybridLM, ModelConfig
from .model.precision import fp32_region

LOG_FILE = "log.jsonl"
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that determines a run (stored in state.json; a resumed run must match)."""

    model: dict = field(default_factory=lambda: ModelConfig(
        d_model=192, d_ff=512, n_heads=4, n_kv_heads=2, head_dim=32,
        span=SpanConfig(sw_index=3, num_spans=2, backward_factor=3.0, forward_factor=0.0,
                        search_power=0.5, span_power=0.5)).to_dict())  # ModelConfig as a dict
    stages: list = field(default_factory=lambda: [[256, 300, 64], [512, 300, 32], [1024, 400, 16],
                                                  [2048, 400, 8], [4096, 400, 4]])  # [length, steps, batch]
    task_mix: dict = field(default_factory=lambda: {"text": 0.15, "passkey": 0.1, "niah": 0.25, "multi_key": 0.2,
                                                    "multi_value": 0.15, "multi_hop": 0.15})
    lr: float = 2e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    w_lm: float = 1.0  # weight of the mean CE over all tokens
    w_answer: float = 2.0  # weight of the mean CE over answer tokens
    w_first: float = 0.0  # extra weight of the mean CE over the first token of each answer (and answer part)
    w_route: float = 0.5  # weight of the supervised routing loss (0 = gate-only router learning)
    w_rival: float = 0.0  # weight of the rival contrast: evidence stripes against same-kind values' stripes
    seed: int = 0  # data seed (batches are a function of (seed, step))
    probe_every: int = 100  # steps between probe evaluations (routing recall / accuracy on eval seeds)
    probe_rows: int = 8  # held-out NIAH rows per probe
    corpus: str | None = None  # filler text: a folder built by `python -m superlinear_lab.corpus` (None: Python docs)
    init_from: str | None = None  # start from these weights (a shipped model name or a model folder), not at random
    # Tasks whose chained evidence is routed in order (`pair_ranks`): a query's k-th needed range (a chain's pointer
    # first, then its place) is supervised only in the k-th routed attention layer and later ones, so the first
    # routed layer is asked for the first hop alone. Empty: every layer is supervised on every range (as before).
    route_in_order: list = field(default_factory=list)
    # With init_from: the model may be wider than those weights (d_model / d_ff, `model.widen.widened_config`); they
    # are widened so that training starts from the same function (`model.widen.widen_model`, new weights from seed).
    widen_init: bool = False

    @property
    def total_steps(self) -> int:
        return sum(s[1] for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(length, batch) of `step` (0-based)."""
        for length, steps, batch in self.stages:
            if step < steps:
                return length, batch
            step -= steps
        return self.stages[-1][0], self.stages[-1][2]


def make_batch(cfg: TrainConfig, step: int) -> list[D.Example]:
    """The examples of training step `step`: tasks drawn by `task_mix`, seeds from (cfg.seed, step, row)."""
    length, batch = cfg.stage_at(step)
    rng = random.Random(f"batch:{cfg.seed}:{step}")
    names, weights = zip(*sorted(cfg.task_mix.items()))
    out = []
    for row in range(batch):
        task = rng.choices(names, weights)[0]
        out.append(D.make_example(task, length, seed=(cfg.seed * 1_000_003 + step) * 1024 + row, split="train"))
    return out


def loss_weights(examples: list[D.Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, L], answer mask [B, L-1]: 1 where position q predicts an answer token (outside the example's
    `prompts`), first-answer mask [B, L-1]: 1 where q predicts the first token of the answer or of an answer
    part that follows a prompt)."""
    ids = torch.tensor([ex.ids for ex in examples], device=device)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
    first = torch.zeros_like(mask)
    for b, ex in enumerate(examples):
        mask[b, ex.answer[0] - 1:ex.answer[1] - 1] = 1
        if ex.answer[1] > ex.answer[0]:  # plain text has no answer
            first[b, ex.answer[0] - 1] = 1
        for start, end in ex.prompts:
            mask[b, start - 1:end - 1] = 0
            if end < ex.answer[1]:
                first[b, end - 1] = 1
    return ids, mask, first


def rival_ranges(examples: list[D.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's `Example.rivals` as (rival_start [B, R], rival_end [B, R]) int64, end-exclusive, padded with
    -1 (R = the most rivals of an example). A stripe that holds a query's own evidence is a target for it, never a
    rival (`_stripe_targets`), so a `fact_quiz` can list every value as a rival."""
    width = max((len(ex.rivals) for ex in examples), default=0)
    out = torch.full((2, len(examples), width), -1, dtype=torch.int64)
    for b, ex in enumerate(examples):
        for j, (start, end) in enumerate(ex.rivals):
            out[0, b, j], out[1, b, j] = start, end
    return out[0], out[1]


def pair_ranks(examples: list[D.Example], tasks) -> torch.Tensor:
    """int64 [P], aligned with `evaluate.evidence_pairs(examples)`: for an example whose task is in `tasks`, each
    pair's position in its query's `needs` list (the chain tasks list a chain's pointer first, then its place:
    0 for the first hop, 1 for the second), else 0. `routing_loss` supervises a pair of rank k only in the k-th
    routed layer and later ones (`TrainConfig.route_in_order`)."""
    out = []
    for ex in examples:
        for q in ex.queries:
            n = len(ex.needs[q])
            out += list(range(n)) if ex.task in tasks else [0] * n
    return torch.tensor(out, dtype=torch.int64)


def _stripe_targets(span: SpanConfig, pairs, l_kv: int, rivals=None, ranks=None):
    """The candidate stripes of each (query, evidence) pair that training can supervise: pairs whose evidence lies
    before the window (reachable only through a span) and that have a stripe whose span holds all of it.

    Returns (row [P'], query [P'], anchor [P', S], candidate [P', S], target [P', S]: the stripe's span holds the
    evidence, rival [P', S] or None: a candidate that is no target and whose span holds a whole rival range,
    rank [P'] or None: `ranks` [P] of the pairs kept)."""
    row, query, es, ee = pairs
    window_lo = window_bounds(span, query)[0]  # -1 where there is no window
    keep = (window_lo < 0) | (es < window_lo)  # evidence reachable only through a span
    row, query, es, ee = row[keep], query[keep], es[keep], ee[keep]
    ranks = None if ranks is None else ranks.to(keep.device)[keep]
    if row.numel() == 0:
        return None
    dev = query.device
    offsets = stripe_table(span, int(query.max()) + 1, device=dev)[span.sw_index + 1:]
    offsets = offsets[offsets <= int(query.max()) + 1]
    anchor = query[:, None] + 1 - offsets[None, :]  # [P, S]
    candidate = anchor >= 0
    anchor = torch.where(candidate, anchor, torch.full_like(anchor, -1))
    qstart, qend = span_bounds(span, anchor, query[:, None], torch.zeros_like(query)[:, None], l_kv)
    target = candidate & (qstart <= es[:, None]) & (qend >= (ee - 1)[:, None])
    rival = None
    if rivals is not None and rivals[0].shape[1]:
        rs, re_ = (t.to(dev)[row] for t in rivals)  # [P, R]; padding (-1, -1) lies in no candidate's span
        holds = (qstart[:, :, None] <= rs[:, None, :]) & (qend[:, :, None] >= (re_ - 1)[:, None, :])  # [P, S, R]
        rival = candidate & ~target & holds.any(-1)
    has_target = target.any(dim=1)
    if not has_target.any():
        return None
    pick = lambda t: None if t is None else t[has_target]  # noqa: E731
    return pick(row), pick(query), pick(anchor), pick(candidate), pick(target), pick(rival), pick(ranks)


def _stripe_scores(records: dict, row, query, anchor, candidate):
    """Per recorded layer: the raw search values ⟨Q1(query), K(anchor)⟩ [P, H_Q, S] in fp32, −inf off
    candidates."""
    for _, _, q1, k in records.values():
        h_q, h_kv = q1.shape[1], k.shape[1]
        q = q1[row, :, query].float()  # [P, H_Q, D]
        keys = k[row[:, None], :, anchor.clamp_min(0)].float()  # [P, S, H_KV, D]
        keys = keys.repeat_interleave(h_q // h_kv, dim=2)  # [P, S, H_Q, D]
        with fp32_region(q):  # under autocast einsum would score in bf16 (model/precision.py)
            scores = torch.einsum("phd,pshd->phs", q, keys)
        yield scores.masked_fill(~candidate[:, None, :], float("-inf"))


def routing_loss(records: dict, span: SpanConfig, pairs, rivals=None, ranks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised stripe loss (module docstring) over every recorded layer, query head and evidence pair, and the
    rival contrast: −log of the mass on the evidence's stripes within (evidence's stripes ∪ rivals' stripes), over
    the pairs that have a rival stripe (a stripe holding another same-kind value but not the evidence).

    Args:
        records: {layer: (positions [L], routing, q1 [B, H_Q, L, D], k [B, H_KV, L, D])} from `capture_routing`.
        pairs: (row, query, ev_start, ev_end) int64 [P] from `evidence_pairs`.
        rivals: (rival_start, rival_end) [B, R] from `rival_ranges`, or None.
        ranks: int64 [P] from `pair_ranks`, or None: a pair of rank k counts only in the routed layers of rank
            ≥ k (layers ranked 0, 1, … in index order); None = every pair in every layer.
    Returns (stripe loss, rival contrast): scalars, 0 where nothing applies (e.g. evidence in the window). Each
    layer's terms are means over its pairs and heads; the two scalars are their sums over layers / layer count.
    """
    first = next(iter(records.values()))
    zero = first[2].sum() * 0
    dev = first[2].device
    picked = _stripe_targets(span, tuple(t.to(dev) for t in pairs), first[3].shape[2], rivals, ranks)
    if picked is None:
        return zero, zero
    row, query, anchor, candidate, target, rival, rank = picked
    contrasted = rival.any(1) if rival is not None else None
    layer_rank = {layer: r for r, layer in enumerate(sorted(records))}
    total, contrast = zero, zero
    for layer, scores in zip(records, _stripe_scores(records, row, query, anchor, candidate)):
        use = None if rank is None else rank <= layer_rank[layer]  # [P'] pairs this layer is asked to reach
        if use is not None and not use.any():
            continue
        good = scores.masked_fill(~target[:, None, :], float("-inf"))
        term = torch.logsumexp(scores, -1) - torch.logsumexp(good, -1)  # [P', H]
        total = total + (term if use is None else term[use]).mean()
        if contrasted is not None:
            on = contrasted if use is None else contrasted & use
            if on.any():
                both = scores.masked_fill(~(target | rival)[:, None, :], float("-inf"))
                contrast = contrast + (torch.logsumexp(both, -1) - torch.logsumexp(good, -1))[on].mean()
    return total / len(records), contrast / len(records)


def step_loss(model: HybridLM, cfg: TrainConfig, examples: list[D.Example], device, autocast: bool):
    """Forward one batch; returns (loss, stats dict of floats)."""
    ids, ans_mask, first_mask = loss_weights(examples, device)
    pairs = evidence_pairs(examples)
    rivals = rival_ranges(examples)  # the contrast is logged at w_rival = 0 too
    ranks = pair_ranks(examples, set(cfg.route_in_order)) if cfg.route_in_order else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        with capture_routing(model) as records:
            logits = model(ids)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        lm = ce.mean()
        n_ans = ans_mask.sum()
        ans = (ce * ans_mask).sum() / n_ans.clamp_min(1)
        first = (ce * first_mask).sum() / first_mask.sum().clamp_min(1)
        route, rival = routing_loss(records, model.cfg.span, pairs, rivals, ranks) \
            if (cfg.w_route > 0 or cfg.w_rival > 0) and pairs[0].numel() else (lm * 0, lm * 0)
    loss = cfg.w_lm * lm + cfg.w_answer * ans + cfg.w_first * first + cfg.w_route * route + cfg.w_rival * rival
    with torch.no_grad():
        hits = [reached(records[i][1], model.cfg.span, *pairs).any(-1) for i in sorted(records)] \
            if pairs[0].numel() else []
        recall = float(torch.stack(hits).any(0).float().mean()) if hits else float("nan")
    return loss, {"loss": loss.item(), "lm": lm.item(), "answer": ans.item(), "first": first.item(),
                  "route": route.item(), "rival": rival.item(), "train_recall": recall}


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: HybridLM, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------- checkpoints (safetensors + JSON)
def save_checkpoint(path, model: HybridLM, opt: torch.optim.AdamW, cfg: TrainConfig, state: dict) -> None:
    """Write model.safetensors, optimizer_exp_avg.safetensors, optimizer_exp_avg_sq.safetensors (AdamW moments
    keyed by parameter name; one file each keeps every file small) and state.json (with the per-parameter AdamW
    step counts) into `path`; each file is replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {"exp_avg": {}, "exp_avg_sq": {}}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for key in moments:
                    moments[key][names[id(p)]] = st[key].detach().float().cpu().contiguous()
                steps[names[id(p)]] = float(st["step"])
    files = {"model.safetensors": {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
             "optimizer_exp_avg.safetensors": moments["exp_avg"],
             "optimizer_exp_avg_sq.safetensors": moments["exp_avg_sq"]}
    for name, obj in files.items():
        tmp = path / (name + ".tmp")
        save_file(obj, str(tmp))
        tmp.replace(path / name)
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps({**state, "adam_steps": steps, "config": asdict(cfg)}, indent=1))
    tmp.replace(path / "state.json")


def load_checkpoint(path, model: HybridLM, opt: torch.optim.AdamW) -> dict:
    """Restore model and optimizer from `path`; returns the state dict (step, tokens, elapsed, config, ...)."""
    path = Path(path)
    dev = str(model.device)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=dev))
    exp_avg = load_file(str(path / "optimizer_exp_avg.safetensors"), device=dev)
    exp_avg_sq = load_file(str(path / "optimizer_exp_avg_sq.safetensors"), device=dev)
    state = json.loads((path / "state.json").read_text())
    steps = state.pop("adam_steps")
    for name, p in model.named_parameters():
        if name in steps:
            opt.state[p] = {"step": torch.tensor(steps[name]), "exp_avg": exp_avg[name],
                            "exp_avg_sq": exp_avg_sq[name]}
    return state


# --------------------------------------------------------------------------- probe
@torch.no_grad()
def probe(model: HybridLM, cfg: TrainConfig, length: int, autocast: bool) -> dict:
    """Held-out NIAH rows at `length` and spread depths: answer accuracy and routing recall (any head). When the
    task mix trains word facts, also held-out ``fact_word`` rows (held-out phrasings and values): accuracy, answer
    byte accuracy and first-byte accuracy (is the value being copied at all?)."""
    from .evaluate import run_examples, summarize

    model.eval()
    n = cfg.probe_rows
    layers = [i for i, _ in model.routing_layers()]
    suites = {"probe": [D.niah(length, i / max(1, n - 1), 10_000 + i, "eval") for i in range(n)]}
    if "fact_word" in cfg.task_mix:
        suites["probe_word"] = [D.make_example("fact_word", length, 10_000 + i, "eval") for i in range(n)]
    out = {"probe_length": length}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for name, exs in suites.items():
            s = summarize(run_examples(model, exs, batch_size=n), layers)
            out.update({f"{name}_acc": s["accuracy"], f"{name}_recall": s["recall_any"]})
            if name == "probe":
                out["probe_best_head"] = s["best_head"]["recall"]
            else:
                out.update({f"{name}_byte_acc": s["byte_accuracy"], f"{name}_first_byte": s["first_byte_accuracy"]})
    model.train()
    return out


# --------------------------------------------------------------------------- loop
class _Batches(torch.utils.data.IterableDataset):
    """(step, make_batch(cfg, step)) for steps start … end-1, in order; with DataLoader workers, worker w builds
    steps start+w, start+w+n, … and the loader takes them round-robin, so the order (and every batch) is the
    same as without workers."""

    def __init__(self, cfg: TrainConfig, start: int, end: int):
        self.cfg, self.start, self.end = cfg, start, end

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        if info:
            D.use_corpus(self.cfg.corpus)
        for step in range(self.start + worker, self.end, n):
            yield step, make_batch(self.cfg, step)


def _same(x):
    return x


def _batches(cfg: TrainConfig, start: int, end: int, workers: int):
    """Iterator of (step, examples) from `start` to `end`; built in `workers` background processes when > 0
    (a step's examples are a pure function of (cfg, step), so nothing else changes)."""
    data = _Batches(cfg, start, end)
    if workers <= 0:
        return iter(data)
    return iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            collate_fn=_same, persistent_workers=False))


def train(cfg: TrainConfig, ckpt: str | Path, device: str = "cpu", backend: str = "auto", time_limit: float = 0,
          max_steps: int | None = None, save_every: int = 200, progress: bool = True, save_seconds: float = 0,
          workers: int = 0) -> dict:
    """Train from scratch or resume from `ckpt` until the schedule ends, `max_steps` (absolute step count) is
    reached, or `time_limit` seconds pass (0 = none); checkpoints at the end, every `save_every` steps and (when
    `save_seconds` > 0) whenever that many seconds passed since the last checkpoint. `workers` > 0 builds the
    batches in that many background processes (same batches). Returns the final state dict."""
    from tqdm.auto import tqdm

    ckpt = Path(ckpt)
    t_start = time.time()
    D.use_corpus(cfg.corpus)
    model = HybridLM(ModelConfig.from_dict(cfg.model), backend=backend).to(device)
    model.train()
    opt = make_optimizer(model, cfg)
    state = {"step": 0, "tokens": 0, "answer_tokens": 0, "elapsed_s": 0.0, "slices": []}
    if cfg.init_from and not (ckpt / "state.json").is_file():
        _init_weights(model, cfg)
    if (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, opt)
        saved = state.pop("config")
        if saved != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{ckpt}/state.json: the checkpoint was made with another TrainConfig; "
                             "resume with the same settings (see its 'config')")
    autocast = device.startswith("cuda")
    if autocast:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    end = cfg.total_steps if max_steps is None else min(max_steps, cfg.total_steps)
    slice_info = {"start_step": state["step"], "device": device, "backend": backend,
                  "device_name": torch.cuda.get_device_name() if autocast else "cpu", "torch": torch.__version__}
    ckpt.mkdir(parents=True, exist_ok=True)
    log_f = open(ckpt / LOG_FILE, "a")
    bar = tqdm(total=end, initial=state["step"], disable=not progress, dynamic_ncols=True)
    t_slice = time.time()
    last_save, last_save_t = state["step"], time.time()
    batches = _batches(cfg, state["step"], end, workers)
    try:
        while state["step"] < end:
            step = state["step"]
            if time_limit and time.time() - t_start > time_limit:
                break
            got, examples = next(batches)
            if got != step:
                raise RuntimeError(f"batch loader gave step {got} for step {step}")
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, stats = step_loss(model, cfg, examples, device, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            length = len(examples[0].ids)
            state["step"] = step + 1
            state["tokens"] += length * len(examples)
            state["answer_tokens"] += sum(ex.answer[1] - ex.answer[0] for ex in examples)
            entry = {"step": step + 1, "length": length, "batch": len(examples), "lr": lr, "grad_norm": gnorm,
                     **stats}
            if cfg.probe_every and ((step + 1) % cfg.probe_every == 0 or step + 1 == cfg.total_steps):
                entry.update(probe(model, cfg, length, autocast))
            entry["elapsed_s"] = round(state["elapsed_s"] + time.time() - t_slice, 2)
            log_f.write(json.dumps(entry) + "\n")
            log_f.flush()
            bar.update(1)
            bar.set_postfix(L=length, loss=f"{stats['loss']:.3f}", ans=f"{stats['answer']:.3f}",
                            rec=f"{stats['train_recall']:.2f}")
            if state["step"] - last_save >= save_every or (save_seconds and time.time() - last_save_t >= save_seconds):
                _save(ckpt, model, opt, cfg, state, t_slice, slice_info)
                t_slice, last_save, last_save_t = time.time(), state["step"], time.time()
    finally:
        bar.close()
        log_f.close()
        del batches
    _save(ckpt, model, opt, cfg, state, t_slice, slice_info)
    return state


def _init_weights(model: HybridLM, cfg: TrainConfig) -> None:
    """Copy the weights of model `cfg.init_from` (shipped name or model folder, via `loaders.open_model`) into
    `model`; the architecture must match (the span geometry may differ: it has no weights), or, with
    `cfg.widen_init`, `model` may be a widening of it (`model.widen`, new weights from `cfg.seed`)."""
    from .loaders import open_model
    from .model.widen import widen_model

    spec = cfg.init_from
    source = open_model(spec)
    if source.cfg.to_dict() | {"span": None} != model.cfg.to_dict() | {"span": None}:
        if not cfg.widen_init:
            raise ValueError(f"init_from={spec!r}: its architecture differs from the TrainConfig's model "
                             "(set widen_init to start a wider model from it)")
        source = widen_model(source, model.cfg, seed=cfg.seed)
        log.info("widened %s to d_model %d, d_ff %d", spec, model.cfg.d_model, model.cfg.d_ff)
    model.load_state_dict({k: v.to(torch.float32) for k, v in source.state_dict().items()})
    log.info("initialised from %s", spec)


def _save(ckpt, model, opt, cfg, state, t_slice, slice_info) -> None:
    now = time.time()
    state["elapsed_s"] = round(state["elapsed_s"] + now - t_slice, 2)
    slices = state.setdefault("slices", [])
    if slices and slices[-1].get("start_step") == slice_info["start_step"]:
        slices[-1] = {**slice_info, "end_step": state["step"]}
    else:
        slices.append({**slice_info, "end_step": state["step"]})
    save_checkpoint(ckpt, model, opt, cfg, state)


def export(ckpt, out, dtype: str = "float16", search_power: float | None = None) -> Path:
    """Write the checkpoint's model as shipped weights (`save_model` layout) in `dtype` into `out`; with
    `search_power`, the shipped config uses that stripe power p instead of the training one (an inference-time
    geometry choice: same weights, denser or sparser anchors)."""
    from dataclasses import replace

    from .model import save_model

    state = json.loads((Path(ckpt) / "state.json").read_text())
    model_cfg = ModelConfig.from_dict(state["config"]["model"])
    if search_power is not None:
        model_cfg = replace(model_cfg, span=model_cfg.span.replace(search_power=search_power))
    model = HybridLM(model_cfg)
    model.load_state_dict(load_file(str(Path(ckpt) / "model.safetensors")))
    model = model.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    return save_model(model, out)


def _timed_steps(cfg: TrainConfig, length: int, batch: int, device: str, backend: str, n: int = 3) -> float:
    """Median seconds of a training step (forward, backward, AdamW) at (length, batch) on a fresh model."""
    model = HybridLM(ModelConfig.from_dict(cfg.model), backend=backend).to(device).train()
    opt = make_optimizer(model, cfg)
    stage_cfg = TrainConfig(**{**asdict(cfg), "stages": [[length, n + 1, batch]]})
    times = []
    for step in range(n + 1):
        examples = make_batch(stage_cfg, step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        loss, _ = step_loss(model, cfg, examples, device, device.startswith("cuda"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def plan(cfg: TrainConfig, seconds: float, device: str, backend: str,
         shares=(0.1, 0.15, 0.2, 0.25, 0.3)) -> TrainConfig:
    """Resize each stage's step count so the schedule takes about `seconds` on this device: stage i gets
    `shares[i]` of the time (measured step time at its length and batch). Returns the new config."""
    if len(shares) != len(cfg.stages):
        raise ValueError(f"shares: {len(shares)} values for {len(cfg.stages)} stages")
    stages = []
    for (length, _, batch), share in zip(cfg.stages, shares):
        t = _timed_steps(cfg, length, batch, device, backend)
        steps = max(1, int(share * seconds / t))
        log.info("plan: L=%d batch=%d: %.3f s/step, %s tok/s -> %d steps", length, batch, t,
                 f"{length * batch / t:,.0f}", steps)
        stages.append([length, steps, batch])
    return TrainConfig(**{**asdict(cfg), "stages": stages})


def check_backends(cfg: TrainConfig, device: str, lengths=(1024, 4096), batch: int = 2) -> list[dict]:
    """Loss and gradients of one batch with backend "triton" vs "oracle" (same weights), plus step times."""
    rows = []
    for length in lengths:
        stage_cfg = TrainConfig(**{**asdict(cfg), "stages": [[length, 1, batch]]})
        examples = make_batch(stage_cfg, 0)
        grads, losses = {}, {}
        for backend in ("oracle", "triton"):
            model = HybridLM(ModelConfig.from_dict(cfg.model), backend=backend).to(device).train()
            try:
                loss, _ = step_loss(model, cfg, examples, device, device.startswith("cuda"))
                loss.backward()
            except Exception as exc:  # report, do not hide: the caller decides which backend to train with
                rows.append({"length": length, "backend": backend, "error": repr(exc)[:400]})
                continue
            losses[backend] = float(loss)
            grads[backend] = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                              if p.grad is not None}
        row = {"length": length, "losses": losses}
        if len(grads) == 2:
            rel = {n: float((grads["oracle"][n] - grads["triton"][n]).norm() / grads["oracle"][n].norm().clamp_min(1e-12))
                   for n in grads["oracle"]}
            row["max_grad_rel"] = max(rel.values())
            row["worst_grad"] = max(rel, key=rel.get)
            for backend in ("oracle", "triton"):
                row[f"step_s_{backend}"] = _timed_steps(cfg, length, batch * 2, device, backend, n=2)
        rows.append(row)
        log.info("%s", json.dumps(row))
    return rows


def load_config(path: str | None) -> TrainConfig:
    if not path:
        return TrainConfig()
    return TrainConfig(**json.loads(Path(path).read_text()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="superlinear-lab train", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint directory (created; resumed when it holds state.json)")
    p.add_argument("--config", help="TrainConfig JSON (default: the built-in config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "oracle", "torch", "triton"])
    p.add_argument("--time-limit", type=float, default=0, help="stop (and checkpoint) after this many seconds")
    p.add_argument("--max-steps", type=int, help="stop at this absolute step")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--save-seconds", type=float, default=0, help="also checkpoint every this many seconds")
    p.add_argument("--workers", type=int, default=0, help="build batches in this many background processes")
    p.add_argument("--export", help="write the checkpoint's weights to this model directory and exit")
    p.add_argument("--export-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--export-search-power", type=float, help="stripe power p written into the exported config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plan", type=float, help="size the stages to about this many seconds here, write --plan-out")
    p.add_argument("--plan-out", default="train_config.json")
    p.add_argument("--check-backends", action="store_true", help="compare triton with oracle (loss, grads, time)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the command's progress lines, on stderr
    if args.check_backends:
        print(json.dumps(check_backends(load_config(args.config), args.device), indent=1))
        return 0
    if args.plan:
        cfg = plan(load_config(args.config), args.plan, args.device, args.backend)
        Path(args.plan_out).write_text(json.dumps(asdict(cfg), indent=1))
        print(json.dumps(cfg.stages))
        return 0
    if not args.ckpt:
        p.error("--ckpt is required to train or export")
    if args.export:
        print(export(args.ckpt, args.export, args.export_dtype, args.export_search_power))
        return 0
    cfg = load_config(args.config)
    state = train(cfg, args.ckpt, args.device, args.backend, args.time_limit, args.max_steps, args.save_every,
                  progress=not args.no_progress, save_seconds=args.save_seconds, workers=args.workers)
    log.info("%s", json.dumps({k: state[k] for k in ("step", "tokens", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
