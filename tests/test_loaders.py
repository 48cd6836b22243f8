"""Loader round trip on a tiny random checkpoint in the released layout (sharded safetensors + index + HF-style
config.json + tokenizer.json): load, forward, chunked prefill + decode == one full forward, Session, checkpoint /
rollback, fork, RoutingTrace, SnapshotStore round trip, dtype conversion, key-map override."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", minversion="5.24", reason="the loaders need the optional extra hf")

from helpers import assert_close  # noqa: E402

from superlinear_lab.engine import Session, SnapshotCompatibilityError, SnapshotStore  # noqa: E402
from superlinear_lab.loaders import (KEY_MAP, SuperlinearExpConfig, checkpoint_names, load_checkpoint,  # noqa: E402
                                     read_json_lenient, save_checkpoint)
from superlinear_lab.loaders.model import SuperlinearExpLM  # noqa: E402
from superlinear_lab.loaders.tokenizer import CheckpointTokenizer, byte_level_tokenizer_json  # noqa: E402


def build_tiny_checkpoint(path, seed: int = 0, **config_changes):
    """A random tiny Superlinear-Exp checkpoint (fp32) with 4+ shards, an index and a byte-level tokenizer."""
    cfg = SuperlinearExpConfig.tiny(**config_changes)
    model = SuperlinearExpLM(cfg).init_random(seed)
    save_checkpoint(model, path, max_shard_bytes=400_000, tokenizer_json=byte_level_tokenizer_json())
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-superlinear-exp")
    reference = build_tiny_checkpoint(path)
    return path, reference.eval()


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt[0], backend="torch")


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_checkpoint_layout(ckpt):
    path, reference = ckpt
    cfg = read_json_lenient(path / "config.json")
    index = read_json_lenient(path / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert cfg["model_type"] == "superlinear-exp" and cfg["hybrid_override_pattern"] == "MEM*EMEM*EM-E"
    assert len(shards) >= 3 and all(s.endswith(".safetensors") for s in shards)
    assert "backbone.layers.3.mixer.q1_proj.weight" in index["weight_map"]  # search query of attention layer 3
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in index["weight_map"]  # per-expert tensors
    assert set(index["weight_map"]) == set(checkpoint_names(reference))
    assert reference.cfg.attention_layers == [3, 8]


def test_loaded_model_matches_the_saved_one(ckpt, model):
    path, reference = ckpt
    ids = ids_of(40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert model.model_id == f"superlinear-exp/{path.name}"
    assert set(model.source["files"]) == {"config.json", "model.safetensors.index.json"}
    assert isinstance(model.tokenizer, CheckpointTokenizer) and model.tokenizer.eos_id == 256
    assert not model.training
    counts = model.cfg.parameter_counts()
    assert counts["total"] == model.num_parameters() + sum(b.numel() for b in model.buffers())


def test_released_layout_parameter_count_matches_the_built_model():
    cfg = SuperlinearExpConfig.released()
    with torch.device("meta"):
        meta = SuperlinearExpLM(cfg)
    built = sum(p.numel() for p in meta.parameters()) + sum(b.numel() for b in meta.buffers())
    assert built == cfg.parameter_counts()["total"] == 31_644_000_576


def test_chunked_prefill_then_decode_equals_full_forward(model):
    ids = ids_of(48)
    with torch.no_grad():
        full = model(ids[None])[0]
    s = Session(model, max_len=64, chunk_size=13, progress=False)
    s.append(ids[:40])  # chunks of 13: 13, 13, 13, 1 tokens (the last chunk is the one-token path)
    assert_close("prefill logits", full[39], s.logits, 1e-5)
    for p in range(40, 48):  # one-token decode steps
        s.append(ids[p:p + 1])
        assert_close(f"decode logits at {p}", full[p], s.logits, 1e-5)


def test_session_text_generate_checkpoint_rollback_fork(model):
    s = Session(model, max_len=128, chunk_size=16, progress=False)
    s.append("The quick brown fox")
    cp = s.checkpoint()
    first = s.generate(6)
    s.rollback(cp)
    assert s.generate(6) == first  # greedy after rollback reproduces the continuation bit for bit
    other = s.fork()
    other.append(" jumps")
    s.append(" jumps")
    assert torch.equal(other.logits, s.logits)
    assert s.text().startswith("The quick brown fox")


def test_routing_trace_of_a_session_equals_the_full_forward(model):
    ids = ids_of(40, seed=3)
    with model.trace() as full_trace, torch.no_grad():
        model(ids[None])
    s = Session(model, max_len=64, chunk_size=11, progress=False)
    with s.trace() as tr:
        s.append(ids[:36])
        for p in range(36, 40):
            s.append(ids[p:p + 1])
    assert tr.layers == full_trace.layers == [3, 8]
    assert tr.length == 40 and tr.tokens is not None and len(tr.tokens) == 40
    for layer in tr.layers:
        a, b = tr.layer(layer), full_trace.layer(layer)
        assert torch.equal(a.qanchor, b.qanchor) and torch.equal(a.qstart, b.qstart)
        assert_close(f"gate of layer {layer}", b.gate, a.gate, 1e-4)
        assert (a.qanchor >= 0).any(), "routing is active (W = 15 < 40 tokens)"
    assert all(not lay.routing_recorders for _, lay in model.routing_layers())


def test_views_render_a_trace_of_the_loaded_model(model, tmp_path):
    pytest.importorskip("plotly")
    from superlinear_lab.widgets import CoverageMap, RoutingExplorer

    s = Session(model, max_len=64, progress=False)
    with s.trace() as tr:
        s.append("routing views on a loaded checkpoint")
    explorer = RoutingExplorer(tr)
    explorer.set_layer(8)
    explorer.set_query(int(tr.queries[-1]))
    assert explorer.error is None and explorer.figures()
    out = CoverageMap(tr).to_html(tmp_path / "coverage.html")
    assert out.stat().st_size > 0


def test_snapshot_round_trip(model, ckpt, tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    s = Session(model, max_len=96, chunk_size=16, progress=False)
    s.append(ids_of(30, seed=5))
    sid = store.save(s, title="tiny superlinear-exp")
    back = store.load(sid, model)
    assert back.cursor == 30 and back.logits is None
    nxt = ids_of(5, seed=6)
    s.append(nxt)
    back.append(nxt)
    assert torch.equal(back.logits, s.logits)
    # a checkpoint copied under another name is another model: its sessions do not load here
    other_path = tmp_path / "renamed-copy"
    shutil.copytree(ckpt[0], other_path)
    other = load_checkpoint(other_path, backend="torch")
    with pytest.raises(SnapshotCompatibilityError):
        store.load(sid, other)


def test_dtype_is_explicit_and_router_stays_fp32(ckpt):
    path, _ = ckpt
    half = load_checkpoint(path, dtype="bfloat16", backend="torch")
    assert half.dtype == torch.bfloat16 and half.new_cache(8).keys[0].dtype == torch.bfloat16
    gate = half.blocks[1].mixer.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert half.new_cache(8).ssm_states.dtype == torch.float32
    with torch.no_grad():
        logits = half(ids_of(20)[None])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="dtype='float64'"):
        load_checkpoint(path, dtype="float64")


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_batched_expert_kernels_match_eager(model, impl):
    ids = ids_of(24)[None]
    with torch.no_grad():
        eager = model(ids)
        try:
            model.set_experts_implementation(impl)
            assert_close(impl, eager, model(ids), 1e-5)
        finally:
            model.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="experts_implementation='fast'"):
        model.set_experts_implementation("fast")


def test_key_map_override_renames_the_search_query(tmp_path):
    rows = {"blocks.{i}.mixer.q1_proj.weight": "backbone.layers.{i}.mixer.search_proj.weight"}
    model = SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(2)
    save_checkpoint(model, tmp_path, key_map=rows)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "backbone.layers.8.mixer.search_proj.weight" in weight_map
    loaded = load_checkpoint(tmp_path, key_map=rows, backend="torch")
    assert torch.equal(loaded.blocks[8].mixer.q1_proj.weight, model.blocks[8].mixer.q1_proj.weight)
    assert KEY_MAP["blocks.{i}.mixer.q1_proj.weight"] == "backbone.layers.{i}.mixer.q1_proj.weight"  # untouched


def test_checkpoint_without_tokenizer_takes_ids(tmp_path):
    model = SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(3)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, backend="torch")
    s = Session(loaded, max_len=32, progress=False)
    s.append(ids_of(10))
    assert len(s.generate(3)) <= 3
    with pytest.raises(ValueError, match="no tokenizer.json"):
        s.append("text")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_load_prefill_decode_trace(ckpt, dtype, tmp_path):
    """On a GPU (Triton attention): load in 16-bit, chunked prefill + decode against one full forward, routing."""
    path, _ = ckpt
    model = load_checkpoint(path, device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.blocks[1].mixer.gate.weight.dtype == torch.float32
    ids = ids_of(96, seed=7)
    with torch.no_grad(), model.trace() as full_trace:
        full = model(ids.cuda()[None])[0]
    s = Session(model, max_len=128, chunk_size=32, progress=False)
    with s.trace() as tr:
        s.append(ids[:80])
        assert_close("prefill logits", full[79], s.logits, 3e-2)
        for p in range(80, 96):
            s.append(ids[p:p + 1])
            assert_close(f"decode logits at {p}", full[p], s.logits, 3e-2)
    for layer in tr.layers:
        same = (tr.layer(layer).qanchor == full_trace.layer(layer).qanchor).float().mean().item()
        assert same > 0.98, f"layer {layer}: only {same:.3f} of the anchors agree (16-bit rounding flips ties)"
    store = SnapshotStore(tmp_path)
    back = store.load(store.save(s), model)
    back.append(ids[:4])
    s.append(ids[:4])
    assert torch.equal(back.logits, s.logits)
    with torch.no_grad():
        grouped = model.set_experts_implementation("grouped_mm")(ids.cuda()[None])[0]
    assert_close("grouped_mm experts", full, grouped, 3e-2)
