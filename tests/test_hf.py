"""superlinear_lab.hf on tiny random transformers models built from configs (Llama, Qwen2, Mistral, GPT-NeoX; nothing
is downloaded): the window-only limit equals dense attention, the converted layer equals the oracle on the layer's own
q/k/v, generate with the model's cache (dynamic or static) equals a full forward, Mistral's and Qwen2's own sliding
windows (replaced in converted layers, kept by dense ones), padding, traces, attention patterns, bad input."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import superlinear_lab.hf as hf  # noqa: E402
from superlinear_kernels import SpanConfig, coverage, superlinear_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline")
VOCAB = 300
WIDE = SpanConfig(sw_index=6, num_spans=2, backward_factor=2.0, forward_factor=0.0, span_power=0.5,
                  search_power=0.5)  # W = F(7) - 1 = 48
NARROW = SpanConfig.default()  # W = 15


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


def build(arch: str, seed: int = 0, sliding_window: int | None = None):
    """A tiny random causal LM of `arch`, fp32, eval mode, sdpa attention (Mistral: with `sliding_window`)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, attn_implementation="sdpa")
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=1, **common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            num_key_value_heads=2, sliding_window=sliding_window, **common))
    elif arch == "neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(rotary_pct=0.5, **common))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["llama", "qwen2", "mistral", "neox"]


def attn_modules(model):
    return dict(hf.attention.attention_modules(model))


