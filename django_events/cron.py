"""Cron functions: the workers fire a tick event at each time a function's cron expressions name.

``@django_events.function(cron="0 9 * * MON", timezone="Europe/Paris")`` runs the
function every Monday at 9:00 in Paris. There is no scheduler process: every
worker's recovery loop calls :func:`schedule_pass`, and whatever the number of
workers and hosts, each tick fires once.

**A tick** is an event named :data:`CRON_EVENT` whose data says which function,
expressions and zone it belongs to and when it was scheduled
(``{"function": ..., "cron": [...], "timezone": ..., "scheduled_at": "<ISO, in the
zone>"}``), with one run of that function only (no trigger matching: a function
subscribed to the event's name gets nothing). The event's idempotency key is the
function and the tick's time in UTC (:func:`tick_key`): the database's unique
constraint lets one transaction store it, and its run goes in with it, so a tick
fires exactly once however many passes schedule it at the same moment. There is
no lock that could be lost: a pass that dies mid-way rolls back, and the next pass,
on any worker, does the work again.

**The next tick is made ahead of its time**: a ``scheduled`` run due at the tick,
with a delayed message. It fires at its time without waiting for a pass, the
admin shows it (:func:`next_ticks`), and it can be cancelled like any run. The
first pass after it is due makes the one after; the recovery loop wakes for that
(:attr:`CronPass.next_due`).

**What a pass costs.** Each cron function keeps its memory in one ``FlowKey`` row
(kind ``"cron"``): ``key``, the expressions and zone its ticks were made by
(:func:`signature`); ``tat``, the time of the latest tick made; ``open_run``, its
run. A pass reads these rows, one indexed query for every cron function; a
function whose next tick is already made for its current schedule costs nothing
more. Otherwise the pass locks the row (``ledger.lock_keys``), looks again, and
makes what is missing in one transaction:

* a function seen for the first time gets its next tick only (no history);
* a function whose expressions or zone changed gets its tick made ahead by the
  old schedule cancelled (unless the new one names the same time), and its next
  tick by the new one;
* a function whose latest tick is due or past gets the ticks missed since then
  (below), and its next tick.

**Missed ticks** (``catch_up``) are the times named after the latest tick made,
up to now: they passed while no worker ran (or no pass came). ``"latest"`` fires
the most recent of them, late; ``"all"`` fires every one, oldest first, at most
``registry.MAX_CATCH_UP`` (the most recent); ``"none"`` fires none. The tick made
ahead before the downtime counts as missed too if it has not started: with
``"latest"`` it is cancelled when a later tick also passed (that one fires
instead), with ``"none"`` when a later tick passed or it is more than
``RECOVERY_GRACE`` late. (A worker that takes its message before the first pass
runs it: the first pass comes as soon as a worker boots.)

**Time zones.** Expressions are read in the function's zone (``timezone=``, else
``settings.TIME_ZONE``) by croniter, on aware datetimes; times are compared in UTC.
When clocks go forward, no tick is lost: an expression that names every hour goes on
with the next hour (``30 * * * *``: 1:30, then 3:30, an hour later), one that names
particular hours fires the skipped times once, at the end of the gap (``30 2 * * *``
at 3:00 that day). When they go back, an expression with fixed times (no ``*`` in its
minute and hour fields: ``30 2 * * *``) fires once, at the first of the two 2:30s; one
with a ``*`` there (``0 * * * *``, ``*/15 * * * *``) fires at each real hour or quarter,
both 2:00s included, as cron does. Several expressions fire at the union of their
times, each time once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import json
import logging
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from itertools import islice, takewhile
from typing import Any

from croniter import CroniterBadDateError, croniter
from django.db import router, transaction

from . import clock, dispatch, flow, ledger
from .conf import get_settings
from .models import Event, FlowKey, Run, RunStatus
from .names import MAX_NAME_LENGTH
from .registry import MAX_CATCH_UP, Function, registered_functions

__all__ = [
    "CRON_EVENT",
    "KIND",
    "CronPass",
    "NextTick",
    "Tick",
    "next_tick",
    "next_ticks",
    "schedule",
    "schedule_pass",
    "signature",
    "tick_key",
    "ticks_between",
]

logger = logging.getLogger("django_events")

#: The name of the events that cron ticks are.
CRON_EVENT = "django_events/cron"
#: The ``FlowKey.kind`` of a cron function's memory (its ``key`` is ``""`` when locked).
KIND = "cron"

_UTC = dt.UTC
_SECOND = dt.timedelta(seconds=1)


@dataclass(frozen=True)
class Tick:
    """A tick whose run a pass made."""

    function: str
    #: The time the tick is for, in the function's zone.
    at: dt.datetime
    run_id: Any
    #: ``True``: a missed tick, fired late (due at once); ``False``: made ahead, ``scheduled`` at ``at``.
    late: bool


@dataclass
class CronPass:
    """What one :func:`schedule_pass` did."""

    #: The ticks whose run it made, in the order made.
    ticks: list[Tick] = field(default_factory=list)
    #: Runs of ticks it cancelled: made ahead by a schedule since changed, or missed (``catch_up``).
    cancelled: list[Any] = field(default_factory=list)
    #: The earliest next tick of the cron functions: a pass right after it makes the one after.
    #: ``None`` when no cron function has a next tick.
    next_due: dt.datetime | None = None
    #: Functions whose ticks could not be made (the error is logged; the next pass tries again).
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NextTick:
    """A cron function's next tick, for the admin."""

    function: str
    cron: tuple[str, ...]
    #: The zone name the expressions are read in.
    timezone: str
    #: The next time the expressions name, in the zone; ``None`` if they name no time to come.
    at: dt.datetime | None
    #: That tick's run, once a worker has made it (``scheduled`` until it fires).
    run: Run | None


