"""Flow control: which runs an event gets, and when a run may start. Written through ``ledger``.

At send time, in the sender's transaction (:func:`route`, :func:`after_insert`):

* wildcards and ``if_`` filters decide which functions get a run; the ones a
  filter refused are kept on the event (``Event.skipped_by``);
* ``delay`` / ``run_at`` make runs ``scheduled``; ``priority`` is computed;
* ``cancel_on`` cancels the matching runs not started yet (:func:`cancel_matching`);
* ``debounce`` and ``batch`` fold runs into one, under their key's lock.

At claim time, in the worker (:func:`claim`), for functions with a start
timeout, a rate limit, a concurrency limit, a throttle or a priority, in one
transaction under the keys' locks: the run is cancelled, skipped, held for a
slot, throttled to its turn, or claimed with its slots. When an attempt ends
(:func:`release`), its slots go to the held runs next in line.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

from django.db import transaction
from django.db.models import Count, Q

from . import clock, dispatch, ledger, waits
from .models import Event, FlowKey, Run, RunStatus, Slot
from .options import Concurrency, KeySpec, as_seconds, describe_key, key_of
from .registry import (
    MAX_PRIORITY,
    Function,
    cancellers_for,
    functions_for,
    get_function,
    lease_seconds,
    registered_functions,
)

__all__ = [
    "after_insert",
    "batch_events",
    "cancel_matching",
    "claim",
    "describe_period",
    "finish_deadline",
    "release",
    "route",
]

logger = logging.getLogger("django_events")


def describe_period(seconds: float) -> str:
    """``14400`` -> ``"4 h"``: a period as a run's page says it."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _at(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe_key(spec: KeySpec, event: Event, what: str, function_id: str) -> str:
    """``key_of``, or a shared key (logged) when the user's key callable raises."""
    try:
        return key_of(spec, event)
    except Exception:
        logger.exception(
            "The %s key of %s raised for event %s; the run uses the key '!error'.",
            what,
            function_id,
            event.pk,
        )
        return "!error"


# -- send time -----------------------------------------------------------------------------------


def route(event: Event, now: dt.datetime, due: dt.datetime | None, *, using: str) -> list[Run]:
    """Unsaved runs of ``event``, one per function that takes it; ``event.skipped_by`` says who did not.

    ``due``: when the runs start (``send(delay=...)``); ``None`` or past: now.
    A function over its rate limit gets a ``skipped`` run saying so. Call it in
    the sender's transaction: a rate limit's key stays locked until it ends.
    """
    runs = []
    skipped: dict[str, str] = {}
    for spec in functions_for(event.name):
        if spec.if_ is not None:
            why = _filter(spec, event)
            if why:
                skipped[spec.id] = why
                continue
        run = ledger.new_run(event, spec, now, due=due, priority=priority_of(spec, event))
        if spec.rate_limit is not None:
            why = _over_rate_limit(spec, event, using=using, now=now)
            if why:
                run.status, run.reason, run.due_at, run.finished_at = RunStatus.SKIPPED, why, None, now
        runs.append(run)
    event.skipped_by = skipped
    return runs


def _over_rate_limit(spec: Function, event: Event, *, using: str, now: dt.datetime) -> str:
    """Why ``event`` is over ``spec``'s rate limit (``""``: within it, and counted).

    A generic cell rate: each event uses ``period / limit`` of the allowance, and
    ``limit`` events may come at once after a quiet ``period``.
    """
    limit = spec.rate_limit
    assert limit is not None
    key = _safe_key(limit.key, event, "rate_limit", spec.id)
    flow_key = ledger.lock_keys([(spec.id, "rate_limit", key)], using=using, now=now)[
        ledger.flow_key_id(spec.id, "rate_limit", key)
    ]
    period = as_seconds(limit.period)
    tat = max(flow_key.tat or now, now)
    if tat - dt.timedelta(seconds=period - limit.interval) > now:
        return (
            f"skipped: rate limit {limit.limit} per {describe_period(period)}{describe_key(limit.key, key)}"
        )
    ledger.save_key(flow_key, using=using, tat=tat + dt.timedelta(seconds=limit.interval))
    return ""