# --------------------------------------------------------------------------- the window-only limit
@pytest.mark.parametrize("arch", ARCHS)
def test_window_only_limit_equals_dense(arch):
    model = build(arch)
    assert coverage(WIDE, 512).ok
    ids = torch.randint(0, VOCAB, (1, WIDE.window_len))  # every key inside the window: t <= W
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
        hf.convert(model, WIDE)
        sl = model(input_ids=ids).logits
        beyond = model(input_ids=torch.randint(0, VOCAB, (1, 3 * WIDE.window_len))).logits
        with hf.dense(model):
            beyond_dense = model(input_ids=torch.randint(0, VOCAB, (1, 3 * WIDE.window_len))).logits
    assert model.config._attn_implementation == "superlinear"
    torch.testing.assert_close(sl, dense_logits, rtol=0, atol=2e-5)
    assert beyond.shape == beyond_dense.shape


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_left_padding_equals_unpadded_rows(arch):
    """A left-padded batch gives each row the logits of that row alone (the kernel's row start from the mask)."""
    model = hf.convert(build(arch, seed=1), NARROW)
    a = torch.randint(0, VOCAB, (1, 40))
    b = torch.randint(0, VOCAB, (1, 25))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 15, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :15] = 0
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask).logits
        alone_a = model(input_ids=a).logits
        alone_b = model(input_ids=b).logits
    # Padded rows: RoPE positions come from position_ids = cumsum(mask) - 1, as generate() builds them.
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(both[0], alone_a[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(both[1, 15:], alone_b[0], rtol=0, atol=2e-5)


def test_right_padding_is_refused():
    model = hf.convert(build("llama"), NARROW)
    ids = torch.randint(0, VOCAB, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with pytest.raises(ValueError, match="left.padd"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------- beyond the window: the oracle
def _capture_qkv(model, ids):
    """Each attention module's (query, key, value, scaling, output) from a run with a recording attention function:
    the q/k/v the model's own projection and RoPE code produce."""
    from transformers import AttentionInterface

    got = {}

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        got[module.layer_idx] = (query, key, value, scaling)
        out = hf.attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        got[module.layer_idx] += (out[0],)
        return out

    AttentionInterface.register("h7_test_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("h7_test_capture")
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        model.set_attn_implementation(previous)
    return got


@pytest.mark.parametrize("arch", ARCHS)
def test_beyond_window_layer_output_equals_oracle(arch):
    model = hf.convert(build(arch, seed=2), NARROW)
    ids = torch.randint(0, VOCAB, (1, 90))  # t up to 90 >> W = 15: spans matter
    got = _capture_qkv(model, ids)
    assert sorted(got) == [0, 1]
    for index, (q, k, v, scaling, out) in got.items():
        d = q.shape[-1]
        assert scaling == pytest.approx(1 / math.sqrt(d))
        oracle = superlinear_attention(q, q, k, v, torch.arange(90), NARROW, backend="oracle")
        torch.testing.assert_close(out, oracle.transpose(1, 2), rtol=0, atol=1e-5)
        dense = torch.softmax((q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scaling
                              + torch.full((90, 90), float("-inf")).triu(1), -1)
        dense_out = (dense @ v.repeat_interleave(q.shape[1] // k.shape[1], 1)).transpose(1, 2)
        assert (out - dense_out).abs().max() > 1e-4  # routing really drops keys here


def test_layer_scaling_other_than_inverse_sqrt_d():
    """A layer whose softmax scale is not 1/sqrt(D) (e.g. Gemma-style) keeps its scale: Q2 is rescaled for the kernel."""
    model = hf.convert(build("llama", seed=10), NARROW)
    for mod in attn_modules(model).values():
        mod.scaling = 0.3
    ids = torch.randint(0, VOCAB, (1, 40))
    for q, k, v, scaling, out in _capture_qkv(model, ids).values():
        assert scaling == 0.3
        oracle = superlinear_attention(q, q * 0.3 * math.sqrt(q.shape[-1]), k, v, torch.arange(40), NARROW,
                                       backend="oracle")
        torch.testing.assert_close(out, oracle.transpose(1, 2), rtol=0, atol=1e-5)


def test_search_projection_starts_training_free_and_is_used():
    model = hf.convert(build("qwen2", seed=3), NARROW)
    ids = torch.randint(0, VOCAB, (1, 70))
    with torch.no_grad():
        training_free = model(input_ids=ids).logits
        hf.convert(model, NARROW, search_query="proj")
        proj = model(input_ids=ids).logits
        torch.testing.assert_close(proj, training_free, rtol=0, atol=1e-5)  # Q1 initialised from q_proj
        for mod in attn_modules(model).values():
            mod.q_proj.search.weight.mul_(-1.0)  # Q1 = -Q: the search now ranks anchors the other way
        flipped = model(input_ids=ids).logits
    got = _capture_qkv(model, ids)
    for q, k, v, _, out in got.values():  # 2H heads: [attention | search]; the search heads pick the anchors
        attn, search = q[:, :4], q[:, 4:]
        torch.testing.assert_close(search, -attn)
        oracle = superlinear_attention(search, attn, k, v, torch.arange(70), NARROW, backend="oracle")
        torch.testing.assert_close(out, oracle.transpose(1, 2), rtol=0, atol=1e-5)
    with torch.no_grad():
        with hf.dense(model):
            dense_proj = model(input_ids=ids).logits
        hf.convert(model, NARROW, search_query="q")  # unwraps q_proj again
        assert not isinstance(attn_modules(model)[0].q_proj, hf.SearchQueryProjection)
    assert (flipped - training_free).abs().max() > 1e-4
    dense_model = build("qwen2", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(dense_proj, dense_model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_partial_conversion_keeps_dense_layers_dense():
    dense_model = build("llama", seed=4)
    model = hf.convert(build("llama", seed=4), {1: NARROW})
    ids = torch.randint(0, VOCAB, (1, 60))
    got = _capture_qkv(model, ids)
    ref = _capture_qkv(hf.convert(dense_model, NARROW, layers=[1]), ids)
    torch.testing.assert_close(got[0][4], ref[0][4])
    assert [i for i, _ in hf.converted_layers(model)] == [1]
    q, k, v, _, out = got[0]
    causal = torch.full((60, 60), float("-inf")).triu(1)
    w = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, -1)
    torch.testing.assert_close(out, (w @ v.repeat_interleave(2, 1)).transpose(1, 2), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- generate with the model's cache
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_equals_full_forward(arch):
    model = hf.convert(build(arch, seed=5), NARROW)
    prompt = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = model(input_ids=out.sequences).logits
    steps = torch.stack(out.logits, 1)[0]  # [24, vocab]: logits that chose tokens 30..53
    torch.testing.assert_close(steps, full[0, 29:-1], rtol=0, atol=5e-5)
    assert out.sequences.shape[1] == 54  # crosses the window (15) and the first stripes


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_generate_with_static_cache_equals_full_forward(arch):
    """transformers' StaticCache (``cache_implementation="static"``) hands every layer its whole buffer; the layer
    attends over the filled prefix, so each step's logits equal a full forward (and the dynamic cache's tokens)."""
    model = hf.convert(build(arch, seed=14), NARROW)
    prompt = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")
        full = model(input_ids=out.sequences).logits
        dynamic = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full[0, 29:-1], rtol=0, atol=5e-5)
    assert torch.equal(out.sequences, dynamic)


# --------------------------------------------------------------------------- the model's own sliding window
def test_mistral_sliding_window_is_replaced_in_converted_layers(tmp_path):
    """A Mistral with sliding_window=8: converted layers attend with superlinear attention over the whole row (the
    model's window is replaced: its masks and cache become full-length), dense layers and `dense(model)` keep the
    window, and the choice survives save/load."""
    original = build("mistral", seed=16, sliding_window=8)
    model = hf.convert(build("mistral", seed=16, sliding_window=8), NARROW)
    assert model.config.sliding_window is None and model.config.superlinear["sliding_windows"] == {"0": 8, "1": 8}
    ids = torch.randint(0, VOCAB, (1, 40))  # 40 > 8: the model's window matters
    with torch.no_grad():
        want = original(input_ids=ids).logits
        with hf.dense(model):  # the teacher of a retrofit is the original model, window included
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    for q, k, v, _, out in _capture_qkv(model, ids).values():  # no trace of the 8-key window in converted layers
        oracle = superlinear_attention(q, q, k, v, torch.arange(40), NARROW, backend="oracle")
        torch.testing.assert_close(out, oracle.transpose(1, 2), rtol=0, atol=1e-5)
    # window-only limit: with every key inside superlinear's window, the converted model is the dense model
    # WITHOUT its sliding window (superlinear's window replaced it)
    wide = hf.convert(build("mistral", seed=16, sliding_window=8), WIDE)
    no_window = build("mistral", seed=16, sliding_window=None)
    with torch.no_grad():
        torch.testing.assert_close(wide(input_ids=ids).logits, no_window(input_ids=ids).logits, rtol=0, atol=2e-5)
        assert (wide(input_ids=ids).logits - want).abs().max() > 1e-3
    # partly converted: layer 0 stays dense with its window, layer 1 is superlinear
    part = hf.convert(build("mistral", seed=16, sliding_window=8), NARROW, layers=[1])
    with torch.no_grad():
        h_part = part(input_ids=ids, output_hidden_states=True).hidden_states
        h_orig = original(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(h_part[1], h_orig[1], rtol=0, atol=1e-6)
        assert (h_part[2] - h_orig[2]).abs().max() > 1e-3
        # generate with the model's (now full-length) cache equals a full forward, past both windows
        out = part.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
        torch.testing.assert_close(torch.stack(out.logits, 1)[0], part(input_ids=out.sequences).logits[0, 39:-1],
                                   rtol=0, atol=5e-5)
        hf.save_pretrained(part, tmp_path / "m")
        loaded = hf.from_pretrained(tmp_path / "m").eval()
        assert loaded.config.sliding_window is None
        torch.testing.assert_close(loaded(input_ids=ids).logits, part(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_qwen2_sliding_layers_are_replaced_only_where_converted():
    """Qwen2-style per-layer windows (layer_types): a converted sliding layer gets the full causal mask and cache,
    a dense sliding layer keeps its window."""
    def qwen(seed=17):
        torch.manual_seed(seed)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=512, attn_implementation="sdpa", use_sliding_window=True,
            sliding_window=8, max_window_layers=1)).eval()

    original = qwen()
    assert original.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    model = hf.convert(qwen(), NARROW, layers=[0, 1])
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert model.config.superlinear["sliding_windows"] == {"1": 8, "2": 8}
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        with hf.dense(model):
            torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0,
                                       atol=1e-5)
    got = _capture_qkv(model, ids)
    q, k, v, _, out = got[1]
    oracle = superlinear_attention(q, q, k, v, torch.arange(40), NARROW, backend="oracle")
    torch.testing.assert_close(out, oracle.transpose(1, 2), rtol=0, atol=1e-5)
    q, k, v, _, out = got[2]  # dense, window of 8 keys
    pos = torch.arange(40)
    allowed = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 8)
    w = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
                      + torch.zeros(40, 40).masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(out, (w @ v.repeat_interleave(4, 1)).transpose(1, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache,seed,steps", [(None, 6, 12), ("static", 15, 10)])
def test_generate_left_padded_batch_equals_single_rows(cache, seed, steps):
    """A left-padded batch generates what its rows generate alone, with the model's default (dynamic) cache and
    with transformers' StaticCache."""
    model = hf.convert(build("llama", seed=seed), NARROW)
    a, b = torch.randint(1, VOCAB, (1, 30)), torch.randint(1, VOCAB, (1, 18))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [12]])).long()
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                              cache_implementation=cache)
        one_b = model.generate(b, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 30:], one_b[0, 18:])


# --------------------------------------------------------------------------- traces and views
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_has_the_models_layers_and_heads(arch):
    from superlinear_lab.trace import RoutingTrace

    model = hf.convert(build(arch, seed=7), NARROW)
    ids = torch.randint(0, VOCAB, (1, 64))
    with RoutingTrace.capture(model, profile_queries=[63]) as tr, torch.no_grad():
        model(input_ids=ids)
    n_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert tr.layers == list(range(n_layers)) and tr.length == 64
    assert tr.names == [f"layers.{i}.routing" for i in range(n_layers)]
    for name in tr.names:  # names map to the model's modules: model.<base>.layers.<i>.<attention>
        index = int(name.split(".")[1])
        assert attn_modules(model)[index] is model.base_model.layers[index].get_submodule(
            "attention" if arch == "neox" else "self_attn")
        rec = tr.layer(name)
        assert rec.heads == heads and rec.num_spans == NARROW.num_spans
        assert rec.queries.tolist() == list(range(64))
    assert torch.equal(tr.token_ids, ids[0])
    # The recorded routing is the kernel's search on the layer's own rotated q/k.
    got = _capture_qkv(model, ids)
    for i in range(n_layers):
        q, k = got[i][0], got[i][1]
        ref = superlinear_attention(q, q, k, got[i][2], torch.arange(64), NARROW, backend="oracle",
                                    return_routing=True)[1]
        assert torch.equal(tr.layer(i).qanchor, ref.qanchor[0])
        assert tr.layer(i).stripe_values.shape[:2] == (heads, 1)


def test_trace_protocol_follows_a_deep_copy():
    import copy

    model = hf.convert(build("llama", seed=11), NARROW)
    twin = copy.deepcopy(model)
    states = [s for _, s in twin.routing_layers()]
    assert states and all(a is not b for a, b in zip(states, [s for _, s in model.routing_layers()]))
    with twin.trace() as tr, torch.no_grad():
        twin(input_ids=torch.randint(0, VOCAB, (1, 20)))
    assert tr.layers == [0, 1] and tr.length == 20


def test_views_accept_hf_traces():
    from superlinear_lab.widgets import CoverageMap, RoutingExplorer

    model = hf.convert(build("qwen2", seed=8), NARROW)
    with model.trace() as tr, torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 80)))
    RoutingExplorer(tr)
    cov = CoverageMap(tr)
    assert cov is not None and tr.coverage(0).shape == (model.config.num_attention_heads,)


def test_attention_pattern_is_the_layers_attention():
    """P @ V equals the layer's attention output; rows sum to 1; keys outside span ∪ window get 0."""
    model = hf.convert(build("llama", seed=9), NARROW)
    ids = torch.randint(0, VOCAB, (1, 70))
    got = _capture_qkv(model, ids)
    pattern = hf.attention_pattern(model, ids, "layers.1.routing")
    assert pattern.shape == (4, 70, 70)
    q, k, v, _, out = got[1]
    torch.testing.assert_close(pattern @ v[0].repeat_interleave(2, 0), out[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 70), rtol=0, atol=1e-5)
    assert float(pattern.triu(1).abs().max()) == 0.0  # causal
    with model.trace() as tr, torch.no_grad():
        model(input_ids=ids)
    zero = pattern == 0
    for h in range(4):
        for query in (20, 50, 69):
            for key in range(query + 1):
                if not tr.reached(1, h, query, key):
                    assert zero[h, query, key]
    part = hf.attention_pattern(model, ids, 1, queries=[5, 69])
    torch.testing.assert_close(part, pattern[:, [5, 69]])
    views = hf.bertviz_attention(model, ids)
    assert len(views) == 2 and views[1].shape == (1, 4, 70, 70)
    torch.testing.assert_close(views[1][0], pattern)


# --------------------------------------------------------------------------- bad input
def test_unsupported_architectures_name_what_is_missing():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.convert(torch.nn.Linear(2, 2), NARROW)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        hf.convert(t5, NARROW)

    class NoInterface(transformers.LlamaForCausalLM):
        _supports_attention_backend = False

    model = NoInterface(build("llama").config)
    with pytest.raises(ValueError, match="_supports_attention_backend"):
        hf.convert(model, NARROW)
    with pytest.raises(ValueError, match="q_proj"):
        hf.convert(build("neox"), NARROW, search_query="proj")


def test_unsupported_layer_types_are_refused():
    model = build("llama")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        hf.convert(model, NARROW)
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small))  # soft-capped logits
    with pytest.raises(ValueError, match="attn_logit_softcapping=50"):
        hf.convert(gemma2, NARROW)
    gpt_oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(num_local_experts=2, num_experts_per_tok=1,
                                                                       **small))  # attention sinks
    with pytest.raises(ValueError, match=r"layers \[0, 1\] have attention sinks"):
        hf.convert(gpt_oss, NARROW)
    assert not hf.converted_layers(gemma2) and not hf.converted_layers(gpt_oss)