# -- times ---------------------------------------------------------------------------------------


def next_tick(spec: Function, after: dt.datetime) -> dt.datetime | None:
    """The first time after ``after`` (aware) that ``spec``'s cron expressions name, in its zone.

    ``None`` if they name no time to come (``0 0 30 2 *``: February 30th).
    """
    moment = _next(spec, after)
    return None if moment is None else moment.astimezone(spec.zone())


def _next(spec: Function, after: dt.datetime) -> dt.datetime | None:
    """:func:`next_tick` in UTC.

    Times are compared in UTC only: an aware time in the repeated hour never equals
    one of another zone (PEP 495), even at the same instant.
    """
    return next(_times(spec, after), None)


def ticks_between(
    spec: Function, after: dt.datetime, until: dt.datetime, *, limit: int | None = None
) -> list[dt.datetime]:
    """The times ``spec``'s expressions name after ``after`` and up to ``until``, oldest first, in its zone.

    ``limit``: only the most recent ``limit`` of them.
    """
    zone = spec.zone()
    newest_first = takewhile(lambda moment: moment > after, _times(spec, until, reverse=True))
    return [moment.astimezone(zone) for moment in reversed(list(islice(newest_first, limit)))]


def _times(spec: Function, start: dt.datetime, *, reverse: bool = False) -> Iterator[dt.datetime]:
    """The times ``spec``'s expressions name, each once, as aware UTC datetimes.

    After ``start``, oldest first; or with ``reverse``, at or before ``start``, newest first.
    """
    if start.tzinfo is None:
        raise ValueError(f"A cron time needs an aware datetime, not {start!r}.")
    zone = spec.zone()
    # croniter's get_prev is strict; one second on, then the times after start are dropped.
    origin = start + _SECOND if reverse else start
    merged = heapq.merge(*(_series(e, zone, origin, reverse) for e in spec.cron), reverse=reverse)
    previous = None
    for moment in merged:
        if moment == previous or (moment > start if reverse else moment <= start):
            continue
        previous = moment
        yield moment


def _series(
    expression: str, zone: zoneinfo.ZoneInfo, start: dt.datetime, reverse: bool
) -> Iterator[dt.datetime]:
    """The times ``expression`` names from ``start`` on (or back), in UTC; if fixed, without repeats."""
    fixed = _is_fixed(expression)
    times = croniter(expression, start.astimezone(zone))
    step = times.get_prev if reverse else times.get_next
    last: dt.datetime | None = None
    while True:
        try:
            found = step(dt.datetime)
        except CroniterBadDateError:
            return  # no time to come (or gone) for decades: croniter gives up
        moment = found.astimezone(_UTC)
        if last is not None and (moment >= last if reverse else moment <= last):
            return  # croniter went nowhere: never loop on it
        last = moment
        if fixed and _repeated(moment, zone):
            continue
        yield moment


@cache
def _is_fixed(expression: str) -> bool:
    """Whether ``expression`` names fixed times of day (no ``*`` in its minute and hour fields).

    Such a time falls twice when clocks go back; like cron, it fires at the first one only.
    """
    fields = croniter(expression).expressions
    return "*" not in str(fields[0]) and "*" not in str(fields[1])


def _repeated(moment: dt.datetime, zone: zoneinfo.ZoneInfo) -> bool:
    """Whether ``moment``'s wall-clock time in ``zone`` is the second of two (clocks went back)."""
    local = moment.astimezone(zone)
    return bool(local.fold) and local.replace(fold=0).utcoffset() != local.utcoffset()


# -- ticks ---------------------------------------------------------------------------------------


