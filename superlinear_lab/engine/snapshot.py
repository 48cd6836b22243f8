"""`SnapshotStore`: sessions saved to disk and verified on the way back (SPEC §6.4, Decision D2).

Layout: ``<root>/<model_key>/<fingerprint>/<snapshot_id>/`` holding

* ``manifest.json`` — schema_version 1, format, snapshot_id, created_at, compat {fingerprint, payload},
  session {max_seq_len, current_pos}, metadata {title, description, tags}, files {name: {sha256, bytes}};
* ``transcript.json`` — {"messages": [...]};
* ``cache.safetensors`` — ``key.<layer>`` / ``value.<layer>`` [1, H_KV, current_pos, D] (truncated to the
  cursor), ``conv_states`` / ``ssm_states`` (full), ``token_ids`` int64 [current_pos]; header metadata
  cache_format, kv_layers, max_seq_len, current_pos.

Writes go to ``.tmp-<id>-<uuid>/``, are fsynced, then renamed into place; snapshots are never overwritten and a
metadata update rewrites only the manifest, atomically. Loads run, in order: id and manifest validation, exact
file set, sizes and sha256, fingerprint, safetensors header (names, dtypes, shapes against the manifest and the
model), then build a new session. Every failure is a `SnapshotError` that names the problem. Nothing is ever
unpickled: the cache is parsed by hand (header) and by `safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..ids import is_valid_id, validate_id
from ..model.io import canonical_json, model_fingerprint
from .session import Session

SCHEMA_VERSION = 1
FORMAT = "superlinear-lab.session-snapshot"
CACHE_FORMAT = "hybrid_mamba_attention_static_v1"
DATA_FILES = ("cache.safetensors", "transcript.json")
MAX_MANIFEST_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class SnapshotError(Exception):
    """A snapshot could not be saved, found, verified or loaded; the message names the problem."""


class SnapshotCompatibilityError(SnapshotError):
    """The snapshot was made by a different model (fingerprint mismatch; HTTP 409 in the server)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """What `list()` shows about one snapshot (read from its manifest, not verified)."""

    id: str
    model_key: str
    fingerprint: str
    created_at: float
    title: str
    description: str
    tags: tuple[str, ...]
    current_pos: int
    max_seq_len: int
    path: Path