def test_bad_arguments_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match=r"layers=\[5\]"):
        hf.convert(model, NARROW, layers=[5])
    with pytest.raises(ValueError, match="no SpanConfig for layers"):
        hf.convert(model, {0: NARROW}, layers=[0, 1])
    with pytest.raises(TypeError, match="cfg"):
        hf.convert(model, {"sw_index": 3})
    with pytest.raises(ValueError, match="search_query"):
        hf.convert(model, NARROW, search_query="k")
    assert model.config._attn_implementation == "sdpa"  # nothing was converted by the refusals


def test_span_config_that_breaks_coverage_is_refused_unless_allowed(caplog):
    gappy = SpanConfig(sw_index=1, num_spans=1, backward_factor=0.5, span_power=0.5, search_power=0.25)
    report = coverage(gappy, 512)
    assert not report.ok
    model = build("llama")
    with pytest.raises(ValueError, match="breaks coverage.*allow_gaps=True"):
        hf.convert(model, gappy)
    assert not hf.converted_layers(model)
    with caplog.at_level("WARNING"):
        hf.convert(model, gappy, allow_gaps=True)
    assert "converting anyway" in caplog.text
    assert len(hf.converted_layers(model)) == 2


def test_nothing_is_downloaded(tmp_path):
    with pytest.raises((OSError, ValueError)):
        hf.from_pretrained(tmp_path / "no-such-model")
    with pytest.raises((OSError, ValueError)):
        hf.from_pretrained("some-org/some-model")  # a hub name: local files only, so it fails at once


