"""Sessions: chunked prefill + decode == one full forward, rollback, forks, growth, sampling, error paths."""
from __future__ import annotations

import pytest
import torch

from superlinear_lab.engine import ContextOverflowError, Session, SessionError
from superlinear_lab.engine.session import _sample
from superlinear_lab.model import load_model

from helpers import assert_close

TEXT = "Superlinear attention searches stripes, then attends spans. " * 6  # 360 bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def state(s: Session) -> dict:
    """Everything observable about a session (K/V up to the cursor)."""
    c = s.cursor
    return {"cursor": c, "logits": None if s.logits is None else s.logits.clone(), "ids": s.ids,
            "transcript": [dict(m) for m in s.transcript], "conv": s.cache.conv_states.clone(),
            "ssm": s.cache.ssm_states.clone(), "rng": s._gen.get_state(),
            "kv": [t[:, :, :c].clone() for t in s.cache.keys + s.cache.values], "max_len": s.max_len}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or x is None:
            assert (x is None and y is None) or torch.equal(x, y), k
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert all(torch.equal(p, q) for p, q in zip(x, y)), k
        else:
            assert x == y, k


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 250], ids=lambda c: f"chunk{c}")
def test_prefill_then_decode_equals_full_forward(model, chunk_size):
    ids = torch.tensor(model.tokenizer.encode(TEXT[:300]))
    prefill = 260 if chunk_size > 1 else 60  # chunk 1 is decode all the way: keep it short
    end = prefill + 40
    with torch.no_grad():
        full = model(ids[None, :end])[0]
    s = Session(model, max_len=512, chunk_size=chunk_size, progress=False)
    s.append(ids[:prefill])
    got = [s.logits]
    for i in range(prefill, end):  # token-by-token decode (L_Q = 1)
        s.append(ids[i:i + 1])
        got.append(s.logits)
    assert_close("logits", full[prefill - 1:end], torch.stack(got), 2e-5)


def test_greedy_generation_is_argmax_of_full_forward(model):
    s = Session(model, max_len=512, progress=False)
    s.append(TEXT[:200])
    out = s.generate(30, temperature=0)
    assert len(out) <= 30 and s.cursor == 200 + len(out)
    with torch.no_grad():
        full = model(s.ids[None])[0]
    assert full[199:199 + len(out)].argmax(dim=-1).tolist() == out
    assert s.transcript[-1] == {"role": "assistant", "content": model.tokenizer.decode(out), "tokens": len(out)}


def test_sampler():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert _sample(logits, 0.0, 1.0, gen) == 1
    assert {_sample(logits, 1.0, 1e-6, gen) for _ in range(20)} == {1}  # top-p keeps at least one token
    # top_p = 0.6 keeps the two most probable tokens (cumulative 0.48 + 0.44 >= 0.6).
    assert {_sample(logits, 1.0, 0.6, gen) for _ in range(200)} == {1, 3}
    assert len({_sample(logits, 1.0, 1.0, gen) for _ in range(400)}) == 4


def test_stream_keeps_what_was_consumed(model):
    s = Session(model, max_len=512, progress=False)
    s.append(TEXT[:100])
    stream = s.stream(50, temperature=1.0, seed=3)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert s.cursor == 103 and s.ids[100:].tolist() == first
    assert s.transcript[-1]["tokens"] == 3


def test_stop_token_is_not_written(model):
    s = Session(model, max_len=512, progress=False)
    s.append(TEXT[:100])
    probe = s.fork()
    nxt = probe.generate(1)[0]
    out = s.generate(10, stop=nxt)
    assert out == [] and s.cursor == 100 and len(s.transcript) == 1


def test_rollback_is_bit_exact(model):
    s = Session(model, max_len=1024, progress=False)
    s.append(TEXT[:150])
    cp = s.checkpoint()
    before = state(s)
    first = s.generate(12, temperature=0.8, top_p=0.9)
    s.append(" and a second turn")
    s.rollback(cp)
    assert_same_state(before, state(s))
    assert s.generate(12, temperature=0.8, top_p=0.9) == first  # sampler state restored too
    s.rollback(cp)
    assert_same_state(before, state(s))


def test_stale_checkpoint_is_refused(model):
    s = Session(model, max_len=1024, progress=False)
    s.append(TEXT[:50])
    early = s.checkpoint()
    s.append(TEXT[50:100])
    late = s.checkpoint()
    s.rollback(early)
    s.rollback(late)  # nothing was overwritten yet: still valid
    s.rollback(early)
    s.append("different words")  # overwrites positions 50.. that `late` relies on
    with pytest.raises(SessionError, match="stale"):
        s.rollback(late)
    s.rollback(early)  # positions below 50 are untouched
    other = Session(model, max_len=64, progress=False)
    with pytest.raises(SessionError, match="another session"):
        other.rollback(early)


def test_forks_are_independent(model):
    s = Session(model, max_len=1024, progress=False)
    s.append(TEXT[:120])
    cp = s.checkpoint()
    parent_before = state(s)
    a, b = s.fork(seed=1), s.fork(seed=2)
    a.append(" first branch")
    b.append(" second branch, longer")
    ga, gb = a.generate(20, temperature=1.0), b.generate(20, temperature=1.0)
    assert_same_state(parent_before, state(s))
    assert a.ids.tolist() != b.ids.tolist() and ga != gb
    # The fork continues exactly like a session that never forked.
    fresh = Session(model, max_len=1024, progress=False, seed=1)
    fresh.append(TEXT[:120])
    fresh.append(" first branch")
    assert fresh.generate(20, temperature=1.0) == ga and torch.equal(fresh.logits, a.logits)
    a.rollback(cp)  # a checkpoint taken before the fork works on the fork ...
    assert_same_state(parent_before | {"max_len": a.max_len}, state(a) | {"rng": parent_before["rng"]})
    c = a.checkpoint()
    with pytest.raises(SessionError):  # ... but not the other way round
        s.rollback(c)


