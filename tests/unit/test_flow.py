"""Flow control in one process, on the clock the test controls: each feature's rule, and bad input."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import time

import dramatiq
import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext

import django_events
from django_events import (
    Batch,
    CancelOn,
    Concurrency,
    Debounce,
    EventValidationError,
    RateLimit,
    RetryAfterError,
    Throttle,
    Timeouts,
    dispatch,
    flow,
    ledger,
    registry,
    signals,
)
from django_events.control import cancel_runs
from django_events.execution import TURN_AGAIN, execute_run, record
from django_events.models import Event, FlowKey, Run, RunStatus, Slot
from django_events.recovery import recover
from django_events.testing import advance, now, run_all, run_due
from tests.testapp.models import Span

pytestmark = pytest.mark.usefixtures("ledger_form")


@contextlib.contextmanager
def _another_transaction(sql, params):
    """Run ``sql`` in a transaction of another connection (a worker elsewhere, or a client gone
    silent), kept open, with its locks, until the block ends; then roll it back."""
    other = connection.copy()
    try:
        other.connect()
        other.set_autocommit(False)
        with other.cursor() as cursor:
            cursor.execute(sql, params)
        yield other
    finally:
        other.rollback()
        other.close()


def _runs(function: str) -> list[Run]:
    return list(Run.objects.filter(function=function).order_by("created_at", "id"))


# -- delays ----------------------------------------------------------------------------------------


def test_a_delayed_run_exists_at_once_as_scheduled_and_runs_at_its_time(db):
    event = django_events.send("flow/unlimited", {"n": 1}, delay=60)
    (run,) = _runs("tests.flow_unlimited")
    assert run.event_id == event.pk
    assert run.status == RunStatus.SCHEDULED
    assert abs((run.due_at - now()).total_seconds() - 60) < 5

    assert run_due() == []  # not due yet
    advance(61)
    assert [r.status for r in run_due()] == [RunStatus.SUCCEEDED]


def test_run_at_schedules_at_that_time_and_a_past_time_runs_now(db):
    later = now() + dt.timedelta(hours=2)
    django_events.send("flow/unlimited", {"n": 1}, run_at=later)
    django_events.send("flow/unlimited", {"n": 2}, run_at=now() - dt.timedelta(hours=1))
    first, second = _runs("tests.flow_unlimited")
    assert (first.status, first.due_at) == (RunStatus.SCHEDULED, later)
    assert second.status == RunStatus.PENDING


def test_a_scheduled_run_can_be_cancelled_and_then_never_runs(db):
    django_events.send("flow/unlimited", delay=30)
    (run,) = _runs("tests.flow_unlimited")

    cancel_runs([run.pk])
    advance(31)
    assert run_due() == []
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay": -1}, "delay must be from 0"),
        ({"delay": float("nan")}, "delay must be from 0"),
        ({"delay": "10"}, "delay must be a number"),
        ({"delay": True}, "delay must be a number"),
        ({"run_at": dt.datetime(2030, 1, 1)}, "aware datetime"),
        ({"run_at": "2030-01-01"}, "run_at must be a datetime"),
        ({"delay": 5, "run_at": dt.datetime(2030, 1, 1, tzinfo=dt.UTC)}, "not both"),
    ],
)
def test_bad_delays_are_refused_and_nothing_is_stored(db, kwargs, message):
    with pytest.raises(EventValidationError, match=message):
        django_events.send("flow/unlimited", **kwargs)
    assert not Event.objects.exists()


# -- wildcards and filters -------------------------------------------------------------------------


def test_a_wildcard_trigger_takes_every_name_under_it_and_not_the_prefix_itself(db):
    for name in ("flow/order.created", "flow/order.item.added", "flow/order", "flow/orders.created"):
        django_events.send(name)
    assert sorted(
        Run.objects.filter(function="tests.flow_wildcard").values_list("event_name", flat=True)
    ) == [
        "flow/order.created",
        "flow/order.item.added",
    ]


def test_a_filter_that_refuses_gives_no_run_and_the_event_says_which_function(db):
    refused = django_events.send("flow/filtered", {"go": False})
    taken = django_events.send("flow/filtered", {"go": True})
    assert not Run.objects.filter(event=refused).exists()
    assert Event.objects.get(pk=refused.pk).skipped_by == {"tests.flow_filtered": "if_ returned False"}
    assert Run.objects.filter(event=taken, function="tests.flow_filtered").count() == 1
    assert Event.objects.get(pk=taken.pk).skipped_by == {}


def test_a_filter_that_raises_gives_no_run_and_says_what_it_raised(db):
    @django_events.function(
        "flow/raising-filter", id="tests.raising_filter", if_=lambda event: event.data["x"]
    )
    def raising(ctx):  # pragma: no cover - never runs
        return None

    try:
        event = django_events.send("flow/raising-filter", {})
    finally:
        registry.unregister("tests.raising_filter")
    assert not Run.objects.filter(event=event).exists()
    assert Event.objects.get(pk=event.pk).skipped_by == {"tests.raising_filter": "if_ raised KeyError: 'x'"}


# -- concurrency -----------------------------------------------------------------------------------


def test_a_run_over_the_concurrency_limit_is_held_without_using_an_attempt_and_starts_when_a_slot_frees(db):
    # Given two runs of key "a" running (their claims hold the two slots)
    for n in range(3):
        django_events.send("flow/limited", {"k": "a", "n": n})
    first, second, third = _runs("tests.flow_limited")

    spec = registry.get_function("tests.flow_limited")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    assert flow.claim(first.pk, spec, using="default", now=t, lease_until=lease) is not flow.HELD_BACK
    assert flow.claim(second.pk, spec, using="default", now=t, lease_until=lease) is not flow.HELD_BACK

    # When the third is claimed
    assert flow.claim(third.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK

    # Then it is held, with no attempt used, saying why
    third.refresh_from_db()
    assert third.status == RunStatus.HELD
    assert third.attempts == 0
    assert third.reason == "waiting for a concurrency slot (limit 2 for k a)"
    assert Slot.objects.filter(flow_key=third.held_on).count() == 2


def test_a_message_runs_the_due_run_with_the_highest_priority_then_the_oldest(db):
    # Given four due runs of a function with a priority (its messages are turns)
    for n, p in enumerate([0, 5, 1, 5]):
        django_events.send("flow/limited-one", {"n": n, "p": p})

    # When their messages are taken one after another
    runs = run_all()

    # Then the highest priority ran first, the older of equal priorities before the newer
    order = [r.event.data["n"] for r in sorted(runs, key=lambda r: r.started_at)]
    assert order == [1, 3, 2, 0]
    assert all(r.status == RunStatus.SUCCEEDED and r.attempts == 1 for r in runs)


def test_held_runs_are_woken_in_priority_then_arrival_order_as_slots_free(db):
    # Given a run holding the only slot, and three runs held behind it
    for n, p in enumerate([0, 1, 5, 5]):
        django_events.send("flow/limited-one", {"n": n, "p": p})
    runs = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    assert isinstance(
        flow.claim(runs[0].pk, spec, using="default", now=t, lease_until=lease, ignore_due=True), Run
    )
    for run in runs[1:]:
        assert (
            flow.claim(run.pk, spec, using="default", now=t, lease_until=lease, ignore_due=True)
            is flow.HELD_BACK
        )

    # When each attempt ends, the one woken is executed
    woken_order = []
    running = Run.objects.select_related("event").get(pk=runs[0].pk)
    for _ in range(3):
        record(running, running.attempts, t, "ok", None, using="default")
        (woken,) = Run.objects.filter(function="tests.flow_limited_one", status=RunStatus.PENDING)
        woken_order.append(woken.event.data["n"])
        running = flow.claim(woken.pk, spec, using="default", now=now(), lease_until=lease)
        assert isinstance(running, Run)

    # Then they were woken highest priority first, the older of equal priorities first
    assert woken_order == [2, 3, 1]


def test_a_message_that_finds_no_slot_takes_the_run_a_slot_was_kept_for(db):
    # Given key "a" full (two running), and a run woken when one of them ended: its slot is kept
    # for it while its message waits at the back of the broker's queue
    for n in range(4):
        django_events.send("flow/limited", {"k": "a", "n": n})
    first, second, third, fourth = _runs("tests.flow_limited")
    spec = registry.get_function("tests.flow_limited")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    for run in (first, second):
        assert isinstance(flow.claim(run.pk, spec, using="default", now=t, lease_until=lease), Run)
    assert flow.claim(third.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK
    record(Run.objects.select_related("event").get(pk=first.pk), 1, t, "ok", None, using="default")
    third.refresh_from_db()
    assert third.status == RunStatus.PENDING

    # When the message of a newer run of the key comes first
    claimed = flow.claim(fourth.pk, spec, using="default", now=now(), lease_until=lease)

    # Then it runs the woken run in the kept slot, and the newer run is held behind it
    assert isinstance(claimed, Run)
    assert claimed.pk == third.pk
    assert claimed.status == RunStatus.RUNNING
    fourth.refresh_from_db()
    assert fourth.status == RunStatus.HELD
    assert sorted(Slot.objects.values_list("run_id", flat=True)) == sorted([second.pk, third.pk])
    # and the woken run's own message, when it comes, finds nothing to do
    assert flow.claim(third.pk, spec, using="default", now=now(), lease_until=lease) is None


def test_a_message_takes_over_a_woken_run_through_execute_run(db):
    django_events.send("flow/limited-one", {"n": 1})
    django_events.send("flow/limited-one", {"n": 2})
    first, second = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    assert isinstance(flow.claim(first.pk, spec, using="default", now=t, lease_until=lease), Run)
    assert flow.claim(second.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK
    record(Run.objects.select_related("event").get(pk=first.pk), 1, t, "ok", None, using="default")
    django_events.send("flow/limited-one", {"n": 3})
    third = _runs("tests.flow_limited_one")[2]

    # The third's message runs the woken second; the third waits for the slot
    assert execute_run(third.pk, enqueue=False).value == "succeeded"
    second.refresh_from_db()
    third.refresh_from_db()
    assert (second.status, second.attempts) == (RunStatus.SUCCEEDED, 1)
    assert third.status == RunStatus.PENDING  # woken in turn when the second ended
    assert third.attempts == 0


def _claim(run, spec):
    t = now()
    return flow.claim(run.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))


def _end(run_id):
    run = Run.objects.select_related("event").get(pk=run_id)
    record(run, run.attempts, now(), "ok", None, using="default")


def test_a_function_with_two_limits_keeps_both(db):
    # Given [Concurrency(2), Concurrency(1, key="data.k")]: a1 and b1 run
    for key in ("a", "a", "b", "c"):
        django_events.send("flow/two-limits", {"k": key})
    a1, a2, b1, c1 = _runs("tests.flow_two_limits")
    spec = registry.get_function("tests.flow_two_limits")
    assert isinstance(_claim(a1, spec), Run)
    assert _claim(a2, spec) is flow.HELD_BACK
    assert isinstance(_claim(b1, spec), Run)
    assert _claim(c1, spec) is flow.HELD_BACK

    # Then a2 waits for key a, c1 for the function, each saying so; a1 and b1 hold one slot of each
    a2.refresh_from_db()
    c1.refresh_from_db()
    assert a2.reason == "waiting for a concurrency slot (limit 1 for k a)"
    assert c1.reason == "waiting for a concurrency slot (limit 2)"
    assert Slot.objects.count() == 4

    # When a1 ends, each of its slots goes to the run held on it
    _end(a1.pk)
    a2.refresh_from_db()
    c1.refresh_from_db()
    assert (a2.status, c1.status) == (RunStatus.PENDING, RunStatus.PENDING)

    # Then c1 starts (the function's slot was kept for it); a2 must wait for the function's slot
    assert isinstance(_claim(c1, spec), Run)
    assert _claim(a2, spec) is flow.HELD_BACK
    a2.refresh_from_db()
    assert a2.reason == "waiting for a concurrency slot (limit 2)"
    assert Run.objects.filter(function=spec.id, status=RunStatus.RUNNING).count() == 2

    # and starts when one of the two running ends
    _end(b1.pk)
    a2.refresh_from_db()
    assert a2.status == RunStatus.PENDING
    assert isinstance(_claim(a2, spec), Run)


def _two_limits_with_c1_woken():
    """tests.flow_two_limits: b1 running, c1 woken (the function's slot kept for it), d1 not claimed."""
    for key in ("a", "b", "c", "d"):
        django_events.send("flow/two-limits", {"k": key})
    a1, b1, c1, d1 = _runs("tests.flow_two_limits")
    spec = registry.get_function("tests.flow_two_limits")
    assert isinstance(_claim(a1, spec), Run)
    assert isinstance(_claim(b1, spec), Run)
    assert _claim(c1, spec) is flow.HELD_BACK
    _end(a1.pk)
    c1.refresh_from_db()
    assert c1.status == RunStatus.PENDING
    return spec, c1, d1


def test_a_message_takes_over_a_woken_run_of_a_function_with_two_limits(db):
    spec, c1, d1 = _two_limits_with_c1_woken()

    # When d1's message comes before c1's
    claimed = _claim(d1, spec)

    # Then it runs c1 (with a slot of its key, c, too), and d1 waits
    assert isinstance(claimed, Run)
    assert claimed.pk == c1.pk
    d1.refresh_from_db()
    assert d1.status == RunStatus.HELD
    assert Slot.objects.filter(run_id=c1.pk).count() == 2


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SKIP LOCKED (SQLite has one writer)")
def test_a_take_over_never_waits_for_the_woken_runs_other_keys(transactional_db, monkeypatch):
    # Given c1 woken, and its own key's row locked by another transaction
    spec, c1, d1 = _two_limits_with_c1_woken()
    sent = []
    monkeypatch.setattr(dispatch, "send_with_transaction", lambda refs, using, **options: sent.extend(refs))
    with _another_transaction(
        "SELECT id FROM django_events_flowkey WHERE id = %s FOR UPDATE",
        [ledger.flow_key_id(spec.id, "concurrency1", "c")],
    ):
        # When d1's message comes, it does not wait (keys locked out of order could deadlock)
        started = time.monotonic()
        assert _claim(d1, spec) is flow.HELD_BACK
        assert time.monotonic() - started < 1

        # Then d1 is held, and c1 is left woken, its slot kept, for its own message
        d1.refresh_from_db()
        c1.refresh_from_db()
        assert d1.status == RunStatus.HELD
        assert c1.status == RunStatus.PENDING
        assert Slot.objects.filter(run_id=c1.pk).count() == 1
        # with a message of its own sent again (the first may have come while it was locked)
        assert sent == [(c1.pk, spec.id)]
    assert isinstance(_claim(c1, spec), Run)


def test_a_slot_held_by_a_dead_worker_comes_back_when_its_lease_ends(db):
    django_events.send("flow/limited-one", {"n": 1})
    django_events.send("flow/limited-one", {"n": 2})
    first, second = _runs("tests.flow_limited_one")

    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    # A worker claims the first and dies: its slot counts until the lease ends
    assert (
        flow.claim(first.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=30))
        is not None
    )
    assert (
        flow.claim(second.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=30))
        is flow.HELD_BACK
    )
    second.refresh_from_db()
    assert second.status == RunStatus.HELD

    # When the lease is over, recovery records the lost attempt and the slot goes to the held run
    advance(31 + 60)

    recover(now=now())
    second.refresh_from_db()
    assert second.status == RunStatus.PENDING
    assert Slot.objects.filter(run_id=second.pk).count() == 1


