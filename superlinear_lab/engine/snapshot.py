"""`SnapshotStore`: sessions saved to disk and verified on the way back (docs/algorithm.md §6.4, Decision D2 in docs/design.md).

Layout: ``<root>/<model_key>/<fingerprint>/<snapshot_id>/`` holding

* ``manifest.json`` — schema_version 1, format, snapshot_id, created_at, compat {fingerprint, payload},
  session {max_seq_len, current_pos}, metadata {title, description, tags}, files {name: {sha256, bytes}};
* ``transcript.json`` — {"messages": [...]};
* ``cache.safetensors`` — ``key.<layer>`` / ``value.<layer>`` [1, H_KV, current_pos, D] (truncated to the
  cursor), ``conv_states`` / ``ssm_states`` (full), ``token_ids`` int64 [current_pos]; header metadata
  cache_format, kv_layers, max_seq_len, current_pos.

One manifest reader and one writer (`decode_manifest` / `encode_manifest`) apply the same checks and the same
size limit both ways, so `save` and `update` refuse (before writing anything) what a later read would refuse.

Writes go to ``.tmp-<id>-<uuid>/`` (held under an exclusive `flock` while written; created under a shared
store-wide lock, ``<root>/.lock``, so the cleanup never sees it unlocked), are fsynced, then renamed into place;
snapshots are never overwritten and a metadata update rewrites only the manifest, atomically. A delete renames
the snapshot to ``.trash-…`` (also locked) before removing it. Temporaries left by a killed process (no lock
held, older than `stale_after` seconds) are removed when the store is opened and on every listing.

Loads run, in order: id and manifest validation, the caller's `max_len_limit`, exact file set, bounded sizes and
sha256, fingerprint, safetensors header (names, dtypes, shapes against the manifest and the model), then
`Session.from_state` (finite values, token ids, transcript). Every failure is a `SnapshotError` that names the
problem; listings never fail because of one bad entry (it is skipped, logged and recorded in `store.problems`).
Symbolic links inside the store (folders or files) are never followed. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
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
from .session import Session, SessionState, _is_int, _is_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT = "superlinear-lab.session-snapshot"
CACHE_FORMAT = "hybrid_mamba_attention_static_v1"
DATA_FILES = ("cache.safetensors", "transcript.json")
MAX_MANIFEST_BYTES = 1 << 20
MAX_CACHE_HEADER_BYTES = 1 << 20  # the safetensors JSON header (a few hundred bytes per tensor)
TRANSCRIPT_BYTES_PER_TOKEN = 256  # bound on transcript.json: 1 MiB + this many bytes per context token
DEFAULT_MAX_LEN_LIMIT = 1 << 22  # largest allocation `load` makes unless the caller passes another limit
MAX_UNIX_TIME = 1 << 40  # created_at must be a finite number in [0, this]
MAX_FILE_BYTES = 1 << 50
TEMP_PREFIXES = (".tmp-", ".trash-")
STORE_LOCK = ".lock"  # <root>/.lock: see SnapshotStore._creation_guard
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class SnapshotError(Exception):
    """A snapshot could not be saved, found, verified or loaded; the message names the problem."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id (HTTP 404 in the server)."""


class SnapshotLimitError(SnapshotError):
    """Loading the snapshot would allocate more positions than the caller's `max_len_limit` (HTTP 413/422)."""


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


@dataclass(frozen=True)
class SnapshotProblem:
    """An entry of the store that a listing skipped, and why."""

    path: Path
    message: str


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


