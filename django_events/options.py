"""The flow-control options of ``@django_events.function``: what each one says, checked at startup.

These classes only describe a policy and check their arguments; ``flow.py``
enforces them through the ledger. All are importable from ``django_events``.

Periods and timeouts are seconds (``int`` or ``float``) or ``timedelta``. A
``key`` (and ``CancelOn``'s ``match``) is a dotted path into the event, such as
``"data.user_id"`` (``data`` is the event's data; ``name`` and ``id`` are the
event's own), or a callable that takes the event and returns the key.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .conf import MAX_DURATION
from .names import validate_trigger

if TYPE_CHECKING:
    from .models import Event

__all__ = [
    "Batch",
    "CancelOn",
    "Concurrency",
    "Debounce",
    "KeySpec",
    "RateLimit",
    "Throttle",
    "Timeouts",
    "as_seconds",
    "key_of",
    "seconds",
]

#: A key: a dotted path into the event ("data.user_id"), or a callable(event) returning the key.
KeySpec = str | Callable[["Event"], Any] | None

#: The largest ``limit`` of a concurrency, throttle or rate limit, and ``max_size`` of a batch.
MAX_LIMIT = 100_000
#: The shortest period or timeout, in seconds.
MIN_PERIOD = 0.001

_PATH = re.compile(r"(data(\.[^.\s]+)*|name|id)")


def seconds(value: object, what: str, *, minimum: float = MIN_PERIOD) -> float:
    """``value`` (seconds or a ``timedelta``) as a float of seconds, or ``TypeError`` naming ``what``."""
    if isinstance(value, dt.timedelta):
        number = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{what} must be a number of seconds or a timedelta, not {value!r}.")
    if not (math.isfinite(number) and minimum <= number <= MAX_DURATION):
        raise TypeError(
            f"{what} must be from {minimum:g} to {MAX_DURATION} seconds (ten years), not {value!r}."
        )
    return number


def as_seconds(value: float | dt.timedelta) -> float:
    """A checked period or timeout (already seconds once its class checked it) as a float."""
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def _limit(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise TypeError(f"{what} must be an int from 1 to {MAX_LIMIT}, not {value!r}.")
    return value


def _key(value: object, what: str) -> KeySpec:
    if value is None or callable(value):
        return value
    if isinstance(value, str) and _PATH.fullmatch(value):
        return value
    raise TypeError(
        f"{what} must be a dotted path into the event such as 'data.user_id' (or 'name', 'id'), "
        f"or a callable taking the event, not {value!r}."
    )


def key_of(spec: KeySpec, event: Event) -> str:
    """The key ``spec`` gives ``event``, as text: ``""`` without a key spec, JSON of the value otherwise.

    A path that leads nowhere (a missing key, or into a non-object) gives ``"null"``,
    as does a callable returning ``None``: those events share one key.
    """
    if spec is None:
        return ""
    if callable(spec):
        value = spec(event)
    else:
        head, _, rest = spec.partition(".")
        value = {"data": event.data, "name": event.name, "id": str(event.pk)}[head]
        for part in rest.split(".") if rest else ():
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def describe_key(spec: KeySpec, key: str) -> str:
    """How a run's page names a key: ``"for user_id 7"``, or ``""`` for a function-wide limit."""
    if spec is None:
        return ""
    name = spec.rpartition(".")[2] if isinstance(spec, str) else "key"
    return f" for {name} {key}"


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` attempts of the function running at once, per ``key`` if given.

    Counted across every worker and host. A run over the limit waits (``held``)
    without using an attempt, and starts when a slot frees, in priority then
    arrival order; a slot held by a killed worker comes back when its lease ends.
    """

    limit: int
    key: KeySpec = None

    def __post_init__(self) -> None:
        _limit(self.limit, "Concurrency.limit")
        _key(self.key, "Concurrency.key")


@dataclass(frozen=True)
class Throttle:
    """At most ``limit`` starts per ``period``, per ``key``; up to ``burst`` of them at once.

    Excess runs are not dropped: each waits (``throttled``) until its turn.
    """

    limit: int
    period: float | dt.timedelta
    key: KeySpec = None
    burst: int = 1

    def __post_init__(self) -> None:
        _limit(self.limit, "Throttle.limit")
        object.__setattr__(self, "period", seconds(self.period, "Throttle.period"))
        _key(self.key, "Throttle.key")
        _limit(self.burst, "Throttle.burst")

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate."""
        return as_seconds(self.period) / self.limit


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` runs per ``period``, per ``key``: the excess events are skipped (recorded)."""

    limit: int
    period: float | dt.timedelta
    key: KeySpec = None

    def __post_init__(self) -> None:
        _limit(self.limit, "RateLimit.limit")
        object.__setattr__(self, "period", seconds(self.period, "RateLimit.period"))
        _key(self.key, "RateLimit.key")

    @property
    def interval(self) -> float:
        """Seconds each run uses of the allowance."""
        return as_seconds(self.period) / self.limit


@dataclass(frozen=True)
class Debounce:
    """One run, with the last event, once ``period`` passes with no new event (per ``key``).

    ``timeout``: the longest a run may be put off by new events, from the first
    event of its window; then it runs with the last event so far.
    """

    period: float | dt.timedelta
    key: KeySpec = None
    timeout: float | dt.timedelta | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "period", seconds(self.period, "Debounce.period"))
        _key(self.key, "Debounce.key")
        if self.timeout is not None:
            object.__setattr__(self, "timeout", seconds(self.timeout, "Debounce.timeout"))


@dataclass(frozen=True)
class Batch:
    """One run for up to ``max_size`` events (per ``key``); ``ctx.events`` holds them, oldest first.

    A batch runs when it is full, or ``timeout`` after its first event.
    """

    max_size: int
    timeout: float | dt.timedelta
    key: KeySpec = None

    def __post_init__(self) -> None:
        _limit(self.max_size, "Batch.max_size")
        object.__setattr__(self, "timeout", seconds(self.timeout, "Batch.timeout"))
        _key(self.key, "Batch.key")


@dataclass(frozen=True)
class CancelOn:
    """An event that cancels the function's runs not started yet (pending, scheduled, waiting, retrying).

    ``match``: a dotted path (or callable) whose value must be equal in the
    cancelling event and the run's event, such as ``"data.order_id"``.
    ``if_``: ``callable(cancelling_event, run_event) -> bool``, for other conditions.
    With neither, every run of the function would be cancelled: pass
    ``all_runs=True`` to mean it.
    """

    event: str
    match: KeySpec = None
    if_: Callable[[Event, Event], bool] | None = field(default=None)
    all_runs: bool = False

    def __post_init__(self) -> None:
        validate_trigger(self.event)
        _key(self.match, "CancelOn.match")
        if self.if_ is not None and not callable(self.if_):
            raise TypeError(
                f"CancelOn.if_ must be a callable(cancelling_event, run_event), not {self.if_!r}."
            )
        if self.match is None and self.if_ is None and not self.all_runs:
            raise TypeError(
                f"CancelOn({self.event!r}) has neither match= nor if_=, so it would cancel every run of "
                "the function; pass all_runs=True if that is what you mean."
            )


@dataclass(frozen=True)
class Timeouts:
    """``start``: cancel a run not started this long after it was created (or due).

    ``finish``: fail a run still not finished this long after its first attempt
    started: no attempt starts after it, and an attempt that ends after it fails
    the run. Each attempt is also bounded by the function's ``time_limit``, which
    Dramatiq enforces by interrupting it.
    """

    start: float | dt.timedelta | None = None
    finish: float | dt.timedelta | None = None

    def __post_init__(self) -> None:
        if self.start is not None:
            object.__setattr__(self, "start", seconds(self.start, "Timeouts.start"))
        if self.finish is not None:
            object.__setattr__(self, "finish", seconds(self.finish, "Timeouts.finish"))


#: What happens to cron ticks missed while no worker ran.
CatchUp = Literal["latest", "all", "none"]