def test_each_concurrency_key_has_its_own_slots(db):
    for key in ("a", "a", "a", "b", "b", "b"):
        django_events.send("flow/limited", {"k": key})

    spec = registry.get_function("tests.flow_limited")
    t = now()
    claimed = [
        flow.claim(run.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))
        for run in _runs("tests.flow_limited")
    ]
    assert [isinstance(c, Run) for c in claimed] == [True, True, False, True, True, False]


# -- throttle --------------------------------------------------------------------------------------


def test_throttled_runs_wait_their_turn_and_none_is_dropped(db):
    # Throttle(2, 1.0): one start every half second per key
    for n in range(4):
        django_events.send("flow/throttled", {"k": "a", "n": n})
    first_pass = run_due()
    assert [r.status for r in first_pass] == [RunStatus.SUCCEEDED]
    waiting = Run.objects.filter(function="tests.flow_throttled", status=RunStatus.THROTTLED)
    assert waiting.count() == 3
    assert all(r.reason.startswith("throttled until ") for r in waiting)
    turns = sorted(r.due_at for r in waiting)
    assert [round((b - a).total_seconds(), 3) for a, b in itertools.pairwise(turns)] == [0.5, 0.5]

    runs = run_all(until=now() + dt.timedelta(seconds=5))
    assert len([r for r in runs if r.status == RunStatus.SUCCEEDED]) == 3
    spans = sorted(Span.objects.filter(function="throttled").values_list("started_at", flat=True))
    assert len(spans) == 4


