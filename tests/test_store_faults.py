"""Generated fault suite for `SnapshotStore` (issue 18): corruptions are generated (seeded) over every manifest
field, every cache tensor, ids, special files and symlinks, and `kill -9` lands at every step of save / update /
delete. For every case:

* every failure is a clear error: `SnapshotError` (or `ValueError` for a bad argument) — never another exception
  (a crash) and never a hang (a watchdog fails any call that takes more than a few seconds);
* listings always work: `list()` never raises; a bad entry is skipped and reported in `store.problems`;
* no data loss: the untouched snapshots stay listed and load bit-exactly; a successful `update` never makes a
  snapshot unlistable; a bad entry can still be deleted; after a kill nothing half-written is visible and stale
  temporaries are removed.

Figures (cases by category and outcome) go to the file named by $STORE_FAULTS_FIGURES, when set.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import sys
import time

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from superlinear_lab.engine import Session, SnapshotError, SnapshotStore
from superlinear_lab.engine import snapshot as snapshot_module
from superlinear_lab.ids import is_valid_id

SEED = 20261130
WATCHDOG_S = 10
FIGURES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
TEXTS = {"A": "Anchors on power-law stripes.", "B": "Spans around the best keys, then a gate.",
         "C": "A sliding window keeps the recent keys."}

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- harness
class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds=WATCHDOG_S):
    """Raise Hang in the main thread if the block runs longer than `seconds`."""
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn, *args, **kwargs):
    """(kind, value): ("ok", result), ("refused", exc) for SnapshotError/ValueError, ("crash", exc), ("hang", exc)."""
    try:
        with watchdog():
            return "ok", fn(*args, **kwargs)
    except Hang as e:
        return "hang", e
    except (SnapshotError, ValueError) as e:
        return "refused", e
    except Exception as e:  # anything else is a crash: counted and reported
        return "crash", e


CLEAR = re.compile(r"manifest\.json|cache\.safetensors|transcript\.json|snapshot [0-9a-f]{32}|snapshot_id=|"
                   r"tags=|not a plain directory|snapshot store")


def unclear(kind: str, value) -> bool:
    """A refusal whose message names neither the file, the snapshot, nor the argument at fault."""
    return kind == "refused" and not CLEAR.search(str(value))


def record(category: str, kind: str, value=None) -> None:
    label = kind if kind == "ok" else f"{kind}:{type(value).__name__}"
    FIGURES[category][label] += 1


def write_figures():
    path = os.environ.get("STORE_FAULTS_FIGURES")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        old.update({k: dict(v) for k, v in FIGURES.items()})
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def small_session(model, key: str) -> Session:
    s = Session(model, max_len=48, progress=False)
    s.append(TEXTS[key])
    s.generate(2)
    return s


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory):
    """A store with snapshots A, B, C (kept pristine; cases work on copies): (root, {key: sid}, {key: ids})."""
    root = tmp_path_factory.mktemp("pristine") / "store"
    store = SnapshotStore(root)
    sids, ids = {}, {}
    for key in TEXTS:
        s = small_session(model, key)
        sids[key] = store.save(s, title=f"title {key}", tags=[key], description="d")
        ids[key] = s.ids
    return root, sids, ids


def snap_dir(root, sid):
    (found,) = [p for p in root.glob(f"*/*/{sid}")]
    return found


class Bench:
    """A working copy of the pristine store; `reset()` restores the target snapshot B after each case."""

    def __init__(self, pristine, tmp_path):
        self.src_root, self.sids, self.ids = pristine
        self.root = tmp_path / "store"
        shutil.copytree(self.src_root, self.root, symlinks=True)
        self.target = self.sids["B"]
        self.src_target = snap_dir(self.src_root, self.target)
        self.target_dir = snap_dir(self.root, self.target)
        self.fp_dir = self.target_dir.parent
        self.outside = tmp_path / "outside"

    def reset(self):
        for d in (self.root, self.outside):
            if os.path.lexists(d):
                _force_remove(d)
        shutil.copytree(self.src_root, self.root, symlinks=True)
        self.outside.mkdir()


def _force_remove(path):
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        for p in sorted(path.rglob("*"), reverse=True):  # make everything removable (chmod'ed cases)
            if not p.is_symlink():
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
        shutil.rmtree(path)


def check_store(bench: Bench, model, category: str, *, target_may_vanish=True, must_refuse=False,
                check_others=True) -> list[str]:
    """The invariants after a corruption of snapshot B (returns the violated ones, as text)."""
    bad = []
    store = SnapshotStore(bench.root)
    kind, infos = outcome(store.list)
    if kind != "ok":
        return [f"list() -> {kind} {infos!r}"]
    listed = {i.id for i in infos}
    problems = {p.path.name for p in store.problems}
    if problems - {bench.target}:
        bad.append(f"problems outside the target: {store.problems}")
    others = [k for k in ("A", "C") if bench.sids[k] not in listed]
    if others:
        bad.append(f"untouched snapshots {others} not listed")
    if check_others:  # no data loss: an untouched snapshot still loads bit-exactly
        s = store.load(bench.sids["A"], model)
        if not torch.equal(s.ids, bench.ids["A"]):
            bad.append("snapshot A changed")
    kind, info = outcome(store.info, bench.target)
    record(category + "/info", kind, info)
    if kind in ("crash", "hang") or unclear(kind, info):
        bad.append(f"info -> {kind} {info!r}")
    if (kind == "ok") != (bench.target in listed):
        bad.append(f"info {kind} but listed={bench.target in listed}")
    kind, value = outcome(store.load, bench.target, model)
    record(category + "/load", kind, value)
    if kind in ("crash", "hang") or unclear(kind, value):
        bad.append(f"load -> {kind} {value!r}")
    if kind == "ok":
        if must_refuse:
            bad.append("load accepted a corrupted snapshot")
        elif not torch.equal(value.ids, bench.ids["B"]):
            bad.append("load accepted different token ids")
    kind, value = outcome(store.update, bench.target, title="repaired")
    record(category + "/update", kind, value)
    if kind in ("crash", "hang") or unclear(kind, value):
        bad.append(f"update -> {kind} {value!r}")
    if kind == "ok" and bench.target not in {i.id for i in store.list()}:
        bad.append("a successful update made the snapshot unlistable (data loss)")
    kind, value = outcome(store.delete, bench.target)
    record(category + "/delete", kind, value)
    if kind in ("crash", "hang") or unclear(kind, value):
        bad.append(f"delete -> {kind} {value!r}")
    kind, infos = outcome(store.list)
    if kind != "ok":
        bad.append(f"list() after delete -> {kind} {infos!r}")
    elif {bench.sids["A"], bench.sids["C"]} - {i.id for i in infos}:
        bad.append("delete of the target removed another snapshot")
    return bad


def run_cases(cases, bench: Bench, model, category: str, **kw):
    """Apply each (label, mutate, options) to a fresh copy and check the invariants; return failures."""
    failures = []
    for label, mutate, options in cases:
        bench.reset()
        mutate(bench)
        FIGURES[category]["cases"] += 1
        problems = check_store(bench, model, category, **{**kw, **options})
        if problems:
            failures.append(f"{label}: {problems}")
    write_figures()
    return failures


# --------------------------------------------------------------------------- generated values
def json_paths(obj, prefix=()):
    """Every path (tuple of keys) in a JSON object, containers included."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out.extend(json_paths(v, prefix + (k,)))
    return out


