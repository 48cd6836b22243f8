"""`superlinear-lab serve --model PATH` for a transformers model with its own tokenizer (issue 14): a byte-level BPE
trained here on the repository's docs, wrapped in a transformers fast tokenizer with a ChatML-style chat template,
saved beside a tiny random Qwen2 (nothing downloaded). Chat and completions — plain, streamed, with logprobs,
sessions — are checked with the official `openai` client against greedy full forwards of the same converted model
(the server runs with HF_HUB_OFFLINE=1, so any download attempt would fail it);
a tokenizer without a chat template, a user template, a template that cannot extend a session and stop strings
inside a multi-character token are checked in process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
tokenizers = pytest.importorskip("tokenizers")

import superlinear_lab.hf as hf  # noqa: E402
from superlinear_lab.hf.open import load  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # any attempt to reach the hub raises


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    for name, value in OFFLINE.items():
        mp.setenv(name, value)
    yield
    mp.undo()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QUESTION = ("Which decision keeps the server on the loopback address, and what does a sliding window of "
            "sixteen keys leave to the spans? Answer in one line.")


def build_tokenizer(template: str | None = TEMPLATE):
    """A byte-level BPE (320 ids) trained on docs/design.md, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    if template is not None:
        fast.chat_template = template
    return fast


def build_model_dir(path: Path, template: str | None = TEMPLATE, seed: int = 11) -> Path:
    torch.manual_seed(seed)
    tok = build_tokenizer(template)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      eos_token_id=tok.eos_token_id, initializer_range=0.2,
                                      tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("qwen2-bpe") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    """The directory opened as `serve` opens it (converted with SpanConfig.default()), for full forwards."""
    return load(model_dir)


