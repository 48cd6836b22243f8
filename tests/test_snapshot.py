"""SnapshotStore: save → load → continue is bit-exact; metadata edits; atomic writes; and a fuzz of corrupted
snapshots, each refused with a SnapshotError that names the problem while the store stays usable."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from superlinear_lab.engine import Session, SnapshotCompatibilityError, SnapshotError, SnapshotStore
from superlinear_lab.engine import snapshot as snapshot_module
from superlinear_lab.model import ModelConfig, load_model
from superlinear_lab.model.io import canonical_json

FIRST, LAST = load_model("tiny").cfg.attention_layers[0], load_model("tiny").cfg.attention_layers[-1]
TEXT = "The span search scores one key per stripe; the gate mixes the chosen spans. " * 3


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_session(model, text=TEXT, max_len=512):
    s = Session(model, max_len=max_len, progress=False)
    s.append(text)
    s.generate(5)
    return s


def test_save_load_continue_is_bit_exact(model, tmp_path):
    store = SnapshotStore(tmp_path)
    s = fresh_session(model)
    sid = store.save(s, title="docs read", tags=["docs", "test"], description="d")
    back = store.load(sid, model)
    assert back.logits is None and back.cursor == s.cursor and back.max_len == s.max_len
    assert torch.equal(back.ids, s.ids) and back.transcript == s.transcript
    for a, b in zip(s.cache.keys + s.cache.values, back.cache.keys + back.cache.values):
        assert torch.equal(a[:, :, :s.cursor], b[:, :, :s.cursor])
    s.append(" Next question?")
    back.append(" Next question?")
    assert torch.equal(s.logits, back.logits)
    assert s.generate(25) == back.generate(25)
    assert torch.equal(s.logits, back.logits)

    bigger = store.load(sid, model, max_len=2048)
    assert bigger.max_len == 2048 and bigger.cursor == back.cursor - 15 - 25
    with pytest.raises(SnapshotError, match="max_len"):
        store.load(sid, model, max_len=10)


def test_empty_session_round_trip(model, tmp_path):
    store = SnapshotStore(tmp_path)
    sid = store.save(Session(model, max_len=64, progress=False))
    back = store.load(sid, model)
    assert back.cursor == 0 and back.transcript == ()
    back.append("hi")


def test_list_info_update_delete(model, tmp_path):
    store = SnapshotStore(tmp_path)
    assert store.list() == []
    s = fresh_session(model)
    a = store.save(s, title="first")
    b = store.save(s, title="second", tags=["x"])
    assert [i.id for i in store.list()] == [a, b]
    info = store.update(a, title="renamed", tags=["t1", "t2"], description="new")
    assert (info.title, info.tags, info.description) == ("renamed", ("t1", "t2"), "new")
    assert store.info(a).title == "renamed"
    store.load(a, model)  # a metadata edit keeps the snapshot loadable
    other = load_model(config=ModelConfig(init_seed=1), backend="torch")
    assert store.list(model=other) == [] and len(store.list(model=model)) == 2
    store.delete(b)
    assert [i.id for i in store.list()] == [a]
    with pytest.raises(SnapshotError, match="not found"):
        store.load(b, model)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []  # (<root>/.lock is the store-wide lock file, kept)


def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    s = fresh_session(model)
    calls = {"n": 0}
    real = snapshot_module._fsync_write

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(snapshot_module, "_fsync_write", failing)
    with pytest.raises(SnapshotError, match="disk full.*nothing was kept"):
        store.save(s)
    monkeypatch.setattr(snapshot_module, "_fsync_write", real)
    assert store.list() == [] and not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]
    store.load(store.save(s), model)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPERLINEAR_LAB_SNAPSHOT_DIR", str(tmp_path / "a"))
    assert snapshot_module.default_root() == tmp_path / "a"
    monkeypatch.delenv("SUPERLINEAR_LAB_SNAPSHOT_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert snapshot_module.default_root() == tmp_path / "c" / "superlinear-lab" / "snapshots"


def test_fingerprint_mismatch(model, tmp_path):
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model))
    other = load_model(config=ModelConfig(init_seed=1), backend="torch")
    with pytest.raises(SnapshotCompatibilityError, match="fingerprint"):
        store.load(sid, other)


# --------------------------------------------------------------------------- corrupted-snapshot fuzz
def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d, m):
    (d / "manifest.json").write_text(json.dumps(m))


def _forge(d, name, data: bytes):
    """Replace a data file and update its hash and size in the manifest, so only deeper checks can catch it."""
    import hashlib

    (d / name).write_bytes(data)
    m = _manifest(d)
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_manifest(d, m)


def _cache(d):
    data = (d / "cache.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return st_load(data), meta


def _forge_cache(edit_tensors=None, edit_meta=None):
    def mutate(d):
        tensors, meta = _cache(d)
        if edit_tensors:
            edit_tensors(tensors)
        if edit_meta:
            meta = edit_meta(meta)
        _forge(d, "cache.safetensors", st_save(tensors, metadata=meta))
    return mutate


def _edit_manifest(fn):
    def mutate(d):
        m = _manifest(d)
        fn(m)
        _write_manifest(d, m)
    return mutate


def _set(path, value):
    def fn(m):
        *head, last = path.split("/")
        for key in head:
            m = m[key]
        if value is _DELETE:
            del m[last]
        else:
            m[last] = value(m[last]) if callable(value) else value
    return fn


class _Deleted:
    """Marker: delete the manifest field (its repr names the test case the same way in every process)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Deleted()