# ---------------------------------------------------------------------- files
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path, blocking: bool = True) -> int | None:
    """Open `path` (not following a symlink) and take an exclusive flock; returns the fd, or None if `blocking`
    is False and another process holds the lock. The lock goes when the fd is closed or the process dies."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of regular file `path` (a symlink, directory, FIFO, … is refused; so is a file over
    `max_bytes`). Raises SnapshotError naming `what`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SnapshotError(f"{what}: missing") from None
    except OSError as e:
        raise SnapshotError(f"{what}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{what}: not a regular file")
    if st.st_size > max_bytes:
        raise SnapshotError(f"{what}: {st.st_size} bytes, larger than {max_bytes}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(f"{what}: cannot open it ({e.strerror})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SnapshotError(f"{what}: not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SnapshotError(f"{what}: cannot read it ({e.strerror})") from None
    if len(data) > max_bytes:
        raise SnapshotError(f"{what}: larger than {max_bytes} bytes")
    return data


def _strict_json(data: bytes, what: str):
    """Parse JSON bytes: UTF-8, no NaN/Infinity constants; malformed, too deeply nested or overlong numbers give
    SnapshotError naming `what`."""
    def reject(token):
        raise ValueError(f"non-finite number {token}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=reject)
    except RecursionError:
        raise SnapshotError(f"{what}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{what}: not valid JSON ({str(e)[:200]})") from None


# ---------------------------------------------------------------------- the manifest (one reader, one writer)
def validate_manifest(m, sid: str) -> None:
    """Raise SnapshotError naming the first field of manifest `m` (for snapshot `sid`) that is invalid."""
    def bad(field, expected):
        raise SnapshotError(f"manifest.json: field {field} is invalid (expected {expected})")

    if not isinstance(m, dict):
        bad("<root>", "a JSON object")
    required = {"schema_version", "format", "snapshot_id", "created_at", "compat", "session", "metadata", "files"}
    missing, extra = required - set(m), set(m) - required
    if missing or extra:
        raise SnapshotError(f"manifest.json: missing fields {sorted(missing)}, unknown fields "
                            f"{sorted(map(str, extra))[:20]}")
    if not _is_int(m["schema_version"]) or m["schema_version"] != SCHEMA_VERSION:
        bad("schema_version", SCHEMA_VERSION)
    if m["format"] != FORMAT:
        bad("format", repr(FORMAT))
    if m["snapshot_id"] != sid:
        bad("snapshot_id", f"{sid!r}, the directory name")
    created = m["created_at"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not 0 <= created <= MAX_UNIX_TIME \
            or (isinstance(created, float) and not math.isfinite(created)):
        bad("created_at", f"a unix time in [0, {MAX_UNIX_TIME}]")
    compat = m["compat"]
    if not isinstance(compat, dict) or set(compat) != {"fingerprint", "payload"}:
        bad("compat", "{fingerprint, payload}")
    if not isinstance(compat["fingerprint"], str) or not _HEX64.fullmatch(compat["fingerprint"]):
        bad("compat.fingerprint", "64 lowercase hex digits")
    if not isinstance(compat["payload"], dict):
        bad("compat.payload", "an object")
    try:
        payload_sha = hashlib.sha256(canonical_json(compat["payload"]).encode()).hexdigest()
    except (ValueError, RecursionError, UnicodeEncodeError):
        bad("compat.payload", "a JSON object that can be hashed")
    if payload_sha != compat["fingerprint"]:
        bad("compat.payload", "the fingerprinted fields (their sha256 differs from compat.fingerprint)")
    session = m["session"]
    if not isinstance(session, dict) or set(session) != {"max_seq_len", "current_pos"}:
        bad("session", "{max_seq_len, current_pos}")
    if not _is_int(session["max_seq_len"]) or not 1 <= session["max_seq_len"] <= MAX_FILE_BYTES:
        bad("session.max_seq_len", f"an int in [1, {MAX_FILE_BYTES}]")
    if not _is_int(session["current_pos"]) or not 0 <= session["current_pos"] < session["max_seq_len"]:
        bad("session.current_pos", "an int in [0, max_seq_len)")
    meta = m["metadata"]
    if not isinstance(meta, dict) or set(meta) != {"title", "description", "tags"}:
        bad("metadata", "{title, description, tags}")
    if not _is_text(meta["title"]):
        bad("metadata.title", "a string (valid unicode)")
    if not _is_text(meta["description"]):
        bad("metadata.description", "a string (valid unicode)")
    if not isinstance(meta["tags"], list) or not all(_is_text(t) for t in meta["tags"]):
        bad("metadata.tags", "a list of strings (valid unicode)")
    files = m["files"]
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        bad("files", f"exactly {list(DATA_FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            bad(f"files.{name}", "{sha256, bytes}")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            bad(f"files.{name}.sha256", "64 lowercase hex digits")
        if not _is_int(entry["bytes"]) or not 0 <= entry["bytes"] <= MAX_FILE_BYTES:
            bad(f"files.{name}.bytes", f"an int in [0, {MAX_FILE_BYTES}]")


def encode_manifest(m: dict, sid: str) -> bytes:
    """The bytes written for manifest `m`: validated exactly as `decode_manifest` will read them, and refused
    (SnapshotError) if larger than MAX_MANIFEST_BYTES."""
    validate_manifest(m, sid)
    data = json.dumps(m, indent=2, allow_nan=False).encode("utf-8")
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"manifest.json: {len(data)} bytes, larger than {MAX_MANIFEST_BYTES} (shorten the "
                            "title, description or tags)")
    return data


def decode_manifest(data: bytes, sid: str) -> dict:
    """Parse and validate manifest bytes of snapshot `sid` (the same limit and checks as `encode_manifest`)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"manifest.json: {len(data)} bytes, larger than {MAX_MANIFEST_BYTES}")
    m = _strict_json(data, "manifest.json")
    validate_manifest(m, sid)
    return m