def test_throttled_runs_that_come_back_late_do_not_start_together(db):
    # Given three runs throttled to turns half a second apart
    for n in range(4):
        django_events.send("flow/throttled", {"k": "late", "n": n})
    assert len(run_due()) == 1

    # When their messages all come back long after their turns (a busy or stopped worker)
    advance(10)
    started = run_due()

    # Then one starts, and the others get new turns, one interval apart, after it
    assert len(started) == 1
    waiting = sorted(
        Run.objects.filter(function="tests.flow_throttled", status=RunStatus.THROTTLED).values_list(
            "due_at", flat=True
        )
    )
    assert len(waiting) == 2
    assert waiting[0] >= started[0].attempt_started_at + dt.timedelta(seconds=0.49)
    assert (waiting[1] - waiting[0]).total_seconds() >= 0.49


def test_a_throttled_run_back_on_time_behind_a_late_start_keeps_its_place(db):
    # Given runs throttled to turns t0 + 0.5 and t0 + 1.0 (one start every half second)
    for n in range(3):
        django_events.send("flow/throttled", {"k": "jitter", "n": n})
    (first,) = run_due()
    t0 = first.attempt_started_at
    # ... and the second starts 0.2 s after its turn (a busy worker)
    (second,) = run_due(now=t0 + dt.timedelta(seconds=0.7))
    counted = second.attempt_started_at

    # When the third comes back at its turn, before the starts allow it
    assert run_due(now=t0 + dt.timedelta(seconds=1.0)) == []

    # Then it waits only until they do (half a second after the late start), not behind new turns
    third = Run.objects.get(function="tests.flow_throttled", status=RunStatus.THROTTLED)
    assert abs((third.due_at - (counted + dt.timedelta(seconds=0.5))).total_seconds()) < 0.01