def default_root() -> Path:
    """$SUPERLINEAR_LAB_SNAPSHOT_DIR, else $XDG_CACHE_HOME/superlinear-lab/snapshots, else ~/.cache/…"""
    if os.environ.get("SUPERLINEAR_LAB_SNAPSHOT_DIR"):
        return Path(os.environ["SUPERLINEAR_LAB_SNAPSHOT_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "superlinear-lab" / "snapshots"


def model_key(model_id: str) -> str:
    """model_id mapped onto the id alphabet, so it can be a directory name."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(model_id))[:128]
    return key if key and key[0].isalnum() else ("m" + key)[:128]


def check_id(snapshot_id) -> str:
    """Return `snapshot_id` if it follows the id rule (`superlinear_lab.ids.validate_id`), else raise
    SnapshotError with that rule's message."""
    try:
        return validate_id(snapshot_id, "snapshot_id")
    except ValueError as e:
        raise SnapshotError(str(e)) from None


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _strict_json(data: bytes, what: str):
    def reject(token):
        raise ValueError(f"non-finite number {token}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=reject)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{what}: not valid JSON ({e})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SnapshotStore:
    """Directory of verified session snapshots.

    Example::

        store = SnapshotStore(tmp_dir)
        sid = store.save(session, title="after reading the docs", tags=["docs"])
        again = store.load(sid, model)     # a new Session; logits are None until the next append
    """

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_root()

    # ------------------------------------------------------------------ locating
    def _dirs(self):
        """(model_key, fingerprint, snapshot dir) for every well-named snapshot directory."""
        if not self.root.is_dir():
            return
        for mk in sorted(os.listdir(self.root)):
            if not is_valid_id(mk) or not (self.root / mk).is_dir():
                continue
            for fp in sorted(os.listdir(self.root / mk)):
                if not is_valid_id(fp) or not (self.root / mk / fp).is_dir():
                    continue
                for sid in sorted(os.listdir(self.root / mk / fp)):
                    if is_valid_id(sid):
                        yield mk, fp, self.root / mk / fp / sid

    def _locate(self, snapshot_id) -> Path:
        sid = check_id(snapshot_id)
        found = [d for _, _, d in self._dirs() if d.name == sid]
        if not found:
            raise SnapshotError(f"snapshot {sid}: not found under {self.root}")
        if len(found) > 1:
            raise SnapshotError(f"snapshot {sid}: ambiguous, found in {[str(d) for d in found]}")
        path = found[0]
        if path.is_symlink() or not path.is_dir():
            raise SnapshotError(f"snapshot {sid}: {path} is not a plain directory")
        return path

    # ------------------------------------------------------------------ manifest
    def _read_manifest(self, path: Path) -> dict:
        mpath = path / "manifest.json"
        try:
            st = os.lstat(mpath)
        except FileNotFoundError:
            raise SnapshotError("manifest.json: missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError("manifest.json: not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise SnapshotError(f"manifest.json: {st.st_size} bytes, larger than {MAX_MANIFEST_BYTES}")
        manifest = _strict_json(mpath.read_bytes(), "manifest.json")
        self._validate_manifest(manifest, path.name)
        return manifest

    @staticmethod
    def _validate_manifest(m, sid: str) -> None:
        def bad(field, expected):
            raise SnapshotError(f"manifest.json: field {field} is invalid (expected {expected})")

        if not isinstance(m, dict):
            bad("<root>", "a JSON object")
        required = {"schema_version", "format", "snapshot_id", "created_at", "compat", "session", "metadata", "files"}
        missing, extra = required - set(m), set(m) - required
        if missing or extra:
            raise SnapshotError(f"manifest.json: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
        if not _is_int(m["schema_version"]) or m["schema_version"] != SCHEMA_VERSION:
            bad("schema_version", SCHEMA_VERSION)
        if m["format"] != FORMAT:
            bad("format", repr(FORMAT))
        if m["snapshot_id"] != sid:
            bad("snapshot_id", f"{sid!r}, the directory name")
        if isinstance(m["created_at"], bool) or not isinstance(m["created_at"], (int, float)):
            bad("created_at", "a unix time")
        compat = m["compat"]
        if not isinstance(compat, dict) or set(compat) != {"fingerprint", "payload"}:
            bad("compat", "{fingerprint, payload}")
        if not isinstance(compat["fingerprint"], str) or not _HEX64.match(compat["fingerprint"]):
            bad("compat.fingerprint", "64 lowercase hex digits")
        if not isinstance(compat["payload"], dict):
            bad("compat.payload", "an object")
        if hashlib.sha256(canonical_json(compat["payload"]).encode()).hexdigest() != compat["fingerprint"]:
            bad("compat.payload", "the fingerprinted fields (their sha256 differs from compat.fingerprint)")
        session = m["session"]
        if not isinstance(session, dict) or set(session) != {"max_seq_len", "current_pos"}:
            bad("session", "{max_seq_len, current_pos}")
        if not _is_int(session["max_seq_len"]) or session["max_seq_len"] < 1:
            bad("session.max_seq_len", "an int >= 1")
        if not _is_int(session["current_pos"]) or not 0 <= session["current_pos"] < session["max_seq_len"]:
            bad("session.current_pos", "an int in [0, max_seq_len)")
        meta = m["metadata"]
        if not isinstance(meta, dict) or set(meta) != {"title", "description", "tags"}:
            bad("metadata", "{title, description, tags}")
        if not isinstance(meta["title"], str) or not isinstance(meta["description"], str):
            bad("metadata.title/description", "strings")
        if not isinstance(meta["tags"], list) or not all(isinstance(t, str) for t in meta["tags"]):
            bad("metadata.tags", "a list of strings")
        files = m["files"]
        if not isinstance(files, dict) or set(files) != set(DATA_FILES):
            bad("files", f"exactly {list(DATA_FILES)}")
        for name, entry in files.items():
            if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
                bad(f"files.{name}", "{sha256, bytes}")
            if not isinstance(entry["sha256"], str) or not _HEX64.match(entry["sha256"]):
                bad(f"files.{name}.sha256", "64 lowercase hex digits")
            if not _is_int(entry["bytes"]) or entry["bytes"] < 0:
                bad(f"files.{name}.bytes", "an int >= 0")

    def _info(self, mk: str, fp: str, path: Path, m: dict) -> SnapshotInfo:
        meta = m["metadata"]
        return SnapshotInfo(m["snapshot_id"], mk, m["compat"]["fingerprint"], float(m["created_at"]), meta["title"],
                            meta["description"], tuple(meta["tags"]), m["session"]["current_pos"],
                            m["session"]["max_seq_len"], path)

    # ------------------------------------------------------------------ public API
    def save(self, session: Session, title: str = "", tags=(), description: str = "") -> str:
        """Write `session` (K/V up to the cursor, states, token ids, transcript) atomically; returns the new id."""
        if not isinstance(title, str) or not isinstance(description, str):
            raise SnapshotError("title and description must be strings")
        tags = list(tags)
        if not all(isinstance(t, str) for t in tags):
            raise SnapshotError(f"tags={tags!r}: expected strings")
        model = session.model
        fingerprint, payload = model_fingerprint(model)
        sid = uuid.uuid4().hex
        parent = self.root / model_key(model.model_id) / fingerprint
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{sid}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            blobs = {"cache.safetensors": self._cache_bytes(session),
                     "transcript.json": json.dumps({"messages": session.transcript}, ensure_ascii=False,
                                                   allow_nan=False).encode("utf-8")}
            for name, data in blobs.items():
                _fsync_write(tmp / name, data)
            manifest = {
                "schema_version": SCHEMA_VERSION, "format": FORMAT, "snapshot_id": sid, "created_at": time.time(),
                "compat": {"fingerprint": fingerprint, "payload": payload},
                "session": {"max_seq_len": session.max_len, "current_pos": session.cursor},
                "metadata": {"title": title, "description": description, "tags": tags},
                "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in blobs.items()},
            }
            _fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
            _fsync_dir(tmp)
            os.rename(tmp, parent / sid)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return sid

    @staticmethod
    def _cache_bytes(session: Session) -> bytes:
        cache, cur = session.cache, session.cursor
        tensors = {}
        for j, (layer, _) in enumerate(session.model.routing_layers()):
            tensors[f"key.{layer}"] = cache.keys[j][:, :, :cur].contiguous().cpu()
            tensors[f"value.{layer}"] = cache.values[j][:, :, :cur].contiguous().cpu()
        tensors["conv_states"] = cache.conv_states.contiguous().cpu()
        tensors["ssm_states"] = cache.ssm_states.contiguous().cpu()
        tensors["token_ids"] = session.ids.contiguous()
        meta = {"cache_format": CACHE_FORMAT, "kv_layers": json.dumps([i for i, _ in session.model.routing_layers()]),
                "max_seq_len": str(session.max_len), "current_pos": str(cur)}
        return save_safetensors(tensors, metadata=meta)

    def load(self, snapshot_id: str, model, max_len: int | None = None, **session_kwargs) -> Session:
        """Verify snapshot `snapshot_id` and return a new `Session` on `model` holding it.

        `max_len` may enlarge the allocation (never shrink it below the saved max_seq_len). The session's logits
        are None: append before generating (SPEC §6.4). Raises SnapshotError (SnapshotCompatibilityError for a
        fingerprint mismatch) before anything is allocated.
        """
        path = self._locate(snapshot_id)
        try:
            manifest = self._read_manifest(path)
            blobs = self._verified_files(path, manifest)
        except OSError as e:  # unreadable entries, permissions, a file where a directory should be, ...
            raise SnapshotError(f"snapshot {snapshot_id}: cannot read it ({type(e).__name__}: {e})") from None
        fingerprint, _ = model_fingerprint(model)
        if manifest["compat"]["fingerprint"] != fingerprint:
            raise SnapshotCompatibilityError(
                f"snapshot {snapshot_id}: model fingerprint {manifest['compat']['fingerprint'][:12]}… does not match "
                f"this model's {fingerprint[:12]}… (model_id {model.model_id!r})")
        transcript = self._parse_transcript(blobs["transcript.json"])
        tensors = self._parse_cache(blobs["cache.safetensors"], manifest, model)
        saved_len = manifest["session"]["max_seq_len"]
        if max_len is not None and (not _is_int(max_len) or max_len < saved_len):
            raise SnapshotError(f"max_len={max_len!r}: must be an int >= the snapshot's max_seq_len {saved_len}")
        cur = manifest["session"]["current_pos"]
        session = Session(model, max_len or saved_len, **session_kwargs)
        cache = session.cache
        for j, (layer, _) in enumerate(model.routing_layers()):
            cache.keys[j][:, :, :cur] = tensors[f"key.{layer}"].to(cache.device)
            cache.values[j][:, :, :cur] = tensors[f"value.{layer}"].to(cache.device)
        cache.conv_states.copy_(tensors["conv_states"])
        cache.ssm_states.copy_(tensors["ssm_states"])
        session._token_ids[:cur] = tensors["token_ids"]
        session._cursor = session._high = cur
        session.transcript = transcript
        return session

    def _verified_files(self, path: Path, manifest: dict) -> dict[str, bytes]:
        present = set(os.listdir(path))
        expected = set(DATA_FILES) | {"manifest.json"}
        if expected - present:
            raise SnapshotError(f"missing file(s): {sorted(expected - present)}")
        if present - expected:
            raise SnapshotError(f"unlisted file(s): {sorted(present - expected)}")
        blobs = {}
        for name in DATA_FILES:
            entry = manifest["files"][name]
            st = os.lstat(path / name)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{name}: not a regular file")
            if st.st_size != entry["bytes"]:
                raise SnapshotError(f"{name}: size {st.st_size} bytes, manifest says {entry['bytes']}")
            data = (path / name).read_bytes()
            if len(data) != entry["bytes"]:
                raise SnapshotError(f"{name}: size changed while reading")
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise SnapshotError(f"{name}: sha256 mismatch (file is corrupted or was modified)")
            blobs[name] = data
        return blobs

    @staticmethod
    def _parse_transcript(data: bytes) -> list[dict]:
        doc = _strict_json(data, "transcript.json")
        if not isinstance(doc, dict) or set(doc) != {"messages"} or not isinstance(doc["messages"], list):
            raise SnapshotError('transcript.json: expected {"messages": [...]}')
        for i, msg in enumerate(doc["messages"]):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                raise SnapshotError(f"transcript.json: message {i} needs string 'role' and 'content'")
        return doc["messages"]

    @staticmethod
    def _parse_cache(data: bytes, manifest: dict, model) -> dict[str, torch.Tensor]:
        """Check the safetensors header against the manifest and the model, then decode the tensors."""
        what = "cache.safetensors"
        if len(data) < 8:
            raise SnapshotError(f"{what}: truncated (no header)")
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise SnapshotError(f"{what}: header length {n} exceeds the file")
        header = _strict_json(data[8:8 + n], f"{what} header")
        if not isinstance(header, dict):
            raise SnapshotError(f"{what}: header is not an object")
        meta = header.pop("__metadata__", None)
        cfg = model.cfg
        cur = manifest["session"]["current_pos"]
        layers = [i for i, _ in model.routing_layers()]
        expected_meta = {"cache_format": CACHE_FORMAT, "kv_layers": json.dumps(layers),
                         "max_seq_len": str(manifest["session"]["max_seq_len"]), "current_pos": str(cur)}
        if meta != expected_meta:
            raise SnapshotError(f"{what}: header metadata {meta!r} does not match the manifest/model {expected_meta!r}")
        dtype = model.dtype
        kv = (1, cfg.n_kv_heads, cur, cfg.head_dim)
        expected = {f"{kind}.{layer}": (dtype, kv) for layer in layers for kind in ("key", "value")}
        expected["conv_states"] = (dtype, (len(cfg.mamba_layers), 1, cfg.conv_dim, cfg.conv_kernel - 1))
        expected["ssm_states"] = (torch.float32, (len(cfg.mamba_layers), 1, cfg.ssm_heads, cfg.ssm_head_dim,
                                                  cfg.ssm_state))
        expected["token_ids"] = (torch.int64, (cur,))
        if set(header) != set(expected):
            raise SnapshotError(f"{what}: tensors {sorted(header)} differ from the expected {sorted(expected)}")
        for name, (want_dtype, want_shape) in expected.items():
            entry = header[name]
            if not isinstance(entry, dict) or _ST_DTYPES.get(entry.get("dtype")) != want_dtype \
                    or entry.get("shape") != list(want_shape):
                raise SnapshotError(f"{what}: tensor {name} is {entry!r}, expected dtype {want_dtype} shape "
                                    f"{list(want_shape)}")
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # malformed offsets etc.: safetensors raises its own error types
            raise SnapshotError(f"{what}: unreadable ({type(e).__name__}: {e})") from None
        ids = tensors["token_ids"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise SnapshotError(f"{what}: token_ids outside [0, {cfg.vocab_size})")
        return tensors

    def list(self, model=None) -> list[SnapshotInfo]:
        """Snapshots with a readable manifest, oldest first; with `model`, only those matching its fingerprint.
        Broken snapshots are skipped here (loading one names the problem)."""
        want = model_fingerprint(model)[0] if model is not None else None
        out = []
        for mk, fp, path in self._dirs():
            try:
                m = self._read_manifest(path)
            except (SnapshotError, OSError):
                continue
            if want is None or m["compat"]["fingerprint"] == want:
                out.append(self._info(mk, fp, path, m))
        return sorted(out, key=lambda i: (i.created_at, i.id))

    def info(self, snapshot_id: str) -> SnapshotInfo:
        """Manifest summary of one snapshot (the manifest is validated, the files are not)."""
        path = self._locate(snapshot_id)
        return self._info(path.parent.parent.name, path.parent.name, path, self._read_manifest(path))

    def update(self, snapshot_id: str, title: str | None = None, tags=None, description: str | None = None) -> SnapshotInfo:
        """Edit the metadata; only the manifest is rewritten (temp file + atomic replace)."""
        path = self._locate(snapshot_id)
        m = self._read_manifest(path)
        if title is not None:
            m["metadata"]["title"] = title
        if description is not None:
            m["metadata"]["description"] = description
        if tags is not None:
            m["metadata"]["tags"] = list(tags)
        self._validate_manifest(m, path.name)
        tmp = path.parent / f".tmp-manifest-{path.name}-{uuid.uuid4().hex}"
        _fsync_write(tmp, json.dumps(m, indent=2).encode("utf-8"))
        os.replace(tmp, path / "manifest.json")
        _fsync_dir(path)
        return self._info(path.parent.parent.name, path.parent.name, path, m)

    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot (renamed out of sight first, so a crash never leaves half a snapshot listed)."""
        path = self._locate(snapshot_id)
        trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash)
