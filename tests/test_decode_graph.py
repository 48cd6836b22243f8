"""The one-token decode path (issue 16): the pre-validated `DecodeAttention`, the models' `step` with positions
as device tensors, `Session` decode modes ("auto" = whole-model CUDA graph on CUDA, "eager", "forward"), their
fallbacks, and that rollback/fork/grow/snapshots stay bit-exact on the static cache. Every comparison is exact
(torch.equal): the paths run the same operations on the same data. GPU tests are marked `gpu`."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention
from superlinear_lab.engine import ContextOverflowError, Session, SnapshotStore
from superlinear_lab.engine.decode import Decoder, hooks_attached
from superlinear_lab.model import load_model

TEXT = "A stripe is scored at its anchor; the best spans are attended with the window. " * 4  # 320 bytes

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def observable(s: Session) -> dict:
    """What a user can observe of a session, K/V up to the cursor included."""
    c = s.cursor
    return {"cursor": c, "ids": s.ids.tolist(), "logits": None if s.logits is None else s.logits.cpu(),
            "conv": s.cache.conv_states.cpu(), "ssm": s.cache.ssm_states.cpu(), "transcript": s.transcript,
            "kv": [t[:, :, :c].cpu() for t in s.cache.keys + s.cache.values]}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        elif key == "kv":
            assert all(torch.equal(p, q) for p, q in zip(x, y)), key
        else:
            assert x == y, key


# ---------------------------------------------------------------------------------------------- kernel entry
@pytest.mark.parametrize("backend", ["torch", "oracle"])
def test_decode_entry_equals_public_call(backend):
    cfg = SpanConfig.default()
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 300, 16, generator=gen)
    entry = DecodeAttention(k, v, cfg, num_heads=4, backend=backend)
    for pos in (0, 1, 57, 200, 299):
        q1, q2 = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 4, 1, 16, generator=gen)
        ref = superlinear_attention(q1, q2, k, v, [pos], cfg, backend=backend)
        assert torch.equal(entry(q1, q2, pos), ref)
        assert torch.equal(entry(q1, q2, torch.tensor([pos])), ref)
    # the entry reads the cache at call time: a write between calls is seen
    k[:, :, 299] = 5 * q1[0, :2, 0]
    assert torch.equal(entry(q1, q2, 299), superlinear_attention(q1, q2, k, v, [299], cfg, backend=backend))


def test_decode_entry_graph_switch_is_off_without_cuda():
    k = torch.zeros(1, 2, 16, 8)
    entry = DecodeAttention(k, k, SpanConfig.default(), num_heads=4, backend="torch")
    assert not entry.use_graph
    entry.use_graph = True  # only where a graph is possible
    assert not entry.use_graph and torch.equal(entry(torch.ones(1, 4, 1, 8), torch.ones(1, 4, 1, 8), 3),
                                                torch.zeros(1, 4, 1, 8))


def test_decode_entry_at_position_zero_is_attention_to_key_zero():
    k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    out = DecodeAttention(k, v, SpanConfig.default(), num_heads=2, backend="torch")(
        torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0)
    assert torch.allclose(out[0, :, 0], v[0, 0, 0].expand(2, 4))


def test_decode_entry_validates_once_and_names_the_argument():
    k = torch.zeros(1, 2, 64, 8)
    with pytest.raises(ValueError, match="H_Q=3 must be a multiple of KV heads H_KV=2"):
        DecodeAttention(k, k, SpanConfig.default(), num_heads=3)
    with pytest.raises(ValueError, match="num_heads=0"):
        DecodeAttention(k, k, SpanConfig.default(), num_heads=0)
    with pytest.raises(ValueError, match="v: shape"):
        DecodeAttention(k, torch.zeros(1, 2, 32, 8), SpanConfig.default(), num_heads=4)
    with pytest.raises(TypeError, match="cfg"):
        DecodeAttention(k, k, "release", num_heads=4)
    entry = DecodeAttention(k, k, SpanConfig.default(), num_heads=4, backend="torch")
    q = torch.zeros(1, 4, 1, 8)
    for bad in (64, -1, True, 2.0):
        with pytest.raises(ValueError, match="position"):
            entry(q, q, bad)
    with pytest.raises(ValueError, match="position: holds 64"):
        entry(q, q, torch.tensor([64]))
    with pytest.raises(ValueError, match="position: got torch.int32"):
        entry(q, q, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q2: got torch.float32 \(1, 4, 2, 8\)"):
        entry(q, torch.zeros(1, 4, 2, 8), 3)
    with pytest.raises(ValueError, match="q1: got torch.float64"):
        entry(q.double(), q, 3)


TRITON_ENTRY_CHECK = """
import torch
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention
cfg, gen = SpanConfig.default(), torch.Generator().manual_seed(0)
k, v = torch.randn(1, 2, 700, 32, generator=gen), torch.randn(1, 2, 700, 32, generator=gen)
entry = DecodeAttention(k, v, cfg, num_heads=4, backend="triton")
q1, q2 = torch.randn(1, 4, 1, 32, generator=gen), torch.randn(1, 4, 1, 32, generator=gen)
for pos in (5, 699):
    assert torch.equal(entry(q1, q2, pos), superlinear_attention(q1, q2, k, v, [pos], cfg, backend="triton")), pos