def _filter(spec: Function, event: Event) -> str:
    """Why ``spec``'s ``if_`` refuses ``event`` (``""``: it takes it)."""
    assert spec.if_ is not None
    try:
        taken = spec.if_(event)
    except Exception as exc:
        logger.exception(
            "The if_ filter of %s raised for event %s; the event gets no run of it.", spec.id, event.name
        )
        return f"if_ raised {type(exc).__name__}: {exc}"[:500]
    return "" if taken else "if_ returned False"


def priority_of(spec: Function, event: Event) -> int | None:
    """The priority of ``spec``'s run for ``event``: its int, or its callable's (0 if that fails)."""
    if spec.priority is None:
        return None
    if not callable(spec.priority):
        return spec.priority
    try:
        value = spec.priority(event)
    except Exception:
        logger.exception(
            "The priority of %s raised for event %s; the run gets priority 0.", spec.id, event.name
        )
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        logger.error("The priority of %s returned %r, not an int; the run gets priority 0.", spec.id, value)
        return 0
    return max(-MAX_PRIORITY, min(MAX_PRIORITY, value))


def cancel_matching(event: Event, *, using: str, now: dt.datetime) -> int:
    """Cancel the runs not started yet that ``event`` cancels (``cancel_on``); return how many."""
    cancelled = 0
    for spec, cancel in cancellers_for(event.name):
        candidates = Run.objects.using(using).filter(function=spec.id).not_started()
        if isinstance(cancel.match, str) and cancel.match.startswith("data."):
            value = key_of_value(cancel.match, event)
            if value is _MISSING:
                continue
            candidates = candidates.filter(**{"event__" + cancel.match.replace(".", "__"): value})
        ids = []
        for run in candidates.select_related("event").only("pk", "event"):
            if _cancels(cancel.match, cancel.if_, event, run.event, spec.id):
                ids.append(run.pk)
        if ids:
            moved = ledger.cancel(
                ids,
                using=using,
                now=now,
                reason=f"cancelled by event {event.name} {event.pk}",
                cancelled_by=event.pk,
            )
            if moved:
                waits.invoked_ended_ids(ids, using=using, now=now)  # callers of a cancelled invoke go on
            cancelled += moved
    return cancelled


_MISSING = object()


def key_of_value(path: str, event: Event) -> Any:
    """The value at ``path`` ("data.a.b") in ``event``, or ``_MISSING``."""
    value: Any = event.data
    for part in path.split(".")[1:]:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _cancels(
    match: KeySpec,
    if_: Callable[[Event, Event], bool] | None,
    event: Event,
    run_event: Event,
    function_id: str,
) -> bool:
    try:
        if match is not None and key_of(match, event) != key_of(match, run_event):
            return False
        return if_ is None or bool(if_(event, run_event))
    except Exception:
        logger.exception(
            "The cancel_on of %s raised for event %s; the run is not cancelled.", function_id, event.pk
        )
        return False


def after_insert(runs: Sequence[Run], *, using: str, now: dt.datetime) -> list[Run]:
    """Fold just-inserted runs of debounced and batched functions; return the runs to send messages for."""
    outgoing = []
    for run in runs:
        spec = get_function(run.function)
        if spec is not None and spec.debounce is not None:
            _debounce(run, spec, using=using, now=now)
        elif spec is not None and spec.batch is not None:
            start = _batch(run, spec, using=using, now=now)
            if start is None:
                continue  # batched into another run: no message of its own
            run = start
        outgoing.append(run)
    return outgoing


