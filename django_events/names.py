"""Event names and triggers: what a valid name is, and which names a wildcard trigger matches."""

from __future__ import annotations

import re
from functools import lru_cache

from .exceptions import EventValidationError

__all__ = ["MAX_NAME_LENGTH", "is_wildcard", "matches", "validate_event_name", "validate_trigger"]

#: Longest event name or function id, in characters (the database column size).
MAX_NAME_LENGTH = 255

#: The separators of a name's segments: ``"app/user.created"`` has three segments.
_SEPARATORS = "/."
#: One ``*`` stands for one or more whole segments.
_SEGMENTS = r"[^/.]+(?:[/.][^/.]+)*"


def validate_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise ``EventValidationError``.

    An event name is a string of 1 to 255 characters with no whitespace or
    control characters, such as ``"api/source.connected"``.
    """
    if not isinstance(name, str):
        raise EventValidationError(f"An event name must be a str, not {type(name).__name__}.")
    if not name:
        raise EventValidationError("An event name cannot be empty.")
    if len(name) > MAX_NAME_LENGTH:
        raise EventValidationError(
            f"An event name has at most {MAX_NAME_LENGTH} characters; this one has {len(name)}."
        )
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise EventValidationError(
            f"An event name cannot contain whitespace or control characters: {name!r}."
        )
    return name


def validate_trigger(trigger: object) -> str:
    """Return ``trigger`` if it is an event name or a wildcard pattern, else raise ``EventValidationError``.

    In a pattern, ``*`` stands for one or more whole segments after a ``/`` or a
    ``.`` (or at the start): ``"app/user.*"`` matches ``"app/user.created"`` and
    ``"app/user.email.changed"``, not ``"app/user"``. A ``*`` inside a segment
    (``"app/user*"``) is refused.
    """
    name = validate_event_name(trigger)
    if "*" in name:
        for index, char in enumerate(name):
            if char != "*":
                continue
            before = name[index - 1] if index else "/"
            after = name[index + 1] if index + 1 < len(name) else "/"
            if before not in _SEPARATORS or after not in _SEPARATORS:
                raise EventValidationError(
                    f"In the trigger {name!r}, '*' must be a whole segment (after '/' or '.'), "
                    "such as 'app/user.*'."
                )
    return name


def is_wildcard(trigger: str) -> bool:
    """Whether ``trigger`` is a pattern rather than one event name."""
    return "*" in trigger


@lru_cache(maxsize=1024)
def _pattern(trigger: str) -> re.Pattern[str]:
    return re.compile(_SEGMENTS.join(re.escape(part) for part in trigger.split("*")))


def matches(trigger: str, name: str) -> bool:
    """Whether the event name ``name`` is one ``trigger`` (a name or a pattern) subscribes to."""
    if not is_wildcard(trigger):
        return trigger == name
    return _pattern(trigger).fullmatch(name) is not None
