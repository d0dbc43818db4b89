"""Helpers for your own tests: execute runs synchronously, with no broker or worker.

Example (pytest-django)::

    from django_events import send
    from django_events.testing import run_all

    def test_connecting_a_source_backfills(db):
        send("api/source.connected", {"source_id": 1})
        runs = run_all()
        assert [run.status for run in runs] == ["succeeded"]

The runs go through the same claim, call and record code as in a worker, so
attempts, results, tracebacks and retry counts are stored exactly as in
production. Function time limits are not enforced here.

Flow control holds here too, on a clock the test controls: :func:`advance`
moves django-events' time forward (in this process), and :func:`run_all` jumps
it to each next due time instead of waiting, so delays, throttles, debounce and
batch windows take no real time::

    def test_a_delayed_reminder(db):
        send("app/reminder", {"user": 1}, delay=3600)
        assert run_due() == []            # not due yet
        advance(3600)
        assert [run.status for run in run_due()] == ["succeeded"]

    def test_the_digest_batches_a_days_events(db):
        for n in range(3):
            send("app/activity", {"n": n})
        runs = run_all(until=testing.now() + timedelta(days=1))   # the batch's timeout passes

Reset the clock when a test ends (``reset_clock()`` in a fixture).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from . import clock, cron
from .execution import Execution, execute
from .models import Run, RunStatus
from .registry import lease_seconds

__all__ = ["RunsDidNotSettle", "advance", "now", "reset_clock", "run_all", "run_due"]


class RunsDidNotSettle(AssertionError):
    """Raised by ``run_all`` when runs keep coming (a function that sends its own event, say)."""


def now() -> dt.datetime:
    """The time as django-events sees it in this process (the wall clock plus :func:`advance`)."""
    return clock.now()


def advance(seconds: float | dt.timedelta) -> dt.datetime:
    """Move django-events' clock forward (this process only); return the new time.

    Delays, throttle turns, debounce and batch windows and retries then come due
    without waiting: ``send(..., delay=60); advance(60); run_due()``. Call
    :func:`reset_clock` when the test ends (a fixture is the place).
    """
    step = seconds if isinstance(seconds, dt.timedelta) else dt.timedelta(seconds=seconds)
    if step < dt.timedelta(0):
        raise ValueError("The clock only moves forward.")
    clock.set_offset(clock.offset() + step)
    return clock.now()


def reset_clock() -> None:
    """Put django-events' clock back on the wall clock."""
    clock.set_offset(dt.timedelta(0))


def _move_to(moment: dt.datetime) -> None:
    ahead = moment - clock.now()
    if ahead > dt.timedelta(0):
        clock.set_offset(clock.offset() + ahead)


def _due_order() -> Any:
    return Run.objects.due(clock.now()).order_by("due_at", "-priority", "created_at", "id")


def run_due(*, now: dt.datetime | None = None) -> list[Run]:
    """Execute once every waiting run whose due time has come (at ``now``, if given, moving the clock there).

    Flow control applies as in a worker: a run over its concurrency limit is held,
    one before its throttle turn is throttled, and so on. Returns the runs
    executed, reloaded from the database, in the order executed. Retries and runs
    that come due meanwhile are left for a later call.
    """
    if now is not None:
        _move_to(now)
    cron.schedule(now=clock.now())
    executed: dict[Any, None] = {}
    for pk, function in _due_order().values_list("pk", "function"):
        outcome, ran = _execute(pk, function)
        if outcome is not Execution.SKIPPED:
            executed.setdefault(ran)
    return _reload(list(executed))


def run_all(*, max_rounds: int = 100, until: dt.datetime | None = None) -> list[Run]:
    """Execute every due run, and every retry at once, until none is left; with ``until``, up to that time.

    Retries run at once instead of after their backoff, so do sleeping runs
    (``ctx.step.sleep`` passes at once), and runs created by the functions
    themselves (events they send, runs they invoke) are executed too. A run
    waiting for an event (``step.wait_for_event``) stays waiting: send the event
    and call ``run_all()`` again, or let its timeout pass with ``until=``. Flow control holds
    as in a worker, on django-events' clock (:func:`advance`): runs scheduled or
    throttled for later are left waiting, unless ``until`` is given: then the
    clock jumps to each next due time up to ``until`` (and stays at the last), so
    delays, throttle turns, debounce and batch windows pass without waiting.

    Cron functions get their ticks as in a worker: with ``until``, every tick up to
    that time runs.

    Args:
        max_rounds: give up after this many passes over the due runs.
        until: move django-events' clock forward, up to this time, as runs come due.

    Returns:
        Every run executed, reloaded from the database, in the order first executed.

    Raises:
        RunsDidNotSettle: runs were still due after ``max_rounds`` passes, or runs
            are held for a concurrency slot that no running run will free.
    """
    executed: dict[Any, None] = {}
    for _ in range(max_rounds):
        cron.schedule(now=clock.now())  # a cron function's ticks, as a worker makes them
        due = list(_due_order().values_list("pk", "function"))
        retries = list(
            Run.objects.filter(status__in=_FAST_FORWARD, due_at__gt=clock.now())
            .order_by("due_at", "id")
            .values_list("pk", "function")
        )
        if due or retries:
            for pk, function in due:
                _note(executed, _execute(pk, function))
            for pk, function in retries:
                _note(executed, _execute(pk, function, ignore_due=True))
            continue
        upcoming = (
            Run.objects.waiting()
            .filter(due_at__isnull=False)
            .order_by("due_at")
            .values_list("due_at", flat=True)
            .first()
        )
        if upcoming is not None and until is not None and upcoming <= until:
            _move_to(upcoming)
            continue
        held = Run.objects.filter(status=RunStatus.HELD).count()
        if held and not Run.objects.filter(status=RunStatus.RUNNING).exists():
            raise RunsDidNotSettle(
                f"{held} run(s) are held for a concurrency slot that no running run will free."
            )
        if until is not None:
            _move_to(until)
        return _reload(list(executed))
    still = Run.objects.due(clock.now()).count() + Run.objects.filter(status=RunStatus.RETRYING).count()
    raise RunsDidNotSettle(f"{still} run(s) were still due or retrying after {max_rounds} rounds.")


#: What :func:`run_all` runs at once instead of at its time: retries, and sleeping runs (their
#: ``step.sleep`` is over). A wait's timeout passes only with the clock (``until=``, :func:`advance`),
#: so that a test can send the awaited event first.
_FAST_FORWARD = (RunStatus.RETRYING, RunStatus.SLEEPING)


def _note(executed: dict[Any, None], outcome: tuple[Execution, Any]) -> None:
    execution, run_id = outcome
    if execution is not Execution.SKIPPED:
        executed.setdefault(run_id)


def _execute(run_id: Any, function_id: str, *, ignore_due: bool = False) -> tuple[Execution, Any]:
    """Execute a run as a worker would (the lease from its function), without sending retries.

    Returns what happened and the id of the run executed (another, with a priority).
    """
    return execute(run_id, enqueue=False, lease=lease_seconds(function_id), ignore_due=ignore_due)


def _reload(ids: Sequence[Any]) -> list[Run]:
    runs = Run.objects.select_related("event").in_bulk(ids)
    return [runs[pk] for pk in ids if pk in runs]