def _debounce(run: Run, spec: Function, *, using: str, now: dt.datetime) -> None:
    """Put ``run`` at the end of its key's window; the run it replaces is skipped, pointing at it."""
    debounce = spec.debounce
    assert debounce is not None
    key = _safe_key(debounce.key, run.event, "debounce", spec.id)
    flow_key = ledger.lock_keys([(spec.id, "debounce", key)], using=using, now=now)[
        ledger.flow_key_id(spec.id, "debounce", key)
    ]
    opened = now
    if flow_key.open_run is not None and ledger.merge(
        flow_key.open_run, into=run.pk, reason=f"debounced into run {run.pk}", using=using, now=now
    ):
        opened = flow_key.opened_at or now
    due = now + dt.timedelta(seconds=as_seconds(debounce.period))
    if debounce.timeout is not None:
        due = min(due, opened + dt.timedelta(seconds=as_seconds(debounce.timeout)))
    due = max(due, run.due_at or now)
    Run.objects.using(using).filter(pk=run.pk).update(
        status=RunStatus.SCHEDULED if due > now else RunStatus.PENDING, due_at=due, ready_at=due
    )
    run.status, run.due_at = (RunStatus.SCHEDULED if due > now else RunStatus.PENDING), due
    ledger.save_key(flow_key, using=using, open_run=run.pk, opened_at=opened)


def _batch(run: Run, spec: Function, *, using: str, now: dt.datetime) -> Run | None:
    """Add ``run``'s event to its key's open batch (``None``: it joined one), or open a batch with it.

    Returns the run whose message to send: ``run`` opening a batch (scheduled at
    the batch's timeout), or the batch that this event filled (due now).
    """
    batch = spec.batch
    assert batch is not None
    key = _safe_key(batch.key, run.event, "batch", spec.id)
    flow_key = ledger.lock_keys([(spec.id, "batch", key)], using=using, now=now)[
        ledger.flow_key_id(spec.id, "batch", key)
    ]
    open_run = ledger.lock_open(flow_key.open_run, using=using) if flow_key.open_run else None
    if open_run is not None and flow_key.size < batch.max_size:
        Run.objects.using(using).filter(pk=run.pk).update(
            status=RunStatus.SKIPPED,
            merged_into=open_run.pk,
            reason=f"batched into run {open_run.pk}",
            finished_at=now,
            due_at=None,
        )
        size = flow_key.size + 1
        if size >= batch.max_size:
            ledger.start_now(open_run.pk, using=using, now=now)
            ledger.save_key(flow_key, using=using, open_run=None, opened_at=None, size=0)
            open_run.status, open_run.due_at = RunStatus.PENDING, now
            return open_run
        ledger.save_key(flow_key, using=using, size=size)
        return None
    if batch.max_size == 1:
        ledger.save_key(flow_key, using=using, open_run=None, opened_at=None, size=0)
        return run
    due = max(now + dt.timedelta(seconds=as_seconds(batch.timeout)), run.due_at or now)
    Run.objects.using(using).filter(pk=run.pk).update(status=RunStatus.SCHEDULED, due_at=due, ready_at=due)
    run.status, run.due_at = RunStatus.SCHEDULED, due
    ledger.save_key(flow_key, using=using, open_run=run.pk, opened_at=now, size=1)
    return run


# -- claim time ----------------------------------------------------------------------------------


def _concurrency_kind(index: int) -> str:
    return f"concurrency{index}"


class _HeldBack:
    """What :func:`claim` returns for a run that flow control held back (it says why on the run)."""

    def __repr__(self) -> str:
        return "HELD_BACK"


HELD_BACK = _HeldBack()