def tick_key(function_id: str, at: dt.datetime) -> str:
    """The idempotency key of ``function_id``'s tick at ``at``: one event per function and time.

    ``django_events/cron:<function id>:<UTC time>``, or its sha256 if that is over 255 characters.
    """
    key = f"{CRON_EVENT}:{function_id}:{at.astimezone(_UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    if len(key) > MAX_NAME_LENGTH:
        key = f"{CRON_EVENT}:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return key


def signature(spec: Function) -> str:
    """What ``spec``'s ticks are made by, kept in its memory: its expressions and zone (JSON)."""
    return json.dumps({"cron": list(spec.cron), "timezone": spec.zone().key}, separators=(",", ":"))


def _when(at: dt.datetime, zone: zoneinfo.ZoneInfo) -> str:
    return f"{at.astimezone(zone):%Y-%m-%d %H:%M:%S%z} ({zone.key})"


def _fire(spec: Function, at: dt.datetime, now: dt.datetime, using: str) -> tuple[Any, Run | None]:
    """Store the tick of ``spec`` at ``at`` and its run; return ``(its run's id, the run if made now)``.

    The run is ``scheduled`` at ``at``, or ``pending`` due now for a time past. A
    tick already stored keeps its run; one whose only runs were cancelled (the
    schedule changed, then changed back) gets a new one. The id is ``None`` only
    for a tick stored with no run of this function.
    """
    zone = spec.zone()
    local = at.astimezone(zone)
    key = tick_key(spec.id, at)
    data = {
        "function": spec.id,
        "cron": list(spec.cron),
        "timezone": zone.key,
        "scheduled_at": local.isoformat(),
    }
    event = Event(name=CRON_EVENT, data=data, idempotency_key=key, created_at=now)
    stored, inserted = ledger.insert_keyed([event], using)[key]
    if not inserted:
        live = (
            Run.objects.using(using)
            .filter(event=stored, function=spec.id)
            .exclude(status=RunStatus.CANCELLED)
            .values_list("pk", flat=True)
            .first()
        )
        if live is not None:
            return live, None
    late = at <= now
    run = Run(
        event=stored,
        event_name=CRON_EVENT,
        function=spec.id,
        max_attempts=spec.max_attempts(),
        status=RunStatus.PENDING if late else RunStatus.SCHEDULED,
        due_at=now if late else at,
        ready_at=now if late else at,
        created_at=now,
        priority=flow.priority_of(spec, stored),
        reason=(
            f"cron tick of {_when(at, zone)}, missed, fired late (catch_up={spec.catch_up!r})"
            if late
            else f"cron tick of {_when(at, zone)}"
        ),
    )
    ledger.insert([], [run], using)
    return run.pk, run


# -- passes --------------------------------------------------------------------------------------


def schedule(*, now: dt.datetime | None = None, using: str | None = None) -> list[Tick]:
    """Make the ticks due by ``now`` (default: django-events' clock) and each cron function's next; one pass.

    Returns the ticks whose run this pass made. Safe to call from every worker at
    once: see the module's docstring. Tests call it with the time they choose.
    """
    return schedule_pass(now=now, using=using).ticks


def schedule_pass(*, now: dt.datetime | None = None, using: str | None = None) -> CronPass:
    """:func:`schedule`, saying also when the next pass is due and what was cancelled or failed.

    A function whose ticks cannot be made (a database error, say) is logged and
    left for the next pass; the others are scheduled.
    """
    now = now or clock.now()
    using = using or router.db_for_write(Run)
    result = CronPass()
    specs = {ledger.flow_key_id(spec.id, KIND, ""): spec for spec in registered_functions() if spec.cron}
    if not specs:
        return result
    memories = dict(
        (pk, (key, tat))
        for pk, key, tat in FlowKey.objects.using(using)
        .filter(pk__in=list(specs))
        .values_list("pk", "key", "tat")
    )
    for pk, spec in specs.items():
        wanted = signature(spec)
        key, tat = memories.get(pk, ("", None))
        if not _settled(key, tat, wanted, now):
            try:
                tat = _schedule(spec, wanted, now, using, result)
            except Exception:
                logger.exception("Could not make the cron ticks of %s; the next pass tries again.", spec.id)
                result.failed.append(spec.id)
                continue
        if tat is not None and tat > now and (result.next_due is None or tat < result.next_due):
            result.next_due = tat
    return result


def _settled(key: str, tat: dt.datetime | None, wanted: str, now: dt.datetime) -> bool:
    """Whether a function's next tick is made, by its current schedule (or the schedule names none)."""
    return key == wanted and (tat is None or tat > now)


