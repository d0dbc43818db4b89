"""Matching sent events to the runs that wait for them (``step.wait_for_event``), and invoked runs'
ends to the runs that invoked them (``step.invoke``).

A wait must not miss its event, whatever the interleaving of the send and the
wait. Both sides commit first, then look for the other:

* the waiting run commits its wait (a ``Step`` row, ``waiting``, with the match
  key), then looks through the events sent since its trigger event;
* a send commits its events, then looks up the waits they match (an index
  lookup on ``(event_name, match_key)``: :func:`deliver`).

Whichever commits second sees the other's row, so at least one side finds the
match. Resolving a wait is one conditional UPDATE (``waiting`` -> ``completed``),
so of two events (or an event and the timeout) only one resolves it.

The run then leaves the worker (``running`` -> ``waiting``), unless its wait was
resolved or poked meanwhile: that move locks the wait's row first and checks it
(:func:`still_waiting`), while a sender locks the same row to resolve it before
moving the run from ``waiting`` to ``pending``; so either the sender sees the run
``waiting`` and wakes it, or the run sees the wait resolved and is due at once.

A wait with an ``if_`` callable is not resolved by the sender, which cannot call
the function's code: the sender *pokes* it (``pokes + 1``) and wakes its run,
whose replay checks the events itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import F

from . import clock, dispatch, ledger, rawsql
from .conf import get_settings
from .models import Event, Run, Step, StepKind, StepStatus, WaitPath

__all__ = ["deliver", "match_key", "redeliver", "value_at"]

logger = logging.getLogger("django_events")

_MISSING = object()

#: Events read at a time while a wait looks back for its event.
_LOOK_CHUNK = 500


def _lookback() -> dt.timedelta:
    return dt.timedelta(seconds=get_settings().WAIT_LOOKBACK)


def value_at(event: Event, path: str) -> Any:
    """The value at dotted ``path`` in ``event`` (``data.order_id``, ``name``), or ``_MISSING``."""
    value: Any = {"name": event.name, "data": event.data, "id": str(event.pk)}
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def match_key(path: str, value: Any) -> str:
    """The digest that sent events and waits meet on: sha256 of the path and the value, as JSON."""
    text = json.dumps([path, value], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- the waiting side ----------------------------------------------------------------------------


def create(step: Step, path: str, *, using: str) -> Step:
    """Commit a new wait (and its path), before the run looks for its event; return the stored row.

    If the row exists (a racing attempt stored it first), that row is returned.
    """
    WaitPath.objects.using(using).get_or_create(event_name=step.event_name, path=path)
    try:
        with transaction.atomic(using=using):
            step.save(using=using, force_insert=True)
    except IntegrityError:
        return Step.objects.using(using).get(run_id=step.run_id, step_id=step.step_id)
    return step


def look(
    run: Run, step: Step, path: str, accept: Callable[[Event], Any] | None, *, using: str
) -> Event | None:
    """The first event sent since ``run``'s trigger that ends ``step``: its name, match and ``accept``.

    "Since" is by the events' stamps (``created_at``), less ``WAIT_LOOKBACK``: an event
    committed after the trigger may have been stamped a little before it (its sender's
    transaction was open, or its host's clock is behind). A sender applies the same
    bound (:func:`deliver`), so whichever side sees the other, an event counts or not
    alike.

    Events that ended another wait of the run are passed over, so that a loop of
    waits for the same event takes each event once.
    """
    trigger = run.event
    want = _MISSING if not path else value_at(trigger, path)
    used = Step.objects.using(using).filter(run_id=run.pk, resolved_event__isnull=False).exclude(pk=step.pk)
    candidates = (
        Event.objects.using(using)
        .filter(name=step.event_name, created_at__gte=trigger.created_at - _lookback())
        .exclude(pk=trigger.pk)
        .exclude(pk__in=used.values("resolved_event"))
        .order_by("created_at", "id")
    )
    for event in candidates.iterator(chunk_size=_LOOK_CHUNK):
        if path and value_at(event, path) != want:
            continue
        if accept is not None and not accept(event):
            continue
        return event
    return None


def resolve(step: Step, event_id: Any, *, using: str, now: dt.datetime) -> bool:
    """End ``step`` with event ``event_id`` if it still waits: one conditional UPDATE. Whether it did."""
    return bool(
        Step.objects.using(using)
        .filter(pk=step.pk, status__in=_OPEN)
        .update(status=StepStatus.COMPLETED, resolved_event=event_id, finished_at=now)
    )


def finish(step: Step, *, using: str, now: dt.datetime, result: Any = None, error: str = "") -> bool:
    """End ``step`` with no event (a timeout, an invoked run's end) if it still waits. Whether it did."""
    return bool(
        Step.objects.using(using)
        .filter(pk=step.pk, status__in=_OPEN)
        .update(status=StepStatus.COMPLETED, result=result, error=error, finished_at=now)
    )


#: A wait's statuses before it ends (a cancelled run's waits, until it is retried).
_OPEN = (StepStatus.WAITING, StepStatus.CANCELLED)


def still_waiting(step: Step, pokes: int, *, using: str) -> bool:
    """Lock ``step``'s row and say whether it still waits, unpoked since the run read ``pokes``.

    Call it in the transaction that moves the run to ``waiting``, before that move.
    """
    row = (
        Step.objects.using(using)
        .select_for_update()
        .filter(pk=step.pk)
        .values_list("status", "pokes")
        .first()
    )
    return row == (StepStatus.WAITING, pokes)


# -- the sending side ----------------------------------------------------------------------------


def deliver(events: Sequence[Event], *, using: str | None = None) -> list[Any]:
    """After the commit of ``events``: end the waits they match, poke those with an ``if_``, and send
    the runs woken. Returns the ids of the runs woken.

    A wait's match key is the digest of its path and value, so each (event, path)
    is one index lookup. The paths in use per event name are read first (a few
    rows): an event nobody waits for costs that one query.
    """
    using = using or router.db_for_write(Step)
    paths = _paths_for(sorted({event.name for event in events}), using)
    if not paths:
        return []
    woken: list[Any] = []
    for event in events:
        for path in paths.get(event.name, ()):
            if path:
                value = value_at(event, path)
                if value is _MISSING:
                    continue
                key = match_key(path, value)
            else:
                key = match_key("", None)
            woken += _deliver_one(event, key, using=using)
    return woken


def _paths_for(names: list[str], using: str) -> dict[str, list[str]]:
    """The match paths some wait used, per event name among ``names``: what every send asks.

    One prepared statement (``rawsql.cursor``: planned once per connection on
    PostgreSQL), not an ORM query: for a send of an event nobody waits for, building
    the ORM's query cost more than the send's own insert (benchmarks/steps.py).
    """
    paths: dict[str, list[str]] = {}
    with rawsql.cursor(using) as cursor:
        cursor.execute(_paths_sql(using, len(names)), names)
        for name, path in cursor.fetchall():
            paths.setdefault(name, []).append(path)
    return paths


@cache
def _paths_sql(using: str, count: int) -> str:
    quote = connections[using].ops.quote_name
    fields = {field.name: quote(rawsql.column(field)) for field in WaitPath._meta.concrete_fields}
    return (
        f"SELECT {fields['event_name']}, {fields['path']} FROM {quote(WaitPath._meta.db_table)} "
        f"WHERE {fields['event_name']} IN ({', '.join(['%s'] * count)})"
    )


def _deliver_one(event: Event, key: str, *, using: str) -> list[Any]:
    now = clock.now()
    matching = (
        Step.objects.using(using)
        .filter(status=StepStatus.WAITING, kind=StepKind.WAIT, event_name=event.name, match_key=key)
        .filter(run__event__created_at__lte=event.created_at + _lookback())  # as look() bounds it
        .exclude(run__event_id=event.pk)  # a run's own trigger never ends its waits
        # nor does an event that ended another of its waits (matched again by recovery)
        .exclude(run__step_set__resolved_event=event.pk)
    )
    with transaction.atomic(using=using):
        rows = list(matching.values_list("pk", "run_id", "checks"))
        if not rows:
            return []
        resolved = [pk for pk, _run, checks in rows if not checks]
        checked = [pk for pk, _run, checks in rows if checks]
        # Lock order: the waits, then their runs (as a run leaving the worker does).
        if resolved:
            Step.objects.using(using).filter(pk__in=resolved, status=StepStatus.WAITING).update(
                status=StepStatus.COMPLETED, resolved_event=event.pk, finished_at=now
            )
        if checked:
            Step.objects.using(using).filter(pk__in=checked, status=StepStatus.WAITING).update(
                pokes=F("pokes") + 1
            )
        runs = ledger.resume([run for _pk, run, _checks in rows], using=using, now=now)
        dispatch.send_with_transaction(runs, using)
    return [pk for pk, _function in runs]


def redeliver(
    *, since: dt.datetime, until: dt.datetime, limit: int, using: str
) -> tuple[list[Any], dt.datetime | None]:
    """Match again the events sent from ``since`` to ``until`` whose name some wait has used.

    A sender matches its events after its commit; if its process died in between,
    nobody would until each wait's timeout (whose last look finds the event, late).
    Recovery calls this on the events old enough that their sender should have matched
    them. Matching is a conditional update, so doing it twice is harmless. Returns
    the ids of the runs woken, and the stamp of the last event matched if ``limit``
    cut the batch short (the next call goes on from there), else ``None``.
    """
    names = list(WaitPath.objects.using(using).values_list("event_name", flat=True).distinct())
    if not names:
        return [], None
    events = list(
        Event.objects.using(using)
        .filter(name__in=names, created_at__gte=since, created_at__lt=until)
        .order_by("created_at", "id")[:limit]
    )
    woken = deliver(events, using=using) if events else []
    return woken, events[-1].created_at if len(events) == limit else None


def invoked_ended(children: Iterable[Run], *, using: str, now: dt.datetime) -> None:
    """In the transaction that ends invoked runs: poke their callers' invokes and wake the callers."""
    pairs = [(run.parent, run.pk) for run in children if run.parent is not None]
    if not pairs:
        return
    parents = {parent for parent, _child in pairs}
    Step.objects.using(using).filter(
        run_id__in=parents,
        kind=StepKind.INVOKE,
        invoked_run__in=[child for _parent, child in pairs],
        status=StepStatus.WAITING,
    ).update(pokes=F("pokes") + 1)
    dispatch.send_with_transaction(ledger.resume(parents, using=using, now=now), using)


def invoked_ended_ids(run_ids: Iterable[Any], *, using: str, now: dt.datetime) -> None:
    """:func:`invoked_ended` for runs known by id (a cancel): those that an invoke started."""
    children = list(
        Run.objects.using(using).filter(pk__in=list(run_ids), parent__isnull=False).only("parent")
    )
    invoked_ended(children, using=using, now=now)
