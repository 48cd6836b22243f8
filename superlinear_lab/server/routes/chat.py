"""`POST /v1/chat/completions`: a stateless chat completion, or a turn appended to a session (`session_id`)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..chat import ChatFormatError, message_text
from ..engine import GenerationRequest, check_session_id
from ..errors import BadRequest
from ..schemas import ChatCompletionBody
from ..streaming import ChatFormat, check_stream_options, generate
from .common import check_common, state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request):
    st = state(request)
    settings, engine = st.settings, st.engine
    stop = check_common(settings, body)
    if body.tools:
        raise BadRequest("tools are not supported by this server")
    if body.top_logprobs and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true")
    if engine.chat.chat_error:
        raise BadRequest(engine.chat.chat_error)
    try:
        messages = [message_text(m, i) for i, m in enumerate(body.messages)]
    except ChatFormatError as e:
        raise BadRequest(str(e)) from None
    if body.session_id is None and not messages:
        raise BadRequest("messages: at least one message is needed without a session_id")
    opts = check_stream_options(body.stream_options)
    wanted = body.max_completion_tokens or body.max_tokens or settings.max_completion_tokens
    session = None if body.session_id is None else engine.get(check_session_id(body.session_id))
    req = GenerationRequest(messages, min(wanted, settings.max_completion_tokens), body.temperature, body.top_p,
                            stop, body.seed, session, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    fmt = ChatFormat(settings.served_model, req, engine.chat)
    return await generate(request, engine, st.admission, req, fmt, body.stream, opts)