def claim(
    run_id: Any,
    spec: Function,
    *,
    using: str,
    now: dt.datetime,
    lease_until: dt.datetime,
    ignore_due: bool = False,
    on_dead: Callable[[Run], None] | None = None,
) -> Run | _HeldBack | None:
    """Claim run ``run_id`` (or, with a priority, its function's run that goes first) under flow control.

    One transaction: the run is locked, then its keys (in a fixed order). A run
    past its start timeout is cancelled, one past its finish timeout dead, one with
    no free concurrency slot held, one before its throttle turn throttled (its turn
    kept, its message sent for then); otherwise it is claimed with a slot of each
    of its concurrency keys. Returns the claimed run, :data:`HELD_BACK`, or
    ``None`` if the run is not waiting or not due. ``on_dead(run)`` is called, in
    the transaction, for a run that its finish timeout ended.
    """
    with transaction.atomic(using=using):
        best_of = spec.id if spec.priority is not None else None
        run = ledger.lock_claimable(
            run_id, using=using, now=now, ignore_due=ignore_due, best_of=best_of, bound_waits=True
        )
        if run is None:
            return None
        # The time after the locks: a start is counted when it happens, not when its worker asked.
        waited = max(clock.now() - now, dt.timedelta(0))
        now, lease_until = now + waited, lease_until + waited
        for _turn in range(TAKE_OVER + 1):
            outcome = _decide(
                run,
                spec,
                using=using,
                now=now,
                lease_until=lease_until,
                ignore_due=ignore_due,
                on_dead=on_dead,
                taken_over=_turn > 0,
            )
            if not isinstance(outcome, _TakeOver):
                return outcome
            run = outcome.run  # a woken run whose kept slot this message uses (see _decide)
        return HELD_BACK


class _TakeOver:
    """What :func:`_decide` returns for a woken run to decide instead of the run held back."""

    def __init__(self, run: Run) -> None:
        self.run = run


#: How many woken runs one message may take over in a row (:func:`_decide`); each is held back or
#: claimed, so one is the usual case, more only when the woken run is itself held on another key.
TAKE_OVER = 2


def _decide(
    run: Run,
    spec: Function,
    *,
    using: str,
    now: dt.datetime,
    lease_until: dt.datetime,
    ignore_due: bool,
    on_dead: Callable[[Run], None] | None,
    taken_over: bool = False,
) -> Run | _HeldBack | _TakeOver | None:
    """Claim, hold back or end ``run`` (locked, waiting) under ``spec``'s flow control; see :func:`claim`.

    Returns the claimed run (``running``), :data:`HELD_BACK`, ``None`` (not
    claimable after all), or a *woken* run to decide instead (:class:`_TakeOver`): when ``run`` finds
    no free slot because a slot is kept for a run woken earlier (its message
    went to the back of the broker's queue, behind a backlog), ``run`` is held
    and this message takes the woken run instead, so that the slot is used now
    rather than when the woken run's own message comes (that message then finds
    nothing to do).

    ``taken_over``: ``run`` is such a woken run. Its keys may differ from those
    of the run held for it, except the one it was woken on, so locking them
    could break the order every transaction locks keys in (and deadlock): they
    are only taken if no other transaction holds them, and otherwise the woken
    run is left as it was, for its own message.
    """
    expired = _timed_out(run, spec, now)
    if expired is not None:
        to, reason = expired
        moved = ledger.hold_back(run, to, using=using, now=now, reason=reason)
        if moved and to == RunStatus.DEAD and on_dead is not None:
            on_dead(run)  # in this transaction: the run.dead event commits with the move
        if moved and run.parent is not None:
            waits.invoked_ended([run], using=using, now=now)  # its caller's invoke ends too
        return HELD_BACK
    slots: list[str] = []
    kept: list[str] = []  # slots kept for the run (it was woken)
    if spec.concurrency:
        wanted = [
            (spec.id, _concurrency_kind(i), _safe_key(c.key, run.event, "concurrency", spec.id))
            for i, c in enumerate(spec.concurrency)
        ]
        if taken_over and len(wanted) > 1:
            if len(ledger.try_lock_keys([ledger.flow_key_id(*w) for w in wanted], using=using)) < len(wanted):
                # Another transaction holds one: the woken run waits for a message of its own. Its
                # first may come while this transaction has it locked, and find nothing to take
                # (with a priority): another is sent, in this transaction, for when it is unlocked.
                dispatch.send_with_transaction([(run.pk, run.function)], using)
                return HELD_BACK
        else:
            ledger.lock_keys(wanted, using=using, now=now)
        for c, (function_id, kind, key) in zip(spec.concurrency, wanted, strict=True):
            flow_key = ledger.flow_key_id(function_id, kind, key)
            others, own = ledger.slot_counts(flow_key, using=using, now=now, run_id=run.pk)
            if own:
                kept.append(flow_key)
            if others >= c.limit:
                woken = ledger.lock_woken(flow_key, using=using, now=now, besides=run.pk)
                _hold(
                    run,
                    RunStatus.HELD,
                    using=using,
                    now=now,
                    held_on=flow_key,
                    reason=f"waiting for a concurrency slot (limit {c.limit}{describe_key(c.key, key)})",
                )
                return _TakeOver(woken) if woken is not None else HELD_BACK
            slots.append(flow_key)
    if spec.throttle is not None and not ignore_due:
        turn, counted = _throttle_turn(run, spec, using=using, now=now)
        # The claim's time is the one the throttle counted (after the key's lock).
        now, lease_until = counted, lease_until + (counted - now)
        if turn is not None:
            _hold(
                run,
                RunStatus.THROTTLED,
                using=using,
                now=now,
                due_at=turn,
                reason=f"throttled until {_at(turn)}",
            )
            dispatch.send_with_transaction(
                [(run.pk, run.function)], using, delay=(turn - now).total_seconds()
            )
            return HELD_BACK
    claimed = ledger.claim(run.pk, using=using, now=now, lease_until=lease_until, ignore_due=True)
    if claimed is None:
        return None
    if slots:
        ledger.take_slots(claimed.pk, slots, using=using, until=lease_until, kept=kept)
    return claimed


