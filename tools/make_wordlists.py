"""Write superlinear_lab/resources/words.txt and names.txt from Debian's wamerican + wbritish word lists.

Entries present in both lists; words: lower-case, 4-9 letters; names: capitalised, 4-9 letters. A deterministic
subsample by sha256 keeps the package small. Run on a machine with both packages installed:

    apt-get install wamerican wbritish && python tools/make_wordlists.py
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

LISTS = ("/usr/share/dict/american-english", "/usr/share/dict/british-english")
OUT = Path(__file__).resolve().parents[1] / "superlinear_lab" / "resources"
NOTICE = """# Derived from Debian's wamerican and wbritish word lists (SCOWL): entries present in both lists,
# {what}, a deterministic subsample by sha256 (tools/make_wordlists.py). SCOWL copyright notice:
#   Copyright 2000-2011 by Kevin Atkinson. Permission to use, copy, modify, distribute and sell these word
#   lists, the associated scripts, the output created from the scripts, and its documentation for any purpose
#   is hereby granted without fee, provided that the above copyright notice appears in all copies and that
#   both that copyright notice and this permission notice appear in supporting documentation. Kevin Atkinson
#   makes no representations about the suitability of this array for any purpose. It is provided "as is"
#   without express or implied warranty.
"""


def _kept(word: str, fraction: float) -> bool:
    return hashlib.sha256(word.encode()).digest()[0] < 256 * fraction


def main() -> None:
    sets = [set(Path(p).read_text(encoding="utf-8", errors="ignore").split("\n")) for p in LISTS]
    both = set.intersection(*sets)
    for name, pattern, fraction, what in (("words", r"[a-z]{4,9}", 0.30, "lower-case, 4-9 letters"),
                                          ("names", r"[A-Z][a-z]{3,8}", 0.45,
                                           "capitalised, 4-9 letters (names and places)")):
        kept = sorted(w for w in both if re.fullmatch(pattern, w) and _kept(w, fraction))
        (OUT / f"{name}.txt").write_text(NOTICE.format(what=what) + "\n".join(kept) + "\n", encoding="utf-8")
        print(f"{name}: {len(kept)} entries")


if __name__ == "__main__":
    main()