# -- rate limit ------------------------------------------------------------------------------------


def test_events_over_the_rate_limit_are_skipped_and_say_so(db):
    for company in (7, 7, 8):
        django_events.send("flow/rate", {"company": company})
    statuses = [(r.status, r.reason) for r in _runs("tests.flow_rate")]
    assert statuses == [
        (RunStatus.PENDING, ""),
        (RunStatus.SKIPPED, "skipped: rate limit 1 per 4 h for company 7"),
        (RunStatus.PENDING, ""),
    ]
    advance(4 * 3600)
    django_events.send("flow/rate", {"company": 7})
    assert _runs("tests.flow_rate")[-1].status == RunStatus.PENDING


def test_a_rate_limit_rolled_back_with_the_sender_counts_nothing(db):
    def rolled_back() -> None:
        with transaction.atomic():
            django_events.send("flow/rate", {"company": 9})
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        rolled_back()
    django_events.send("flow/rate", {"company": 9})
    assert [r.status for r in _runs("tests.flow_rate")] == [RunStatus.PENDING]


# -- debounce --------------------------------------------------------------------------------------


def test_debounce_runs_once_with_the_last_event_and_the_others_say_into_which_run(db):
    for n in range(3):
        django_events.send("flow/debounced", {"user": 1, "n": n})
        advance(2)
    django_events.send("flow/debounced", {"user": 2, "n": 9})
    runs = _runs("tests.flow_debounced")
    last_for_1 = runs[2]
    assert [r.status for r in runs] == [
        RunStatus.SKIPPED,
        RunStatus.SKIPPED,
        RunStatus.SCHEDULED,
        RunStatus.SCHEDULED,
    ]
    assert runs[0].reason == f"debounced into run {runs[1].pk}"
    assert runs[1].merged_into == last_for_1.pk

    assert run_all() == []  # the windows are open
    executed = run_all(until=now() + dt.timedelta(seconds=10))
    assert sorted(r.event.data["n"] for r in executed) == [2, 9]