OWN = object()  # load the snapshot's own id


def _consistent_payload(key, value):
    import hashlib

    def fn(m):
        m["compat"]["payload"][key] = value
        m["compat"]["fingerprint"] = hashlib.sha256(canonical_json(m["compat"]["payload"]).encode()).hexdigest()
    return fn


def _cases():
    """(case id, mutate(snapshot_dir) or None, id to load (OWN = the snapshot's), error regex)."""
    rng = random.Random(1234)
    cases = []
    sizes = {"cache.safetensors": 100_000, "transcript.json": 400, "manifest.json": 1500}  # rough, for positions

    # Truncated files.
    for name, n in (("cache.safetensors", 12), ("transcript.json", 8), ("manifest.json", 8)):
        for k in range(n):
            keep = [0, 1, 7, 8][k] if k < 4 else rng.randrange(9, sizes[name] // 2)

            def mutate(d, name=name, keep=keep):
                data = (d / name).read_bytes()
                (d / name).write_bytes(data[:min(keep, len(data) - 1)])
            cases.append((f"truncate-{name}-{keep}", mutate, OWN, re.escape(name)))

    # Flipped bytes in the data files (the manifest is covered by the targeted edits below).
    for name, n in (("cache.safetensors", 70), ("transcript.json", 25)):
        for _ in range(n):
            frac, xor = rng.random(), rng.randrange(1, 256)

            def mutate(d, name=name, frac=frac, xor=xor):
                data = bytearray((d / name).read_bytes())
                data[int(frac * len(data))] ^= xor
                (d / name).write_bytes(bytes(data))
            cases.append((f"flip-{name}-{frac:.4f}-{xor}", mutate, OWN, f"{re.escape(name)}: sha256 mismatch"))

    # Missing, renamed, extra, non-regular files.
    for name in ("cache.safetensors", "transcript.json", "manifest.json"):
        cases.append((f"missing-{name}", lambda d, name=name: (d / name).unlink(), OWN, re.escape(name)))
        cases.append((f"renamed-{name}", lambda d, name=name: (d / name).rename(d / (name + ".old")), OWN,
                      re.escape(name)))
        cases.append((f"dir-{name}", lambda d, name=name: ((d / name).unlink(), (d / name).mkdir()), OWN,
                      f"{re.escape(name)}: not a regular file"))

        def symlink(d, name=name):
            (d.parent / ("copy-" + name)).write_bytes((d / name).read_bytes())
            (d / name).unlink()
            (d / name).symlink_to(d.parent / ("copy-" + name))
        cases.append((f"symlink-{name}", symlink, OWN, f"{re.escape(name)}: not a regular file"))

    def swap(d):
        (d / "cache.safetensors").rename(d / "tmp")
        (d / "transcript.json").rename(d / "cache.safetensors")
        (d / "tmp").rename(d / "transcript.json")
    cases.append(("swapped-data-files", swap, OWN, "size"))
    for extra in (".hidden", "notes.txt", "cache.safetensors.bak"):
        cases.append((f"extra-{extra}", lambda d, extra=extra: (d / extra).write_text("x"), OWN, "unlisted"))

    def dir_symlink(d):
        shutil.copytree(d, d.parent / "real")
        shutil.rmtree(d)
        d.symlink_to(d.parent / "real")
    cases.append(("snapshot-dir-symlink", dir_symlink, OWN, "not a plain directory"))

    def dir_is_file(d):
        shutil.rmtree(d)
        d.write_bytes(b"not a directory")
    cases.append(("snapshot-dir-is-a-file", dir_is_file, OWN, "not a plain directory"))

    # Edited manifests.
    edits = [
        ("schema_version", 2, "schema_version"), ("schema_version", "1", "schema_version"),
        ("schema_version", True, "schema_version"), ("schema_version", _DELETE, "missing fields"),
        ("format", "other", "format"), ("snapshot_id", "abc", "snapshot_id"), ("snapshot_id", None, "snapshot_id"),
        ("created_at", "yesterday", "created_at"), ("created_at", None, "created_at"), ("evil", 1, "unknown fields"),
        ("compat", [], "compat"), ("compat/fingerprint", "0" * 64, r"compat\.payload"),
        ("compat/fingerprint", lambda f: f.upper(), r"compat\.fingerprint"),
        ("compat/fingerprint", 5, r"compat\.fingerprint"), ("compat/payload", "x", r"compat\.payload"),
        ("compat/payload", _DELETE, "compat"),
        ("session/current_pos", lambda c: c + 1, "cache.safetensors: header metadata"),
        ("session/current_pos", lambda c: c - 1, "cache.safetensors: header metadata"),
        ("session/current_pos", -1, r"session\.current_pos"), ("session/current_pos", 512, r"session\.current_pos"),
        ("session/current_pos", "64", r"session\.current_pos"), ("session/current_pos", 64.0, r"session\.current_pos"),
        ("session/max_seq_len", 10 ** 9, "exceeds max_len_limit"),
        ("session/max_seq_len", 1000, "cache.safetensors: header metadata"),
        ("session/max_seq_len", 0, r"session\.max_seq_len"), ("session/max_seq_len", True, r"session\.max_seq_len"),
        ("session", {}, "session"), ("metadata", None, "metadata"), ("metadata/tags", "a", r"metadata\.tags"),
        ("metadata/tags", [1], r"metadata\.tags"), ("metadata/title", 5, r"metadata\.title"),
        ("files/cache.safetensors", _DELETE, "files"), ("files/extra.bin", {"sha256": "0" * 64, "bytes": 1}, "files"),
        ("files/cache.safetensors/sha256", "0" * 64, "cache.safetensors: sha256 mismatch"),
        ("files/transcript.json/sha256", "f" * 64, "transcript.json: sha256 mismatch"),
        ("files/cache.safetensors/sha256", "abc", r"files\.cache\.safetensors\.sha256"),
        ("files/cache.safetensors/bytes", lambda b: b + 1, "cache.safetensors: size"),
        ("files/cache.safetensors/bytes", -1, r"files\.cache\.safetensors\.bytes"),
        ("files/cache.safetensors/bytes", True, r"files\.cache\.safetensors\.bytes"),
        ("files/transcript.json/bytes", "12", r"files\.transcript\.json\.bytes"),
        ("files/cache.safetensors/extra", 1, r"files\.cache\.safetensors"),
    ]
    for path, value, expect in edits:
        cases.append((f"manifest-{path}={value if not callable(value) else 'fn'}"[:80],
                      _edit_manifest(_set(path, value)), OWN, expect))
    raw_manifests = [("list", b"[]", "manifest.json"), ("nan", None, "manifest.json: not valid JSON"),
                     ("empty", b"", "manifest.json: not valid JSON"), ("huge", b" " * (1 << 20) + b"{}", "larger than"),
                     ("bad-utf8", b"{\"a\": \"\xff\xfe\"}", "manifest.json: not valid JSON")]
    for label, data, expect in raw_manifests:
        def mutate(d, data=data):
            if data is None:
                text = (d / "manifest.json").read_text()
                data = re.sub(r'"created_at": [0-9.e+]+', '"created_at": NaN', text).encode()
            (d / "manifest.json").write_bytes(data)
        cases.append((f"manifest-raw-{label}", mutate, OWN, expect))

    # Forged files: the content changes and the manifest's hash and size are updated to match.
    def drop(name):
        return lambda t: t.pop(name)

    forged_cache = [
        ("missing-ssm_states", _forge_cache(drop("ssm_states")), "tensors"),
        ("extra-tensor", _forge_cache(lambda t: t.__setitem__("evil", torch.zeros(1))), "tensors"),
        ("key-fp16", _forge_cache(lambda t: t.__setitem__(f"key.{FIRST}", t[f"key.{FIRST}"].half())),
         f"tensor key.{FIRST}"),
        ("key-short", _forge_cache(lambda t: t.__setitem__(f"key.{FIRST}", t[f"key.{FIRST}"][:, :, :-1].contiguous())),
         f"tensor key.{FIRST}"),
        ("value-heads", _forge_cache(lambda t: t.__setitem__(f"value.{LAST}", t[f"value.{LAST}"].repeat(1, 2, 1, 1))),
         f"tensor value.{LAST}"),
        ("conv-shape", _forge_cache(lambda t: t.__setitem__("conv_states", t["conv_states"][:2].contiguous())),
         "tensor conv_states"),
        ("ssm-f64", _forge_cache(lambda t: t.__setitem__("ssm_states", t["ssm_states"].double())), "tensor ssm_states"),
        ("ids-range", _forge_cache(lambda t: t["token_ids"].__setitem__(0, 9999)), "token_ids"),
        ("ids-int32", _forge_cache(lambda t: t.__setitem__("token_ids", t["token_ids"].int())), "tensor token_ids"),
        ("meta-format", _forge_cache(edit_meta=lambda m: {**m, "cache_format": "v0"}), "header metadata"),
        ("meta-layers", _forge_cache(edit_meta=lambda m: {**m, "kv_layers": "[0]"}), "header metadata"),
        ("meta-none", _forge_cache(edit_meta=lambda m: None), "header metadata"),
    ]
    for label, mutate, expect in forged_cache:
        cases.append((f"forged-cache-{label}", mutate, OWN, f"cache.safetensors: .*{expect}"))

    def raw_cache(data_fn):
        return lambda d: _forge(d, "cache.safetensors", data_fn((d / "cache.safetensors").read_bytes()))
    raw = [
        ("empty", lambda b: b"", "truncated"),
        ("header-len-huge", lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length"),
        ("garbage", lambda b: bytes(random.Random(5).randrange(256) for _ in range(300)), "header"),
        ("header-not-json", lambda b: b[:8] + b"#" + b[9:], "header"),
        ("data-cut", lambda b: b[:-16], "unreadable"),
    ]
    for label, fn, expect in raw:
        cases.append((f"forged-cache-raw-{label}", raw_cache(fn), OWN, f"cache.safetensors.*{expect}"))

    transcripts = [("list", b"[]"), ("messages-str", b'{"messages": "x"}'), ("no-role", b'{"messages": [{"content": "a"}]}'),
                   ("content-int", b'{"messages": [{"role": "user", "content": 1}]}'), ("bad-utf8", b'{"messages": "\xff"}'),
                   ("nan", b'{"messages": [NaN]}'), ("extra-key", b'{"messages": [], "x": 1}')]
    for label, data in transcripts:
        cases.append((f"forged-transcript-{label}", lambda d, data=data: _forge(d, "transcript.json", data), OWN,
                      "transcript.json"))

    # Wrong fingerprint, made self-consistent (payload and fingerprint both rewritten).
    for key, value in (("model_id", "someone/else"), ("dtype", "float16"), ("config_sha256", "0" * 64)):
        cases.append((f"fingerprint-{key}", _edit_manifest(_consistent_payload(key, value)), OWN, "fingerprint"))

    # Bad ids: path traversal and everything else outside the id alphabet.
    for bad in ["../x", "..", ".", "", "a/b", "/etc/passwd", "..\\..\\x", "x" * 129, "-abc", "_abc", "abc\x00",
                "ab c", "é", None, 123, ".tmp-x", "a.b", "~", "%2e%2e", "abc\n", "./abc"]:
        cases.append((f"id-{bad!r}"[:60], None, bad, "invalid"))  # (None is a bad id too)
    for missing in ("0" * 32, "abc"):
        cases.append((f"id-missing-{missing}", None, missing, "not found"))
    return cases


CASES = _cases()


def test_fuzz_has_enough_cases():
    assert len(CASES) >= 200, len(CASES)


@pytest.fixture(scope="module")
def base_store(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    store = SnapshotStore(root)
    session = fresh_session(model, text=TEXT[:59])
    sid = store.save(session)  # empty title/description/tags: only protected fields remain in the manifest
    return root, sid, session


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_corrupted_snapshot_is_refused(case, base_store, model, tmp_path):
    label, mutate, load_id, expect = case
    base_root, sid, session = base_store
    root = tmp_path / "store"
    shutil.copytree(base_root, root, symlinks=True)
    snap = next(p for p in root.rglob(sid))
    if mutate is not None:
        mutate(snap)
    store = SnapshotStore(root)
    with pytest.raises(SnapshotError) as err:
        store.load(sid if load_id is OWN else load_id, model)
    assert re.search(expect, str(err.value)), f"{label}: message {str(err.value)!r} does not match {expect!r}"
    # The store stays usable: listing works and a new snapshot saves and loads.
    store.list()
    again = store.load(store.save(session), model)
    assert again.cursor == session.cursor


# --------------------------------------------------------------------------- issue 18 regressions
BIG_TITLE = "t" * 1_100_000  # over the 1 MiB manifest limit


def _only_snapshot_dir(store, sid):
    return store.info(sid).path


def test_update_refuses_an_oversized_manifest_and_keeps_the_snapshot(model, tmp_path):
    """#1: update() used to write a 1.1 MB title that reading then refused: the snapshot vanished from the list."""
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:40], max_len=64), title="kept")
    before = (_only_snapshot_dir(store, sid) / "manifest.json").read_bytes()
    for kwargs in ({"title": BIG_TITLE}, {"description": BIG_TITLE}, {"tags": ["x" * 1000] * 1100}):
        with pytest.raises(SnapshotError, match="larger than 1048576"):
            store.update(sid, **kwargs)
    with pytest.raises(SnapshotError, match=r"metadata\.title"):
        store.update(sid, title=5)
    assert (_only_snapshot_dir(store, sid) / "manifest.json").read_bytes() == before
    assert [i.title for i in store.list()] == ["kept"] and store.problems == []
    store.load(sid, model)
    assert store.update(sid, title="renamed").title == "renamed"  # a repair still works


