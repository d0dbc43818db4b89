"""What a function's code gave back, made storable: results as JSON, exceptions as text."""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from .exceptions import ResultNotSerializableError
from .text import storable, storable_json

__all__ = ["exc_type_name", "json_result", "safe_str", "traceback_text"]

logger = logging.getLogger("django_events")


def json_result(value: Any, what: str = "The function") -> Any:
    """``value`` as the database will store it (JSON), with what no database accepts replaced."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ResultNotSerializableError(
            f"{what} returned a value that JSON cannot hold ({type(value).__name__}): "
            f"{safe_str(exc)}. Return JSON-serialisable data (dicts, lists, strings, numbers, "
            "booleans, None)."
        ) from exc
    clean = storable_json(text)
    if clean != text:
        logger.warning("A result held NUL characters or lone surrogates; they are stored as U+FFFD.")
    return json.loads(clean)


def exc_type_name(exc: BaseException) -> str:
    """The exception's dotted type name (bare for builtins), storable and at most 255 characters."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return storable(name)[:255]


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or what to say instead when that raises."""
    try:
        return str(exc)
    except Exception as error:
        return f"<str() of this {type(exc).__name__} raised {type(error).__name__}>"


def traceback_text(exc: BaseException) -> str:
    """The exception's formatted traceback, or as much of it as can be formatted."""
    try:
        return "".join(traceback.format_exception(exc))
    except Exception as error:  # a broken exception chain, say: keep what can be had
        frames = "".join(traceback.format_tb(exc.__traceback__))
        return f"{frames}<the traceback could not be formatted in full: {type(error).__name__}>"