v[0, 1, 690] = float("inf")  # in the window of position 699, KV head 1: the rows of query heads 2, 3 are NaN
out = entry(q1, q2, 699)
assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all(), out
print("ok")
"""


def test_triton_decode_entry_in_the_interpreter():
    """The Triton entry (kernels in Triton's CPU interpreter, in a subprocess: TRITON_INTERPRET must be set before
    triton is imported) equals the public call bit for bit, and its merge kernel applies the non-finite rule."""
    if importlib.util.find_spec("triton") is None:  # not imported here: test_triton.py sets TRITON_INTERPRET first
        pytest.skip("needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_ENTRY_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- model step
@pytest.fixture(scope="module")
def model():
    return load_model("tiny", backend="torch")


def test_model_step_equals_forward_bit_for_bit(model):
    ids = torch.tensor(model.tokenizer.encode(TEXT))
    a, b = model.new_cache(400), model.new_cache(400)
    with torch.no_grad():
        model(ids[None, :200], a, 0)
        model(ids[None, :200], b, 0)
        entries = model.decode_entries(b)
        for p in range(200, 230):
            ref = model(ids[None, p:p + 1], a, p)
            got = model.step(ids[None, p:p + 1], b, torch.tensor([p]), entries)
            assert torch.equal(ref, got), p
    for x, y in zip(a.keys + a.values + [a.conv_states, a.ssm_states], b.keys + b.values + [b.conv_states, b.ssm_states]):
        assert torch.equal(x, y)


def generated(model, decode: str, n: int = 24, **kw) -> tuple[Session, list[int]]:
    s = Session(model, max_len=kw.pop("max_len", 512), progress=False, decode=decode, **kw)
    s.append(TEXT)
    return s, s.generate(n)


def test_session_eager_step_equals_forward_path(model):
    a, out_a = generated(model, "forward")
    b, out_b = generated(model, "eager")
    assert a.decode_path == "forward" and b.decode_path == "eager"
    assert out_a == out_b and len(out_a) == 24
    assert_same(observable(a), observable(b))
    assert a.generate_text(6) == b.generate_text(6) == model.tokenizer.decode(b.ids[-6:].tolist())


def test_public_step_equals_append_of_one_token(model):
    a, _ = generated(model, "forward", n=0)
    b, _ = generated(model, "eager", n=0)
    for token in model.tokenizer.encode("step by step"):
        a.append([token], role=None)
        b.step(token)
    assert b.decode_path == "eager"
    assert_same(observable(a), observable(b))
    before = observable(b)
    for bad in (-1, model.cfg.vocab_size, True, 3.0):
        with pytest.raises(ValueError, match="token="):
            b.step(bad)
    full = Session(model, max_len=b.cursor + 1, progress=False)
    full.append(b.ids)
    with pytest.raises(ContextOverflowError):
        full.step(5)
    assert_same(before, observable(b))


def test_auto_on_cpu_falls_back_to_the_eager_step_and_says_why(model):
    s, out = generated(model, "auto", n=4)
    assert s.decode_path == "eager" and "cpu" in s.decode_fallback
    assert out == generated(model, "forward", n=4)[1]


def test_hooks_route_steps_through_forward(model):
    s = Session(model, max_len=512, progress=False)
    s.append(TEXT)
    with s.trace() as tr:
        assert hooks_attached(model)
        s.generate(3)
    assert s.decode_path == "forward" and tr.length == s.cursor
    assert not hooks_attached(model)
    s.generate(1)
    assert s.decode_path == "eager"


def test_rollback_fork_grow_snapshot_with_the_step_path(model, tmp_path):
    ref, _ = generated(model, "forward", n=0)
    s, _ = generated(model, "eager", n=0)
    cp = s.checkpoint()
    first = s.generate(10)
    after = observable(s)
    s.rollback(cp)
    assert s.generate(10) == first  # the same cache positions re-written, same results
    assert_same(after, observable(s))
    ref.generate(10)
    assert_same(after, observable(ref))  # and the same as the forward path's
    twin = s.fork()
    assert twin.decode == "eager" and twin.generate(6) == s.generate(6)
    assert twin._decoder.cache is twin.cache and s._decoder.cache is s.cache
    old = s._decoder
    s.grow(1024)
    assert s.generate(5) == twin.generate(5)
    assert s._decoder is not old and s._decoder.cache is s.cache and s.max_len == 1024
    assert_same(observable(s), observable(twin))
    store = SnapshotStore(tmp_path)
    back = store.load(store.save(s), model)
    back.decode = "eager"
    s.append(" and")
    back.append(" and")
    assert s.generate(8) == back.generate(8) and torch.equal(s.logits, back.logits)


def test_failed_step_leaves_the_session_unchanged(model, monkeypatch):
    s, _ = generated(model, "eager", n=3)
    before = observable(s)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(type(model), "step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        s.generate(2)
    assert_same(before, observable(s))


def test_pipelined_greedy_generate_equals_stream(model):
    """generate() at temperature 0 runs one step ahead of the host: same tokens, logits, states, transcript as the
    step-by-step stream, including where a stop token ends it (the step queued for the stop token is undone)."""
    ref, ref_out = generated(model, "forward", n=30)
    stop = next(t for i, t in enumerate(ref_out) if i >= 3 and t not in ref_out[:i])  # first seen at index >= 3
    for n in (1, 2, 30):
        for stop_ids in (None, stop):
            a = Session(model, max_len=512, progress=False, decode="forward")
            b = Session(model, max_len=512, progress=False, decode="eager")
            for s in (a, b):
                s.append(TEXT)
            out = b.generate(n, stop=stop_ids)
            assert out == list(a.stream(n, stop=stop_ids)), (n, stop_ids)
            assert stop_ids is None or n < 30 or len(out) == ref_out.index(stop) >= 3  # the stop was hit
            assert_same(observable(a), observable(b))
            assert a.generate(5) == b.generate(5)  # and both go on the same way
            assert_same(observable(a), observable(b))


def test_pipelined_generate_fills_the_cache_to_the_last_slot(model):
    a = Session(model, max_len=330, progress=False, decode="forward")
    b = Session(model, max_len=330, progress=False, decode="eager")
    for s in (a, b):
        s.append(TEXT)
    n = a.room
    assert a.generate(n) == b.generate(n) and b.room == 0
    assert_same(observable(a), observable(b))


def test_pipelined_generate_error_keeps_committed_tokens(model, monkeypatch):
    ref, _ = generated(model, "forward", n=4)
    s, _ = generated(model, "eager", n=0)
    real = Session.record_step
    calls = []

    def failing(self, token, logits):
        calls.append(token)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, token, logits)
    monkeypatch.setattr(Session, "record_step", failing)
    with pytest.raises(KeyboardInterrupt):
        s.generate(12)
    monkeypatch.undo()
    assert_same(observable(ref), observable(s))  # 4 tokens committed (with their message), states of that cursor
    assert ref.generate(6) == s.generate(6)


def test_decode_mode_is_checked(model):
    with pytest.raises(ValueError, match="decode='graph'"):
        Session(model, max_len=64, decode="graph")
    s = Session(model, max_len=64, decode="eager")
    with pytest.raises(ValueError, match="decode=None"):
        s.decode = None
    assert s.decode == "eager"


# ---------------------------------------------------------------------------------------------- Superlinear-Exp
@pytest.fixture(scope="module")
def exp_model(tmp_path_factory):
    pytest.importorskip("transformers", minversion="5.24", reason="the loaders need the optional extra hf")
    from superlinear_lab.loaders import SuperlinearExpConfig, save_checkpoint
    from superlinear_lab.loaders.model import SuperlinearExpLM
    from superlinear_lab.loaders.tokenizer import byte_level_tokenizer_json

    path = tmp_path_factory.mktemp("exp")
    save_checkpoint(SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(5), path,
                    tokenizer_json=byte_level_tokenizer_json())
    return path


def test_superlinear_exp_step_equals_forward(exp_model):
    from superlinear_lab.loaders import load_checkpoint

    model = load_checkpoint(exp_model, backend="torch")
    a, out_a = generated(model, "forward", n=12, max_len=400)
    b, out_b = generated(model, "eager", n=12, max_len=400)
    assert b.decode_path == "eager" and out_a == out_b
    assert_same(observable(a), observable(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_superlinear_exp_moe_step_reads_nothing_on_the_host(exp_model, monkeypatch, dtype):
    """The MoE blocks of the one-token step (what a CUDA graph captures) equal the module bit for bit and never
    read a device value: transformers' eager experts do (nonzero + item), which would stop the capture."""
    from superlinear_lab.loaders import load_checkpoint

    model = load_checkpoint(exp_model, backend="torch", dtype=dtype)
    moes = [b.mixer for b in model.blocks if b.kind == "E"]
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 1, model.cfg.hidden_size, generator=gen).to(model.dtype) for _ in range(6)]
    with torch.no_grad():
        expected = [[moe(h) for h in inputs] for moe in moes]

        def host_read(*args, **kwargs):
            raise AssertionError("a host read in the one-token MoE step")
        for name in ("item", "nonzero", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        got = [[model._moe_step(moe, h) for h in inputs] for moe in moes]
    monkeypatch.undo()
    hits = {tuple(moe.gate(h)[2].sort().values.tolist()[0]) for moe in moes for h in inputs}
    assert len(hits) > 3  # the inputs reach different experts
    assert all(torch.equal(a, b) for row_a, row_b in zip(expected, got) for a, b in zip(row_a, row_b))


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_entry_and_its_graph_equal_the_public_call(dtype):
    cfg = SpanConfig.release()
    gen = torch.Generator(device="cuda").manual_seed(1)
    length = 40_000
    k = torch.randn(1, 2, length, 64, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, 2, length, 64, device="cuda", dtype=dtype, generator=gen)
    q1, q2 = (torch.randn(1, 8, 1, 64, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    entry = DecodeAttention(k, v, cfg, num_heads=8, backend="triton", graph=False)
    self_graphed = DecodeAttention(k, v, cfg, num_heads=8, backend="triton")  # the default on CUDA
    position = torch.zeros(1, dtype=torch.int64, device="cuda")
    entry(q1, q2, position)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = entry(q1, q2, position)
    for pos in (0, 2031, 2032, 5000, 39_999):  # one graph serves every position
        ref = superlinear_attention(q1, q2, k, v, torch.tensor([pos], device="cuda"), cfg, backend="triton")
        torch_ref = superlinear_attention(q1, q2, k, v, [pos], cfg, backend="torch")
        assert torch.equal(entry(q1, q2, pos), ref)
        assert torch.equal(self_graphed(q1, q2, pos), ref) and self_graphed._graph is not None
        position.fill_(pos)
        graph.replay()
        assert torch.equal(out, ref), pos
        assert torch.allclose(out.float(), torch_ref.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_session_graph_equals_eager_and_forward(dtype):
    model = load_model("tiny", device="cuda", dtype=dtype)
    runs = {}
    for mode in ("auto", "eager", "forward"):
        s = Session(model, max_len=3000, chunk_size=1000, progress=False, decode=mode)
        s.append(TEXT * 8)
        cp = s.checkpoint()
        out = s.generate(40)
        runs[mode] = (s, out, observable(s))
        s.rollback(cp)
    assert runs["auto"][0].decode_path == "graph" and runs["auto"][0].decode_fallback is None
    entries = runs["auto"][0]._decoder.entries  # the whole step replays: the entries' own graphs were never made
    assert all(e._graph is None and e.use_graph for e in entries)
    assert all(e._graph is not None for e in runs["eager"][0]._decoder.entries)  # eager steps replay them
    assert runs["eager"][0].decode_path == "eager" and runs["forward"][0].decode_path == "forward"
    assert runs["auto"][1] == runs["eager"][1] == runs["forward"][1] and len(runs["auto"][1]) == 40
    assert_same(runs["auto"][2], runs["eager"][2])
    assert_same(runs["auto"][2], runs["forward"][2])
    s = runs["auto"][0]  # rolled back: the graph replays the same steps again; fork and grow recapture
    assert s.generate(40) == runs["auto"][1]
    twin = s.fork()
    s.grow(6000)
    assert s.generate(12) == twin.generate(12) and s.decode_path == twin.decode_path == "graph"
    assert s._decoder.cache is s.cache and torch.equal(s.logits, twin.logits)


@pytest.mark.gpu
@cuda
def test_cuda_capture_failure_falls_back_and_logs(caplog, monkeypatch):
    model = load_model("tiny", device="cuda")
    real_step = type(model).step

    def syncing_step(self, ids, cache, position, entries):
        int(position[0])  # a host read: not capturable
        return real_step(self, ids, cache, position, entries)
    ref = Session(model, max_len=1000, progress=False, decode="forward")
    ref.append(TEXT)
    expected = ref.generate(10)
    monkeypatch.setattr(type(model), "step", syncing_step)
    s = Session(model, max_len=1000, progress=False)
    s.append(TEXT)
    before = observable(s)
    with caplog.at_level(logging.WARNING, logger="superlinear_lab.engine.decode"):
        s.rollback(s.checkpoint())
        assert s.generate(10) == expected
    assert s.decode_path == "eager" and s.decode_fallback and "capture" in caplog.text
    assert before["cursor"] + 10 == s.cursor
    assert isinstance(s._decoder, Decoder) and s._decoder.graph is None


@pytest.mark.gpu
@cuda
def test_cuda_superlinear_exp_graph(exp_model):
    from superlinear_lab.loaders import load_checkpoint

    model = load_checkpoint(exp_model, device="cuda")
    a, out_a = generated(model, "forward", n=16, max_len=600)
    b, out_b = generated(model, "auto", n=16, max_len=600)
    assert out_a == out_b
    assert_same(observable(a), observable(b))
    # the whole step (Mamba-2, MoE through `_moe_step`, attention) is captured: no fallback
    assert b.decode_path == "graph" and b.decode_fallback is None, b.decode_fallback
