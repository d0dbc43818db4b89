"""The ``DJANGO_EVENTS`` settings dict, read at use time.

Every key is optional. Read settings through :func:`get_settings`, never at
import time, so that ``override_settings(DJANGO_EVENTS=...)`` works in tests.

Every value is checked when the settings are first read: a value of the wrong
type, not finite (``nan``, ``inf``) or out of its range raises
``ConfigurationError`` (an ``ImproperlyConfigured``) naming the key and what it
takes. Durations are seconds, at most :data:`MAX_DURATION` (ten years): far
beyond any sensible value, and small enough that a date this far ahead (or a
time limit in milliseconds) never overflows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError
from .text import short_repr

__all__ = [
    "MAX_DURATION",
    "MAX_EVENT_BYTES_LIMIT",
    "MAX_QUEUE_NAME_LENGTH",
    "MAX_RECOVERY_BATCH",
    "MAX_RETRIES",
    "EventsSettings",
    "get_settings",
    "is_valid_queue_name",
]

#: The longest duration any setting takes, in seconds: ten years (365-day years).
MAX_DURATION = 10 * 365 * 24 * 3600
#: The most retries ``DEFAULT_RETRIES`` takes (a run's attempt count is a 32-bit column).
MAX_RETRIES = 1_000_000
#: The largest ``MAX_EVENT_BYTES``: PostgreSQL's ``jsonb`` holds no more than 255 MiB.
MAX_EVENT_BYTES_LIMIT = 2**28 - 1
#: The largest ``RECOVERY_BATCH``.
MAX_RECOVERY_BATCH = 100_000
#: The longest ``QUEUE_NAME``: the length of the database broker's ``queue_name`` column
#: (and of a RabbitMQ queue's name).
MAX_QUEUE_NAME_LENGTH = 255

# Dramatiq's rule for queue names (``dramatiq.actor``): a letter or an underscore, then letters,
# digits, dots, underscores or dashes (ASCII only).
_QUEUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class EventsSettings:
    """The effective django-events settings, with their defaults.

    Durations are in seconds and finite, from 0 (or just above, where 0 makes no sense)
    to :data:`MAX_DURATION` (ten years).
    """

    #: Retries after the first attempt for functions that do not set ``retries``
    #: (0 to :data:`MAX_RETRIES`).
    DEFAULT_RETRIES: int = 4
    #: Smallest delay, in seconds, before a retry (the first retry's base delay; 0 or more).
    RETRY_BACKOFF_MIN: float = 10.0
    #: Largest delay, in seconds, before a retry; the exponential backoff stops growing here
    #: (``RETRY_BACKOFF_MIN`` or more).
    RETRY_BACKOFF_MAX: float = 3600.0
    #: Dramatiq queue that run messages are sent to (read when the actor is declared). As
    #: Dramatiq requires: a letter or ``_``, then letters, digits, ``.``, ``_`` or ``-``; not
    #: ending in ``.DQ`` or ``.XQ`` (Dramatiq's delay and dead-letter queues); at most
    #: :data:`MAX_QUEUE_NAME_LENGTH` (255) characters.
    QUEUE_NAME: str = "django_events"
    #: Largest size, in bytes, of an event's data serialised as JSON (1 to
    #: :data:`MAX_EVENT_BYTES_LIMIT`, 255 MiB).
    MAX_EVENT_BYTES: int = 256 * 1024
    #: Seconds added to a function's time limit to form the lease of a running run (more than 0).
    LEASE_MARGIN: float = 60.0
    #: Seconds between two recovery passes in each worker process (more than 0; ``None``: no
    #: recovery loop).
    RECOVERY_INTERVAL: float | None = 15.0
    #: Seconds a pending run (or a retrying run past its due time) may wait before recovery
    #: sends its message again, if the broker's queue shows the message is no longer there
    #: (0 or more); also how far the queue's order may disagree with the runs' due times.
    RECOVERY_GRACE: float = 60.0
    #: Most runs of each kind one recovery pass takes (1 to :data:`MAX_RECOVERY_BATCH`).
    RECOVERY_BATCH: int = 500
    #: Time limit, in seconds, for functions that do not set ``time_limit``
    #: (at least 0.001, Dramatiq's limits being milliseconds; ``None``: Dramatiq's
    #: ``TimeLimit`` default, 10 minutes).
    DEFAULT_TIME_LIMIT: float | None = None
    #: Seconds a worker thread keeps its database connection from one message to the next
    #: (0 or more; ``None``: as Django's ``CONN_MAX_AGE`` says, which by default closes it
    #: after each). A connection that failed, or that a function left outside autocommit, is
    #: closed at once.
    WORKER_CONN_MAX_AGE: float | None = 300.0
    #: Seconds before its trigger event's time (``created_at``, stamped when ``send()`` is called) an
    #: event may have been sent and still end a run's ``step.wait_for_event`` (0 or more). Events
    #: are stamped when sent but seen when committed: this covers a sender's transaction still
    #: open when the trigger was sent, and clocks that differ between hosts.
    WAIT_LOOKBACK: float = 60.0
    #: On PostgreSQL, prepare the hot path's statements (planned once per connection). Turn off
    #: behind a pooler that cannot keep prepared statements (pgbouncer before 1.21, transaction mode).
    PREPARED_STATEMENTS: bool = True

    def __post_init__(self) -> None:
        up_to = f"up to {MAX_DURATION} (ten years)"
        checks: list[tuple[str, bool, str]] = [
            (
                "DEFAULT_RETRIES",
                _is_int(self.DEFAULT_RETRIES) and 0 <= self.DEFAULT_RETRIES <= MAX_RETRIES,
                f"give a whole number from 0 to {MAX_RETRIES}",
            ),
            (
                "RETRY_BACKOFF_MIN",
                _is_duration(self.RETRY_BACKOFF_MIN),
                f"give a number of seconds from 0 {up_to}",
            ),
            (
                "RETRY_BACKOFF_MAX",
                _is_duration(self.RETRY_BACKOFF_MAX)
                and (
                    not _is_duration(self.RETRY_BACKOFF_MIN)
                    or self.RETRY_BACKOFF_MAX >= self.RETRY_BACKOFF_MIN
                ),
                f"give a number of seconds from RETRY_BACKOFF_MIN {up_to}",
            ),
            (
                "QUEUE_NAME",
                is_valid_queue_name(self.QUEUE_NAME),
                "give a Dramatiq queue name: a letter or '_', then letters, digits, '.', '_' or '-', "
                f"not ending in '.DQ' or '.XQ', at most {MAX_QUEUE_NAME_LENGTH} characters",
            ),
            (
                "MAX_EVENT_BYTES",
                _is_int(self.MAX_EVENT_BYTES) and 0 < self.MAX_EVENT_BYTES <= MAX_EVENT_BYTES_LIMIT,
                f"give a whole number of bytes from 1 to {MAX_EVENT_BYTES_LIMIT}",
            ),
            (
                "LEASE_MARGIN",
                _is_duration(self.LEASE_MARGIN, above_zero=True),
                f"give a number of seconds above 0, {up_to}",
            ),
            (
                "RECOVERY_INTERVAL",
                self.RECOVERY_INTERVAL is None or _is_duration(self.RECOVERY_INTERVAL, above_zero=True),
                f"give None or a number of seconds above 0, {up_to}",
            ),
            (
                "RECOVERY_GRACE",
                _is_duration(self.RECOVERY_GRACE),
                f"give a number of seconds from 0 {up_to}",
            ),
            (
                "RECOVERY_BATCH",
                _is_int(self.RECOVERY_BATCH) and 0 < self.RECOVERY_BATCH <= MAX_RECOVERY_BATCH,
                f"give a whole number from 1 to {MAX_RECOVERY_BATCH}",
            ),
            (
                "DEFAULT_TIME_LIMIT",
                self.DEFAULT_TIME_LIMIT is None
                or (_is_duration(self.DEFAULT_TIME_LIMIT) and self.DEFAULT_TIME_LIMIT >= 0.001),
                f"give None or a number of seconds from 0.001 {up_to}",
            ),
            (
                "WAIT_LOOKBACK",
                _is_duration(self.WAIT_LOOKBACK),
                f"give a number of seconds from 0 {up_to}",
            ),
            ("PREPARED_STATEMENTS", isinstance(self.PREPARED_STATEMENTS, bool), "give True or False"),
            (
                "WORKER_CONN_MAX_AGE",
                self.WORKER_CONN_MAX_AGE is None or _is_duration(self.WORKER_CONN_MAX_AGE),
                f"give None or a number of seconds from 0 {up_to}",
            ),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigurationError(
                    f"DJANGO_EVENTS[{key!r}] has an invalid value {short_repr(getattr(self, key))}: "
                    f"{expected}. See the Settings section of the django-events README."
                )

    @property
    def default_time_limit_ms(self) -> int | None:
        """``DEFAULT_TIME_LIMIT`` in milliseconds, or ``None``."""
        if self.DEFAULT_TIME_LIMIT is None:
            return None
        return int(self.DEFAULT_TIME_LIMIT * 1000)


def is_valid_queue_name(name: object) -> bool:
    """Whether ``name`` is a queue name Dramatiq accepts and the database broker can store.

    A letter or ``_``, then letters, digits, ``.``, ``_`` or ``-``; not ending in ``.DQ``
    or ``.XQ`` (which Dramatiq reads as the delay and dead-letter queues of another
    queue); at most :data:`MAX_QUEUE_NAME_LENGTH` characters.
    """
    return (
        isinstance(name, str)
        and len(name) <= MAX_QUEUE_NAME_LENGTH
        and _QUEUE_NAME.fullmatch(name) is not None
        and not name.endswith((".DQ", ".XQ"))
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_duration(value: Any, *, above_zero: bool = False) -> bool:
    """Whether ``value`` is a finite number of seconds from 0 (or above 0) to ``MAX_DURATION``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (value > 0 if above_zero else value >= 0) and value <= MAX_DURATION


_KEYS = frozenset(f.name for f in fields(EventsSettings))
_cache: EventsSettings | None = None


def get_settings() -> EventsSettings:
    """Return the effective settings, validated; raise ``ConfigurationError`` if invalid."""
    global _cache
    if _cache is None:
        raw = getattr(django_settings, "DJANGO_EVENTS", None) or {}
        if not isinstance(raw, dict):
            raise ConfigurationError("settings.DJANGO_EVENTS must be a dict.")
        unknown = sorted(short_repr(key) if not isinstance(key, str) else key for key in set(raw) - _KEYS)
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