def test_intervene_on_an_hf_model():
    """`superlinear_lab.intervene` works on a converted transformers model: ablating every span slot of a head leaves it
    window-only (its trace shows no valid slot), forcing an anchor puts it among the chosen ones; both undone on exit."""
    from superlinear_lab import intervene

    model = hf.HFModel(hf.convert(build("llama", seed=12), NARROW))  # (intervene reads `.model` of a Session)
    ids = torch.randint(0, VOCAB, (1, 60))
    with torch.no_grad():
        before = model(ids)
        with intervene(model, ablate={("layers.1", 2): [0, 1]}, force={("layers.0", 1): [3]}, queries=[59]):
            with model.trace() as tr:
                changed = model(ids)
        after = model(ids)
    assert (tr.layer(1).qanchor[2, 59] == -1).all() and (tr.layer(1).qanchor[3, 59] >= 0).any()
    assert 3 in tr.layer(0).qanchor[1, 59].tolist() and 3 not in tr.layer(0).qanchor[1, 58].tolist()
    assert (changed[0, 59] - before[0, 59]).abs().max() > 1e-6
    torch.testing.assert_close(changed[0, :59], before[0, :59], rtol=0, atol=1e-6)  # other queries untouched
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    raw = model.hf  # the converted transformers model itself is a routing model too
    with torch.no_grad(), intervene(raw, ablate={("layers.1", 2): [0, 1]}, queries=[59]):
        with raw.trace() as tr_raw:
            raw(input_ids=ids)
    assert (tr_raw.layer(1).qanchor[2, 59] == -1).all()