def test_debounce_timeout_bounds_how_long_new_events_put_the_run_off(db):
    # Debounce(10, timeout=60): an event every 5 s for 2 minutes still runs by 60 s after the first
    first_at = now()
    for _ in range(24):
        django_events.send("flow/debounced", {"user": 1})
        run_due()
        advance(5)
    ran = Run.objects.filter(function="tests.flow_debounced", status=RunStatus.SUCCEEDED).order_by(
        "started_at"
    )
    assert ran.exists()
    assert ran.first().started_at <= first_at + dt.timedelta(seconds=65)


# -- batch -----------------------------------------------------------------------------------------


def test_a_batch_runs_once_full_with_every_event_in_order(db):
    for n in range(3):
        django_events.send("flow/batched", {"k": "x", "n": n})
    runs = _runs("tests.flow_batched")
    assert [r.status for r in runs] == [RunStatus.PENDING, RunStatus.SKIPPED, RunStatus.SKIPPED]
    assert runs[1].reason == f"batched into run {runs[0].pk}"
    (done,) = run_due()
    assert done.result == [0, 1, 2]


def test_a_batch_not_full_runs_at_its_timeout(db):
    django_events.send("flow/batched", {"k": "y", "n": 1})
    django_events.send("flow/batched", {"k": "y", "n": 2})
    assert run_due() == []
    advance(30)
    (done,) = run_due()
    assert done.result == [1, 2]
    # A new event after the batch started opens a new batch
    django_events.send("flow/batched", {"k": "y", "n": 3})
    assert _runs("tests.flow_batched")[-1].status == RunStatus.SCHEDULED


# -- cancel on event -------------------------------------------------------------------------------


def test_a_matching_event_cancels_the_runs_not_started_and_records_which_event(db):
    django_events.send("flow/reminder", {"user": 1}, delay=3600)
    django_events.send("flow/reminder", {"user": 2}, delay=3600)
    cancelling = django_events.send("flow/reminder.cancel", {"user": 1})
    one, two = _runs("tests.flow_reminder")
    assert one.status == RunStatus.CANCELLED
    assert one.cancelled_by == cancelling.pk
    assert one.reason == f"cancelled by event flow/reminder.cancel {cancelling.pk}"
    assert two.status == RunStatus.SCHEDULED


def test_a_cancel_rolled_back_with_the_sender_cancels_nothing(db):
    django_events.send("flow/reminder", {"user": 1}, delay=3600)

    def rolled_back() -> None:
        with transaction.atomic():
            django_events.send("flow/reminder.cancel", {"user": 1})
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        rolled_back()
    assert _runs("tests.flow_reminder")[0].status == RunStatus.SCHEDULED


def test_cancel_on_without_match_or_if_is_refused_at_startup_unless_all_runs():
    with pytest.raises(TypeError, match="all_runs=True"):
        CancelOn("app/stop")
    assert CancelOn("app/stop", all_runs=True).all_runs


# -- timeouts --------------------------------------------------------------------------------------


def test_a_run_not_started_within_its_start_timeout_is_cancelled_saying_why(db):
    django_events.send("flow/start-timeout")
    advance(6)
    assert run_due() == []
    (run,) = _runs("tests.flow_start_timeout")
    assert run.status == RunStatus.CANCELLED
    assert run.reason == "cancelled: not started within 5 s (Timeouts.start)"


# -- startup checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "Concurrency.limit must be an int from 1"),
        ({"concurrency": "2"}, "concurrency must be an int"),
        ({"throttle": Throttle}, "throttle must be a Throttle"),
        ({"cron": "61 * * * *"}, "'tests.bad': the cron expression .* does not parse"),
        ({"timezone": "Mars/Olympus"}, "not a known IANA time zone"),
        ({"priority": 10**7}, "priority must be an int"),
        ({"debounce": Debounce(1), "batch": Batch(2, 1)}, "both debounce= and batch="),
        ({"catch_up": "some"}, "catch_up must be"),
    ],
)
def test_bad_flow_options_fail_at_startup_naming_what_is_wrong(kwargs, message):
    with pytest.raises(TypeError, match=message):
        django_events.function("flow/x", id="tests.bad", **kwargs)(lambda ctx: None)
    assert registry.get_function("tests.bad") is None


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Throttle(1, 0), "Throttle.period must be from"),
        (lambda: RateLimit(1, dt.timedelta(days=-1)), "RateLimit.period must be from"),
        (lambda: Concurrency(2, key="user_id"), "dotted path into the event"),
        (lambda: Batch(0, 5), "Batch.max_size"),
        (lambda: Timeouts(start="5"), "Timeouts.start must be a number"),
        (lambda: CancelOn("bad name", match="data.x"), "whitespace"),
    ],
)
def test_bad_option_values_are_refused_when_made(factory, message):
    with pytest.raises((TypeError, EventValidationError), match=message):
        factory()