def test_save_refuses_an_oversized_manifest_before_writing(model, tmp_path):
    """#2: save() used to write the whole snapshot, then fail to list it (undeletable through the API)."""
    store = SnapshotStore(tmp_path)
    s = fresh_session(model, text=TEXT[:40], max_len=64)
    for kwargs in ({"title": BIG_TITLE}, {"description": BIG_TITLE}, {"tags": ["x" * 1000] * 1100},
                   {"title": "\ud800"}, {"title": None}, {"tags": "abc"}, {"tags": [1]}):
        with pytest.raises(SnapshotError):
            store.save(s, **kwargs)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert store.list() == [] and store.problems == []


def test_stale_temporaries_are_removed_but_locked_ones_kept(model, tmp_path):
    """#2: killed saves used to leave .tmp-* folders forever. Unlocked temporaries older than `stale_after` go
    on open and on list; one held by a running operation (flock) or younger than `stale_after` stays."""
    import fcntl

    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:40], max_len=64))
    fp_dir = _only_snapshot_dir(store, sid).parent
    stale = [fp_dir / ".tmp-dead-1", fp_dir / ".trash-dead-2"]
    for d in stale:
        d.mkdir()
        (d / "cache.safetensors").write_bytes(b"x" * 100)
    (fp_dir / ".tmp-manifest-dead-3").write_bytes(b"{}")
    stale.append(fp_dir / ".tmp-manifest-dead-3")
    busy = fp_dir / ".tmp-busy"
    busy.mkdir()
    young = fp_dir / ".tmp-young"
    young.mkdir()
    for p in stale + [busy]:
        os.utime(p, (0, 0))  # long ago
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        SnapshotStore(tmp_path)  # opening heals
        assert not any(p.exists() for p in stale)
        assert busy.exists() and young.exists()
        assert [i.id for i in SnapshotStore(tmp_path, stale_after=0).list()] == [sid]
        assert busy.exists()  # still locked
    finally:
        os.close(fd)
    SnapshotStore(tmp_path, stale_after=0).list()
    assert not busy.exists() and not young.exists()
    store.load(sid, model)


