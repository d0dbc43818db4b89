"""django-events: transactional background events for Django, run by Dramatiq workers.

Subscribe functions with ``@django_events.function("name")`` in an app's
``events.py``, and call ``django_events.send("name", data)`` from anywhere.

This module must import before Django's apps are ready (it is the app's
package), so ``send`` and ``send_many``, which need the models, are loaded on
first use (PEP 562): ``django_events.send`` and ``from django_events import
send`` both work once the apps are ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import (
    DjangoEventsError,
    EventValidationError,
    InvokeFailedError,
    InvokeTimeoutError,
    NonDeterminismError,
    NonRetriableError,
    RetryAfterError,
)
from .options import Batch, CancelOn, Concurrency, Debounce, RateLimit, Throttle, Timeouts
from .registry import Context, function

if TYPE_CHECKING:
    from .sending import send, send_many

__all__ = [
    "Batch",
    "CancelOn",
    "Concurrency",
    "Context",
    "Debounce",
    "DjangoEventsError",
    "EventValidationError",
    "InvokeFailedError",
    "InvokeTimeoutError",
    "NonDeterminismError",
    "NonRetriableError",
    "RateLimit",
    "RetryAfterError",
    "Throttle",
    "Timeouts",
    "function",
    "send",
    "send_many",
]

__version__ = "0.1.0"

#: Public names defined in a module that imports the models, and that module.
_LAZY = {"send": "sending", "send_many": "sending"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
