"""`POST /v1/completions`: a prompt in, its continuation out (stateless; no chat format).

The prompt is the text's tokens after the tokenizer's document start (<|bos|> for the byte tokenizer; what a
transformers tokenizer adds with ``add_special_tokens=True``), or the given token ids as they are. Generation ends at
`max_tokens` (default 16), a stop string, or a stop token (`chat.ChatRules.stop_ids`: any special token of the byte
tokenizer, end-of-sequence for a transformers model).
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..engine import GenerationRequest
from ..errors import BadRequest
from ..schemas import CompletionBody
from ..streaming import CompletionFormat, check_stream_options, generate
from .common import check_common, state

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    st = state(request)
    settings, engine = st.settings, st.engine
    stop = check_common(settings, body)
    if body.echo:
        raise BadRequest("echo=true is not supported by this server")
    if body.suffix:
        raise BadRequest("suffix is not supported by this server")
    if body.best_of not in (None, 1):
        raise BadRequest(f"best_of={body.best_of}: only 1 is supported")
    prompt = body.prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and prompt:
        if len(prompt) != 1:
            raise BadRequest(f"prompt: a list of {len(prompt)} strings; only one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            ids = engine.chat.prompt_ids(prompt)
        except ValueError as e:  # a model without a tokenizer
            raise BadRequest(f"prompt: {e}") from None
    else:
        ids = list(prompt)
        vocab = engine.model.cfg.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"prompt[{bad}]={ids[bad]}: expected a token id in [0, {vocab})")
    if not ids:
        raise BadRequest("prompt: expected a non-empty string or list of token ids")
    opts = check_stream_options(body.stream_options)
    req = GenerationRequest(None, min(body.max_tokens or 16, settings.max_completion_tokens), body.temperature,
                            body.top_p, stop, body.seed, None, prompt_ids=ids, logprobs=body.logprobs is not None,
                            top_logprobs=body.logprobs or 0)
    fmt = CompletionFormat(settings.served_model, req, engine.chat)
    return await generate(request, engine, st.admission, req, fmt, body.stream, opts)