def value_pool(rng: random.Random) -> list[tuple[str, str]]:
    """(label, raw JSON text) of hostile values: types, sizes, numbers, nesting, unicode."""
    deep = rng.choice([1000, 20_000, 100_000])
    pool = [
        ("null", "null"), ("true", "true"), ("false", "false"), ("zero", "0"), ("minus1", "-1"),
        ("int31", str(2 ** 31)),
        ("int63", str(2 ** 63)), ("int64", str(2 ** 64)), ("neg63", str(-2 ** 63)), ("half", "0.5"),
        ("negzero", "-0.0"), ("1e308", "1e308"), ("1e400", "1e400"), ("-1e400", "-1e400"), ("NaN", "NaN"),
        ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("400digits", "9" * 400),
        ("5000digits", "9" * 5000), ("tiny-float", "1e-400"), ("empty-str", '""'), ("str", '"x"'),
        ("nul", '"\\u0000"'), ("surrogate", '"\\ud800"'), ("rtl", '"\\u202eevil"'), ("emoji", '"\\ud83d\\ude00"'),
        ("traversal", '"../../etc/passwd"'), ("long-str-900k", json.dumps("s" * 900_000)),
        ("long-str-1.1M", json.dumps("s" * 1_100_000)), ("empty-list", "[]"), ("empty-obj", "{}"),
        ("list-int", "[1, 2]"), ("list-str", '["a", "b"]'), ("obj", '{"a": 1}'),
        (f"nested-list-{deep}", "[" * deep + "]" * deep), ("nested-obj-5000", '{"a":' * 5000 + "1" + "}" * 5000),
        ("hex64-upper", json.dumps("A" * 64)), ("hex64", json.dumps("0" * 64)),
    ]
    return pool


