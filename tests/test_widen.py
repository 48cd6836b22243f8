"""Function-preserving widening (`superlinear_lab.model.widen`, `TrainConfig.widen_init`): a wider model started from
`small`'s weights computes what `small` computes, and its new weights are not dead (they get gradients)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from superlinear_lab import load_model
from superlinear_lab import train as T
from superlinear_lab.data import reference_docs
from superlinear_lab.model.widen import widen_model, widened_config

SHAPES = [{"d_model": 256}, {"d_ff": 768}, {"d_model": 224, "d_ff": 640}]


@pytest.fixture(scope="module")
def small():
    return load_model("small", backend="torch")


def _ids(n=600, seed=0):
    """Prose (Python's reference docs) and random bytes. Not a repeated sentence: its copies give near-tied stripe
    scores, and a 1e-6 difference may then pick another stripe (measured: 0.09 in a logit) in any two models."""
    text = reference_docs().encode()[10_000:10_000 + n]
    return torch.tensor([list(text)]), torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_widened_model_computes_the_same_logits(small, shape, one_thread):
    """Prose: every position's logits agree to fp32 rounding (measured 2e-5). Random bytes: a stripe pick may flip
    where two stripes score within rounding (measured: 1 position of 600 at d_model 256, 0.09 in a logit), so
    there 99 % of positions must agree."""
    wide = widen_model(small, widened_config(small.cfg, **shape), seed=3)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in small.parameters())
    prose, noise = _ids()
    with torch.no_grad():
        a, b = small(prose), wide(prose)
        assert torch.allclose(a, b, atol=2e-3, rtol=0), float((a - b).abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        a, b = small(noise), wide(noise)
    close = (a - b).abs().amax(-1) < 2e-3
    assert close.float().mean() >= 0.99, int((~close).sum())


def test_widening_keeps_norm_eps_exact_and_refuses_other_changes(small):
    cfg = widened_config(small.cfg, d_model=256)
    assert cfg.norm_eps == pytest.approx(small.cfg.norm_eps * 192 / 256) and cfg.d_ff == small.cfg.d_ff
    with pytest.raises(ValueError, match="norm_eps"):  # the plain eps: off by ~0.1 in a logit (measured)
        widen_model(small, dataclasses.replace(cfg, norm_eps=small.cfg.norm_eps))
    with pytest.raises(ValueError, match="cannot narrow"):
        widen_model(small, dataclasses.replace(small.cfg, d_ff=256))
    with pytest.raises(ValueError, match=r"\['n_heads'\]"):
        widen_model(small, dataclasses.replace(cfg, n_heads=2))
    span = dataclasses.replace(cfg, span=cfg.span.replace(search_power=0.5))  # geometry has no weights
    assert widen_model(small, span).cfg.span.search_power == 0.5


def test_new_weights_get_gradients(small, one_thread):
    """The new residual channels, SSM heads and MLP units start silent but learn: within two SGD steps every block
    the rules zeroed has had a non-zero gradient (a widening whose new channels could never move would pass the
    logits test). Two steps, because the last writer's new rows feed only the tied head, whose new embedding
    columns are zero until the first step gives them a gradient through the input lookup."""
    wide = widen_model(small, widened_config(small.cfg, d_model=224, d_ff=640), seed=1).train()
    params = dict(wide.named_parameters())
    seen = {k: torch.zeros_like(p) for k, p in params.items()}
    ids = _ids(300)[0]
    for _ in range(2):
        wide.zero_grad()
        torch.nn.functional.cross_entropy(wide(ids)[0, :-1], ids[0, 1:]).backward()
        with torch.no_grad():
            for k, p in params.items():
                seen[k] += p.grad.abs()
                p -= 0.05 * p.grad
    d, f, e = 192, 512, 384
    new_x_rows = slice(448 + e, 448 + 448)  # in_proj rows: z [448] | x [448] (old 384, then the new 64) | B, C, dt
    assert seen["embed.weight"][:, d:].sum() > 0
    for i in range(6):
        block = f"blocks.{i}."
        assert seen[block + "mlp.w_down.weight"][d:].sum() > 0, i  # new residual rows
        assert seen[block + "mlp.w_down.weight"][:, f:].sum() > 0, i  # new MLP units
        if i % 2 == 0:  # SSM blocks: new heads' input rows and the residual's new rows of out_proj
            assert seen[block + "mixer.in_proj.weight"][new_x_rows].sum() > 0, i
            assert seen[block + "mixer.out_proj.weight"][d:].sum() > 0, i
        else:
            assert seen[block + "mixer.o_proj.weight"][d:].sum() > 0, i


def test_training_starts_a_wider_model_from_small(tmp_path, one_thread):
    """train.train with widen_init: at lr 0 the trained weights are the widening of small (the same function);
    without widen_init the wider config is refused."""
    wide = widened_config(load_model("small").cfg, d_model=224)
    cfg = T.TrainConfig(model=json.loads(json.dumps(wide.to_dict())), stages=[[256, 1, 1]],
                        task_mix={"fact_name": 1.0}, probe_every=0, init_from="small", lr=0.0, weight_decay=0.0,
                        warmup=1, seed=5)
    with pytest.raises(ValueError, match="widen_init"):
        T.train(cfg, tmp_path / "refused", backend="torch", progress=False)
    T.train(dataclasses.replace(cfg, widen_init=True), tmp_path / "ck", backend="torch", progress=False)
    trained = T.export(tmp_path / "ck", tmp_path / "out", dtype="float32")
    model = load_model(path=trained, backend="torch")
    expected = widen_model(load_model("small", backend="torch"), wide, seed=5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_an_untied_head_is_widened_too(small, one_thread):
    """A model with its own output matrix (tie_embeddings false): the head's new input columns read zeros."""
    cfg = dataclasses.replace(small.cfg, tie_embeddings=False, init_seed=4)
    model = load_model(config=cfg, backend="torch")
    wide = widen_model(model, widened_config(cfg, d_model=224), seed=2)
    assert wide.lm_head.weight.shape == (cfg.vocab_size, 224)
    prose = _ids(400)[0]
    with torch.no_grad():
        assert torch.allclose(model(prose), wide(prose), atol=1e-4, rtol=0)
