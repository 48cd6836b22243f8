"""Request bodies. All are **strict**: a JSON value must already have the field's type (``"5"`` is not an int,
``true`` is not an int, ``"yes"`` is not a bool). The OpenAI bodies ignore fields they do not know (clients send
many optional ones); the server's own bodies refuse unknown fields.

Sampling defaults are OpenAI's: temperature 1.0, top_p 1.0. Temperature is 0 (greedy) or in
[`MIN_TEMPERATURE`, 2]: a smaller positive temperature would overflow the scaled logits.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_TEMPERATURE = 1e-6
MAX_TOP_LOGPROBS = 20


def _check_temperature(value: float) -> float:
    if value != 0 and not MIN_TEMPERATURE <= value <= 2:
        raise ValueError(f"temperature={value!r}: expected 0 (greedy) or a number in [{MIN_TEMPERATURE}, 2]")
    return value


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0 = greedy (D7)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # include_usage, flush_every_n_tokens, flush_every_ms
    seed: int | None = None
    n: int = 1

    _temperature = field_validator("temperature")(_check_temperature)


class ChatCompletionBody(_OpenAIBody):
    """`POST /v1/chat/completions`. `n` must be 1; tools are not supported; `session_id` appends `messages` as a
    delta to a stateful session. `logprobs` / `top_logprobs` report the model's log-probabilities of the reply."""

    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    session_id: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionBody(_OpenAIBody):
    """`POST /v1/completions`: `prompt` (one string, or a list of token ids, or a list holding one string) in, text
    out. `logprobs` (0-20) reports each token's log-probability and that many alternatives. `echo`, `suffix` and
    `best_of` > 1 are not supported."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class SessionCreateBody(_Body):
    session_id: str | None = None  # default sess_<uuid4 hex>
    max_seq_len: int | None = None  # default: the server's --session-max-seq-len


class RollbackBody(_Body):
    keep_messages: int


class ResizeBody(_Body):
    max_seq_len: int
    strategy: str = "auto"  # auto | gpu | disk; all grow the cache in place on this engine


class SaveBody(_Body):
    title: str = ""
    description: str = ""
    tags: list[str] = []


class SnapshotPatchBody(_Body):
    title: str | None = None
    description: str | None = None
    tags: list[str] | None = None


class SnapshotLoadBody(_Body):
    session_id: str | None = None  # default sess_<uuid4 hex>
    force: bool = False  # replace an existing session of that id
    max_seq_len: int | None = None  # a larger allocation than the snapshot's
