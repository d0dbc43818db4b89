"""The function table: ``@function`` registers callables, ``functions_for`` matches triggers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .conf import MAX_DURATION, MAX_RETRIES, get_settings
from .exceptions import DuplicateFunctionError, EventValidationError

if TYPE_CHECKING:
    from .models import Event

__all__ = [
    "Context",
    "Function",
    "function",
    "functions_for",
    "get_function",
    "lease_for_time_limit",
    "lease_seconds",
    "max_attempts_for",
    "registered_functions",
    "time_limit_ms_for",
    "validate_event_name",
]

#: Longest event name or function id, in characters (the database column size).
MAX_NAME_LENGTH = 255
#: Dramatiq's own default time limit, in seconds: the ``TimeLimit`` middleware's when nothing else is set.
DRAMATIQ_DEFAULT_TIME_LIMIT = 600.0
#: Shortest time limit, in seconds: Dramatiq counts in milliseconds, and 0 would mean "no limit".
MIN_TIME_LIMIT = 0.001

F = TypeVar("F", bound=Callable[..., Any])


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


@dataclass(frozen=True)
class Function:
    """A registered function: what runs, on which events, with which retry policy."""

    id: str
    fn: Callable[[Context], Any]
    triggers: tuple[str, ...]
    #: Retries after the first attempt; ``None``: ``DJANGO_EVENTS["DEFAULT_RETRIES"]``.
    retries: int | None = None
    #: Seconds before the attempt is interrupted; ``None``: the default time limit.
    time_limit: float | None = None

    @property
    def path(self) -> str:
        """The dotted path of the callable."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def max_attempts(self) -> int:
        """The attempts a new run of this function is allowed (first try plus retries)."""
        retries = get_settings().DEFAULT_RETRIES if self.retries is None else self.retries
        return 1 + retries

    def time_limit_ms(self) -> int | None:
        """The time limit in milliseconds, or ``None`` for Dramatiq's default."""
        if self.time_limit is not None:
            return int(self.time_limit * 1000)
        return get_settings().default_time_limit_ms


@dataclass
class Context:
    """What a function receives: the event, and where this attempt stands.

    Attributes:
        event: the ``Event`` being handled (``event.name``, ``event.data``, ``event.id``).
        run_id: the id of this run.
        attempt: this attempt's number, 1 on the first try.
        max_attempts: the attempts this run is allowed in all.
        function_id: the id of the function being run.
        logger: a logger that tags its lines with the run id and function.
    """

    event: Event
    run_id: Any
    attempt: int
    max_attempts: int
    function_id: str
    logger: logging.LoggerAdapter[logging.Logger] = field(repr=False)

    @property
    def is_last_attempt(self) -> bool:
        """Whether a failure of this attempt would send the run to ``dead``."""
        return self.attempt >= self.max_attempts


_lock = threading.Lock()
_functions: dict[str, Function] = {}
_by_trigger: dict[str, tuple[Function, ...]] = {}