def greedy(reference, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities by full forwards of the whole row (no cache), stopping before the
    end-of-sequence token."""
    eos = reference.tokenizer.tok.eos_token_id
    out, logprobs = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = reference.hf(input_ids=torch.tensor([prompt + out])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            if token == eos:
                break
            out.append(token)
            logprobs.append(float(lp[token]))
    return out, logprobs


def chat_ids(tok, messages) -> list[int]:
    """transformers' own tokenization of a conversation with the generation prompt."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------- the real `serve` process
@pytest.fixture(scope="module")
def oai(model_dir, tmp_path_factory):
    openai = pytest.importorskip("openai")
    from server_process import ServerProcess, server_env

    tmp = tmp_path_factory.mktemp("hf-serve")
    server = ServerProcess(tmp, "--model", str(model_dir), "--session-max-seq-len", "512",
                           "--http-max-completion-tokens", "64", env=server_env(tmp / "snapshots", **OFFLINE))
    server.args.remove("--random-init")  # the model directory's own weights
    with server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_serve_completions_with_the_models_tokenizer(oai, reference):
    tok = reference.tokenizer.tok
    served = oai.models.list().data[0].id
    assert served == "hf/model"
    prompt = "The server binds the loopback address by default, and a token is needed for any other address."
    ids = tok.encode(prompt)
    assert len(ids) > 16  # longer than the window: spans are searched
    want, want_lp = greedy(reference, ids, 12)
    r = oai.completions.create(model=served, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want) > 0
    assert r.choices[0].text == tok.decode(want) and len(lp.tokens) == len(want)
    assert lp.token_logprobs == pytest.approx(want_lp, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs)  # two different tokens never share a text
    assert [max(t.values()) for t in lp.top_logprobs] == pytest.approx(want_lp, abs=1e-4)
    # where each token's text starts (a token holding the first bytes of a character starts at that character)
    assert lp.text_offset == [len(tok.decode(want[:i]).rstrip("\ufffd")) for i in range(len(want))]
    chunks = list(oai.completions.create(model=served, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         logprobs=2))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(want_lp, abs=1e-4)
    assert oai.completions.create(model=served, prompt=ids, max_tokens=12, temperature=0).choices[0].text == \
        r.choices[0].text  # token ids as they are


def test_serve_chat_with_the_models_chat_template(oai, reference):
    tok = reference.tokenizer.tok
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    prompt = chat_ids(tok, messages)
    want, want_lp = greedy(reference, prompt, 10)
    r = oai.chat.completions.create(model="hf/model", messages=messages, max_tokens=10, temperature=0,
                                    logprobs=True, top_logprobs=3)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want) > 0
    assert r.choices[0].message.content == tok.decode(want)
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(want_lp, abs=1e-4)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    stream = list(oai.chat.completions.create(model="hf/model", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(want_lp, abs=1e-4)


def test_serve_chat_session_appends_only_the_new_turn(oai, reference):
    """Two turns in a session: the second sends only the new message; its reply is the greedy continuation of
    the first turn's prompt, the first reply's tokens, the template's closing text and the new message."""
    import httpx

    tok = reference.tokenizer.tok
    base = str(oai.base_url).rstrip("/")
    sid = httpx.post(f"{base}/sessions", json={"max_seq_len": 512}).json()["session_id"]
    first = [{"role": "user", "content": QUESTION}]
    r1 = oai.chat.completions.create(model="hf/model", messages=first, max_tokens=8, temperature=0,
                                     extra_body={"session_id": sid})
    prompt1 = chat_ids(tok, first)
    reply1, _ = greedy(reference, prompt1, 8)
    assert r1.choices[0].message.content == tok.decode(reply1) and r1.usage.prompt_tokens == len(prompt1)
    second = "And the spans?"
    r2 = oai.chat.completions.create(model="hf/model", messages=[{"role": "user", "content": second}],
                                     max_tokens=8, temperature=0, extra_body={"session_id": sid})
    turn2 = tok.encode(f"<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n")
    context = prompt1 + reply1 + tok.encode("<|im_end|>\n") + turn2
    reply2, _ = greedy(reference, context, 8)
    assert r2.usage.prompt_tokens == len(turn2) and r2.choices[0].message.content == tok.decode(reply2)
    history = httpx.get(f"{base}/sessions/{sid}/history").json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant", "user", "assistant"]
    closing = len(tok.encode("<|im_end|>\n"))
    assert history["current_pos"] == sum(m["tokens"] for m in history["messages"]) == \
        len(context) + len(reply2) + closing


def test_serve_chat_template_file_for_a_tokenizer_without_one(tmp_path):
    """The documented fallback, end to end: `serve --model DIR --chat-template FILE` for a tokenizer without a
    template formats chats with the file's template."""
    openai = pytest.importorskip("openai")
    from server_process import ServerProcess, server_env

    model_dir = build_model_dir(tmp_path / "plain", template=None)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}### assistant: {% endif %}")
    server = ServerProcess(tmp_path, "--model", str(model_dir), "--chat-template", str(template),
                           "--session-max-seq-len", "256", env=server_env(tmp_path / "snapshots", **OFFLINE))
    server.args.remove("--random-init")
    reference = load(model_dir)
    tok = reference.tokenizer.tok
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="hf/plain", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=4, temperature=0)
    prompt = tok.encode(f"### user: {QUESTION}\n") + tok.encode("### assistant: ")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].message.content == tok.decode(greedy(reference, prompt, 4)[0])


# ---------------------------------------------------------------------- in process: templates and stop strings
def engine_app(model, tmp_path, **kwargs):
    from fastapi.testclient import TestClient

    from superlinear_lab.engine.snapshot import SnapshotStore
    from superlinear_lab.server.app import ServerSettings, create_app
    from superlinear_lab.server.engine import ChatEngine

    engine = ChatEngine(model, SnapshotStore(tmp_path / "snaps"), session_max_seq_len=512, **kwargs)
    return engine, TestClient(create_app(engine, ServerSettings(served_model="m")))