def test_a_wildcard_inside_a_segment_is_refused():
    with pytest.raises(EventValidationError, match="whole segment"):
        django_events.function("app/user*", id="tests.bad")(lambda ctx: None)


def test_flow_key_rows_are_made_once_per_function_policy_and_key(db):
    for company in (1, 1, 2):
        django_events.send("flow/rate", {"company": company})
    assert sorted(FlowKey.objects.filter(function="tests.flow_rate").values_list("key", flat=True)) == [
        "1",
        "2",
    ]


def test_execute_run_of_a_held_run_does_nothing(db):
    django_events.send("flow/limited-one", {"n": 1})
    django_events.send("flow/limited-one", {"n": 2})
    first, second = _runs("tests.flow_limited_one")

    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    flow.claim(first.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))
    flow.claim(second.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))
    assert execute_run(second.pk, enqueue=False).value == "skipped"


def test_recovery_wakes_a_held_run_whose_slot_a_cancel_gave_back(db):
    # Given a held run behind a woken run, whose kept slot is then given back by a cancel
    for n in range(3):
        django_events.send("flow/limited-one", {"n": n})
    first, second, third = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    assert isinstance(flow.claim(first.pk, spec, using="default", now=t, lease_until=lease), Run)
    assert flow.claim(second.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK
    assert flow.claim(third.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK

    claimed = Run.objects.select_related("event").get(pk=first.pk)
    record(claimed, 1, t, "ok", None, using="default")  # the slot goes to the second, which is woken
    second.refresh_from_db()
    assert second.status == RunStatus.PENDING
    ledger.cancel([second.pk], using="default", now=now())  # its kept slot is given back, nobody woken
    third.refresh_from_db()
    assert third.status == RunStatus.HELD

    # When recovery passes

    report = recover(now=now())

    # Then the held run is woken, with the slot
    third.refresh_from_db()
    assert third.status == RunStatus.PENDING
    assert report.woken == [(third.pk, "tests.flow_limited_one")]
    assert list(Slot.objects.values_list("run_id", flat=True)) == [third.pk]


def _one_running_one_held_per_key(keys):
    """For each key of tests.faults_limited (one slot per key): a run claimed, and one held behind it."""
    spec = registry.get_function("tests.faults_limited")
    held = {}
    for key in keys:
        django_events.send("faults/limited", {"k": key})
        django_events.send("faults/limited", {"k": key})
        t = now()
        lease = t + dt.timedelta(seconds=600)
        running, waiting = _runs("tests.faults_limited")[-2:]
        assert isinstance(flow.claim(running.pk, spec, using="default", now=t, lease_until=lease), Run)
        assert flow.claim(waiting.pk, spec, using="default", now=t, lease_until=lease) is flow.HELD_BACK
        waiting.refresh_from_db()
        held[waiting.held_on] = waiting.pk
    return held


def test_recovery_passes_go_round_every_key_with_held_runs_however_many(db, monkeypatch):
    # Given seven keys with a run held behind a running one, and a pass that looks at two keys
    monkeypatch.setattr(flow, "_swept_to", {})
    held = _one_running_one_held_per_key([f"k{n}" for n in range(7)])
    # and the slot of the key looked at last given back with nobody woken (as a cancel does)
    last = max(held)
    Slot.objects.filter(flow_key=last).delete()

    # When passes of two keys each run
    passes = 0
    while Run.objects.get(pk=held[last]).status == RunStatus.HELD:
        passes += 1
        assert passes <= 4, "a held run with a free slot was never woken"
        woken, _timed_out = flow.sweep(now=now(), limit=2, using="default")

    # Then the fourth pass (keys 7 of 7) woke it, and only it
    assert passes == 4
    assert woken == [(held[last], "tests.faults_limited")]
    assert Run.objects.filter(function="tests.faults_limited", status=RunStatus.HELD).count() == 6
    # and that pass, past the last key, went on from the first: the next goes on from there
    assert flow._swept_to["default"] == min(held)


def test_a_recovery_pass_over_keys_with_no_free_slot_locks_nothing_and_opens_no_transaction(db, monkeypatch):
    monkeypatch.setattr(flow, "_swept_to", {})
    _one_running_one_held_per_key([f"k{n}" for n in range(20)])

    with CaptureQueriesContext(connection) as queries:
        woken, _timed_out = flow.sweep(now=now(), limit=500, using="default")

    assert woken == []
    statements = [q["sql"].upper() for q in queries.captured_queries]
    assert not [sql for sql in statements if "SAVEPOINT" in sql or "FOR UPDATE" in sql or "UPDATE " in sql]
    # The keys, their live slots, their rows; then one query per function with a start timeout
    timeouts = sum(
        1 for spec in registry.registered_functions() if spec.timeouts and spec.timeouts.start is not None
    )
    assert len(statements) == 3 + timeouts


def test_a_held_run_past_its_start_timeout_is_cancelled_by_recovery(db):
    @django_events.function(
        "flow/held-timeout", id="tests.held_timeout", concurrency=1, timeouts=Timeouts(start=10)
    )
    def held_timeout(ctx):  # pragma: no cover - never runs
        return None

    try:
        django_events.send("flow/held-timeout")
        django_events.send("flow/held-timeout")
        first, second = _runs("tests.held_timeout")
        spec = registry.get_function("tests.held_timeout")
        t = now()
        flow.claim(first.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=600))
        assert flow.claim(second.pk, spec, using="default", now=t, lease_until=t) is flow.HELD_BACK

        assert recover(now=now()).timed_out == []
        advance(11)
        assert recover(now=now()).timed_out == [second.pk]
        second.refresh_from_db()
        assert (second.status, second.reason) == (
            RunStatus.CANCELLED,
            "cancelled: not started within 10 s (Timeouts.start)",
        )
    finally:
        registry.unregister("tests.held_timeout")


def test_an_event_over_the_rate_limit_does_not_join_a_debounce_window(db):
    @django_events.function(
        "flow/both",
        id="tests.rate_and_debounce",
        rate_limit=RateLimit(1, 3600),
        debounce=Debounce(10),
    )
    def both(ctx):
        return ctx.event.data["n"]

    try:
        django_events.send("flow/both", {"n": 1})
        django_events.send("flow/both", {"n": 2})  # over the rate limit: skipped, not the new last event
        first, second = _runs("tests.rate_and_debounce")
        assert (first.status, second.status) == (RunStatus.SCHEDULED, RunStatus.SKIPPED)
        assert second.reason.startswith("skipped: rate limit")
        (done,) = run_all(until=now() + dt.timedelta(seconds=11))
        assert done.result == 1
    finally:
        registry.unregister("tests.rate_and_debounce")


def test_a_message_that_names_its_function_spares_the_read_of_the_function(db):
    # Given flow control on some functions (the test app has some), and two runs of one without
    django_events.send("test/ok")
    django_events.send("test/ok")
    first, second = _runs("tests.ok")
    assert registry.controls_start()

    # When one is executed knowing its function (as the actor does, from the message's options)
    # and the other not
    with CaptureQueriesContext(connection) as knowing:
        assert execute_run(first.pk, lease=60, function_id="tests.ok").value == "succeeded"
    with CaptureQueriesContext(connection) as not_knowing:
        assert execute_run(second.pk, lease=60).value == "succeeded"

    # Then the first needed one statement less: no read of the run's function before its claim
    assert len(knowing) == len(not_knowing) - 1


def test_run_messages_name_their_function():
    message = dispatch._message(dramatiq.get_broker(), ["r"], "tests.flow_limited")
    assert message.options[dispatch.FUNCTION_OPTION] == "tests.flow_limited"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="lock_timeout is PostgreSQL's")
