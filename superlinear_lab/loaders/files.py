"""The files of a Hugging Face style checkpoint directory, read without loading any tensor and without pickle.

* `read_safetensors_header(path)` parses only the header of a ``.safetensors`` file: an 8-byte little-endian
  length, then that many bytes of JSON ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``. The
  offsets are checked against the file size and the byte count implied by dtype and shape.
* `checkpoint_shards(dir)` maps every tensor name to its shard through ``model.safetensors.index.json`` (or a
  single ``model.safetensors``) and refuses pickle-based weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
  ``.pkl``, ``.pickle``), missing shards and paths that leave the directory — naming the file and the key.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import CheckpointError, read_json_lenient

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes in one element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple  # dims
    nbytes: int  # bytes on disk

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path, key: str | None = None) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} from the header of `path`; no tensor data is read.

    Raises CheckpointError naming the file (and the tensor; `key` names one the caller expects in the file when
    the whole file is bad) for a pickle file, a truncated or malformed header, or offsets that disagree with
    dtype x shape or the file size.
    """
    path = Path(path)
    where = f"{path}: key {key!r}" if key is not None else f"{path}"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(_MAX_HEADER_BYTES, size - 8) else b""
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror or e})") from None
    if not raw.startswith(b"{"):
        # torch.save writes a zip archive ("PK\x03\x04"); a bare pickle starts with PROTO (0x80) and a version.
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
            raise CheckpointError(f"{where}: the file is a pickle/zip archive (torch.save format), not "
                                  "safetensors; pickle files are never loaded")
        raise CheckpointError(f"{where}: not a safetensors file (no JSON header of a length that fits the "
                              f"{size}-byte file)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: malformed safetensors header (not an object)")
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(isinstance(s, int) and s >= 0 for s in shape) \
                and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: key {name!r}: malformed header entry {entry!r}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: key {name!r}: data_offsets span {end - begin} bytes, but dtype {dtype} "
                                  f"x shape {list(shape)} needs {nbytes}")
        out[name] = TensorInfo(dtype, shape, nbytes)
    return out


def _inside(name: str) -> bool:
    return not Path(name).is_absolute() and ".." not in Path(name).parts


def shard_headers(root, weight_map: dict[str, str]) -> dict[str, dict[str, TensorInfo]]:
    """{shard file: its header} for every shard of `weight_map` (errors name the shard and a key it holds)."""
    first = {}
    for key, shard in weight_map.items():
        first.setdefault(shard, key)
    return {shard: read_safetensors_header(Path(root) / shard, key) for shard, key in sorted(first.items())}


def _refuse_link_out(root: Path, name: str, key: str | None) -> None:
    """A weight file inside the folder by name may still be a symlink to anywhere: refuse one that resolves out."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        where = f"key {key!r}: " if key else ""
        raise CheckpointError(f"{root / name}: {where}weight file resolves outside the checkpoint directory "
                              f"({target})")


def checkpoint_shards(path) -> tuple[str, dict[str, str]]:
    """(index file name, {tensor name: shard file name}) of checkpoint directory `path`.

    Reads ``model.safetensors.index.json`` (its ``weight_map``), else a single ``model.safetensors`` (whose
    header lists the tensors). Refuses: pickle-based weight files (named in the index, or the only weights
    present), shards outside the directory (by name or through a symlink), and shards that do not exist —
    naming the file and a key.
    """
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        doc = read_json_lenient(index)
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: key 'weight_map': expected a non-empty {{tensor: shard file}} object")
        checked = set()
        for key, shard in weight_map.items():
            if shard in checked:
                continue
            if not _inside(shard):
                raise CheckpointError(f"{index}: key {key!r}: shard {shard!r} is outside the checkpoint directory")
            if shard.lower().endswith(PICKLE_SUFFIXES):
                raise CheckpointError(f"{root / shard}: key {key!r}: pickle-based weight file; only .safetensors "
                                      "shards are loaded (convert the checkpoint to safetensors)")
            if not shard.endswith(".safetensors"):
                raise CheckpointError(f"{root / shard}: key {key!r}: not a .safetensors file")
            if not (root / shard).is_file():
                raise CheckpointError(f"{root / shard}: key {key!r}: shard listed in {INDEX_FILE} is missing")
            _refuse_link_out(root, shard, key)
            checked.add(shard)
        return INDEX_FILE, dict(weight_map)
    single = root / SINGLE_FILE
    if single.is_file():
        _refuse_link_out(root, SINGLE_FILE, None)
        return SINGLE_FILE, {name: SINGLE_FILE for name in read_safetensors_header(single)}
    pickles = sorted(p.name for p in root.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)) \
        if root.is_dir() else []
    if pickles:
        raise CheckpointError(f"{root / pickles[0]}: pickle-based weight file and no {INDEX_FILE}; only "
                              "safetensors checkpoints are loaded (convert it to safetensors)")
    raise CheckpointError(f"{root}: no {INDEX_FILE} and no {SINGLE_FILE}")