def test_tokenizer_without_chat_template_refuses_chat_clearly(tmp_path):
    model = load(build_model_dir(tmp_path / "plain", template=None))
    engine, client = engine_app(model, tmp_path)
    with client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"] \
            and "--chat-template" in r.json()["error"]["message"]
        assert client.get("/v1/server").json()["chat_format"] == {"kind": "none",
                                                                   "error": r.json()["error"]["message"]}
        ok = client.post("/v1/completions", json={"model": "m", "prompt": "The server", "max_tokens": 4,
                                                  "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0
    engine.close()
    # the fallback the user picks: a template of their own (serve --chat-template FILE)
    engine, client = engine_app(model, tmp_path, chat_template=TEMPLATE)
    with client:
        r = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 5, "temperature": 0,
                                                      "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 200 and client.get("/v1/server").json()["chat_format"]["kind"] == "template"
        prompt = model.tokenizer.tok.encode(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        assert r.json()["choices"][0]["message"]["content"] == model.tokenizer.tok.decode(greedy(model, prompt,
                                                                                                5)[0])
    engine.close()


def test_long_streamed_reply_equals_its_whole_decoding(reference, tmp_path):
    """A 100-token reply (the engine decodes a reply's text incrementally, from a settled point on): the streamed
    text, the whole text and the greedy tokens' decoding agree, with multi-byte characters split across tokens."""
    tok = reference.tokenizer.tok
    prompt = "Décisions: the server binds the loopback address — “D8” — and tokens are checked. "
    ids = tok.encode(prompt)
    want = greedy(reference, ids, 100)[0]
    engine, client = engine_app(reference, tmp_path)
    body = {"model": "m", "prompt": prompt, "max_tokens": 100, "temperature": 0}
    with client:
        full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    engine.close()
    assert len(want) > 64 and full == tok.decode(want)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full


def test_model_without_tokenizer_serves_token_ids(reference, tmp_path):
    """A transformers model with no tokenizer (ids only): completions of token ids work, text and chat are 400s
    that say why."""
    bare = hf.HFModel(reference.hf, model_id="m")
    engine, client = engine_app(bare, tmp_path)
    prompt = reference.tokenizer.encode("The server binds the loopback address by default.")
    with client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        want = greedy(reference, prompt, 5)[0]
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " ".join(f"<{t}>" for t in want)
        text = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 2})
        assert text.status_code == 400 and "no tokenizer" in text.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 400 and "no tokenizer" in chat.json()["error"]["message"]
    engine.close()


def test_a_template_that_cannot_extend_a_session_is_refused(reference):
    from superlinear_lab.server.chat import ChatFormatError, NoChat, TemplateChat, chat_rules

    # puts the newest message first: an earlier conversation is never a prefix of a longer one
    reverse = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ChatFormatError, match="extension"):
        chat_rules(reference.tokenizer, reverse)
    own = reference.tokenizer.tok.chat_template
    try:
        reference.tokenizer.tok.chat_template = reverse
        rules = chat_rules(reference.tokenizer)  # its own template: the server starts, chat says why not
        assert isinstance(rules, NoChat) and "extension" in rules.chat_error
    finally:
        reference.tokenizer.tok.chat_template = own
    assert isinstance(chat_rules(reference.tokenizer), TemplateChat)
    with pytest.raises(ChatFormatError, match="cannot render"):
        chat_rules(reference.tokenizer, "{{ raise_exception('no chat here') }}")


