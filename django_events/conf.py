"""The ``DJANGO_EVENTS`` settings dict, read at use time.

Every key is optional. Read settings through :func:`get_settings`, never at
import time, so that ``override_settings(DJANGO_EVENTS=...)`` works in tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError

__all__ = ["EventsSettings", "get_settings"]


@dataclass(frozen=True)
class EventsSettings:
    """The effective django-events settings, with their defaults."""

    #: Retries after the first attempt for functions that do not set ``retries``.
    DEFAULT_RETRIES: int = 4
    #: Smallest delay, in seconds, before a retry (the first retry's base delay).
    RETRY_BACKOFF_MIN: float = 10.0
    #: Largest delay, in seconds, before a retry; the exponential backoff stops growing here.
    RETRY_BACKOFF_MAX: float = 3600.0
    #: Dramatiq queue that run messages are sent to (read when the actor is declared).
    QUEUE_NAME: str = "django_events"
    #: Largest size, in bytes, of an event's data serialised as JSON.
    MAX_EVENT_BYTES: int = 256 * 1024
    #: Seconds added to a function's time limit to form the lease of a running run.
    LEASE_MARGIN: float = 60.0
    #: Seconds between two recovery passes in each worker process (``None``: no recovery loop).
    RECOVERY_INTERVAL: float | None = 15.0
    #: Seconds a pending run (or a retrying run past its due time) may wait before recovery
    #: sends its message again.
    RECOVERY_GRACE: float = 60.0
    #: Most runs of each kind one recovery pass takes.
    RECOVERY_BATCH: int = 500
    #: Time limit, in seconds, for functions that do not set ``time_limit``
    #: (``None``: Dramatiq's ``TimeLimit`` default, 10 minutes).
    DEFAULT_TIME_LIMIT: float | None = None
    #: Seconds a worker thread keeps its database connection from one message to the next
    #: (``None``: as Django's ``CONN_MAX_AGE`` says, which by default closes it after each).
    #: A connection that failed, or that a function left outside autocommit, is closed at once.
    WORKER_CONN_MAX_AGE: float | None = 300.0
    #: On PostgreSQL, prepare the hot path's statements (planned once per connection). Turn off
    #: behind a pooler that cannot keep prepared statements (pgbouncer before 1.21, transaction mode).
    PREPARED_STATEMENTS: bool = True

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("DEFAULT_RETRIES", _is_int(self.DEFAULT_RETRIES) and self.DEFAULT_RETRIES >= 0),
            ("RETRY_BACKOFF_MIN", _is_number(self.RETRY_BACKOFF_MIN) and self.RETRY_BACKOFF_MIN >= 0),
            (
                "RETRY_BACKOFF_MAX",
                _is_number(self.RETRY_BACKOFF_MAX) and self.RETRY_BACKOFF_MAX >= self.RETRY_BACKOFF_MIN,
            ),
            ("QUEUE_NAME", isinstance(self.QUEUE_NAME, str) and bool(self.QUEUE_NAME)),
            ("MAX_EVENT_BYTES", _is_int(self.MAX_EVENT_BYTES) and self.MAX_EVENT_BYTES > 0),
            ("LEASE_MARGIN", _is_number(self.LEASE_MARGIN) and self.LEASE_MARGIN > 0),
            (
                "RECOVERY_INTERVAL",
                self.RECOVERY_INTERVAL is None
                or (_is_number(self.RECOVERY_INTERVAL) and self.RECOVERY_INTERVAL > 0),
            ),
            ("RECOVERY_GRACE", _is_number(self.RECOVERY_GRACE) and self.RECOVERY_GRACE >= 0),
            ("RECOVERY_BATCH", _is_int(self.RECOVERY_BATCH) and self.RECOVERY_BATCH > 0),
            (
                "DEFAULT_TIME_LIMIT",
                self.DEFAULT_TIME_LIMIT is None
                or (_is_number(self.DEFAULT_TIME_LIMIT) and self.DEFAULT_TIME_LIMIT > 0),
            ),
            ("PREPARED_STATEMENTS", isinstance(self.PREPARED_STATEMENTS, bool)),
            (
                "WORKER_CONN_MAX_AGE",
                self.WORKER_CONN_MAX_AGE is None
                or (_is_number(self.WORKER_CONN_MAX_AGE) and self.WORKER_CONN_MAX_AGE >= 0),
            ),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigurationError(
                    f"DJANGO_EVENTS[{key!r}] has an invalid value {getattr(self, key)!r}; "
                    "see the Settings section of the django-events README."
                )

    @property
    def default_time_limit_ms(self) -> int | None:
        """``DEFAULT_TIME_LIMIT`` in milliseconds, or ``None``."""
        if self.DEFAULT_TIME_LIMIT is None:
            return None
        return int(self.DEFAULT_TIME_LIMIT * 1000)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_KEYS = frozenset(f.name for f in fields(EventsSettings))
_cache: EventsSettings | None = None


def get_settings() -> EventsSettings:
    """Return the effective settings, validated; raise ``ConfigurationError`` if invalid."""
    global _cache
    if _cache is None:
        raw = getattr(django_settings, "DJANGO_EVENTS", None) or {}
        if not isinstance(raw, dict):
            raise ConfigurationError("settings.DJANGO_EVENTS must be a dict.")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ConfigurationError(
                f"Unknown key(s) in settings.DJANGO_EVENTS: {', '.join(unknown)}. "
                f"Valid keys are: {', '.join(sorted(_KEYS))}."
            )
        _cache = dataclasses.replace(EventsSettings(), **raw)
    return _cache


@receiver(setting_changed)
def _reset_cache(*, setting: str, **kwargs: Any) -> None:
    global _cache
    if setting == "DJANGO_EVENTS":
        _cache = None
