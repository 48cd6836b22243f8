"""Build a training corpus of real English from what a Debian machine ships, offline and reproducibly.

Sources (each optional; whatever is installed is used):

* package documentation under ``/usr/share/doc`` (READMEs, NEWS, FAQs, plain-text and Markdown docs, copyright
  files), decompressed when gzipped;
* the licence texts in ``/usr/share/common-licenses``;
* manual pages (``/usr/share/man/man1,5,7,8``), with their roff markup stripped;
* the ``fortunes`` and ``riddles`` collections of the fortune packages (one document per fortune);
* Python's own reference docs and standard-library docstrings (`superlinear_lab.data.corpus`).

**Reserved for evaluation.** Literary and religious texts are never training data: the fortune packages'
``literature`` collection is not read, and any document that names Project Gutenberg, Shakespeare or a Bible is
dropped (counted in the manifest).

Documents are de-duplicated (licence texts repeat across packages), filtered to English prose (mostly letters and
spaces, common English function words), and split by a hash of their text into ``train`` and ``eval`` (held out
for model selection). The output directory holds ``train.txt.gz``, ``eval.txt.gz`` and ``manifest.json`` (counts,
bytes and sha256 per split and source, so a model card can name the exact corpus).

    python -m superlinear_lab.corpus runs/corpus          # then: superlinear-lab train --corpus runs/corpus ...
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DOC_ROOT = Path("/usr/share/doc")
LICENCE_ROOT = Path("/usr/share/common-licenses")
MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man5", "man7", "man8")
MAN_SKIP = re.compile(r"^(gcloud|gsutil|bq)[_.-]")  # thousands of near-identical generated CLI pages
SOURCE_CAP = {"man": 12_000_000}  # bytes per source in the train split, so reference pages do not crowd out prose
FORTUNE_ROOT = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("fortunes", "riddles")  # never "literature": literary text is reserved for evaluation
RESERVED = re.compile(r"gutenberg|shakespeare|\bbible\b|king james", re.IGNORECASE)
DOC_NAME = re.compile(r"(readme|news|faq|copyright|changes|usage|intro|howto|manual|guide)[^/]*$|"
                      r"\.(txt|md|rst|text)(\.gz)?$", re.IGNORECASE)
EVAL_FRACTION = 0.1
MAX_DOC_BYTES = 400_000  # one huge generated file must not dominate the corpus
_ENGLISH = re.compile(r"\b(the|and|of|to|is|in|that|for|with|this|are|be)\b", re.IGNORECASE)


@dataclass
class Document:
    """One document: where it came from (``source`` is one of "doc", "licence", "man", "fortune", "python")."""

    source: str
    name: str
    text: str


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(raw) > MAX_DOC_BYTES:
        raw = raw[:MAX_DOC_BYTES]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


_ROFF_ESCAPES = re.compile(r"\\f[BIRPC0-9]|\\f\(..|\\f\[[^]]*]|\\s[-+]?\d|\\\(..|\\\*\(..|\\\*.|\\[&|^~0 %:]")


def strip_roff(source: str) -> str:
    """Plain text of a manual page: request lines dropped except the text of font macros (.B, .I, .SH, …),
    escapes removed."""
    out = []
    for line in source.split("\n"):
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "SH", "SS", "TP", "IP", "Nm", "Nd", "Sh"):
                line = rest.replace('"', "")
            else:
                continue
        out.append(_ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(out)


def is_english_prose(text: str) -> bool:
    """Mostly letters and spaces, and common English function words at a natural rate (rejects code, tables,
    hex dumps and other languages)."""
    if len(text) < 300:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    words = max(1, len(text.split()))
    return letters / len(text) > 0.8 and len(_ENGLISH.findall(text)) / words > 0.08


def _documents(roots: dict[str, Path]) -> list[Document]:
    docs: list[Document] = []
    doc_root = roots.get("doc")
    if doc_root and doc_root.is_dir():
        for path in sorted(p for p in doc_root.rglob("*") if p.is_file() and not p.is_symlink()):
            if DOC_NAME.search(path.name) and (text := _read(path)):
                docs.append(Document("doc", str(path.relative_to(doc_root)), text))
    lic_root = roots.get("licence")
    if lic_root and lic_root.is_dir():
        for path in sorted(p for p in lic_root.iterdir() if p.is_file() and not p.is_symlink()):
            if text := _read(path):
                docs.append(Document("licence", path.name, text))
    man_root = roots.get("man")
    if man_root and man_root.is_dir():
        for section in MAN_SECTIONS:
            for path in sorted((man_root / section).glob("*")) if (man_root / section).is_dir() else ():
                if MAN_SKIP.match(path.name) or not path.is_file() or path.is_symlink():
                    continue
                if text := _read(path):
                    docs.append(Document("man", f"{section}/{path.name}", strip_roff(text)))
    fortune_root = roots.get("fortune")
    if fortune_root and fortune_root.is_dir():
        for name in FORTUNE_FILES:
            text = _read(fortune_root / name) or ""
            for i, item in enumerate(t.strip() for t in text.split("\n%\n")):
                if item:
                    docs.append(Document("fortune", f"{name}#{i}", item))
    return docs


def _python_documents() -> list[Document]:
    from . import data as D

    return [Document("python", f"{split}", D.corpus(split).decode("utf-8")) for split in D.SPLITS]


def _split_of(text: str) -> str:
    return "eval" if hashlib.sha256(text.encode()).digest()[0] < 256 * EVAL_FRACTION else "train"


def build_corpus(out_dir, *, roots: dict[str, Path] | None = None, include_python: bool = True,
                 max_bytes: int = 48_000_000) -> dict:
    """Collect, filter, de-duplicate and split the corpus; write it to `out_dir`; return the manifest.

    Args:
        out_dir: folder to create (its ``train.txt.gz``/``eval.txt.gz``/``manifest.json`` are replaced).
        roots: source folders by kind ({"doc", "licence", "man", "fortune"} -> Path); default: the system's.
        include_python: add Python's reference docs and docstrings (their own train/eval split is kept).
        max_bytes: cap on the train split (documents are taken in hash order, so the cap is a fair sample);
            Python's docs are always included, manual pages at most `SOURCE_CAP["man"]` bytes.
    """
    roots = roots if roots is not None else {"doc": DOC_ROOT, "licence": LICENCE_ROOT, "man": MAN_ROOT,
                                             "fortune": FORTUNE_ROOT}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    kept: dict[str, list[Document]] = {"train": [], "eval": []}
    dropped = {"reserved": 0, "duplicate": 0, "not_prose": 0}
    candidates = _documents(roots)
    for doc in tqdm(candidates, desc="corpus", unit="doc", disable=None):
        text = re.sub(r"[ \t]+\n", "\n", doc.text).strip()
        if doc.source != "fortune" and not is_english_prose(text):
            dropped["not_prose"] += 1
            continue
        if RESERVED.search(text):
            dropped["reserved"] += 1
            continue
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if digest in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest)
        kept[_split_of(text)].append(Document(doc.source, doc.name, text))
    if include_python:
        for doc in _python_documents():  # keeps data.corpus's own split (its eval topics stay held out)
            kept[doc.name].append(Document("python", f"pydoc-{doc.name}", doc.text))
    manifest: dict = {"dropped": dropped, "splits": {}}
    for split, docs in kept.items():
        docs.sort(key=lambda d: hashlib.sha256(d.text.encode()).hexdigest())
        chosen, size, per_source = [], 0, {}
        for d in docs:
            used = per_source.get(d.source, 0)
            if split == "train" and d.source != "python" and (
                    size + len(d.text) > max_bytes or used + len(d.text) > SOURCE_CAP.get(d.source, max_bytes)):
                continue
            chosen.append(d)
            size += len(d.text) + 2
            per_source[d.source] = used + len(d.text)
        blob = "\n\n".join(d.text for d in chosen).encode("utf-8")
        (out / f"{split}.txt.gz").write_bytes(gzip.compress(blob, mtime=0))
        by_source: dict[str, int] = {}
        for d in chosen:
            by_source[d.source] = by_source.get(d.source, 0) + 1
        manifest["splits"][split] = {"documents": len(chosen), "bytes": len(blob),
                                     "sha256": hashlib.sha256(blob).hexdigest(), "by_source": by_source}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log.info("corpus written to %s: %s", out, manifest["splits"])
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m superlinear_lab.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write train.txt.gz, eval.txt.gz and manifest.json into")
    parser.add_argument("--no-python", action="store_true", help="leave out Python's docs and docstrings")
    parser.add_argument("--max-bytes", type=int, default=48_000_000, help="cap on the train split, in bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build_corpus(args.out_dir, include_python=not args.no_python, max_bytes=args.max_bytes)
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