def _kv_layer_ids(model) -> list[int]:
    """Layer indices of the cache's K/V tensors, in cache order (their names in the file)."""
    if hasattr(model, "kv_layers"):
        return list(model.kv_layers())
    return [i for i, _ in model.routing_layers()]


class SnapshotStore:
    """Directory of verified session snapshots.

    Args:
        root: the store folder (default `default_root()`); created on the first save.
        stale_after: seconds after which an unlocked temporary (left by a killed save, update or delete) is
            removed. Temporaries of operations in progress are locked and never removed (the age only protects
            writers that take no locks, e.g. an older version of this code).

    Attributes:
        problems: `SnapshotProblem`s found by the last listing (entries it skipped), also logged as warnings.

    Example::

        store = SnapshotStore(tmp_dir)
        sid = store.save(session, title="after reading the docs", tags=["docs"])
        again = store.load(sid, model)     # a new Session; logits are None until the next append
    """

    def __init__(self, root=None, *, stale_after: float = 10.0):
        if isinstance(stale_after, bool) or not isinstance(stale_after, (int, float)) or not stale_after >= 0:
            raise ValueError(f"stale_after={stale_after!r}: expected a number of seconds >= 0")
        self.root = Path(root) if root is not None else default_root()
        self.stale_after = float(stale_after)
        self.problems: list[SnapshotProblem] = []
        self.heal()

    # ------------------------------------------------------------------ locating
    def _subdirs(self, folder: Path, problems: list[SnapshotProblem] | None):
        """(name, path) of the well-named plain sub-folders of `folder`; symlinks and other entries are skipped
        (and reported in `problems`). Temporaries are not listed."""
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            if not (folder == self.root and e.errno == errno.ENOENT):  # no root yet: an empty store
                self._report(problems, folder, f"cannot list it ({e.strerror})")
            return
        for name in names:
            if not is_valid_id(name):
                continue
            path = folder / name
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                self._report(problems, path, f"cannot stat it ({e.strerror})")
                continue
            if stat.S_ISLNK(mode):
                self._report(problems, path, "is not a plain directory: a symbolic link (never followed in the store)")
            elif not stat.S_ISDIR(mode):
                self._report(problems, path, "is not a plain directory")
            else:
                yield name, path

    @staticmethod
    def _report(problems, path: Path, message: str) -> None:
        if problems is not None:
            problems.append(SnapshotProblem(path, message))

    def _dirs(self, problems: list[SnapshotProblem] | None = None):
        """(model_key, fingerprint, snapshot dir) for every well-named plain snapshot directory."""
        for mk, mk_path in self._subdirs(self.root, problems):
            for fp, fp_path in self._subdirs(mk_path, problems):
                for _, path in self._subdirs(fp_path, problems):
                    yield mk, fp, path

    def _locate(self, snapshot_id) -> Path:
        sid = check_id(snapshot_id)
        problems: list[SnapshotProblem] = []
        found = [d for _, _, d in self._dirs(problems) if d.name == sid]
        if not found:
            for p in problems:
                if p.path.name == sid:
                    raise SnapshotError(f"snapshot {sid}: {p.path} {p.message}")
            raise SnapshotNotFoundError(f"snapshot {sid}: not found under {self.root}")
        if len(found) > 1:
            raise SnapshotError(f"snapshot {sid}: ambiguous, found in {[str(d) for d in found]}")
        return found[0]

    def _read_manifest(self, path: Path) -> dict:
        return decode_manifest(_read_regular(path / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json"), path.name)

    def _plain_parent(self, path: Path) -> None:
        """SnapshotError unless `path` (a model-key or fingerprint folder) is a real directory, not a symlink."""
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            raise SnapshotError(f"{path}: not a plain directory (symbolic links are never followed in the store)")

    # ------------------------------------------------------------------ self-healing
    @contextlib.contextmanager
    def _creation_guard(self, exclusive: bool):
        """Store-wide flock on ``<root>/.lock``. A writer holds it shared from creating its temporary until it
        holds the temporary's own lock; `heal` holds it exclusively while it tries a temporary's lock. So heal
        never meets a temporary whose live creator has not locked it yet (the lock rule alone is exact)."""
        fd = os.open(self.root / STORE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def heal(self) -> list[Path]:
        """Remove temporaries left by killed saves, updates and deletes: entries named ``.tmp-*`` / ``.trash-*``
        in the fingerprint folders that no process holds locked and that are older than `stale_after` seconds.
        Returns the removed paths (each logged). Never raises."""
        removed = []
        for _, mk_path in self._subdirs(self.root, None):
            for _, fp_path in self._subdirs(mk_path, None):
                try:
                    names = os.listdir(fp_path)
                except OSError:
                    continue
                for name in names:
                    if name.startswith(TEMP_PREFIXES) and self._remove_stale(fp_path / name):
                        removed.append(fp_path / name)
        return removed

    def _remove_stale(self, path: Path) -> bool:
        try:
            st = os.lstat(path)
            if time.time() - st.st_mtime < self.stale_after:
                return False
            if stat.S_ISLNK(st.st_mode):
                os.unlink(path)  # a link is removed, never followed
                log.info("snapshot store: removed stale link %s", path)
                return True
            with self._creation_guard(exclusive=True):
                fd = _lock(path, blocking=False)
            if fd is None:
                return False  # an operation in progress holds it
            try:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("snapshot store: could not remove stale temporary %s (%s)", path, e)
            return False
        log.info("snapshot store: removed stale temporary %s (left by an interrupted operation)", path)
        return True

    # ------------------------------------------------------------------ save
    def save(self, session: Session, title: str = "", tags=(), description: str = "") -> str:
        """Write `session` (K/V up to the cursor, states, token ids, transcript) atomically; returns the new id.
        Everything is checked (the manifest built and size-checked) before anything is written."""
        if isinstance(tags, (str, bytes)):
            raise SnapshotError(f"tags={tags!r}: expected a list of strings")
        try:
            tags = list(tags)
        except TypeError:
            raise SnapshotError(f"tags={tags!r}: expected a list of strings") from None
        model = session.model
        fingerprint, payload = model_fingerprint(model)
        sid = uuid.uuid4().hex
        state = session.export_state()
        blobs = {"cache.safetensors": self._cache_bytes(state, model),
                 "transcript.json": self._transcript_bytes(state)}
        manifest = {
            "schema_version": SCHEMA_VERSION, "format": FORMAT, "snapshot_id": sid, "created_at": time.time(),
            "compat": {"fingerprint": fingerprint, "payload": payload},
            "session": {"max_seq_len": state.max_len, "current_pos": state.cursor},
            "metadata": {"title": title, "description": description, "tags": tags},
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                      for name, data in blobs.items()},
        }
        blobs["manifest.json"] = encode_manifest(manifest, sid)  # refuses before anything is written
        parent = self.root / model_key(model.model_id) / fingerprint
        tmp = parent / f".tmp-{sid}-{uuid.uuid4().hex}"
        fd = None
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._plain_parent(parent.parent)
            self._plain_parent(parent)
            with self._creation_guard(exclusive=False):
                tmp.mkdir()
                fd = _lock(tmp)
        except OSError as e:
            if fd is None and os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            raise SnapshotError(f"snapshot store {self.root}: cannot create {tmp} ({e})") from None
        try:
            for name, data in blobs.items():  # the manifest last
                _fsync_write(tmp / name, data)
            _fsync_dir(tmp)
            os.rename(tmp, parent / sid)
            _fsync_dir(parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise SnapshotError(f"snapshot {sid}: could not be written ({type(e).__name__}: {e}); nothing was "
                                    "kept") from None
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return sid

    @staticmethod
    def _cache_bytes(state: SessionState, model) -> bytes:
        layers = _kv_layer_ids(model)
        tensors = {}
        for layer, k, v in zip(layers, state.keys, state.values):
            tensors[f"key.{layer}"] = k.contiguous()
            tensors[f"value.{layer}"] = v.contiguous()
        tensors["conv_states"] = state.conv_states.contiguous()
        tensors["ssm_states"] = state.ssm_states.contiguous()
        tensors["token_ids"] = state.token_ids.contiguous()
        meta = {"cache_format": CACHE_FORMAT, "kv_layers": json.dumps(layers),
                "max_seq_len": str(state.max_len), "current_pos": str(state.cursor)}
        return save_safetensors(tensors, metadata=meta)

    @staticmethod
    def _transcript_bytes(state: SessionState) -> bytes:
        try:
            return json.dumps({"messages": list(state.transcript)}, ensure_ascii=False,
                              allow_nan=False).encode("utf-8")
        except (ValueError, TypeError, UnicodeEncodeError) as e:
            raise SnapshotError(f"transcript: cannot be written as JSON ({e})") from None

    # ------------------------------------------------------------------ load
    def load(self, snapshot_id: str, model, max_len: int | None = None, *, max_len_limit: int | None = None,
             **session_kwargs) -> Session:
        """Verify snapshot `snapshot_id` and return a new `Session` on `model` holding it.

        `max_len` may enlarge the allocation (never shrink it below the saved max_seq_len). `max_len_limit`
        (default DEFAULT_MAX_LEN_LIMIT) bounds the allocation: a server passes its --max-seq-len-limit. The
        session's logits are None: append before generating (docs/algorithm.md §6.4). Raises SnapshotError
        (SnapshotCompatibilityError for a fingerprint mismatch) before anything is allocated.
        """
        limit = DEFAULT_MAX_LEN_LIMIT if max_len_limit is None else max_len_limit
        if not _is_int(limit) or limit < 1:
            raise ValueError(f"max_len_limit={max_len_limit!r}: expected an int >= 1")
        path = self._locate(snapshot_id)
        try:
            manifest = self._read_manifest(path)
            saved_len = manifest["session"]["max_seq_len"]
            if max_len is not None and (not _is_int(max_len) or max_len < saved_len):
                raise SnapshotError(f"max_len={max_len!r}: must be an int >= the snapshot's max_seq_len {saved_len}")
            wanted = max_len or saved_len
            if wanted > limit:
                raise SnapshotLimitError(f"snapshot {snapshot_id}: an allocation of {wanted} positions exceeds "
                                         f"max_len_limit={limit} (the saved max_seq_len is {saved_len}; pass a "
                                         "larger max_len_limit to allow it)")
            blobs = self._verified_files(path, manifest, model)
        except OSError as e:  # unreadable entries, permissions, ...
            raise SnapshotError(f"snapshot {snapshot_id}: cannot read it ({type(e).__name__}: {e})") from None
        fingerprint, _ = model_fingerprint(model)
        if manifest["compat"]["fingerprint"] != fingerprint:
            raise SnapshotCompatibilityError(
                f"snapshot {snapshot_id}: model fingerprint {manifest['compat']['fingerprint'][:12]}… does not match "
                f"this model's {fingerprint[:12]}… (model_id {model.model_id!r})")
        transcript = self._parse_transcript(blobs["transcript.json"])
        tensors = self._parse_cache(blobs["cache.safetensors"], manifest, model)
        layers = _kv_layer_ids(model)
        state = SessionState(max_len=saved_len, token_ids=tensors["token_ids"],
                             keys=tuple(tensors[f"key.{i}"] for i in layers),
                             values=tuple(tensors[f"value.{i}"] for i in layers),
                             conv_states=tensors["conv_states"], ssm_states=tensors["ssm_states"],
                             transcript=tuple(transcript))
        try:
            Session.check_state(model, state, wanted)
        except ValueError as e:
            where = "transcript.json" if str(e).startswith("state.transcript") else "cache.safetensors"
            raise SnapshotError(f"{where}: {e}") from None
        try:
            return Session.from_state(model, state, wanted, **session_kwargs)
        except (RuntimeError, MemoryError) as e:  # the allocation itself failed
            raise SnapshotError(f"snapshot {snapshot_id}: cannot allocate a session of {wanted} positions "
                                f"({type(e).__name__}: {str(e)[:200]})") from None

    def _size_bounds(self, manifest: dict, model) -> dict[str, int]:
        """Largest size each data file of this snapshot can legitimately have (checked before reading it)."""
        cur = manifest["session"]["current_pos"]
        layout = Session.state_layout(model, cur)
        data = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                   for group in layout.values() for dtype, shape in (group if isinstance(group, list) else [group]))
        return {"cache.safetensors": 8 + MAX_CACHE_HEADER_BYTES + data,
                "transcript.json": MAX_MANIFEST_BYTES + TRANSCRIPT_BYTES_PER_TOKEN * cur}

    def _verified_files(self, path: Path, manifest: dict, model) -> dict[str, bytes]:
        present = set(os.listdir(path))
        expected = set(DATA_FILES) | {"manifest.json"}
        if expected - present:
            raise SnapshotError(f"missing file(s): {sorted(expected - present)}")
        if present - expected:
            raise SnapshotError(f"unlisted file(s): {sorted(present - expected)[:20]}")
        bounds = self._size_bounds(manifest, model)
        blobs = {}
        for name in DATA_FILES:
            entry = manifest["files"][name]
            if entry["bytes"] > bounds[name]:
                raise SnapshotError(f"{name}: manifest says {entry['bytes']} bytes, more than a snapshot of "
                                    f"{manifest['session']['current_pos']} tokens can hold ({bounds[name]})")
            data = _read_regular(path / name, bounds[name], name)
            if len(data) != entry["bytes"]:
                raise SnapshotError(f"{name}: size {len(data)} bytes, manifest says {entry['bytes']}")
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise SnapshotError(f"{name}: sha256 mismatch (file is corrupted or was modified)")
            blobs[name] = data
        return blobs

    @staticmethod
    def _parse_transcript(data: bytes) -> list:
        """The messages list (their fields are checked with the rest of the state)."""
        doc = _strict_json(data, "transcript.json")
        if not isinstance(doc, dict) or set(doc) != {"messages"} or not isinstance(doc["messages"], list):
            raise SnapshotError('transcript.json: expected {"messages": [...]}')
        for i, msg in enumerate(doc["messages"]):
            if not isinstance(msg, dict) or not _is_text(msg.get("role")) or not _is_text(msg.get("content")):
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
        if n > MAX_CACHE_HEADER_BYTES:
            raise SnapshotError(f"{what}: header length {n} is larger than {MAX_CACHE_HEADER_BYTES}")
        header = _strict_json(data[8:8 + n], f"{what} header")
        if not isinstance(header, dict):
            raise SnapshotError(f"{what}: header is not an object")
        meta = header.pop("__metadata__", None)
        cur = manifest["session"]["current_pos"]
        layers = _kv_layer_ids(model)
        expected_meta = {"cache_format": CACHE_FORMAT, "kv_layers": json.dumps(layers),
                         "max_seq_len": str(manifest["session"]["max_seq_len"]), "current_pos": str(cur)}
        if meta != expected_meta:
            raise SnapshotError(f"{what}: header metadata {str(meta)[:300]} does not match the manifest/model "
                                f"{expected_meta!r}")
        layout = Session.state_layout(model, cur)
        expected = {"conv_states": layout["conv_states"], "ssm_states": layout["ssm_states"],
                    "token_ids": layout["token_ids"]}
        for kind, prefix in (("keys", "key"), ("values", "value")):
            for layer, spec in zip(layers, layout[kind]):
                expected[f"{prefix}.{layer}"] = spec
        if set(header) != set(expected):
            raise SnapshotError(f"{what}: tensors {sorted(map(str, header))[:40]} differ from the expected "
                                f"{sorted(expected)}")
        for name, (want_dtype, want_shape) in expected.items():
            entry = header[name]
            if not isinstance(entry, dict) or _ST_DTYPES.get(entry.get("dtype")) != want_dtype \
                    or entry.get("shape") != list(want_shape):
                raise SnapshotError(f"{what}: tensor {name} is {str(entry)[:200]}, expected dtype {want_dtype} shape "
                                    f"{list(want_shape)}")
        try:
            return load_safetensors(data)
        except Exception as e:  # malformed offsets etc.: safetensors raises its own error types
            raise SnapshotError(f"{what}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None

    # ------------------------------------------------------------------ listing and metadata
    def _info(self, mk: str, fp: str, path: Path, m: dict) -> SnapshotInfo:
        meta = m["metadata"]
        return SnapshotInfo(m["snapshot_id"], mk, m["compat"]["fingerprint"], float(m["created_at"]), meta["title"],
                            meta["description"], tuple(meta["tags"]), m["session"]["current_pos"],
                            m["session"]["max_seq_len"], path)

    def scan(self, model=None) -> tuple[list[SnapshotInfo], list[SnapshotProblem]]:
        """(snapshots with a valid manifest, oldest first; the entries skipped and why). With `model`, only
        snapshots matching its fingerprint. Removes stale temporaries first. Never raises for a bad entry."""
        self.heal()
        want = model_fingerprint(model)[0] if model is not None else None
        out: list[SnapshotInfo] = []
        problems: list[SnapshotProblem] = []
        for mk, fp, path in self._dirs(problems):
            try:
                m = self._read_manifest(path)
                info = self._info(mk, fp, path, m)
            except SnapshotError as e:
                problems.append(SnapshotProblem(path, str(e)))
                continue
            except Exception as e:  # never fatal for the listing; logged with its traceback below
                log.exception("snapshot store: unexpected error reading %s", path)
                problems.append(SnapshotProblem(path, f"unexpected error ({type(e).__name__}: {str(e)[:200]})"))
                continue
            if want is None or info.fingerprint == want:
                out.append(info)
        for p in problems:
            log.warning("snapshot store: skipped %s: %s", p.path, p.message)
        return sorted(out, key=lambda i: (i.created_at, i.id)), problems

    def list(self, model=None) -> list[SnapshotInfo]:
        """Snapshots with a valid manifest, oldest first; with `model`, only those matching its fingerprint.
        Bad entries are skipped, logged and recorded in `self.problems` (loading one names its problem)."""
        infos, self.problems = self.scan(model)
        return infos

    def info(self, snapshot_id: str) -> SnapshotInfo:
        """Manifest summary of one snapshot (the manifest is validated, the files are not)."""
        path = self._locate(snapshot_id)
        try:
            return self._info(path.parent.parent.name, path.parent.name, path, self._read_manifest(path))
        except OSError as e:
            raise SnapshotError(f"snapshot {snapshot_id}: cannot read it ({type(e).__name__}: {e})") from None

    def update(self, snapshot_id: str, title: str | None = None, tags=None,
               description: str | None = None) -> SnapshotInfo:
        """Edit the metadata; only the manifest is rewritten (temp file + atomic replace). The new manifest is
        checked with the same rules and size limit as reading it, before anything is written."""
        path = self._locate(snapshot_id)
        m = self._read_manifest(path)
        if title is not None:
            m["metadata"]["title"] = title
        if description is not None:
            m["metadata"]["description"] = description
        if tags is not None:
            if isinstance(tags, (str, bytes)):
                raise SnapshotError(f"tags={tags!r}: expected a list of strings")
            try:
                m["metadata"]["tags"] = list(tags)
            except TypeError:
                raise SnapshotError(f"tags={tags!r}: expected a list of strings") from None
        data = encode_manifest(m, path.name)
        tmp = path.parent / f".tmp-manifest-{path.name}-{uuid.uuid4().hex}"
        fd = None
        try:
            with self._creation_guard(exclusive=False):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, path / "manifest.json")
            _fsync_dir(path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise SnapshotError(f"snapshot {snapshot_id}: the manifest could not be rewritten "
                                    f"({type(e).__name__}: {e}); the snapshot is unchanged") from None
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return self._info(path.parent.parent.name, path.parent.name, path, m)

    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot (renamed out of sight first, so a crash never leaves half a snapshot listed; a
        killed delete's leftovers are removed by `heal`)."""
        path = self._locate(snapshot_id)
        trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex}"
        try:
            fd = _lock(path)
        except OSError as e:
            raise SnapshotError(f"snapshot {snapshot_id}: cannot delete it ({e})") from None
        try:
            os.rename(path, trash)
            shutil.rmtree(trash)
        except OSError as e:
            raise SnapshotError(f"snapshot {snapshot_id}: cannot delete it ({type(e).__name__}: {e})") from None
        finally:
            os.close(fd)
