"""`/v1/sessions`: create, list, read, delete, history, rollback, resize, save (to a snapshot)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..engine import check_session_id
from ..errors import BadRequest
from ..schemas import ResizeBody, RollbackBody, SaveBody, SessionCreateBody
from ..streaming import admitted
from .common import state
from .snapshots import snapshot_json

router = APIRouter(prefix="/v1/sessions")


def _session(request: Request, session_id: str):
    return state(request).engine.get(check_session_id(session_id))


@router.post("", status_code=201)
async def create_session(request: Request, body: SessionCreateBody | None = None):
    body = body or SessionCreateBody()
    st = state(request)
    keys = () if body.session_id is None else (body.session_id,)
    ss = await admitted(st.admission, st.engine.run(st.engine.create_session, body.session_id, body.max_seq_len,
                                                    keys=keys))
    return {"session_id": ss.id, **ss.info()}


@router.get("")
async def list_sessions(request: Request):
    return {"object": "list", "data": [ss.info() for ss in list(state(request).engine.sessions.values())]}


@router.get("/{session_id}")
async def get_session(request: Request, session_id: str):
    return _session(request, session_id).info()


@router.delete("/{session_id}")
async def delete_session(request: Request, session_id: str):
    state(request).engine.delete_session(check_session_id(session_id))
    return {"id": session_id, "object": "session", "deleted": True}


@router.get("/{session_id}/history")
async def history(request: Request, session_id: str, tail: int | None = None):
    view = _session(request, session_id).view
    messages = view["transcript"]
    if tail is not None:
        if tail < 0:
            raise BadRequest(f"tail={tail}: expected an int >= 0")
        messages = messages[len(messages) - tail:] if tail else []
    return {"session_id": session_id, "current_pos": view["current_pos"], "messages": messages}


@router.post("/{session_id}/rollback")
async def rollback(request: Request, session_id: str, body: RollbackBody):
    st, ss = state(request), _session(request, session_id)
    ss = await admitted(st.admission, st.engine.run(st.engine.rollback, ss, body.keep_messages, keys=(ss.id,)))
    return ss.info()


@router.post("/{session_id}/resize")
async def resize(request: Request, session_id: str, body: ResizeBody):
    if body.strategy not in ("auto", "gpu", "disk"):
        raise BadRequest(f"strategy={body.strategy!r}: expected auto, gpu or disk")
    st, ss = state(request), _session(request, session_id)
    ss = await admitted(st.admission, st.engine.run(st.engine.resize, ss, body.max_seq_len, keys=(ss.id,)))
    return ss.info()


@router.post("/{session_id}/resize/next_pow2")
async def resize_next_pow2(request: Request, session_id: str):
    st, ss = state(request), _session(request, session_id)
    target = 1 << ss.view["max_seq_len"].bit_length()  # strictly above, also for a power of two
    ss = await admitted(st.admission, st.engine.run(st.engine.resize, ss, target, keys=(ss.id,)))
    return ss.info()


@router.post("/{session_id}/save", status_code=201)
async def save(request: Request, session_id: str, body: SaveBody | None = None):
    body = body or SaveBody()
    st, ss = state(request), _session(request, session_id)
    sid = await admitted(st.admission, st.engine.run(st.engine.save_snapshot, ss, body.title, body.description,
                                                     body.tags, keys=(ss.id,)))
    return snapshot_json(await run_in_threadpool(st.engine.store.info, sid))