def test_trace_attention_pattern_from_a_capture():
    """`trace.attention_pattern(layer, queries)` (recorded with pattern_queries) equals `hf.attention_pattern`."""
    model = hf.convert(build("llama", seed=13), NARROW)
    ids = torch.randint(0, VOCAB, (1, 50))
    with model.trace(pattern_queries=[10, 49]) as tr, torch.no_grad():
        model(input_ids=ids[:, :30])  # two calls with the model's cache: patterns of both chunks
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=ids[:, :30], use_cache=True, cache=cache)
        model(input_ids=ids[:, 30:], use_cache=True, cache=cache)
    direct = hf.attention_pattern(model, ids, 1, queries=[10, 49])
    got = tr.attention_pattern("layers.1.routing", [10, 49])
    assert got.shape == (4, 2, 50)
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(tr.attention_pattern(0), hf.attention_pattern(model, ids, 0, queries=[10, 49]),
                               rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="no attention (weights|pattern)"):
        tr.attention_pattern(1, [11])
    with model.trace() as plain, torch.no_grad():
        model(input_ids=ids)
    with pytest.raises(KeyError, match="pattern_queries"):
        plain.attention_pattern(1, [10])
    assert not any(s.qkv_recorders for _, s in hf.converted_layers(model))  # recorders removed