def test_template_transcript_check_and_turn_tokens(reference):
    from superlinear_lab.server.chat import TemplateChat

    tok = reference.tokenizer.tok
    rules = TemplateChat(reference.tokenizer)
    turn = rules.turn([], [("system", "s"), ("user", "question")])
    want = tok.encode("<|im_start|>system\ns<|im_end|>\n") + tok.encode("<|im_start|>user\nquestion<|im_end|>\n")
    prompt = tok.encode("<|im_start|>assistant\n")
    assert turn.ids == want + prompt and turn.prompt == len(prompt) and sum(turn.counts) == len(want)
    assert turn.close == tok.encode("<|im_end|>\n") and tok.eos_token_id in rules.stop_ids
    reply = tok.encode("answer")
    ids = turn.ids + reply + turn.close
    transcript = [{"role": "system", "content": "s", "tokens": turn.counts[0]},
                  {"role": "user", "content": "question", "tokens": turn.counts[1]},
                  {"role": "assistant", "content": "answer", "tokens": len(prompt) + len(reply) + len(turn.close)}]
    assert rules.transcript_problem(transcript, ids) is None
    assert "covers" in rules.transcript_problem(transcript[:2], ids)
    swapped = [dict(m) for m in transcript]
    swapped[1]["content"] = "questioN"
    assert "does not match" in rules.transcript_problem(swapped, ids)
    assert "does not match" in rules.transcript_problem(transcript, ids[:-1] + [tok.eos_token_id - 1])
    assert "transcript is empty" in rules.transcript_problem([], ids)


def test_stop_string_inside_a_token_trims_reply_and_cache(reference, tmp_path):
    """A stop string that starts in the middle of a multi-character token: the reply is the text before it, the
    session's cache holds exactly that text's tokens, and the next turn continues from it."""
    tok = reference.tokenizer.tok
    engine, client = engine_app(reference, tmp_path)
    with client:
        messages = [{"role": "user", "content": QUESTION}]
        full = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 16,
                                                         "temperature": 0}).json()
        text = full["choices"][0]["message"]["content"]
        reply = greedy(reference, chat_ids(tok, messages), 16)[0]
        pieces = [tok.decode([t]) for t in reply]

        def cut_at(i: int) -> int | None:
            """Where a 3-character stop string starting at token i's second character would cut the reply, if
            that string first occurs there (a random model's reply can repeat characters: '    ')."""
            if i == 0 or len(pieces[i]) < 2:  # a token of two or more characters, not the first
                return None
            cut = len(tok.decode(reply[:i])) + 1
            return cut if len(text[cut:cut + 3]) == 3 and text.find(text[cut:cut + 3]) == cut else None

        k = next(i for i in range(len(reply)) if cut_at(i) is not None)
        cut = cut_at(k)
        stop = text[cut:cut + 3]
        sid = client.post("/v1/sessions", json={}).json()["id"]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 16,
                                                      "temperature": 0, "stop": [stop], "session_id": sid,
                                                      "logprobs": True})
        got = r.json()["choices"][0]
        assert got["message"]["content"] == text[:cut] and got["finish_reason"] == "stop"
        assert len(got["logprobs"]["content"]) == k  # logprobs of the generated tokens kept whole
        ids = engine.sessions[sid].session.ids.tolist()
        prompt = chat_ids(tok, messages)
        assert tok.decode(ids[len(prompt):]) == text[:cut] + "<|im_end|>\n"
        assert engine.chat.transcript_problem(list(engine.sessions[sid].session.transcript), ids) is None
        more = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 3, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "go on"}],
                                                         "session_id": sid})
        assert more.status_code == 200
    engine.close()


