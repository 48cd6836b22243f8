"""`GET /health`, `GET /v1/server` (load and limits), `GET /v1/models`."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ... import __version__
from .common import state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": state(request).settings.served_model}


@router.get("/v1/server")
async def server_stats(request: Request):
    st = state(request)
    engine, settings = st.engine, st.settings
    return {"model": settings.served_model, "version": __version__, "in_flight": st.admission.active,
            "max_concurrency": settings.max_concurrency, "rejected": st.admission.rejected,
            "max_completion_tokens": settings.max_completion_tokens, "sessions": len(engine.sessions),
            "memory_bytes": engine.memory_in_use(), "memory_budget_bytes": engine.memory_budget,
            "chat": dict(engine.stats), "generations": engine.progress(),
            "chat_format": {"kind": engine.chat.kind, "error": engine.chat.chat_error}}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": state(request).settings.served_model, "object": "model", "created": 0,
                                        "owned_by": "superlinear-lab"}]}