def test_a_claim_does_not_wait_for_ever_on_a_key_a_lost_client_holds(transactional_db, monkeypatch):
    # Given a key's row locked by a transaction whose client went silent (another connection here)
    monkeypatch.setattr(ledger, "LOCK_WAIT", 0.3)
    django_events.send("flow/limited-one", {"n": 1})
    (run,) = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    key = ledger.flow_key_id(spec.id, "concurrency0", "")
    with _another_transaction(
        "INSERT INTO django_events_flowkey (id, function, kind, key, size, updated_at) "
        "VALUES (%s, %s, 'concurrency0', '', 0, now())",
        [key, spec.id],
    ):
        # When a worker claims a run of that key
        t = now()
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            flow.claim(run.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))

        # Then it gave up after the bound, and the run is still waiting for a later try
        assert time.monotonic() - started < 5
        run.refresh_from_db()
        assert run.status == RunStatus.PENDING


@pytest.mark.skipif(connection.vendor != "postgresql", reason="lock_timeout is PostgreSQL's")
def test_a_claim_does_not_wait_for_ever_on_a_run_a_lost_client_holds(transactional_db, monkeypatch):
    # The bound is set in the statement that locks the run, before its lock is waited for
    monkeypatch.setattr(ledger, "LOCK_WAIT", 0.3)
    django_events.send("flow/limited", {"k": "a"})
    (run,) = _runs("tests.flow_limited")
    spec = registry.get_function("tests.flow_limited")
    with _another_transaction("SELECT id FROM django_events_run WHERE id = %s FOR UPDATE", [run.pk]):
        t = now()
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            flow.claim(run.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))
        assert time.monotonic() - started < 5


@pytest.mark.skipif(connection.vendor != "postgresql", reason="lock_timeout is PostgreSQL's")
def test_a_record_does_not_wait_for_ever_on_a_key_a_lost_client_holds(transactional_db, monkeypatch):
    # Given a run holding a slot, and its key's row then locked by a client gone silent
    monkeypatch.setattr(ledger, "LOCK_WAIT", 0.3)
    django_events.send("flow/limited-one", {"n": 1})
    (run,) = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    claimed = flow.claim(run.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60))
    assert isinstance(claimed, Run)
    with _another_transaction(
        "SELECT id FROM django_events_flowkey WHERE id = %s FOR UPDATE",
        [ledger.flow_key_id(spec.id, "concurrency0", "")],
    ):
        # When its attempt is recorded, the record gives up after the bound (and commits nothing:
        # the run stays running, and its lease brings it back)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            record(claimed, 1, t, "ok", None, using="default")
        assert time.monotonic() - started < 5
        run.refresh_from_db()
        assert run.status == RunStatus.RUNNING
        assert Slot.objects.filter(run_id=run.pk).count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks (SQLite has one writer)")