def test_snapshot_of_a_template_chat_session_loads_and_continues(reference, tmp_path):
    """A chat session saved as a snapshot and loaded as a new session passes the template's transcript check and
    its next turn equals the same turn on the original session; a snapshot whose transcript does not match its
    cache is refused with 409 when chat continues."""
    engine, client = engine_app(reference, tmp_path)
    with client:
        sid = client.post("/v1/sessions", json={}).json()["session_id"]
        turn = {"model": "m", "max_tokens": 4, "temperature": 0}
        assert client.post("/v1/chat/completions", json={**turn, "session_id": sid, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]}).status_code == 200
        snap = client.post(f"/v1/sessions/{sid}/save", json={"title": "t"}).json()["id"]
        copy = client.post(f"/v1/snapshots/{snap}/load", json={}).json()["session_id"]
        nxt = {**turn, "messages": [{"role": "user", "content": "And the spans?"}]}
        a = client.post("/v1/chat/completions", json={**nxt, "session_id": sid}).json()
        b = client.post("/v1/chat/completions", json={**nxt, "session_id": copy}).json()
        assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]
        # a library-made session (tokens appended without this chat format) saved and loaded: chat refuses it
        from superlinear_lab.engine import Session

        plain = Session(reference, 64, progress=False)
        plain.append(reference.tokenizer.encode("not a chat"), role="user")
        bad = engine.store.save(plain, title="plain")
        other = client.post(f"/v1/snapshots/{bad}/load", json={}).json()["session_id"]
        r = client.post("/v1/chat/completions", json={**nxt, "session_id": other})
        assert r.status_code == 409 and "transcript" in r.json()["error"]["message"]
    engine.close()


def test_end_of_sequence_ends_the_reply_and_the_turn_is_closed(reference, tmp_path):
    """The model ending its turn: with the lm_head rows of <|im_end|> and the third greedy token swapped, greedy
    decoding meets <|im_end|> at step 3. The reply is the two tokens before it (finish "stop"); in a session the
    cache holds them, then the template's closing text. The generation config's extra eos ids stop too."""
    import copy

    tok = reference.tokenizer.tok
    eos = tok.eos_token_id
    messages = [{"role": "user", "content": QUESTION}]
    prompt = chat_ids(tok, messages)
    reply = greedy(reference, prompt, 3)[0]
    assert len(reply) == 3 and eos not in reply
    model = copy.deepcopy(reference)
    with torch.no_grad():
        head = model.hf.lm_head.weight
        head[[eos, reply[2]]] = head[[reply[2], eos]].clone()
    engine, client = engine_app(model, tmp_path)
    with client:
        sid = client.post("/v1/sessions", json={}).json()["session_id"]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 8,
                                                      "temperature": 0, "session_id": sid}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 2
        assert r["choices"][0]["message"]["content"] == tok.decode(reply[:2])
        assert engine.sessions[sid].session.ids.tolist() == prompt + reply[:2] + tok.encode("<|im_end|>\n")
    engine.close()
    other = copy.deepcopy(reference)
    other.hf.generation_config.eos_token_id = [eos, reply[1]]
    wrapped = hf.HFModel(other.hf, tok, model_id="m")
    assert wrapped.tokenizer.eos_ids == sorted({eos, reply[1]})
    engine, client = engine_app(wrapped, tmp_path)
    with client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 8,
                                                      "temperature": 0}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    engine.close()


def test_report_and_debugger_with_the_models_tokenizer(reference, tmp_path):
    """The routing report and the MissedSpanDebugger find evidence through the model's own BPE tokenizer."""
    from superlinear_lab.report import routing_report
    from superlinear_lab.widgets import MissedSpanDebugger

    text = "The pass key is 48213. " + "Filler about the loopback address and its token. " * 6 + "The pass key?"
    page = routing_report(text, tmp_path / "r.html", reference, evidence=["48213"]).read_text()
    assert "layers.1.routing" in page and "48213" in page and "hf/model" in page
    ids = reference.tokenizer.encode(text)
    with reference.trace(profile_queries=[len(ids) - 1]) as tr, torch.no_grad():
        reference(torch.tensor([ids]))
    assert tr.length == len(ids) < len(text)  # BPE tokens, not bytes
    assert "of 8 missed" in MissedSpanDebugger(tr, ["48213"], tokenizer=reference.tokenizer).summary()


def test_serve_refuses_an_unreadable_chat_template_file(tmp_path, capsys):
    from superlinear_lab.server.run import ServeOptions, main_serve

    options = ServeOptions(model=str(tmp_path), chat_template=str(tmp_path / "missing.jinja"), warmup=False)
    assert main_serve(options) == 2
    assert "--chat-template" in capsys.readouterr().err