def _raw_manifest_value(field: str, raw: str):
    """Replace the JSON value of `field` (a number or "") in manifest.json by the raw text `raw`."""
    def forge(snap_dir):
        path = snap_dir / "manifest.json"
        text, n = re.subn(rf'"{field}": ("[^"]*"|[-0-9.e+]+)', f'"{field}": {raw}', path.read_text(), count=1)
        assert n == 1
        path.write_text(text)
    return forge


@pytest.mark.parametrize("label,forge", [
    ("created_at-400-digits", _raw_manifest_value("created_at", "9" * 400)),
    ("created_at-1e400", _raw_manifest_value("created_at", "1e400")),
    ("created_at--1e400", _raw_manifest_value("created_at", "-1e400")),
    ("nested-100k", lambda d: (d / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)),
    ("nested-100k-in-title", _raw_manifest_value("title", "[" * 100_000 + "]" * 100_000)),
    ("max_seq_len-400-digits", _raw_manifest_value("max_seq_len", "9" * 400)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_listing_skips_and_reports_a_bad_manifest(model, tmp_path, label, forge):
    """#3: one manifest with created_at = 10^400 / 1e400 or nested 100k deep used to break list() and info()."""
    store = SnapshotStore(tmp_path)
    good = store.save(fresh_session(model, text=TEXT[:30], max_len=64), title="good")
    bad = store.save(fresh_session(model, text=TEXT[:40], max_len=64), title="")
    bad_dir = _only_snapshot_dir(store, bad)
    forge(bad_dir)
    assert len((bad_dir / "manifest.json").read_bytes()) < (1 << 20)
    infos = store.list()
    assert [i.id for i in infos] == [good]
    assert [p.path for p in store.problems] == [bad_dir] and "manifest.json" in store.problems[0].message
    with pytest.raises(SnapshotError, match="manifest.json"):
        store.info(bad)
    with pytest.raises(SnapshotError, match="manifest.json"):
        store.load(bad, model)
    with pytest.raises(SnapshotError, match="manifest.json"):
        store.update(bad, title="fix")
    store.delete(bad)  # a bad entry can still be removed
    assert [i.id for i in store.list()] == [good] and store.problems == []


def test_deeply_nested_transcript_is_a_snapshot_error(model, tmp_path):
    """#3: a forged transcript nested 100k deep (hash and size updated) used to raise RecursionError."""
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:40], max_len=64))
    _forge(_only_snapshot_dir(store, sid), "transcript.json", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(SnapshotError, match="transcript.json: not valid JSON .nested too deeply"):
        store.load(sid, model)


def _forge_consistent_max_seq_len(d, value: int):
    """Set max_seq_len in the manifest and in the cache header metadata, with hashes updated: self-consistent."""
    m = _manifest(d)
    m["session"]["max_seq_len"] = value
    _write_manifest(d, m)
    _forge_cache(edit_meta=lambda meta: {**meta, "max_seq_len": str(value)})(d)


def test_load_respects_max_len_limit_and_forged_lengths(model, tmp_path):
    """#4: loading bypassed the server's --max-seq-len-limit; a forged max_seq_len of 2^31 raised RuntimeError."""
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:40], max_len=256))
    assert store.load(sid, model, max_len_limit=256).max_len == 256
    with pytest.raises(snapshot_module.SnapshotLimitError, match="exceeds max_len_limit=128"):
        store.load(sid, model, max_len_limit=128)
    with pytest.raises(SnapshotError, match="exceeds max_len_limit=300"):
        store.load(sid, model, max_len=512, max_len_limit=300)
    with pytest.raises(ValueError, match="max_len_limit"):
        store.load(sid, model, max_len_limit=0)
    _forge_consistent_max_seq_len(_only_snapshot_dir(store, sid), 2 ** 31)
    assert store.info(sid).max_seq_len == 2 ** 31  # listed as it says ...
    with pytest.raises(SnapshotError, match="exceeds max_len_limit"):
        store.load(sid, model)  # ... but never allocated (default limit)


