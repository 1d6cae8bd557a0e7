"""Text from files, made safe to show: `excerpt` (a short repr for error messages) and `printable`
(control characters, C1 codes and bidi overrides turned into visible escapes, for the terminal).
Every message that quotes a file-controlled value goes through one of them.
"""

from __future__ import annotations

import unicodedata
from typing import Any

EXCERPT = 80  # characters of a quoted value an error message shows at most
# categories shown as escapes: controls (C0, DEL, C1), formats (bidi overrides, zero-width),
# line/paragraph separators, surrogates, private use, unassigned
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """`repr(value)`, cut to about `limit` characters (with "…" and the full length when cut), and
    escaped for the terminal. Never builds more than a bounded repr of a huge container."""
    try:
        text = _bounded_repr(value, limit + 1)
    except (RecursionError, ValueError, TypeError, OverflowError):
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}… ({type(value).__name__})"
    return printable(text)


def _bounded_repr(value: Any, budget: int) -> str:
    """repr of `value` that stops once `budget` characters are produced (containers are walked
    lazily, so a huge or aliased structure costs about `budget` characters of work)."""
    if isinstance(value, str):
        return repr(value[:budget]) if len(value) > budget else repr(value)
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value[:budget]))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * budget:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, dict):
        items = ((f"{_bounded_repr(k, budget)}: {_bounded_repr(v, budget)}") for k, v in value.items())
        return _join("{", items, "}", budget)
    if isinstance(value, (list, tuple, set, frozenset)):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        return _join(opening, (_bounded_repr(v, budget) for v in value), closing, budget)
    return repr(value)


def _join(opening: str, parts: Any, closing: str, budget: int) -> str:
    out, size = [], 0
    for part in parts:
        out.append(part)
        size += len(part) + 2
        if size > budget:
            return opening + ", ".join(out)  # cut: the caller shortens and marks it
    return opening + ", ".join(out) + closing


def printable(text: Any) -> str:
    """`text` with every character that could move the cursor, retitle the terminal, reorder what
    follows (bidi overrides) or hide (zero-width) shown as a visible escape: "\\x1b", "\\u202e".
    Newlines and tabs are escaped too; print multi-line output line by line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN else c for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
