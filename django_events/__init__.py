"""django-events: transactional background events for Django, run by Dramatiq workers.

Subscribe functions with ``@django_events.function("name")`` in an app's
``events.py``, and call ``django_events.send("name", data)`` from anywhere.
This module imports no models, so it can be imported before apps are ready.
"""

from __future__ import annotations

from .exceptions import (
    DjangoEventsError,
    EventValidationError,
    NonRetriableError,
    RetryAfterError,
)
from .registry import Context, function
from .sending import send, send_many

__all__ = [
    "Context",
    "DjangoEventsError",
    "EventValidationError",
    "NonRetriableError",
    "RetryAfterError",
    "function",
    "send",
    "send_many",
]

__version__ = "0.1.0"