def set_raw(manifest: dict, path, raw: str | None, *, extra: str | None = None) -> bytes:
    """The manifest text with the value at `path` replaced by raw JSON text `raw` (None: delete the key), or with
    an extra key `extra` added to the object at `path`."""
    placeholder = "@@FAULT@@"
    m = json.loads(json.dumps(manifest))
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if extra is not None:
        target = parent[path[-1]] if path else m
        if not isinstance(target, dict):
            return json.dumps(m).encode()
        target[extra] = placeholder
    elif raw is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = placeholder
    text = json.dumps(m, indent=2)
    return text.replace(json.dumps(placeholder), raw if raw is not None else "1").encode()


def harmless(path, label: str, raw: str) -> bool:
    """Edits that leave a valid, loadable snapshot (any other edit must make `load` refuse it)."""
    if path in (("metadata", "title"), ("metadata", "description")):
        return raw.startswith('"') and label not in ("surrogate", "long-str-1.1M")
    if path == ("metadata", "tags"):
        return label in ("empty-list", "list-str")
    if path == ("created_at",):
        return label in ("zero", "int31", "half", "negzero", "tiny-float")
    return False


def manifest_cases(bench: Bench, rng: random.Random):
    manifest = json.loads((bench.src_target / "manifest.json").read_bytes())
    pool = value_pool(rng)
    cases = []

    def writer(data):
        return lambda b: (b.target_dir / "manifest.json").write_bytes(data)

    for path in json_paths(manifest):
        picks = rng.sample(pool, 9)
        for label, raw in picks:
            data = set_raw(manifest, path, raw)
            cases.append((f"{'/'.join(path)}={label}", writer(data), {"must_refuse": not harmless(path, label, raw)}))
        cases.append((f"{'/'.join(path)}:deleted", writer(set_raw(manifest, path, None)), {"must_refuse": True}))
        if isinstance(manifest_value(manifest, path), dict):
            cases.append((f"{'/'.join(path)}:extra-key", writer(set_raw(manifest, path, "1", extra="zz")),
                          {"must_refuse": path != ("compat", "payload")}))
    cases.append(("root:extra-key", writer(set_raw(manifest, (), "1", extra="zz")), {"must_refuse": True}))
    for label, raw in pool:  # the whole manifest replaced by a hostile value
        cases.append((f"root={label}", writer(raw.encode()), {"must_refuse": True}))
    # Byte-level damage: truncations, flips, prefixes, padding around the 1 MiB limit, duplicate keys.
    original = (bench.src_target / "manifest.json").read_bytes()
    for _ in range(25):
        cut = rng.randrange(0, len(original))
        cases.append((f"truncate-{cut}", writer(original[:cut]), {"must_refuse": True}))
    for _ in range(25):
        pos, xor = rng.randrange(len(original)), rng.randrange(1, 256)
        flipped = bytearray(original)
        flipped[pos] ^= xor
        cases.append((f"flip-{pos}-{xor}", writer(bytes(flipped)), {"must_refuse": False}))  # may hit whitespace
    pad = (1 << 20) - len(original)
    cases += [
        ("bom", writer(b"\xef\xbb\xbf" + original), {"must_refuse": True}),
        ("latin1", writer(original.replace(b'"title B"', b'"title \xe9"')), {"must_refuse": True}),
        ("pad-to-limit", writer(original + b" " * pad), {}),
        ("pad-over-limit", writer(original + b" " * (pad + 1)), {"must_refuse": True}),
        ("trailing-garbage", writer(original + b"}"), {"must_refuse": True}),
        ("duplicate-key", writer(original.replace(b'"metadata": {', b'"metadata": {"title": 1, ', 1)), {}),
        ("empty", writer(b""), {"must_refuse": True}),
    ]
    return cases


def manifest_value(m, path):
    for k in path:
        m = m[k]
    return m


# --------------------------------------------------------------------------- tensors
def _reforge(d, name, data: bytes):
    """Replace a data file and update its hash and size in the manifest (only deeper checks can catch it)."""
    (d / name).write_bytes(data)
    m = json.loads((d / "manifest.json").read_bytes())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "manifest.json").write_text(json.dumps(m))