def test_grow_keeps_everything(model):
    s = Session(model, max_len=200, progress=False)
    s.append(TEXT[:150])
    cp = s.checkpoint()
    ref = s.fork()
    with pytest.raises(ContextOverflowError, match="max_len=200"):
        s.append(TEXT[:100])
    s.grow(400)
    assert s.max_len == 400
    s.append(TEXT[:100])
    ref.grow(300)
    ref.append(TEXT[:100])
    assert torch.equal(s.logits, ref.logits)
    s.rollback(cp)
    assert s.cursor == 150
    with pytest.raises(ValueError, match="max_len"):
        s.grow(100)


def test_error_paths_leave_state_unchanged(model):
    s = Session(model, max_len=300, chunk_size=32, progress=False)
    s.append(TEXT[:100])
    s.generate(3)
    before = state(s)
    vocab = model.cfg.vocab_size
    bad_inputs = [[5, vocab], [-1], [1.5], [True], ["a"], torch.tensor([1.0]), torch.zeros(2, 2, dtype=torch.long), []]
    for bad in bad_inputs:
        with pytest.raises(ValueError):
            s.append(bad)
        assert_same_state(before, state(s))
    with pytest.raises(ContextOverflowError):
        s.append("x" * 200)
    assert_same_state(before, state(s))
    for bad_kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": [vocab + 1]}):
        with pytest.raises(ValueError):
            s.generate(3, **bad_kwargs)
        assert_same_state(before, state(s))
    with pytest.raises(ValueError):
        s.generate(-1)

    # An exception, then a KeyboardInterrupt, raised inside the second prefill chunk.
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = {"n": 0}

        def explode(module, args, output, exc=exc):
            calls["n"] += 1
            if calls["n"] == 2:
                raise exc

        handle = model.blocks[3].mlp.register_forward_hook(explode)
        try:
            with pytest.raises(type(exc)):
                s.append(TEXT[:70])
        finally:
            handle.remove()
        assert calls["n"] == 2
        assert_same_state(before, state(s))

    # The session still works and matches one that never failed.
    clean = Session(model, max_len=300, chunk_size=32, progress=False)
    clean.append(TEXT[:100])
    clean.generate(3)
    s.append(TEXT[:70])
    clean.append(TEXT[:70])
    assert torch.equal(s.logits, clean.logits)


def test_generate_needs_logits_and_decode_overflow(model):
    s = Session(model, max_len=20, progress=False)
    with pytest.raises(SessionError, match="append"):
        s.generate(3)
    s.append("0123456789")
    before = state(s)
    with pytest.raises(ContextOverflowError, match=r"max_new_tokens=50: only 9 tokens fit"):
        s.generate(50)  # refused before any write (issue 18 #9: it used to write 9 tokens, then raise)
    assert_same_state(before, state(s))
    with pytest.raises(ContextOverflowError, match="only 9 tokens fit"):
        s.stream(10_000)  # refused when called, not at the first next()
    assert_same_state(before, state(s))
    assert len(s.generate(9)) <= 9 and s.cursor <= 19  # what fits still works


def test_memory_by_kind(model):
    s = Session(model, max_len=256, progress=False)
    s.append(TEXT[:64])
    mem = s.memory()
    cfg = model.cfg
    kv = 2 * len(cfg.attention_layers) * cfg.n_kv_heads * 256 * cfg.head_dim * 4
    assert mem["kv"] == kv and mem["kv_used"] == kv * 64 // 256
    assert mem["total"] == mem["kv"] + mem["conv"] + mem["ssm"] + mem["token_ids"] + mem["logits"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_session_trace_and_snapshot(tmp_path, dtype):
    """On a GPU ("auto" = Triton kernels): chunked prefill + decode, greedy generation, a captured trace and a
    snapshot round trip all work, and the routing/logits agree with the torch backend on the same device."""
    from superlinear_lab.engine import SnapshotStore

    model = load_model("tiny", device="cuda", dtype=dtype)
    ids = torch.tensor(model.tokenizer.encode(TEXT * 8))  # 2,880 tokens
    tol = 2e-4 if dtype == "float32" else 5e-2
    s = Session(model, max_len=4096, chunk_size=1000, progress=False)
    with s.trace(profile_queries=[100, 2000]) as tr:
        s.append(ids[:2800])
        for i in range(2800, 2880):
            s.append(ids[i:i + 1])
    with torch.no_grad():
        full = model.set_backend("torch")(ids[None].cuda())[0, -1]
    model.set_backend("auto")
    assert_close("last logits, triton session vs torch full forward", full, s.logits, tol)
    assert tr.queries.numel() == 2880 and tr.layer(tr.layers[0]).stripe_values.shape[1] == 2
    out = s.generate(16)
    store = SnapshotStore(tmp_path)
    back = store.load(store.save(s), model)
    s.append(" and then?")
    back.append(" and then?")
    assert torch.equal(s.logits, back.logits) and s.generate(8) == back.generate(8)
    assert len(out) <= 16
