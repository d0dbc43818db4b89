"""The function table: ``@function`` registers callables, ``functions_for`` matches triggers."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from croniter import CroniterBadDateError, croniter
from django.conf import settings as django_settings

from .conf import MAX_DURATION, MAX_RETRIES, get_settings
from .exceptions import DuplicateFunctionError
from .names import MAX_NAME_LENGTH, is_wildcard, matches, validate_event_name, validate_trigger
from .options import Batch, CancelOn, CatchUp, Concurrency, Debounce, RateLimit, Throttle, Timeouts

if TYPE_CHECKING:
    from .models import Event
    from .steps import Steps

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
    "validate_trigger",
]

#: The highest (and, negated, lowest) priority a run can have.
MAX_PRIORITY = 1_000_000
#: Cron ticks a function with ``catch_up="all"`` fires at most after downtime.
MAX_CATCH_UP = 1000

#: Dramatiq's own default time limit, in seconds: the ``TimeLimit`` middleware's when nothing else is set.
DRAMATIQ_DEFAULT_TIME_LIMIT = 600.0
#: Shortest time limit, in seconds: Dramatiq counts in milliseconds, and 0 would mean "no limit".
MIN_TIME_LIMIT = 0.001

F = TypeVar("F", bound=Callable[..., Any])


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
    #: Cron expressions; a tick event runs the function at each time one of them names.
    cron: tuple[str, ...] = ()
    #: The IANA time zone the cron expressions are read in; ``None``: ``settings.TIME_ZONE``.
    timezone: str | None = None
    #: Which ticks missed while no worker ran are fired: ``"latest"``, ``"all"`` or ``"none"``.
    catch_up: CatchUp = "latest"
    #: ``callable(event) -> bool``: ``False`` and the event gets no run of this function.
    if_: Callable[[Event], bool] | None = None
    concurrency: tuple[Concurrency, ...] = ()
    throttle: Throttle | None = None
    rate_limit: RateLimit | None = None
    debounce: Debounce | None = None
    #: An int, or ``callable(event) -> int``: higher runs first when work waits.
    priority: int | Callable[[Event], int] | None = None
    batch: Batch | None = None
    cancel_on: tuple[CancelOn, ...] = ()
    timeouts: Timeouts | None = None

    @property
    def controls_start(self) -> bool:
        """Whether a claim must ask ``flow`` first (a limit, a throttle, a start timeout, a priority)."""
        return bool(
            self.concurrency
            or self.throttle
            or self.rate_limit
            or self.priority is not None
            or (self.timeouts is not None and (self.timeouts.start or self.timeouts.finish))
        )

    def zone(self) -> zoneinfo.ZoneInfo:
        """The time zone of the cron expressions."""
        return zoneinfo.ZoneInfo(self.timezone or django_settings.TIME_ZONE or "UTC")

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
        events: the events this run handles: ``[event]``, or for a function with
            ``batch=`` every event of the batch, oldest first.
        step: the run's durable steps (``steps.Steps``): ``ctx.step.run(...)``,
            ``atomic``, ``sleep``, ``sleep_until``, ``wait_for_event``,
            ``send_event``, ``invoke``.
    """

    event: Event
    run_id: Any
    attempt: int
    max_attempts: int
    function_id: str
    logger: logging.LoggerAdapter[logging.Logger] = field(repr=False)
    events: list[Event] = field(default_factory=list, repr=False)
    step: Steps = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not self.events:
            self.events = [self.event]

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
    cron: str | Iterable[str] | None = None,
    timezone: str | None = None,
    catch_up: CatchUp = "latest",
    if_: Callable[[Event], bool] | None = None,
    concurrency: int | Concurrency | Iterable[Concurrency] | None = None,
    throttle: Throttle | None = None,
    rate_limit: RateLimit | None = None,
    debounce: Debounce | None = None,
    priority: int | Callable[[Event], int] | None = None,
    batch: Batch | None = None,
    cancel_on: CancelOn | Iterable[CancelOn] | None = None,
    timeouts: Timeouts | None = None,
) -> Callable[[F], F]:
    """Register the decorated callable to run, in a worker, for each event named in ``triggers``.

    Args:
        triggers: event names, such as ``"api/source.connected"``, or patterns where
            ``*`` stands for one or more segments (``"app/user.*"``). None is needed
            with ``cron``.
        id: the function's stable id, stored on its runs; defaults to the
            callable's dotted path. Must be unique.
        retries: retries after the first attempt (``DJANGO_EVENTS["DEFAULT_RETRIES"]`` if ``None``).
        time_limit: seconds an attempt may take before it is interrupted and retried.
        cron: a cron expression (``"0 9 * * MON"``) or several: the workers fire a
            tick event at each time named, once however many workers run.
        timezone: the IANA zone the cron expressions are read in (default ``settings.TIME_ZONE``).
        catch_up: ticks missed while no worker ran: ``"latest"`` fires the last one,
            ``"all"`` every one (at most 1,000), ``"none"`` none.
        if_: ``callable(event) -> bool``, asked at send time: ``False`` and the
            event gets no run of this function (its admin page says so).
        concurrency: at most this many attempts running at once: an int, a
            :class:`~django_events.Concurrency` (with a key), or a list of them.
        throttle: a :class:`~django_events.Throttle`: excess runs wait their turn.
        rate_limit: a :class:`~django_events.RateLimit`: excess events are skipped.
        debounce: a :class:`~django_events.Debounce`: one run with the last event.
        priority: an int or ``callable(event) -> int`` (-1,000,000 to 1,000,000):
            higher runs first when runs wait for workers or slots.
        batch: a :class:`~django_events.Batch`: one run for many events (``ctx.events``).
        cancel_on: a :class:`~django_events.CancelOn` or a list: events that cancel
            the function's runs not started yet.
        timeouts: a :class:`~django_events.Timeouts`: cancel a run not started in
            time, fail a run not finished in time.

    The callable takes one argument, a :class:`Context`, and returns a
    JSON-serialisable value (stored on the run) or ``None``. It is returned
    unchanged, so it can still be called directly.

    Raises:
        DuplicateFunctionError: another callable is already registered under ``id``.
        EventValidationError: a trigger is not a valid event name or pattern.
        TypeError: an argument has the wrong type, or a cron expression does not parse.
    """
    if not triggers and cron is None:
        raise TypeError(
            "@django_events.function needs at least one event name to subscribe to, or a cron= schedule."
        )
    for trigger in triggers:
        validate_trigger(trigger)
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
    options = _FlowOptions.check(
        cron=cron,
        timezone=timezone,
        catch_up=catch_up,
        if_=if_,
        concurrency=concurrency,
        throttle=throttle,
        rate_limit=rate_limit,
        debounce=debounce,
        priority=priority,
        batch=batch,
        cancel_on=cancel_on,
        timeouts=timeouts,
    )

    def decorator(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@django_events.function decorates a callable, not {fn!r}.")
        function_id = id or f"{fn.__module__}.{fn.__qualname__}"
        if len(function_id) > MAX_NAME_LENGTH:
            raise TypeError(
                f"The function id {function_id!r} is longer than {MAX_NAME_LENGTH} characters; "
                "pass a shorter id=."
            )
        try:
            options.check_cron()
        except TypeError as exc:
            raise TypeError(f"@django_events.function {function_id!r}: {exc}") from None
        spec = Function(
            id=function_id,
            fn=fn,
            triggers=tuple(dict.fromkeys(triggers)),
            retries=retries,
            time_limit=None if time_limit is None else float(time_limit),
            **options.fields(),
        )
        register(spec)
        return fn

    return decorator


@dataclass(frozen=True)
class _FlowOptions:
    """The flow-control arguments of :func:`function`, checked and in the form ``Function`` keeps."""

    cron: tuple[str, ...]
    timezone: str | None
    catch_up: CatchUp
    if_: Callable[[Event], bool] | None
    concurrency: tuple[Concurrency, ...]
    throttle: Throttle | None
    rate_limit: RateLimit | None
    debounce: Debounce | None
    priority: int | Callable[[Event], int] | None
    batch: Batch | None
    cancel_on: tuple[CancelOn, ...]
    timeouts: Timeouts | None

    @classmethod
    def check(cls, **kwargs: Any) -> _FlowOptions:
        cron = kwargs["cron"]
        if cron is None:
            crons: tuple[str, ...] = ()
        elif isinstance(cron, str):
            crons = (cron,)
        elif isinstance(cron, Iterable) and all(isinstance(item, str) for item in cron):
            crons = tuple(dict.fromkeys(cron))
        else:
            raise TypeError(f"cron must be a cron expression (str) or a list of them, not {cron!r}.")
        if cron is not None and not crons:
            raise TypeError("cron= was given an empty list.")
        zone = kwargs["timezone"]
        if kwargs["catch_up"] not in ("latest", "all", "none"):
            raise TypeError(f"catch_up must be 'latest', 'all' or 'none', not {kwargs['catch_up']!r}.")
        if kwargs["if_"] is not None and not callable(kwargs["if_"]):
            raise TypeError(f"if_ must be a callable(event) -> bool, not {kwargs['if_']!r}.")
        concurrency = kwargs["concurrency"]
        if concurrency is None:
            limits: tuple[Concurrency, ...] = ()
        elif isinstance(concurrency, int) and not isinstance(concurrency, bool):
            limits = (Concurrency(concurrency),)
        elif isinstance(concurrency, Concurrency):
            limits = (concurrency,)
        elif isinstance(concurrency, (list, tuple)) and all(isinstance(c, Concurrency) for c in concurrency):
            limits = tuple(concurrency)
        else:
            raise TypeError(
                "concurrency must be an int, a Concurrency(limit, key=...) or a list of them, "
                f"not {concurrency!r}."
            )
        for name, kind in (
            ("throttle", Throttle),
            ("rate_limit", RateLimit),
            ("debounce", Debounce),
            ("batch", Batch),
            ("timeouts", Timeouts),
        ):
            value = kwargs[name]
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}(...), not {value!r}.")
        if kwargs["debounce"] is not None and kwargs["batch"] is not None:
            raise TypeError(
                "A function cannot have both debounce= and batch=: each decides which events run."
            )
        priority = kwargs["priority"]
        if (
            priority is not None
            and not callable(priority)
            and (isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY)
        ):
            raise TypeError(
                f"priority must be an int from -{MAX_PRIORITY} to {MAX_PRIORITY} or a callable(event), "
                f"not {priority!r}."
            )
        cancel_on = kwargs["cancel_on"]
        if cancel_on is None:
            cancels: tuple[CancelOn, ...] = ()
        elif isinstance(cancel_on, CancelOn):
            cancels = (cancel_on,)
        elif isinstance(cancel_on, (list, tuple)) and all(isinstance(c, CancelOn) for c in cancel_on):
            cancels = tuple(cancel_on)
        else:
            raise TypeError(f"cancel_on must be a CancelOn(...) or a list of them, not {cancel_on!r}.")
        return cls(
            cron=crons,
            timezone=zone,
            catch_up=kwargs["catch_up"],
            if_=kwargs["if_"],
            concurrency=limits,
            throttle=kwargs["throttle"],
            rate_limit=kwargs["rate_limit"],
            debounce=kwargs["debounce"],
            priority=priority,
            batch=kwargs["batch"],
            cancel_on=cancels,
            timeouts=kwargs["timeouts"],
        )

    def check_cron(self) -> None:
        """Check the zone and the expressions (the errors are raised naming the function)."""
        zone = zoneinfo.ZoneInfo("UTC")
        if self.timezone is not None:
            if not isinstance(self.timezone, str):
                raise TypeError(
                    f"timezone must be an IANA zone name such as 'Europe/Paris', not {self.timezone!r}."
                )
            try:
                zone = zoneinfo.ZoneInfo(self.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise TypeError(f"timezone {self.timezone!r} is not a known IANA time zone.") from None
        for expression in self.cron:
            if not croniter.is_valid(expression):
                raise TypeError(f"the cron expression {expression!r} does not parse.")
            try:
                croniter(expression, dt.datetime(2000, 1, 1, tzinfo=zone)).get_next(dt.datetime)
            except CroniterBadDateError:
                raise TypeError(f"the cron expression {expression!r} names no time that exists.") from None

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


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
    global _by_trigger, _wildcards, _matched, _with_cancel_on, _folding, _controlled, _limited
    index: dict[str, list[Function]] = {}
    wildcards: list[tuple[str, Function]] = []
    for spec in _functions.values():
        for trigger in spec.triggers:
            if is_wildcard(trigger):
                wildcards.append((trigger, spec))
            else:
                index.setdefault(trigger, []).append(spec)
    _by_trigger = {name: tuple(specs) for name, specs in index.items()}
    _wildcards = tuple(wildcards)
    _matched = {}
    _with_cancel_on = tuple(spec for spec in _functions.values() if spec.cancel_on)
    _folding = frozenset(spec.id for spec in _functions.values() if spec.debounce or spec.batch)
    _controlled = frozenset(spec.id for spec in _functions.values() if spec.controls_start)
    _limited = frozenset(spec.id for spec in _functions.values() if spec.concurrency)


_wildcards: tuple[tuple[str, Function], ...] = ()
#: Event names already matched against the wildcard triggers (cleared when the table changes).
_matched: dict[str, tuple[Function, ...]] = {}
#: Most event names whose matches are remembered.
_MATCHED_SIZE = 10_000


def functions_for(event_name: str) -> tuple[Function, ...]:
    """The functions subscribed to ``event_name`` (by name or pattern), in registration order, each once."""
    if not _wildcards:
        return _by_trigger.get(event_name, ())
    found = _matched.get(event_name)
    if found is None:
        specs = {spec.id: spec for spec in _by_trigger.get(event_name, ())}
        for trigger, spec in _wildcards:
            if matches(trigger, event_name):
                specs.setdefault(spec.id, spec)
        order = {spec_id: index for index, spec_id in enumerate(_functions)}
        found = tuple(sorted(specs.values(), key=lambda spec: order[spec.id]))
        if len(_matched) < _MATCHED_SIZE:
            _matched[event_name] = found
    return found


def cancellers_for(event_name: str) -> tuple[tuple[Function, CancelOn], ...]:
    """The functions, with their ``CancelOn``, whose runs an event named ``event_name`` may cancel."""
    return tuple(
        (spec, cancel)
        for spec in _with_cancel_on
        for cancel in spec.cancel_on
        if matches(cancel.event, event_name)
    )


_with_cancel_on: tuple[Function, ...] = ()
_folding: frozenset[str] = frozenset()
_controlled: frozenset[str] = frozenset()
_limited: frozenset[str] = frozenset()


def controls_start() -> bool:
    """Whether any function has flow control at claim time (else no claim asks ``flow``)."""
    return bool(_controlled)


def has_concurrency(function_id: str) -> bool:
    """Whether the function ``function_id`` has a concurrency limit (its attempts hold slots)."""
    return function_id in _limited


def has_cancellers() -> bool:
    """Whether any function has ``cancel_on`` (else a send looks for no runs to cancel)."""
    return bool(_with_cancel_on)


def folding_ids() -> frozenset[str]:
    """The ids of the functions with ``debounce`` or ``batch``: their runs are folded after insert."""
    return _folding


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