def _cache(d):
    data = (d / "cache.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, n, st_load(data), json.loads(data[8:8 + n])["__metadata__"]


def tensor_cases(bench: Bench, rng: random.Random, vocab: int):
    _, header_len, tensors, meta = _cache(bench.src_target)
    cases = []

    def forge(edit_tensors=None, edit_meta=None):
        def mutate(b):
            _, _, t, m = _cache(b.target_dir)
            if edit_tensors:
                edit_tensors(t)
            if edit_meta:
                m = edit_meta(m)
            _reforge(b.target_dir, "cache.safetensors", st_save(t, metadata=m))
        return mutate

    for name, t in sorted(tensors.items()):
        def put(fn, name=name):
            return lambda ts: ts.__setitem__(name, fn(ts[name]).contiguous())
        edits = {
            "f16": put(lambda x: x.half()), "bf16": put(lambda x: x.bfloat16()), "f64": put(lambda x: x.double()),
            "i32": put(lambda x: x.int()), "i64": put(lambda x: x.long()), "f32": put(lambda x: x.float()),
            "add-dim": put(lambda x: x[None]), "scalar": put(lambda x: x.reshape(-1)[:1].reshape(())),
            "flatten": put(lambda x: x.reshape(-1)), "empty": put(lambda x: x.reshape(-1)[:0]),
            "removed": lambda ts, name=name: ts.pop(name),
            "renamed": lambda ts, name=name: ts.__setitem__(name + "_x", ts.pop(name)),
        }
        for dim in range(t.dim()):
            edits[f"dim{dim}+1"] = put(lambda x, dim=dim: _grow(x, dim))
            if t.shape[dim] > 1:
                edits[f"dim{dim}-1"] = put(lambda x, dim=dim: x.narrow(dim, 0, x.shape[dim] - 1))
        if t.dim() >= 2 and t.shape[-1] != t.shape[-2]:
            edits["transposed"] = put(lambda x: x.transpose(-1, -2))
        if t.dtype.is_floating_point and t.numel():
            for bad in ("nan", "inf", "-inf"):
                idx = rng.randrange(t.numel())
                edits[f"{bad}@{idx}"] = put(lambda x, bad=bad, idx=idx: _poke(x, idx, float(bad)))
        if t.dtype == torch.int64 and t.numel():
            for bad in (-1, vocab, 2 ** 40, -(2 ** 63)):
                idx = rng.randrange(t.numel())
                edits[f"id={bad}@{idx}"] = put(lambda x, bad=bad, idx=idx: _poke(x, idx, bad))
        for label, fn in edits.items():
            if label in ("f32", "i64") and ((label == "f32") == t.dtype.is_floating_point) \
                    or label == "flatten" and t.dim() == 1:
                continue  # no change: not a corruption
            cases.append((f"{name}:{label}", forge(fn), {"must_refuse": True}))
    cases.append(("extra-tensor", forge(lambda ts: ts.__setitem__("evil", torch.zeros(2))), {"must_refuse": True}))
    for key in sorted(meta):
        for label, value in (("missing", None), ("changed", "x"), ("number", "12345678901234567890")):
            def edit(m, key=key, value=value):
                m = dict(m)
                if value is None:
                    del m[key]
                else:
                    m[key] = value
                return m
            cases.append((f"meta-{key}:{label}", forge(edit_meta=edit), {"must_refuse": True}))
    cases.append(("meta-none", forge(edit_meta=lambda m: None), {"must_refuse": True}))

    # Raw bytes, re-hashed: truncations anywhere and flips inside the header.
    def raw(fn):
        def mutate(b):
            data = (b.target_dir / "cache.safetensors").read_bytes()
            _reforge(b.target_dir, "cache.safetensors", fn(data))
        return mutate
    size = len((bench.src_target / "cache.safetensors").read_bytes())
    for cut in sorted({0, 1, 7, 8, 9, header_len + 7, header_len + 8, header_len + 9, size - 1}
                      | {rng.randrange(size) for _ in range(20)}):
        cases.append((f"truncate-{cut}", raw(lambda d, cut=cut: d[:cut]), {"must_refuse": True}))
    for _ in range(30):
        pos, xor = rng.randrange(8 + header_len), rng.randrange(1, 256)
        cases.append((f"header-flip-{pos}-{xor}", raw(lambda d, pos=pos, xor=xor: _flip(d, pos, xor)),
                      {"must_refuse": False}))  # a flip in header whitespace/padding is harmless
    for length in (0, 2, 1 << 40, 1 << 63, header_len + 1, header_len - 1):
        cases.append((f"header-len={length}", raw(lambda d, length=length: struct.pack("<Q", length) + d[8:]),
                      {"must_refuse": True}))
    cases.append(("appended-bytes", raw(lambda d: d + b"\0" * 64), {"must_refuse": True}))
    # Not re-hashed: flips in the tensor data are caught by sha256.
    for _ in range(15):
        pos, xor = rng.randrange(8 + header_len, size), rng.randrange(1, 256)

        def flip_only(b, pos=pos, xor=xor):
            p = b.target_dir / "cache.safetensors"
            p.write_bytes(_flip(p.read_bytes(), pos, xor))
        cases.append((f"data-flip-{pos}-{xor}", flip_only, {"must_refuse": True}))
    return cases


def _grow(x, dim):
    """`x` one longer along `dim` (a copy of its first slice, or zeros when it is empty)."""
    if x.shape[dim]:
        return torch.cat([x, x.narrow(dim, 0, 1)], dim)
    return torch.zeros(*[1 if i == dim else n for i, n in enumerate(x.shape)], dtype=x.dtype)


def _poke(x, idx, value):
    x = x.clone()
    x.view(-1)[idx] = value
    return x


def _flip(data: bytes, pos: int, xor: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= xor
    return bytes(b)


def transcript_cases(rng: random.Random):
    msgs = [
        b"[]", b"{}", b'{"messages": null}', b'{"messages": [1]}', b'{"messages": [{"role": "user"}]}',
        b'{"messages": [{"role": "user", "content": "x", "tokens": 99999}]}',
        b'{"messages": [{"role": "user", "content": "x", "tokens": -1}]}',
        b'{"messages": [{"role": "user", "content": "x", "tokens": 1e400}]}',
        b'{"messages": [{"role": "user", "content": "\\ud800", "tokens": 1}]}',
        b'{"messages": [{"role": "user", "content": "x", "tokens": 1, "extra": 1}]}',
        b'{"messages": [], "x": 1}', b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"messages": [' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"]}", b"\xff\xfe", b"",
        b'{"messages": [NaN]}', b'{"messages": [' + b"9" * 5000 + b"]}",
    ]
    cases = []
    for i, data in enumerate(msgs):
        cases.append((f"transcript-{i}", lambda b, data=data: _reforge(b.target_dir, "transcript.json", data),
                      {"must_refuse": True}))
    for n in (2_000_000, rng.randrange(1_100_000, 4_000_000)):  # bounded by the context length: refused unread
        data = json.dumps({"messages": [{"role": "user", "content": "x" * n, "tokens": 1}]}).encode()
        cases.append((f"transcript-huge-{n}", lambda b, data=data: _reforge(b.target_dir, "transcript.json", data),
                      {"must_refuse": True}))
    return cases


# --------------------------------------------------------------------------- tests: corruptions
def test_generated_manifest_faults(pristine, model, tmp_path):
    bench = Bench(pristine, tmp_path)
    cases = manifest_cases(bench, random.Random(SEED))
    assert len(cases) >= 300, len(cases)
    failures = run_cases(cases, bench, model, "manifest")
    assert not failures, f"{len(failures)} of {len(cases)} manifest cases broke an invariant:\n" + "\n".join(
        failures[:20])


def test_generated_tensor_and_transcript_faults(pristine, model, tmp_path):
    bench = Bench(pristine, tmp_path)
    rng = random.Random(SEED + 1)
    cases = tensor_cases(bench, rng, model.cfg.vocab_size) + transcript_cases(rng)
    assert len(cases) >= 150, len(cases)
    failures = run_cases(cases, bench, model, "tensors")
    assert not failures, f"{len(failures)} of {len(cases)} tensor cases broke an invariant:\n" + "\n".join(
        failures[:20])


def test_generated_special_files_and_symlinks(pristine, model, tmp_path):
    """Every level of the store (model-key, fingerprint, snapshot folder, each file) replaced by a symlink to an
    outside copy, a dangling link, a link loop, a FIFO, or the other kind of entry; temporaries that are links."""
    bench = Bench(pristine, tmp_path)
    cases = []

    def levels(b):
        return {"model-key": b.fp_dir.parent, "fingerprint": b.fp_dir, "snapshot": b.target_dir,
                **{f: b.target_dir / f for f in ("manifest.json", "cache.safetensors", "transcript.json")}}

    def replace(level, how):
        def mutate(b):
            path = levels(b)[level]
            copy = b.outside / ("copy-" + path.name)
            if path.is_dir():
                shutil.copytree(path, copy)
                shutil.rmtree(path)
            else:
                shutil.copy(path, copy)
                path.unlink()
            if how == "link-outside":
                path.symlink_to(copy)
            elif how == "dangling":
                path.symlink_to(b.outside / "nothing-here")
            elif how == "loop":
                path.symlink_to(path)
            elif how == "fifo":
                os.mkfifo(path)
            elif how == "dev-zero":
                path.symlink_to("/dev/zero")
            elif how == "swap-kind":
                if copy.is_dir():
                    path.write_bytes(b"not a directory")
                else:
                    path.mkdir()
            elif how == "unreadable":
                if copy.is_dir():
                    shutil.copytree(copy, path)
                else:
                    shutil.copy(copy, path)
                os.chmod(path, 0)
        return mutate

    hows = ["link-outside", "dangling", "loop", "fifo", "dev-zero", "swap-kind"]
    if os.geteuid() != 0:  # root reads anything: permission cases only mean something for other users
        hows.append("unreadable")
    for level in ("model-key", "fingerprint", "snapshot", "manifest.json", "cache.safetensors", "transcript.json"):
        for how in hows:
            # A broken model-key/fingerprint folder hides A and C too: they must come back when it is repaired,
            # which is outside this check; here only "never crash, never hang, listing works" is asserted.
            shared = level in ("model-key", "fingerprint")
            cases.append((f"{level}:{how}", replace(level, how),
                          {"must_refuse": True, "check_others": not shared, "shared_level": shared}))

    def evil_temporaries(b):
        victim = b.outside / "victim"
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me")
        (b.fp_dir / ".tmp-evil-link").symlink_to(victim)
        (b.fp_dir / ".trash-evil-link").symlink_to(victim / "precious.txt")
        os.mkfifo(b.fp_dir / ".tmp-fifo")
        old = time.time() - 3600
        for name in (".tmp-evil-link", ".trash-evil-link"):
            os.utime(b.fp_dir / name, (old, old), follow_symlinks=False)
        os.utime(b.fp_dir / ".tmp-fifo", (old, old))
    failures = []
    for label, mutate, options in cases:
        bench.reset()
        mutate(bench)
        outside_before = {p: p.read_bytes() for p in bench.outside.rglob("*") if p.is_file() and not p.is_symlink()}
        FIGURES["special"]["cases"] += 1
        shared = options.pop("shared_level")
        if shared:
            store = SnapshotStore(bench.root)
            for op, args in ((store.list, ()), (store.info, (bench.target,)), (store.load, (bench.target, model)),
                             (store.update, (bench.target,)), (store.delete, (bench.target,)),
                             (store.save, (small_session(model, "A"),))):
                kind, value = outcome(op, *args)
                record("special/shared-folder", kind, value)
                if kind in ("crash", "hang") or unclear(kind, value) or (op == store.list and kind != "ok"):
                    failures.append(f"{label}: {op.__name__} -> {kind} {value!r}")
                if op == store.list and kind == "ok" and bench.target in {i.id for i in value}:
                    failures.append(f"{label}: followed a {label} into a listing")
        else:
            problems = check_store(bench, model, "special", **options)
            if problems:
                failures.append(f"{label}: {problems}")
        SnapshotStore(bench.root, stale_after=0).list()  # heal must not touch anything outside
        for p, data in outside_before.items():
            if not p.exists() or p.read_bytes() != data:
                failures.append(f"{label}: {p} outside the store was changed")
    bench.reset()
    evil_temporaries(bench)
    FIGURES["special"]["cases"] += 1
    store = SnapshotStore(bench.root, stale_after=0)
    kind, infos = outcome(store.list)
    assert kind == "ok" and len(infos) == 3, infos
    assert (bench.outside / "victim" / "precious.txt").read_text() == "keep me"
    assert not [p for p in bench.fp_dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    write_figures()
    assert not failures, f"{len(failures)} of {len(cases)} special-file cases failed:\n" + "\n".join(failures[:20])


def naive_id_ok(value) -> bool:
    """Reference id rule written out by hand (no regex): 1-128 of [A-Za-z0-9_-], first a letter or digit."""
    if type(value) is not str or not 1 <= len(value) <= 128:
        return False
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    return all(c in allowed for c in value) and value[0] not in "_-"


def test_generated_ids(pristine, model, tmp_path):
    rng = random.Random(SEED + 2)
    good = "abcXYZ019_-"
    bad = "\n\r\t /\\.:*?\"'<>|\x00é\u202e\u0131\u212a%~"
    ids = [None, 5, 1.5, b"abc", ["a"], "", "x" * 128, "x" * 129, "dup\n", "..", "."]
    for _ in range(400):
        n = rng.choice([0, 1, 2, 5, 32, 64, 127, 128, 129, 200])
        s = "".join(rng.choice(good) for _ in range(n))
        if rng.random() < 0.6 and n:
            i = rng.randrange(n + 1)
            s = s[:i] + rng.choice(bad) + s[i:]
        ids.append(s)
    bench = Bench(pristine, tmp_path)
    bench.reset()
    store = SnapshotStore(bench.root)
    before = sorted(str(p) for p in bench.root.rglob("*"))
    failures = []
    for value in ids:
        FIGURES["ids"]["cases"] += 1
        if is_valid_id(value) != naive_id_ok(value):
            failures.append(f"{value!r}: is_valid_id={is_valid_id(value)}, reference {naive_id_ok(value)}")
        for op, args in ((store.info, ()), (store.load, (model,)), (store.update, ()), (store.delete, ())):
            kind, err = outcome(op, value, *args)
            record("ids", kind, err)
            want = "invalid" if not naive_id_ok(value) else "not found"
            if kind != "refused" or want not in str(err):
                failures.append(f"{op.__name__}({value!r}) -> {kind} {err!r}, expected a SnapshotError '{want}'")
    assert sorted(str(p) for p in bench.root.rglob("*")) == before  # nothing was touched
    assert len(store.list()) == 3
    write_figures()
    assert sum(not naive_id_ok(v) for v in ids) >= 200 and sum(naive_id_ok(v) for v in ids) >= 50
    assert not failures, "\n".join(failures[:20])


# --------------------------------------------------------------------------- kill -9 during every operation
def _is_step(fn) -> bool:
    """A call that can change or read the disk: an os/fcntl/io function or a method of a file object."""
    if getattr(fn, "__module__", None) in ("posix", "fcntl", "_io", "io"):
        return True
    return isinstance(getattr(fn, "__self__", None), io.IOBase)


def _kill_hook(kill_at: int | None, counter: list):
    """A profile hook counting the disk-level steps of an operation (every os/fcntl/file call, wherever it is made:
    the store's code, shutil, pathlib); SIGKILL at step `kill_at`."""
    def hook(frame, event, arg):
        if event == "c_call" and _is_step(arg):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _in_child(fn, kill_at=None, loop=False):
    """Run `fn` in a forked child (store operations only; the model and sessions are inherited). Returns its
    pid; with `kill_at`, the child SIGKILLs itself at that call."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            sys.setprofile(_kill_hook(kill_at, [0]))
            while True:
                fn()
                if not loop:
                    break
        except BaseException:
            code = 3
        finally:
            sys.setprofile(None)
            os._exit(code)
    return pid


def _wait(pid, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise Hang(f"child {pid} still running after {timeout} s")


def _count_calls(fn) -> int:
    counter = [0]
    sys.setprofile(_kill_hook(None, counter))
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counter[0]


def check_after_kill(bench: Bench, model, op: str, new_ids) -> list[str]:
    """Invariants after a killed operation: heal removes every temporary, nothing half-written is visible, every
    listed snapshot loads bit-exactly, A is intact, B keeps an old or new title, C is present or gone whole."""
    bad = []
    store = SnapshotStore(bench.root, stale_after=0)  # opening heals: the killed process holds no lock
    left = [p for p in bench.root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]
    if left:
        bad.append(f"temporaries left after heal: {left}")
    kind, infos = outcome(store.list)
    if kind != "ok":
        return bad + [f"list -> {kind} {infos!r}"]
    if store.problems:
        bad.append(f"half-written or broken entries visible: {store.problems}")
    listed = {i.id: i for i in infos}
    known = {bench.sids[k]: bench.ids[k] for k in TEXTS}
    for sid in listed:
        kind, s = outcome(store.load, sid, model)
        if kind != "ok":
            bad.append(f"listed snapshot {sid} does not load: {kind} {s!r}")
        elif not torch.equal(s.ids, known.get(sid, new_ids)):
            bad.append(f"snapshot {sid} loads different tokens")
    if bench.sids["A"] not in listed:
        bad.append("A lost")
    if op != "delete" and bench.sids["C"] not in listed:
        bad.append("C lost")
    if op == "update" and bench.sids["B"] in listed and listed[bench.sids["B"]].title not in ("title B", "renamed"):
        bad.append(f"B has title {listed[bench.sids['B']].title!r}")
    if op != "update" and bench.sids["B"] not in listed:
        bad.append("B lost")
    if op == "update" and bench.sids["B"] not in listed:
        bad.append("B lost by an update")
    extra = set(listed) - set(known)
    if op != "save" and op != "cycle" and extra:
        bad.append(f"unexpected snapshots {extra}")
    return bad


def test_kill_9_at_every_step_of_save_update_delete_heal(pristine, model, tmp_path):
    bench = Bench(pristine, tmp_path)
    session = small_session(model, "B")  # saved again by `save`: same tokens as B
    new_ids = session.ids
    ops = {
        "save": lambda store: store.save(session, title="new"),
        "update": lambda store: store.update(bench.sids["B"], title="renamed", tags=["t"]),
        "delete": lambda store: store.delete(bench.sids["C"]),
        "heal": lambda store: store.heal(),  # removing what killed operations left
    }

    def prepare(name):
        bench.reset()
        if name != "heal":
            return SnapshotStore(bench.root)
        for d in (".tmp-dead-save", ".trash-dead-delete"):
            (bench.fp_dir / d).mkdir()
            for f in ("manifest.json", "cache.safetensors", "transcript.json"):
                (bench.fp_dir / d / f).write_bytes(b"x" * 1000)
        (bench.fp_dir / ".tmp-manifest-dead-update").write_bytes(b"{}")
        store = SnapshotStore(bench.root, stale_after=1e9)  # opening heals nothing ...
        store.stale_after = 0  # ... the operation under test does
        return store
    failures, kills = [], 0
    for name, op in ops.items():
        store = prepare(name)
        total = _count_calls(lambda: op(store))
        assert total > 5, (name, total)
        points = range(1, total + 1)  # every step
        for k in points:
            store = prepare(name)
            status = _wait(_in_child(lambda: op(store), kill_at=k))
            FIGURES["kill-9"][f"{name}:killed" if os.WIFSIGNALED(status) else f"{name}:completed"] += 1
            kills += os.WIFSIGNALED(status)
            problems = check_after_kill(bench, model, name, new_ids)
            if problems:
                failures.append(f"{name} killed at call {k}/{total}: {problems}")
    # Kills at random times while a child cycles save -> update -> delete without pause.
    rng = random.Random(SEED + 4)

    def cycle():
        store = SnapshotStore(bench.root)
        sid = store.save(session, title="cycle")
        store.update(sid, title="cycle renamed")
        store.delete(sid)
    for _ in range(25):
        bench.reset()
        pid = _in_child(cycle, loop=True)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        status = _wait(pid)
        FIGURES["kill-9"]["cycle:killed" if os.WIFSIGNALED(status) else "cycle:exited"] += 1
        kills += os.WIFSIGNALED(status)
        problems = check_after_kill(bench, model, "cycle", new_ids)
        if problems:
            failures.append(f"cycle killed at random: {problems}")
    FIGURES["kill-9"]["kills"] = kills
    write_figures()
    assert kills >= 100, kills
    assert not failures, f"{len(failures)} kills broke an invariant:\n" + "\n".join(failures[:20])


def test_cleanup_never_removes_work_in_progress(pristine, model, tmp_path):
    """A child saves, updates and deletes without pause while this process heals with stale_after=0 (any unlocked
    temporary is removed at once) and lists: no operation of the child may fail, and the store stays consistent."""
    bench = Bench(pristine, tmp_path)
    bench.reset()
    session = small_session(model, "B")
    done = tmp_path / "ops"

    def cycle():
        store = SnapshotStore(bench.root, stale_after=0)
        n = 0
        while not done.exists() or n == 0:
            sid = store.save(session, title="concurrent")
            store.update(sid, title="concurrent renamed")
            store.delete(sid)
            n += 1
        (tmp_path / "ops-count").write_text(str(n))
    pid = os.fork()
    if pid == 0:
        try:
            cycle()
        except BaseException:
            os._exit(3)
        os._exit(0)
    heals = 0
    end = time.time() + 1.5
    try:
        while time.time() < end:
            store = SnapshotStore(bench.root, stale_after=0)
            store.list()
            heals += 1
    finally:
        done.write_text("stop")
    status = _wait(pid)
    FIGURES["concurrent"].update({"heals": heals, "child_cycles": int((tmp_path / "ops-count").read_text())
                                  if (tmp_path / "ops-count").exists() else 0})
    write_figures()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"a save/update/delete failed while healing: {status}"
    assert heals > 10 and FIGURES["concurrent"]["child_cycles"] > 3
    assert check_after_kill(bench, model, "cycle", session.ids) == []


def test_cleanup_waits_for_a_writer_stalled_before_its_lock(pristine, model, tmp_path):
    """The gap between creating a temporary and locking it: a writer that stalls there (here 0.5 s) must not lose
    its temporary to a cleanup with stale_after=0 (the store-wide creation lock closes the gap)."""
    bench = Bench(pristine, tmp_path)
    bench.reset()
    session = small_session(model, "B")
    stalled = tmp_path / "stalled"
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            real = snapshot_module._lock

            def slow_lock(path, blocking=True):
                if blocking and path.name.startswith(".tmp-"):
                    stalled.write_text("1")
                    time.sleep(0.5)
                return real(path, blocking)
            snapshot_module._lock = slow_lock
            SnapshotStore(bench.root).save(session, title="stalled")
            code = 0
        finally:
            os._exit(code)
    deadline = time.time() + 10
    while not stalled.exists() and time.time() < deadline:
        time.sleep(0.005)
    assert stalled.exists()
    SnapshotStore(bench.root, stale_after=0).heal()  # during the stall
    status = _wait(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the stalled save lost its temporary"
    assert "stalled" in [i.title for i in SnapshotStore(bench.root).list()]