def _throttle_turn(
    run: Run, spec: Function, *, using: str, now: dt.datetime
) -> tuple[dt.datetime | None, dt.datetime]:
    """When ``run`` may start under its function's throttle (``None``: now, and the start is counted).

    Two clocks per key, each a generic cell rate (a start uses ``period / limit``;
    ``burst`` starts may come at once): ``FlowKey.opened_at`` counts the starts that
    happened, and is what keeps the limit; ``FlowKey.tat`` hands out turns, one per
    run that has to wait, so that waiting runs come back one interval apart in
    arrival order instead of all at once. A throttled run that comes back at its
    turn starts if the starts allow it; if it came back late, behind other late
    runs, it is given the next turn.
    """
    throttle = spec.throttle
    assert throttle is not None
    key = _safe_key(throttle.key, run.event, "throttle", spec.id)
    flow_key = ledger.lock_keys([(spec.id, "throttle", key)], using=using, now=now)[
        ledger.flow_key_id(spec.id, "throttle", key)
    ]
    now = max(now, clock.now())  # after the key's lock: when this start would really be
    interval = dt.timedelta(seconds=throttle.interval)
    tolerance = interval * (throttle.burst - 1)
    started = max(flow_key.opened_at or now, now)
    if run.status == RunStatus.THROTTLED and started - tolerance > now and _on_time(run, now, interval):
        # Back at (or soon after) its turn, but an earlier start came late: it goes as soon as the
        # starts allow, keeping its place. A run that came back later goes behind the turns
        # handed out, so that runs back from a long outage do not all wait for the same moment.
        return started - tolerance, now
    if run.status != RunStatus.THROTTLED or started - tolerance > now:
        # A turn: the run's own (a new run), or the next one (a run that came back too early).
        turns = max(flow_key.tat or now, now)
        turn = max(now, turns - tolerance, started - tolerance)
        ledger.save_key(flow_key, using=using, tat=max(turns, turn) + interval)
        if turn > now:
            return turn, now
    ledger.save_key(flow_key, using=using, opened_at=started + interval)
    return None, now


