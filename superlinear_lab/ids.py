"""The one rule for ids (session ids, snapshot ids, store folder names): 1-128 characters of ``[A-Za-z0-9_-]``,
starting with a letter or digit.

The pattern is always applied with ``fullmatch``: a ``$`` anchor with ``re.match`` would also accept a trailing
newline (``"dup\\n"`` next to ``"dup"``). Every place that checks an id calls `validate_id` (or `is_valid_id`).
"""
from __future__ import annotations

import re

ID_MAX_LEN = 128
ID_RULE = f"1-{ID_MAX_LEN} characters of [A-Za-z0-9_-], starting with a letter or digit"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,%d}" % (ID_MAX_LEN - 1))


def is_valid_id(value) -> bool:
    """True if `value` is a str that follows the id rule (no exception; for filtering directory listings)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def validate_id(value, what: str) -> str:
    """Return `value` if it is a valid id, else raise ValueError naming `what`, the value and the rule.

    Example::

        validate_id("run-1", "session_id")      # -> "run-1"
        validate_id("dup\\n", "session_id")      # ValueError: session_id='dup\\n' is invalid: expected ...
    """
    if not is_valid_id(value):
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "…"
        raise ValueError(f"{what}={shown} is invalid: expected {ID_RULE}")
    return value