@pytest.mark.parametrize("tensor", ["key", "value", "conv_states", "ssm_states"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_tensors_are_refused(model, tmp_path, tensor, bad):
    """#4: snapshot tensors were never checked to be finite."""
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:40], max_len=64))
    name = f"{tensor}.{LAST}" if tensor in ("key", "value") else tensor

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[t[name].numel() // 3] = bad
    _forge_cache(poison)(_only_snapshot_dir(store, sid))
    with pytest.raises(SnapshotError, match="cache.safetensors: .*NaN or infinite"):
        store.load(sid, model)


def test_one_id_rule_everywhere(model, tmp_path):
    """#8: ids with a trailing newline were accepted by one of two regexes. One validator, fullmatch."""
    from superlinear_lab.ids import is_valid_id, validate_id

    assert validate_id("dup", "session_id") == "dup"
    for bad in ("dup\n", "dup\r\n", "\ndup", "du p", "", "x" * 129, "-x", None, 5, b"dup"):
        assert not is_valid_id(bad)
        with pytest.raises(ValueError, match=r"^session_id=.* is invalid: expected 1-128 characters"):
            validate_id(bad, "session_id")
    store = SnapshotStore(tmp_path)
    sid = store.save(fresh_session(model, text=TEXT[:20], max_len=64))
    for op in (store.info, store.delete, lambda i: store.load(i, model), lambda i: store.update(i, title="x")):
        with pytest.raises(SnapshotError, match=r"snapshot_id='.*\\n' is invalid"):
            op(sid + "\n")
    assert [i.id for i in store.list()] == [sid]


def test_symlinked_store_folders_are_not_followed(model, tmp_path):
    """#12: symlinked model-key/fingerprint folders were followed outside the store (listed, loaded, written)."""
    outside = tmp_path / "outside"
    store_a = SnapshotStore(outside)
    sid = store_a.save(fresh_session(model, text=TEXT[:40], max_len=64))
    fp_dir = _only_snapshot_dir(store_a, sid).parent
    root = tmp_path / "store"
    store = SnapshotStore(root)
    own = store.save(fresh_session(model, text=TEXT[:20], max_len=64))
    mk_name, fp_name = fp_dir.parent.name, fp_dir.name
    # 1. the fingerprint folder is a link to a folder outside the store
    shutil.rmtree(root / mk_name / fp_name)
    (root / mk_name / fp_name).symlink_to(fp_dir)
    assert store.list() == [] and any("symbolic link" in p.message for p in store.problems)
    with pytest.raises(SnapshotError, match="not found"):
        store.load(sid, model)
    outside_files = sorted(p for p in outside.rglob("*"))
    with pytest.raises(SnapshotError, match="not a plain directory"):
        store.save(fresh_session(model, text=TEXT[:20], max_len=64))
    assert sorted(p for p in outside.rglob("*")) == outside_files  # nothing written outside
    # 2. the model-key folder is a link
    (root / mk_name / fp_name).unlink()
    shutil.rmtree(root / mk_name)
    (root / mk_name).symlink_to(fp_dir.parent)
    assert store.list() == [] and any("symbolic link" in p.message for p in store.problems)
    with pytest.raises(SnapshotError):
        store.load(sid, model)
    with pytest.raises(SnapshotError, match="not a plain directory"):
        store.save(fresh_session(model, text=TEXT[:20], max_len=64))
    assert sorted(p for p in outside.rglob("*")) == outside_files
    del own