#: How many intervals after its turn a throttled run may come back and keep its place. Runs that
#: keep their place can meet on one moment, at most about this many (their turns are an interval
#: apart); later ones go behind the turns handed out. Four covers the delay of Redis's delayed
#: messages at a half-second interval (up to 1.6 s measured in tests/brokers/test_flow_workers.py).
ON_TIME_INTERVALS = 4


def _on_time(run: Run, now: dt.datetime, interval: dt.timedelta) -> bool:
    """Whether a throttled run came back soon enough after its turn to keep its place."""
    return run.due_at is not None and now - run.due_at < interval * ON_TIME_INTERVALS


def _timed_out(run: Run, spec: Function, now: dt.datetime) -> tuple[str, str] | None:
    """``(status, reason)`` for a run past its start or finish timeout, else ``None``.

    The start timeout counts from when the run could first start (``Run.ready_at``:
    when it was sent, or its time: a delay, a cron tick, a debounce or batch window),
    however long it was held or throttled since; the finish timeout from its first start.
    """
    timeouts = spec.timeouts
    if timeouts is None:
        return None
    if timeouts.start is not None and run.attempts == 0:
        start = as_seconds(timeouts.start)
        since = run.ready_at or run.created_at
        if now > since + dt.timedelta(seconds=start):
            return (
                RunStatus.CANCELLED,
                f"cancelled: not started within {describe_period(start)} (Timeouts.start)",
            )
    if timeouts.finish is not None and run.started_at is not None:
        finish = as_seconds(timeouts.finish)
        if now > run.started_at + dt.timedelta(seconds=finish):
            return (
                RunStatus.DEAD,
                f"timed out: not finished within {describe_period(finish)} (Timeouts.finish)",
            )
    return None


def finish_deadline(run: Run) -> dt.datetime | None:
    """When ``run``'s ``Timeouts.finish`` ends it (from its first start), or ``None``."""
    spec = get_function(run.function)
    if spec is None or spec.timeouts is None or spec.timeouts.finish is None or run.started_at is None:
        return None
    return run.started_at + dt.timedelta(seconds=as_seconds(spec.timeouts.finish))


def batch_events(run: Run) -> list[Event]:
    """The events a batch run handles: its own, then those batched into it, oldest first."""
    merged = (
        Run.objects.filter(merged_into=run.pk, status=RunStatus.SKIPPED)
        .select_related("event")
        .order_by("created_at", "pk")
    )
    return [run.event, *(item.event for item in merged)]


def release(run: Run, *, using: str, now: dt.datetime) -> list[tuple[Any, str]]:
    """Give back the slots of ``run`` (its attempt ended) to the runs held on them; return the runs woken.

    Call it inside the transaction that records the attempt, and send the woken
    runs' messages in it (``dispatch.send_with_transaction``).
    """
    keys = ledger.release_slots(run.pk, using=using, bound_waits=True)
    return _wake(keys, run.function, using=using, now=now)


def _hold(run: Run, to: str, *, using: str, now: dt.datetime, reason: str, **where: Any) -> None:
    """Hold ``run`` back (``held`` or ``throttled``: :func:`ledger.hold_back`), giving back first any
    slot kept for it."""
    _give_back(run, using=using, now=now)
    ledger.hold_back(run, to, using=using, now=now, reason=reason, **where)


def _give_back(run: Run, *, using: str, now: dt.datetime) -> None:
    """Give back the slots kept for a woken ``run`` that is held back again, and send who takes them."""
    woken = release(run, using=using, now=now)
    dispatch.send_with_transaction([ref for ref in woken if ref[0] != run.pk], using)


