"""`/v1/snapshots`: list, read, edit metadata, delete, load into a session."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...ids import validate_id
from ..errors import BadRequest, api_errors
from ..schemas import SnapshotLoadBody, SnapshotPatchBody
from ..streaming import admitted
from .common import state

router = APIRouter(prefix="/v1/snapshots")


def snapshot_json(info) -> dict:
    return {"id": info.id, "object": "snapshot", "created_at": info.created_at, "title": info.title,
            "description": info.description, "tags": list(info.tags), "current_pos": info.current_pos,
            "max_seq_len": info.max_seq_len, "model_key": info.model_key, "fingerprint": info.fingerprint}


def _snapshot_id(snapshot_id: str) -> str:
    """`snapshot_id` if well-formed, else BadRequest (checked before the store is touched)."""
    try:
        return validate_id(snapshot_id, "snapshot_id")
    except ValueError as e:
        raise BadRequest(str(e)) from None


async def _store(fn, *args):
    with api_errors():
        return await run_in_threadpool(fn, *args)


@router.get("")
async def list_snapshots(request: Request):
    """The model's snapshots, oldest first; `problems` names the store entries that were skipped and why (paths
    relative to the store root)."""
    engine = state(request).engine
    infos, problems = await _store(engine.store.scan, engine.model)
    root = engine.store.root
    return {"object": "list", "data": [snapshot_json(i) for i in infos],
            "problems": [{"path": _relative(p.path, root), "message": p.message} for p in problems]}


def _relative(path, root) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@router.get("/{snapshot_id}")
async def get_snapshot(request: Request, snapshot_id: str):
    return snapshot_json(await _store(state(request).engine.store.info, _snapshot_id(snapshot_id)))


@router.patch("/{snapshot_id}")
async def patch_snapshot(request: Request, snapshot_id: str, body: SnapshotPatchBody):
    store = state(request).engine.store
    return snapshot_json(await _store(store.update, _snapshot_id(snapshot_id), body.title, body.tags,
                                      body.description))


@router.delete("/{snapshot_id}")
async def delete_snapshot(request: Request, snapshot_id: str):
    await _store(state(request).engine.store.delete, _snapshot_id(snapshot_id))
    return {"id": snapshot_id, "object": "snapshot", "deleted": True}


@router.post("/{snapshot_id}/load", status_code=201)
async def load_snapshot(request: Request, snapshot_id: str, body: SnapshotLoadBody | None = None):
    body = body or SnapshotLoadBody()
    st = state(request)
    keys = () if body.session_id is None else (body.session_id,)
    ss = await admitted(st.admission, st.engine.run(st.engine.load_snapshot, _snapshot_id(snapshot_id),
                                                    body.session_id, body.force, body.max_seq_len, keys=keys))
    return {"session_id": ss.id, "snapshot_id": snapshot_id, **ss.info()}