def _schedule(
    spec: Function, wanted: str, now: dt.datetime, using: str, result: CronPass
) -> dt.datetime | None:
    """Make ``spec``'s missed ticks and its next one, under its memory's lock; return the next one's time."""
    zone = spec.zone()
    with transaction.atomic(using=using):
        memory = ledger.lock_keys([(spec.id, KIND, "")], using=using, now=now)[
            ledger.flow_key_id(spec.id, KIND, "")
        ]
        if _settled(memory.key, memory.tat, wanted, now):
            return memory.tat  # another worker made it meanwhile
        upcoming = _next(spec, now)
        missed: list[dt.datetime] = []
        cancel: tuple[Any, str] | None = None
        if memory.key == wanted and memory.tat is not None:
            # The latest tick made is due or past: the times named since then were missed.
            last = memory.tat
            passed = _passed(spec, last, now)
            missed = [] if spec.catch_up == "none" else passed
            if memory.open_run is not None and _superseded(spec, last, passed, now):
                if passed:
                    why = f"a later tick ({_when(passed[-1], zone)}) passed too"
                else:
                    why = "not started within RECOVERY_GRACE of its time"
                reason = (
                    f"cancelled: cron tick of {_when(last, zone)} missed, {why} (catch_up={spec.catch_up!r})"
                )
                cancel = (memory.open_run, reason)
        elif (
            memory.key
            and memory.open_run is not None
            and memory.tat is not None
            and memory.tat > now
            and memory.tat != upcoming
        ):
            # The schedule changed: the tick made ahead by the old one goes, unless the new one names it.
            cancel = (memory.open_run, f"cancelled: the cron schedule changed to {wanted}")
        if cancel is not None:
            run_id, reason = cancel
            if ledger.cancel([run_id], using=using, now=now, reason=reason):
                result.cancelled.append(run_id)
        made: list[tuple[dt.datetime, Run]] = []
        open_run = None
        for at in [*missed, *([upcoming] if upcoming is not None else [])]:
            open_run, run = _fire(spec, at, now, using)
            if run is not None:
                made.append((at, run))
        ledger.save_key(
            memory, using=using, key=wanted, tat=upcoming, open_run=open_run if upcoming else None
        )
        late = [(run.pk, run.function) for _at, run in made if run.status == RunStatus.PENDING]
        dispatch.send_with_transaction(late, using)
        for at, run in made:
            if run.status == RunStatus.SCHEDULED:
                dispatch.send_with_transaction(
                    [(run.pk, run.function)], using, delay=(at - now).total_seconds()
                )
    for at, run in made:
        result.ticks.append(Tick(spec.id, at.astimezone(zone), run.pk, late=run.status == RunStatus.PENDING))
    return upcoming


def _passed(spec: Function, last: dt.datetime, now: dt.datetime) -> list[dt.datetime]:
    """The missed times after ``last`` up to ``now`` that ``catch_up`` looks at, oldest first, in UTC.

    The most recent one for ``"latest"`` and ``"none"``, up to ``MAX_CATCH_UP`` for ``"all"``.
    """
    limit = MAX_CATCH_UP if spec.catch_up == "all" else 1
    return [moment.astimezone(_UTC) for moment in ticks_between(spec, last, now, limit=limit)]


def _superseded(spec: Function, last: dt.datetime, passed: list[dt.datetime], now: dt.datetime) -> bool:
    """Whether the tick at ``last``, made ahead and now past, was missed too (it is cancelled if not started).

    ``"latest"``: a later tick passed too, and fires instead. ``"none"``: that, or it is
    more than ``RECOVERY_GRACE`` late. ``"all"``: never.
    """
    if spec.catch_up == "latest":
        return bool(passed)
    if spec.catch_up == "none":
        return bool(passed) or now - last > dt.timedelta(seconds=get_settings().RECOVERY_GRACE)
    return False


# -- for the admin -------------------------------------------------------------------------------


def next_ticks(*, now: dt.datetime | None = None, using: str | None = None) -> list[NextTick]:
    """Each registered cron function's next tick, and its run if a worker has made it; two queries.

    In registration order. The run is the one made ahead by the function's current
    expressions and zone, not yet due.
    """
    now = now or clock.now()
    using = using or router.db_for_read(Run)
    specs = [spec for spec in registered_functions() if spec.cron]
    if not specs:
        return []
    memories = FlowKey.objects.using(using).in_bulk([ledger.flow_key_id(spec.id, KIND, "") for spec in specs])
    run_ids: dict[str, Any] = {}
    for spec in specs:
        memory = memories.get(ledger.flow_key_id(spec.id, KIND, ""))
        if (
            memory is not None
            and memory.open_run is not None
            and _settled(memory.key, memory.tat, signature(spec), now)
        ):
            run_ids[spec.id] = memory.open_run
    runs = Run.objects.using(using).in_bulk(list(run_ids.values())) if run_ids else {}
    return [
        NextTick(
            function=spec.id,
            cron=spec.cron,
            timezone=spec.zone().key,
            at=next_tick(spec, now),
            run=runs.get(run_ids.get(spec.id)),
        )
        for spec in specs
    ]