def test_a_priority_turn_locks_only_the_run_it_takes(transactional_db):
    # Given two due runs of a function with a priority
    django_events.send("flow/limited-one", {"p": 0})
    django_events.send("flow/limited-one", {"p": 9})
    low, high = _runs("tests.flow_limited_one")
    # When the low run's message takes its turn (in a transaction not yet committed)
    with _another_transaction("SELECT 1", []) as other, transaction.atomic():
        taken = ledger.lock_claimable(low.pk, using="default", now=now(), best_of="tests.flow_limited_one")
        assert taken is not None
        assert taken.pk == high.pk

        # Then the low run, passed over, is not locked: another message's turn can take it now
        # (were it locked, that message would skip it and find nothing, and be lost)
        with other.cursor() as cursor:
            cursor.execute("SELECT id FROM django_events_run WHERE status = 'pending' FOR UPDATE SKIP LOCKED")
            assert [row[0] for row in cursor.fetchall()] == [low.pk]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks (SQLite has one writer)")
def test_a_priority_turn_that_finds_every_due_run_locked_is_sent_again(transactional_db, monkeypatch):
    # Given two due runs of a function with a priority, both locked by other transactions
    django_events.send("flow/limited-one", {"p": 0})
    django_events.send("flow/limited-one", {"p": 9})
    low, high = _runs("tests.flow_limited_one")
    sent = []
    monkeypatch.setattr(dispatch, "send_now", lambda refs, delay=None: sent.append((list(refs), delay)))

    with _another_transaction(
        "SELECT id FROM django_events_run WHERE id IN (%s, %s) FOR UPDATE", [low.pk, high.pk]
    ):
        # When the low run's message comes, it takes nothing
        assert execute_run(low.pk).value == "skipped"

    # Then the turn is sent again shortly, not dropped
    assert sent == [([(low.pk, "tests.flow_limited_one")], TURN_AGAIN)]


def test_a_message_whose_run_another_turn_took_runs_the_best_waiting_run(db):
    # Given three due runs of a function with a priority, and the p=0 run's message taken first
    for p in (0, 1, 9):
        django_events.send("flow/limited-one", {"p": p})
    low, mid, high = _runs("tests.flow_limited_one")
    spec = registry.get_function("tests.flow_limited_one")
    t = now()
    lease = t + dt.timedelta(seconds=60)
    taken = flow.claim(low.pk, spec, using="default", now=t, lease_until=lease)
    assert isinstance(taken, Run)
    assert taken.pk == high.pk  # the best due run took the turn
    record(taken, 1, t, "ok", None, using="default")

    # When the p=9 run's own message comes (its run already ran)
    again = flow.claim(high.pk, spec, using="default", now=now(), lease_until=lease)

    # Then it runs the best waiting run, not nothing: no run is left without a message
    assert isinstance(again, Run)
    assert again.pk == mid.pk


def test_the_start_timeout_of_a_delayed_run_counts_from_its_time_even_when_held(db):
    @django_events.function(
        "flow/late-start", id="tests.late_start", concurrency=1, timeouts=Timeouts(start=4)
    )
    def late_start(ctx):
        return None

    try:
        django_events.send("flow/late-start")
        django_events.send("flow/late-start", delay=2)
        first, second = _runs("tests.late_start")
        assert second.ready_at == second.due_at
        spec = registry.get_function("tests.late_start")
        t = now()
        assert isinstance(
            flow.claim(first.pk, spec, using="default", now=t, lease_until=t + dt.timedelta(seconds=60)), Run
        )
        advance(2)
        assert flow.claim(second.pk, spec, using="default", now=now(), lease_until=now()) is flow.HELD_BACK
        advance(3)  # 5 s after it was sent, 3 s after its time: within its start timeout
        assert recover(now=now()).timed_out == []
        advance(2)  # 5 s after its time
        assert recover(now=now()).timed_out == [second.pk]
    finally:
        registry.unregister("tests.late_start")


def test_a_run_its_finish_timeout_ends_before_its_next_attempt_sends_the_run_dead_event(db):
    @django_events.function("flow/finish", id="tests.finish", retries=5, timeouts=Timeouts(finish=3))
    def finish(ctx):
        raise RetryAfterError(1)

    dead = []

    def on_dead(sender, run, attempt, exception, **kwargs):
        dead.append((run.pk, attempt.number, type(exception).__name__))

    signals.run_dead.connect(on_dead)
    try:
        django_events.send("flow/finish")
        (run,) = run_due()
        assert run.status == RunStatus.RETRYING  # due again in 1 s, within its finish (3 s)
        advance(4)  # ... but its worker comes back to it only after the finish
        assert run_due() == []
        run.refresh_from_db()
        assert run.status == RunStatus.DEAD
        assert run.reason == "timed out: not finished within 3 s (Timeouts.finish)"
        assert Event.objects.filter(name="django_events/run.dead", data__run_id=str(run.pk)).count() == 1
        assert dead == [(run.pk, 1, "RunTimedOutError")]
    finally:
        signals.run_dead.disconnect(on_dead)
        registry.unregister("tests.finish")
