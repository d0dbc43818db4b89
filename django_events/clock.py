"""The time django-events goes by: ``timezone.now()``, moved forward by tests that control it.

``django_events.testing.advance(seconds)`` moves this clock (in this process
only), so that a test can see delays, throttles, debounce windows and cron
ticks come due without waiting. Workers in other processes are not affected.
"""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

__all__ = ["now", "offset", "set_offset"]

_offset = dt.timedelta(0)


def now() -> dt.datetime:
    """The current time: the wall clock, plus what a test advanced it by."""
    return timezone.now() + _offset


def offset() -> dt.timedelta:
    """How far a test has moved the clock ahead."""
    return _offset


def set_offset(value: dt.timedelta) -> None:
    """Move the clock to ``value`` ahead of the wall clock (for ``django_events.testing``)."""
    global _offset
    _offset = value
