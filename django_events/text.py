"""Text helpers with no dependency: bounded representations of values for logs and messages.

Anything written to a log about input django-events did not choose (a queue row, a
message's arguments, an event's data) goes through :func:`short_repr`, so that a
10 MB value makes a line of a few hundred characters, not of 10 MB.
"""

from __future__ import annotations

import re
import reprlib

__all__ = [
    "REPLACEMENT",
    "SHORT_REPR_LIMIT",
    "clip",
    "has_nul_escape",
    "has_unstorable",
    "short_repr",
    "storable",
    "storable_json",
]

#: Characters :func:`short_repr` keeps by default (its marker comes on top).
SHORT_REPR_LIMIT = 200

# Containers are shown only to a depth of 3 and a few items each, so that making the
# representation costs little whatever the value's size; the result is then cut to the limit.
_bounded = reprlib.Repr()
_bounded.maxlevel = 3
_bounded.maxdict = _bounded.maxlist = _bounded.maxtuple = _bounded.maxset = _bounded.maxfrozenset = 8
_bounded.maxdeque = _bounded.maxarray = 8
_bounded.maxstring = _bounded.maxother = _bounded.maxlong = SHORT_REPR_LIMIT


def short_repr(value: object, limit: int = SHORT_REPR_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with a visible marker if it is longer.

    Strings and bytes are cut before they are represented, and containers are represented
    only in part (a few items, a few levels), so the cost stays small for any value. A cut
    representation ends with ``…[cut: N chars]`` (``N bytes`` for bytes, the value's
    length in full) or ``…[cut]`` for other values. A value whose ``repr()`` raises is
    shown by its type. Never raises.

    >>> short_repr("x" * 10_000_000, 5)
    "'xxxx…[cut: 10000000 chars]"
    """
    limit = max(int(limit), 1)
    try:
        if isinstance(value, str):
            return _cut(repr(value[: limit + 1]), limit, len(value) > limit, f"{len(value)} chars")
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value[: limit + 1])
            size = value.nbytes if isinstance(value, memoryview) else len(value)
            return _cut(repr(data), limit, size > limit, f"{size} bytes")
        text = _bounded.repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
    return _cut(text, limit, False, "")


def _cut(text: str, limit: int, longer: bool, size: str) -> str:
    """``text`` itself if short and complete; else its first ``limit`` characters and a marker."""
    if len(text) <= limit and not longer:
        return text
    return text[:limit] + (f"…[cut: {size}]" if size else "…[cut]")


# -- Text the database must accept ---------------------------------------------------------------

#: What PostgreSQL refuses in text and JSON (NUL), and what UTF-8 cannot encode at all (surrogate
#: code points: in a Python str they are always unpaired, from ``surrogateescape`` or a bad escape).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: A NUL character written as a JSON escape (after an even number of backslashes).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
#: The character put in place of what cannot be stored.
REPLACEMENT = "\ufffd"


def has_unstorable(text: str) -> bool:
    """Whether ``text`` holds a NUL character or a surrogate code point."""
    return _UNSTORABLE.search(text) is not None


def has_nul_escape(json_text: str) -> bool:
    """Whether a JSON document's text holds a NUL character (always written as ``\\u0000``)."""
    return _NUL_ESCAPE.search(json_text) is not None


def storable(text: str) -> str:
    """``text`` with each NUL character and surrogate code point replaced by U+FFFD, so that any
    database (PostgreSQL refuses NUL) and UTF-8 accept it."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


def storable_json(text: str) -> str:
    """A JSON document's text with NUL escapes (``\\u0000``) and surrogates replaced by U+FFFD.

    ``text`` is what ``json.dumps(..., ensure_ascii=False)`` made: surrogates stay
    characters there, and NUL is escaped.
    """
    return _NUL_ESCAPE.sub(lambda match: match.group(1) + "\\ufffd", storable(text))


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters; else its start and its end, with a marker
    between them that says how many characters were cut and how many there were.

    The end gets three quarters of the room: in a traceback it holds the innermost
    frames and the exception itself.
    """
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    return (
        f"{text[:head]}\n[… {len(text) - limit} characters cut here; the text had {len(text)} …]\n"
        f"{text[len(text) - tail :]}"
    )