def function(
    *triggers: str,
    id: str | None = None,
    retries: int | None = None,
    time_limit: float | None = None,
) -> Callable[[F], F]:
    """Register the decorated callable to run, in a worker, for each event named in ``triggers``.

    Args:
        triggers: one or more event names, such as ``"api/source.connected"``.
        id: the function's stable id, stored on its runs; defaults to the
            callable's dotted path. Must be unique.
        retries: retries after the first attempt (``DJANGO_EVENTS["DEFAULT_RETRIES"]`` if ``None``).
        time_limit: seconds an attempt may take before it is interrupted and retried.

    The callable takes one argument, a :class:`Context`, and returns a
    JSON-serialisable value (stored on the run) or ``None``. It is returned
    unchanged, so it can still be called directly.

    Raises:
        DuplicateFunctionError: another callable is already registered under ``id``.
        EventValidationError: a trigger is not a valid event name.
        TypeError: an argument has the wrong type.
    """
    if not triggers:
        raise TypeError("@django_events.function needs at least one event name to subscribe to.")
    for trigger in triggers:
        validate_event_name(trigger)
    if id is not None and (not isinstance(id, str) or not id or len(id) > MAX_NAME_LENGTH):
        raise TypeError(f"A function id must be a non-empty str of at most {MAX_NAME_LENGTH} characters.")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES
    ):
        raise TypeError(f"retries must be an int from 0 to {MAX_RETRIES}, not {retries!r}.")
    if time_limit is not None and (
        isinstance(time_limit, bool)
        or not isinstance(time_limit, (int, float))
        or not MIN_TIME_LIMIT <= time_limit <= MAX_DURATION  # False for NaN too
    ):
        raise TypeError(
            f"time_limit must be a number of seconds from {MIN_TIME_LIMIT} to {MAX_DURATION} (ten years), "
            f"not {time_limit!r}."
        )

    def decorator(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@django_events.function decorates a callable, not {fn!r}.")
        spec = Function(
            id=id or f"{fn.__module__}.{fn.__qualname__}",
            fn=fn,
            triggers=tuple(dict.fromkeys(triggers)),
            retries=retries,
            time_limit=None if time_limit is None else float(time_limit),
        )
        if len(spec.id) > MAX_NAME_LENGTH:
            raise TypeError(
                f"The function id {spec.id!r} is longer than {MAX_NAME_LENGTH} characters; "
                "pass a shorter id=."
            )
        register(spec)
        return fn

    return decorator


def register(spec: Function) -> None:
    """Add ``spec`` to the table; the same callable registered again (a re-import) replaces itself."""
    with _lock:
        existing = _functions.get(spec.id)
        if existing is not None and existing.path != spec.path:
            raise DuplicateFunctionError(
                f"Two functions are registered with the id {spec.id!r}: {existing.path} and "
                f"{spec.path}. Give one of them another id with @django_events.function(..., id=...)."
            )
        _functions[spec.id] = spec
        _rebuild_index()


def unregister(function_id: str) -> None:
    """Remove a function from the table (for tests and code that registers functions dynamically)."""
    with _lock:
        _functions.pop(function_id, None)
        _rebuild_index()


def _rebuild_index() -> None:
    global _by_trigger
    index: dict[str, list[Function]] = {}
    for spec in _functions.values():
        for trigger in spec.triggers:
            index.setdefault(trigger, []).append(spec)
    _by_trigger = {name: tuple(specs) for name, specs in index.items()}


def functions_for(event_name: str) -> tuple[Function, ...]:
    """The functions subscribed to ``event_name``, in registration order."""
    return _by_trigger.get(event_name, ())


def get_function(function_id: str) -> Function | None:
    """The function registered under ``function_id``, or ``None``."""
    return _functions.get(function_id)


def max_attempts_for(function_id: str) -> int:
    """The attempts a new run of ``function_id`` is allowed: its own setting, or the default.

    A function that is no longer registered gets ``1 + DJANGO_EVENTS["DEFAULT_RETRIES"]``.
    """
    spec = _functions.get(function_id)
    return spec.max_attempts() if spec is not None else 1 + get_settings().DEFAULT_RETRIES


def time_limit_ms_for(function_id: str) -> int | None:
    """The time limit, in ms, of an attempt of ``function_id``: its own, or the default.

    ``None`` leaves Dramatiq's ``TimeLimit`` default in force.
    """
    spec = _functions.get(function_id)
    return spec.time_limit_ms() if spec is not None else get_settings().default_time_limit_ms


def lease_seconds(function_id: str) -> float:
    """How long a worker holds a run of ``function_id``: its time limit plus ``LEASE_MARGIN``."""
    return lease_for_time_limit(time_limit_ms_for(function_id))


def lease_for_time_limit(time_limit_ms: float | None) -> float:
    """The lease, in seconds, of an attempt under a time limit in ms (``None``: Dramatiq's default)."""
    limit = DRAMATIQ_DEFAULT_TIME_LIMIT if time_limit_ms is None else time_limit_ms / 1000
    return limit + get_settings().LEASE_MARGIN


def registered_functions() -> Iterable[Function]:
    """Every registered function."""
    return tuple(_functions.values())