def _wake(keys: Sequence[str], function_id: str, *, using: str, now: dt.datetime) -> list[tuple[Any, str]]:
    spec = get_function(function_id)
    if spec is None or not keys:
        return []
    woken: list[tuple[Any, str]] = []
    locked = ledger.lock_keys_by_id(keys, using=using, now=now)
    slot_until = now + dt.timedelta(seconds=lease_seconds(function_id))
    for flow_key in sorted(locked):
        limit = _limit_of(spec, locked[flow_key].kind)
        if limit is None:
            continue
        woken += ledger.wake(flow_key, limit=limit.limit, using=using, now=now, slot_until=slot_until)
    return woken


#: Per database: the last concurrency key (FlowKey id) a recovery pass of this process looked at,
#: so that each pass goes on from there and every key with held runs is looked at in turn.
_swept_to: dict[str, str] = {}


def sweep(*, now: dt.datetime, limit: int, using: str) -> tuple[list[tuple[Any, str]], list[Any]]:
    """Recovery's part of flow control: wake held runs a free slot waits for, end held runs timed out.

    A slot is normally handed to the next held run by the attempt that gives it
    back (:func:`release`); this finds the ones nobody handed over: a slot whose
    lease ended (its worker died) or that a cancel gave back. Each pass looks at
    up to ``limit`` keys with held runs, in key order, going on where the last
    pass stopped (and starting over after the last key), so that every key is
    looked at however many there are; it counts their live slots in one query
    and opens a transaction only for a key with a free slot. Returns the runs
    woken ``(id, function)`` and the ids of the held runs cancelled by their
    ``Timeouts.start``.
    """
    woken: list[tuple[Any, str]] = []
    held = Run.objects.using(using).filter(status=RunStatus.HELD)
    after = _swept_to.get(using, "")
    keys = _held_keys(held.filter(held_on__gt=after), limit)
    if len(keys) < limit and after:  # past the last key: start over, up to where this pass began
        keys += _held_keys(held.filter(held_on__lte=after), limit - len(keys))
    _swept_to[using] = keys[-1] if len(keys) == limit else ""
    live = dict(
        Slot.objects.using(using)
        .filter(flow_key__in=keys, lease_expires_at__gt=now)
        .order_by()
        .values_list("flow_key")
        .annotate(n=Count("pk"))
    )
    for flow_key in FlowKey.objects.using(using).filter(pk__in=keys).order_by("pk"):
        spec = get_function(flow_key.function)
        limit_of = None if spec is None else _limit_of(spec, flow_key.kind)
        if limit_of is None or live.get(flow_key.pk, 0) >= limit_of.limit:
            continue
        with transaction.atomic(using=using):
            ledger.bound_lock_waits(using)
            found = _wake([flow_key.pk], flow_key.function, using=using, now=now)
            dispatch.send_with_transaction(found, using)
        woken += found
    timed_out: list[Any] = []
    for spec in registered_functions():
        if spec.timeouts is None or spec.timeouts.start is None:
            continue
        start = as_seconds(spec.timeouts.start)
        cutoff = now - dt.timedelta(seconds=start)
        late = list(
            held.filter(function=spec.id)
            .filter(Q(ready_at__lt=cutoff) | Q(ready_at__isnull=True, created_at__lt=cutoff))
            .values_list("pk", flat=True)[:limit]
        )
        if late and ledger.cancel(
            late,
            using=using,
            now=now,
            reason=f"cancelled: not started within {describe_period(start)} (Timeouts.start)",
        ):
            waits.invoked_ended_ids(late, using=using, now=now)  # callers of a cancelled invoke go on
            timed_out += late
    return woken, timed_out


def _held_keys(held: Any, limit: int) -> list[str]:
    """The first ``limit`` concurrency keys (FlowKey ids) the ``held`` runs wait on, in order."""
    return list(held.order_by("held_on").values_list("held_on", flat=True).distinct()[:limit])


def _limit_of(spec: Function, kind: str) -> Concurrency | None:
    for index, limit in enumerate(spec.concurrency):
        if _concurrency_kind(index) == kind:
            return limit
    return None
