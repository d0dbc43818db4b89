"""Cron functions: ticks made ahead, exactly once, missed ticks by policy, changed schedules, DST.

Scheduling is tested on a clock the test controls: ``cron.schedule(now=...)`` with chosen
times. The recovery loop's cron passes are tested with a real loop thread at the end.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from croniter import croniter
from django.db import connection, transaction
from django.utils import timezone

import django_events
from django_events import cron, dispatch, ledger, registry
from django_events.execution import Execution, execute_run
from django_events.models import Event, FlowKey, Run, RunStatus
from django_events.recovery import RecoveryLoop
from django_events.registry import MAX_CATCH_UP, Context, Function, function, get_function, unregister
from django_events.testing import run_due
from tests.conftest import wait_for
from tests.testapp.models import Call

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
UTC = dt.UTC

#: Spring forward in Paris: 2026-03-29 02:00 CET becomes 03:00 CEST. Fall back: 2026-10-25 03:00
#: CEST becomes 02:00 CET.
SPRING = dt.date(2026, 3, 29)
FALL = dt.date(2026, 10, 25)


def _record_tick(ctx: Context) -> str:
    Call.objects.create(
        function="cron", run_id=str(ctx.run_id), attempt=ctx.attempt, event_name=ctx.event.name
    )
    return str(ctx.event.data["scheduled_at"])


def _other(ctx: Context) -> None:
    return None


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def paris(*args: int, fold: int = 0) -> dt.datetime:
    return dt.datetime(*args, tzinfo=PARIS, fold=fold)  # type: ignore[misc]


@pytest.fixture
def cron_function() -> Iterator[Callable[..., Function]]:
    """``cron_function(cron, id="tests.cron", **options)`` registers ``_record_tick`` (again: a new
    schedule); unregistered after the test."""
    registered: set[str] = set()

    def register(expressions: str | list[str], *, id: str = "tests.cron", **options: Any) -> Function:
        fn = options.pop("fn", _record_tick)
        function(id=id, cron=expressions, **options)(fn)
        registered.add(id)
        spec = get_function(id)
        assert spec is not None
        return spec

    yield register
    for function_id in registered:
        unregister(function_id)


def ticks(function_id: str = "tests.cron") -> list[tuple[dt.datetime, str]]:
    """``(scheduled time, run status)`` of the function's tick runs, oldest tick first."""
    runs = Run.objects.filter(function=function_id).select_related("event")
    found = [(dt.datetime.fromisoformat(run.event.data["scheduled_at"]), run.status) for run in runs]
    return sorted(found, key=lambda item: (item[0], item[1]))


def memory(function_id: str = "tests.cron") -> FlowKey:
    return FlowKey.objects.get(pk=ledger.flow_key_id(function_id, cron.KIND, ""))


# -- the first pass, and the passes after ---------------------------------------------------------


@pytest.mark.usefixtures("ledger_form")
def test_a_function_seen_for_the_first_time_gets_its_next_tick_only(db, cron_function):
    # Given a function every day at 9:00 in Paris, registered at 11:00 Paris time (9:00 passed today)
    spec = cron_function("0 9 * * *", timezone="Europe/Paris")
    now = utc(2026, 3, 2, 10, 0)

    # When a pass runs
    made = cron.schedule(now=now)

    # Then it makes tomorrow's tick only, scheduled at its time, with the tick event
    assert [(tick.function, tick.at, tick.late) for tick in made] == [
        ("tests.cron", paris(2026, 3, 3, 9, 0), False)
    ]
    run = Run.objects.select_related("event").get(function="tests.cron")
    assert run.pk == made[0].run_id
    assert (run.status, run.due_at, run.event_name) == (
        RunStatus.SCHEDULED,
        utc(2026, 3, 3, 8, 0),
        cron.CRON_EVENT,
    )
    assert run.reason == "cron tick of 2026-03-03 09:00:00+0100 (Europe/Paris)"
    assert run.max_attempts == spec.max_attempts()
    assert run.event.name == cron.CRON_EVENT
    assert run.event.data == {
        "function": "tests.cron",
        "cron": ["0 9 * * *"],
        "timezone": "Europe/Paris",
        "scheduled_at": "2026-03-03T09:00:00+01:00",
    }
    assert run.event.idempotency_key == "django_events/cron:tests.cron:2026-03-03T08:00:00Z"
    # ...and the function's memory: the schedule it was made by, the tick, its run
    fk = memory()
    assert (fk.key, fk.tat, fk.open_run) == (cron.signature(spec), utc(2026, 3, 3, 8, 0), run.pk)


def test_a_pass_with_the_next_tick_made_reads_one_row_and_does_nothing(
    db, cron_function, django_assert_num_queries
):
    # Given a function whose next tick is made
    cron_function("0 9 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 0))

    # When passes run before the tick is due
    with django_assert_num_queries(1):
        made = cron.schedule(now=utc(2026, 3, 3, 7, 59, 59))

    # Then they make nothing, with one query (no lock)
    assert made == []
    assert len(ticks()) == 1


def test_a_pass_without_cron_functions_makes_no_query(db, monkeypatch, django_assert_num_queries):
    # Given no cron function registered (the registry's other functions aside)
    monkeypatch.setattr(cron, "registered_functions", lambda: [])

    # Then a pass costs nothing
    with django_assert_num_queries(0):
        result = cron.schedule_pass(now=utc(2026, 3, 2))
    assert (result.ticks, result.next_due) == ([], None)


@pytest.mark.usefixtures("ledger_form")
def test_the_pass_after_a_tick_is_due_makes_the_next_one(db, cron_function):
    # Given the tick of 3 March 9:00 made ahead
    cron_function("0 9 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 0))

    # When a pass comes just after it is due (a worker is up)
    made = cron.schedule(now=utc(2026, 3, 3, 8, 0, 0) + dt.timedelta(milliseconds=50))

    # Then it makes the next one, and leaves the due one to fire
    assert [tick.at for tick in made] == [paris(2026, 3, 4, 9, 0)]
    assert ticks() == [
        (paris(2026, 3, 3, 9, 0), RunStatus.SCHEDULED),
        (paris(2026, 3, 4, 9, 0), RunStatus.SCHEDULED),
    ]
    assert cron.schedule_pass(now=utc(2026, 3, 3, 9, 0)).next_due == utc(2026, 3, 4, 8, 0)


@pytest.mark.usefixtures("ledger_form")
def test_a_tick_run_executes_the_function_with_the_tick_event(db, cron_function):
    # Given an every-minute function whose next tick, made by a pass a minute ago, is due now
    # (and the one after it is not: run_due() makes ticks as a worker does)
    cron_function("* * * * *", timezone="UTC")
    made = cron.schedule(now=timezone.now() - dt.timedelta(minutes=1))

    # When the due runs execute
    runs = [run for run in run_due() if run.function == "tests.cron"]

    # Then the function ran once, with the tick event, and returned its scheduled time
    assert [run.pk for run in runs] == [made[0].run_id]
    assert runs[0].status == RunStatus.SUCCEEDED
    assert runs[0].result == made[0].at.isoformat()
    call = Call.objects.get()
    assert (call.run_id, call.event_name) == (str(made[0].run_id), cron.CRON_EVENT)


# -- missed ticks --------------------------------------------------------------------------------


@pytest.mark.usefixtures("ledger_form")
@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        (
            "latest",
            [
                (paris(2026, 3, 3, 9, 0), RunStatus.CANCELLED),
                (paris(2026, 3, 6, 9, 0), RunStatus.PENDING),
                (paris(2026, 3, 7, 9, 0), RunStatus.SCHEDULED),
            ],
        ),
        (
            "all",
            [
                (paris(2026, 3, 3, 9, 0), RunStatus.SCHEDULED),
                (paris(2026, 3, 4, 9, 0), RunStatus.PENDING),
                (paris(2026, 3, 5, 9, 0), RunStatus.PENDING),
                (paris(2026, 3, 6, 9, 0), RunStatus.PENDING),
                (paris(2026, 3, 7, 9, 0), RunStatus.SCHEDULED),
            ],
        ),
        (
            "none",
            [
                (paris(2026, 3, 3, 9, 0), RunStatus.CANCELLED),
                (paris(2026, 3, 7, 9, 0), RunStatus.SCHEDULED),
            ],
        ),
    ],
)
def test_ticks_missed_while_no_worker_ran_follow_catch_up(db, cron_function, catch_up, expected):
    # Given a daily 9:00 function whose tick of 3 March was made ahead, and then no worker ran
    # until 6 March 9:30 (the ticks of 3, 4, 5 and 6 March passed)
    cron_function("0 9 * * *", timezone="Europe/Paris", catch_up=catch_up)
    cron.schedule(now=utc(2026, 3, 2, 10, 0))

    # When the first pass after the downtime runs
    result = cron.schedule_pass(now=utc(2026, 3, 6, 8, 30))

    # Then the missed ticks are fired (late, due now) or not, by the policy, and the next is made
    assert ticks() == expected
    first = paris(2026, 3, 3, 9, 0)
    assert [(tick.at, tick.late) for tick in result.ticks] == [
        (at, status == RunStatus.PENDING) for at, status in expected if at > first
    ]
    for run in Run.objects.filter(status=RunStatus.PENDING):
        assert run.due_at == utc(2026, 3, 6, 8, 30)
        assert run.reason.endswith(f"missed, fired late (catch_up={catch_up!r})")
    cancelled = Run.objects.filter(status=RunStatus.CANCELLED)
    assert [run.pk for run in cancelled] == result.cancelled
    for run in cancelled:
        assert run.reason.startswith("cancelled: cron tick of 2026-03-03 09:00:00+0100 (Europe/Paris) missed")


@pytest.mark.parametrize("catch_up", ["latest", "none"])
def test_a_missed_tick_that_already_ran_is_left_alone(db, cron_function, catch_up):
    # Given the tick of 3 March made ahead and executed (a worker took its message at boot)
    cron_function("0 9 * * *", timezone="Europe/Paris", catch_up=catch_up)
    first = cron.schedule(now=utc(2026, 3, 2, 10, 0))[0]
    assert execute_run(first.run_id, ignore_due=True, enqueue=False) is Execution.SUCCEEDED

    # When the first pass after a downtime runs
    cron.schedule(now=utc(2026, 3, 6, 8, 30))

    # Then the run that ran keeps its outcome
    assert Run.objects.get(pk=first.run_id).status == RunStatus.SUCCEEDED


@pytest.mark.parametrize(("late", "status"), [(10, RunStatus.SCHEDULED), (120, RunStatus.CANCELLED)])
def test_with_catch_up_none_a_tick_later_than_the_grace_is_missed(db, cron_function, settings, late, status):
    # Given a daily tick made ahead, and a recovery grace of 60 s
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "RECOVERY_GRACE": 60}
    cron_function("0 9 * * *", timezone="Europe/Paris", catch_up="none")
    first = cron.schedule(now=utc(2026, 3, 2, 10, 0))[0]

    # When the first pass after its time comes `late` seconds after it, its run not started
    cron.schedule(now=utc(2026, 3, 3, 8, 0) + dt.timedelta(seconds=late))

    # Then within the grace it still fires; past it, it counts as missed
    assert Run.objects.get(pk=first.run_id).status == status


def test_catch_up_all_fires_at_most_max_catch_up_ticks_the_most_recent(db, cron_function, monkeypatch):
    # Given an every-minute function with catch_up="all" (the limit made 5 for the test: same code)
    assert MAX_CATCH_UP == 1000
    monkeypatch.setattr(cron, "MAX_CATCH_UP", 5)
    cron_function("* * * * *", timezone="UTC", catch_up="all")
    cron.schedule(now=utc(2026, 3, 2, 10, 0, 30))  # makes 10:01

    # When no worker ran for 20 minutes
    made = cron.schedule(now=utc(2026, 3, 2, 10, 21, 30))

    # Then the 5 most recent missed ticks fire, oldest first, then the next is made
    assert [(tick.at, tick.late) for tick in made] == [
        *[(utc(2026, 3, 2, 10, minute), True) for minute in range(17, 22)],
        (utc(2026, 3, 2, 10, 22), False),
    ]


def test_a_pass_just_after_a_tick_fires_nothing_late(db, cron_function):
    # Given an every-second function (6 fields: the last is seconds), its next tick made
    cron_function("* * * * * *", timezone="UTC")
    cron.schedule(now=utc(2026, 3, 2, 10, 0, 0) + dt.timedelta(milliseconds=500))

    # When passes come just after each tick
    for second in range(1, 4):
        cron.schedule(now=utc(2026, 3, 2, 10, 0, second) + dt.timedelta(milliseconds=50))

    # Then every second has its tick, each made ahead, none late or cancelled
    assert ticks() == [(utc(2026, 3, 2, 10, 0, second), RunStatus.SCHEDULED) for second in range(1, 5)]


# -- a changed schedule ----------------------------------------------------------------------------


@pytest.mark.usefixtures("ledger_form")
def test_a_changed_expression_cancels_the_tick_made_ahead_and_schedules_by_the_new_one(db, cron_function):
    # Given the tick of 3 March 9:00 made ahead
    cron_function("0 9 * * *", timezone="Europe/Paris")
    old = cron.schedule(now=utc(2026, 3, 2, 10, 0))[0]

    # When the function is deployed with another expression, and a pass runs
    spec = cron_function("0 10 * * *", timezone="Europe/Paris")
    result = cron.schedule_pass(now=utc(2026, 3, 2, 10, 5))

    # Then the old tick is cancelled, saying why, and the new one is made; no history is fired
    assert result.cancelled == [old.run_id]
    assert [tick.at for tick in result.ticks] == [paris(2026, 3, 3, 10, 0)]
    assert ticks() == [
        (paris(2026, 3, 3, 9, 0), RunStatus.CANCELLED),
        (paris(2026, 3, 3, 10, 0), RunStatus.SCHEDULED),
    ]
    reason = Run.objects.get(pk=old.run_id).reason
    assert (
        reason == 'cancelled: the cron schedule changed to {"cron":["0 10 * * *"],"timezone":"Europe/Paris"}'
    )
    assert memory().key == cron.signature(spec)


def test_a_changed_zone_is_a_changed_schedule(db, cron_function):
    cron_function("0 9 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 0))

    cron_function("0 9 * * *", timezone="America/New_York")
    cron.schedule(now=utc(2026, 3, 2, 10, 5))

    new_york = zoneinfo.ZoneInfo("America/New_York")
    assert ticks() == [
        (dt.datetime(2026, 3, 2, 9, 0, tzinfo=new_york), RunStatus.SCHEDULED),
        (paris(2026, 3, 3, 9, 0), RunStatus.CANCELLED),
    ]


def test_a_change_that_names_the_same_next_time_keeps_its_tick(db, cron_function):
    # Given the tick of 3 March 9:00 made ahead
    cron_function("0 9 * * *", timezone="Europe/Paris")
    kept = cron.schedule(now=utc(2026, 3, 2, 10, 0))[0]

    # When an expression is added whose times come later
    spec = cron_function(["0 9 * * *", "0 12 * * SUN"], timezone="Europe/Paris")
    result = cron.schedule_pass(now=utc(2026, 3, 2, 10, 5))

    # Then the tick stays, no other is made, and the memory has the new schedule
    assert (result.ticks, result.cancelled) == ([], [])
    assert ticks() == [(paris(2026, 3, 3, 9, 0), RunStatus.SCHEDULED)]
    assert (memory().key, memory().open_run) == (cron.signature(spec), kept.run_id)


def test_a_schedule_changed_and_changed_back_still_fires_its_tick(db, cron_function):
    # Given a schedule A, changed to B, and back to A before A's next tick
    cron_function("0 9 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 0))
    cron_function("0 10 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 1))

    cron_function("0 9 * * *", timezone="Europe/Paris")
    cron.schedule(now=utc(2026, 3, 2, 10, 2))

    # Then A's tick has a live run again (a new one: the cancelled one stays cancelled)
    assert ticks() == [
        (paris(2026, 3, 3, 9, 0), RunStatus.CANCELLED),
        (paris(2026, 3, 3, 9, 0), RunStatus.SCHEDULED),
        (paris(2026, 3, 3, 10, 0), RunStatus.CANCELLED),
    ]
    live = Run.objects.get(function="tests.cron", status=RunStatus.SCHEDULED)
    assert memory().open_run == live.pk


def test_workers_of_two_versions_side_by_side_leave_the_new_schedule_with_one_live_tick(db, cron_function):
    # Given a rolling deploy: passes of old (A) and new (B) workers take turns for a while
    now = utc(2026, 3, 2, 10, 0)
    for turn in range(6):
        cron_function("0 9 * * *" if turn % 2 == 0 else "0 10 * * *", timezone="Europe/Paris")
        cron.schedule(now=now + dt.timedelta(seconds=15 * turn))

    # When only new workers remain
    cron_function("0 10 * * *", timezone="Europe/Paris")
    cron.schedule(now=now + dt.timedelta(minutes=5))

    # Then exactly one tick is live, the new schedule's; each tick time has one event
    live = [(at, status) for at, status in ticks() if status != RunStatus.CANCELLED]
    assert live == [(paris(2026, 3, 3, 10, 0), RunStatus.SCHEDULED)]
    assert Event.objects.filter(name=cron.CRON_EVENT).count() == 2


# -- time: several expressions, DST ----------------------------------------------------------------


def _spec(expressions: str | list[str], zone: str = "Europe/Paris") -> Function:
    crons = (expressions,) if isinstance(expressions, str) else tuple(expressions)
    return Function(id="tests.cron_times", fn=_other, triggers=(), cron=crons, timezone=zone)


def test_several_expressions_fire_at_the_union_of_their_times_each_once():
    spec = _spec(["0 9 * * MON-FRI", "0 12 * * SAT,SUN", "0 9 * * MON"])

    times = cron.ticks_between(spec, paris(2026, 3, 2, 0, 0), paris(2026, 3, 9, 0, 0))

    assert times == [
        *[paris(2026, 3, day, 9, 0) for day in range(2, 7)],
        paris(2026, 3, 7, 12, 0),
        paris(2026, 3, 8, 12, 0),
    ]
    assert cron.next_tick(spec, paris(2026, 3, 6, 9, 0)) == paris(2026, 3, 7, 12, 0)


@pytest.mark.parametrize(
    ("expression", "day", "expected"),
    [
        # Clocks go forward at 2:00: the 2:30 that does not exist fires at 3:00, once.
        ("30 2 * * *", SPRING, [paris(2026, 3, 29, 3, 0)]),
        # Clocks go back at 3:00: 2:30 happens twice and fires at the first.
        ("30 2 * * *", FALL, [paris(2026, 10, 25, 2, 30, fold=0)]),
        ("0 2 * * *", FALL, [paris(2026, 10, 25, 2, 0, fold=0)]),
    ],
)
def test_a_fixed_time_fires_once_on_the_days_clocks_change(expression, day, expected):
    spec = _spec(expression)
    start = dt.datetime.combine(day, dt.time(0), tzinfo=PARIS)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=PARIS)

    assert cron.ticks_between(spec, start, end) == expected
    assert [moment.utcoffset() for moment in cron.ticks_between(spec, start, end)] == [
        moment.utcoffset() for moment in expected
    ]


@pytest.mark.parametrize(("day", "hours"), [(SPRING, 23), (FALL, 25)])
def test_an_hourly_expression_fires_every_real_hour_on_the_days_clocks_change(day, hours):
    spec = _spec("0 * * * *")
    start = dt.datetime.combine(day, dt.time(0), tzinfo=PARIS) - dt.timedelta(seconds=1)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=PARIS) - dt.timedelta(seconds=1)

    times = [moment.astimezone(UTC) for moment in cron.ticks_between(spec, start, end)]

    assert len(times) == hours
    assert all(later - earlier == dt.timedelta(hours=1) for earlier, later in itertools.pairwise(times))


@pytest.mark.parametrize(
    "expression", ["0 * * * *", "30 * * * *", "*/15 * * * *", "5 */2 * * *", "* 2 * * *", "*/20 1-3 * * *"]
)
@pytest.mark.parametrize("day", [SPRING, FALL])
def test_an_expression_with_a_wildcard_fires_at_every_real_instant_whose_wall_time_matches(expression, day):
    # Given every minute of the two days around a change of clocks, in UTC; the instants whose wall
    # time in Paris matches the expression (both 2:xx when clocks go back). When they go forward, an
    # expression naming every hour goes on with the next hour; one naming some hours fires the
    # skipped hour's times once, at the gap's end (3:00): croniter's rule, no tick lost
    spec = _spec(expression)
    start = dt.datetime.combine(day - dt.timedelta(days=1), dt.time(0), tzinfo=UTC)
    minutes = [start + dt.timedelta(minutes=n) for n in range(1, 2 * 24 * 60 + 1)]
    expected = {m for m in minutes if croniter.match(expression, m.astimezone(PARIS).replace(tzinfo=None))}
    skipped = [dt.datetime.combine(SPRING, dt.time(2, minute)) for minute in range(60)]
    every_hour = croniter(expression).expanded[1] == ["*"]
    if day == SPRING and not every_hour and any(croniter.match(expression, wall) for wall in skipped):
        expected.add(paris(2026, 3, 29, 3, 0).astimezone(UTC))

    # Then the ticks, forward and backward, are exactly those, each once
    forward = []
    moment: dt.datetime | None = start
    while moment is not None and moment < minutes[-1]:
        moment = cron.next_tick(spec, moment)
        if moment is not None and moment <= minutes[-1]:
            forward.append(moment.astimezone(UTC))
    assert forward == sorted(expected)
    assert [moment.astimezone(UTC) for moment in cron.ticks_between(spec, start, minutes[-1])] == sorted(
        expected
    )


@pytest.mark.parametrize("day", [SPRING, FALL])
@pytest.mark.parametrize(
    ("expression", "per_day"), [("30 2 * * *", {SPRING: 1, FALL: 1}), ("0 * * * *", {SPRING: 23, FALL: 25})]
)
def test_passes_through_a_change_of_clocks_lose_no_tick_and_double_none(
    db, cron_function, day, expression, per_day
):
    # Given a function in Paris, and workers up through the day clocks change (a pass every 10 minutes)
    cron_function(expression, timezone="Europe/Paris", catch_up="all")
    start = dt.datetime.combine(day, dt.time(0), tzinfo=PARIS).astimezone(UTC) - dt.timedelta(minutes=5)
    for step in range(0, 26 * 6 + 1):
        cron.schedule(now=start + dt.timedelta(minutes=10 * step))

    # Then that local day has its ticks, each once, each made ahead (none late, none cancelled)
    made = ticks()
    assert {status for _at, status in made} == {RunStatus.SCHEDULED}
    on_the_day = [at for at, _status in made if at.astimezone(PARIS).date() == day]
    assert len(on_the_day) == per_day[day]
    assert len({at.astimezone(UTC) for at, _status in made}) == len(made)
    assert Event.objects.filter(name=cron.CRON_EVENT).count() == len(made)


# -- bad input -----------------------------------------------------------------------------------


def test_an_expression_that_does_not_parse_fails_at_decoration_naming_the_function():
    with pytest.raises(TypeError, match=r"'tests\.cron_bad'.*'0 9 \* \* MONDAY-ish'.*does not parse"):
        function(id="tests.cron_bad", cron="0 9 * * MONDAY-ish")(_other)
    assert get_function("tests.cron_bad") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"cron": "0 9 * * *", "timezone": "Mars/Olympus_Mons"},
            r"timezone 'Mars/Olympus_Mons' is not a known",
        ),
        ({"cron": "0 9 * * *", "timezone": 2}, r"timezone must be an IANA zone name"),
        ({"cron": []}, r"cron= was given an empty list"),
        ({"cron": 9}, r"cron must be a cron expression"),
        ({"cron": "0 9 * * *", "catch_up": "some"}, r"catch_up must be 'latest', 'all' or 'none'"),
    ],
)
def test_bad_cron_options_fail_at_decoration(options, message):
    with pytest.raises(TypeError, match=message):
        function(id="tests.cron_bad", **options)(_other)
    assert get_function("tests.cron_bad") is None


def test_an_expression_that_names_no_time_that_exists_is_refused_at_startup():
    # 30 February: croniter parses it, and no such day ever comes
    with pytest.raises(TypeError, match=r"'tests.never': the cron expression '0 0 30 2 \*' names no time"):
        django_events.function(cron="0 0 30 2 *", id="tests.never")(lambda ctx: None)
    assert registry.get_function("tests.never") is None


def test_a_long_function_id_gets_a_hashed_key_of_at_most_255_characters():
    long_id = "tests." + "x" * 249
    first, second = cron.tick_key(long_id, utc(2026, 3, 2, 9)), cron.tick_key(long_id, utc(2026, 3, 2, 10))

    assert len(first) <= 255
    assert first.startswith("django_events/cron:")
    assert first != second
    assert first == cron.tick_key(long_id, utc(2026, 3, 2, 9).astimezone(PARIS))


def test_a_function_whose_ticks_fail_leaves_the_others_scheduled(db, cron_function, monkeypatch, caplog):
    # Given two cron functions, one of whose ticks cannot be stored
    cron_function("0 9 * * *", timezone="UTC")
    cron_function("0 9 * * *", id="tests.cron_broken", timezone="UTC")
    fire = cron._fire

    def failing(spec: Function, *args: Any) -> Any:
        if spec.id == "tests.cron_broken":
            raise RuntimeError("the disk is full")
        return fire(spec, *args)

    monkeypatch.setattr(cron, "_fire", failing)

    # When a pass runs
    result = cron.schedule_pass(now=utc(2026, 3, 2, 10))

    # Then the other function is scheduled, the failure is logged, and nothing of it is stored
    assert [tick.function for tick in result.ticks] == ["tests.cron"]
    assert result.failed == ["tests.cron_broken"]
    assert "Could not make the cron ticks of tests.cron_broken" in caplog.text
    assert not FlowKey.objects.filter(function="tests.cron_broken").exists()


# -- the admin's view ----------------------------------------------------------------------------


def test_next_ticks_shows_each_cron_function_s_next_tick_and_its_run(db, cron_function):
    # Given a cron function not yet scheduled
    cron_function("0 9 * * *", timezone="Europe/Paris")
    now = utc(2026, 3, 2, 10, 0)

    def mine() -> list[tuple[dt.datetime | None, Any]]:
        return [(t.at, t.run and t.run.pk) for t in cron.next_ticks(now=now) if t.function == "tests.cron"]

    # Then before a worker made it, the admin knows its time, without a run
    assert mine() == [(paris(2026, 3, 3, 9, 0), None)]

    # And once made, its run
    made = cron.schedule(now=now)[0]
    assert mine() == [(paris(2026, 3, 3, 9, 0), made.run_id)]

    # And after a change not yet scheduled by a worker, the new time without a run
    cron_function("0 10 * * *", timezone="Europe/Paris")
    assert mine() == [(paris(2026, 3, 3, 10, 0), None)]


# -- exactly once, however many schedule at once ----------------------------------------------------


def _at_once(count: int, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` in ``count`` threads released together, each with its own connection (closed after)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = work()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread never finished"
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def _no_broker_messages() -> Iterator[None]:
    """Passes here commit, and send their tick's messages: to a queue emptied after the test."""
    yield
    broker = dramatiq.get_broker()
    broker.flush(dispatch.run_queue(broker))


@pytest.mark.usefixtures("_no_broker_messages")
def test_many_workers_scheduling_at_once_fire_each_tick_once(transactional_db, cron_function):
    # Given a function every 5 minutes with catch_up="all", first scheduled by 8 workers at once
    cron_function("*/5 * * * *", timezone="UTC", catch_up="all")
    _at_once(8, lambda: cron.schedule(now=utc(2026, 3, 2, 10, 1)))
    assert ticks() == [(utc(2026, 3, 2, 10, 5), RunStatus.SCHEDULED)]

    # When, after a downtime that missed three ticks, 8 workers pass at once
    made = _at_once(8, lambda: cron.schedule(now=utc(2026, 3, 2, 10, 21)))

    # Then each tick has one event and one run, and one pass made them
    assert sum(len(ticks_made) for ticks_made in made) == 4
    assert ticks() == [
        (utc(2026, 3, 2, 10, 5), RunStatus.SCHEDULED),
        (utc(2026, 3, 2, 10, 10), RunStatus.PENDING),
        (utc(2026, 3, 2, 10, 15), RunStatus.PENDING),
        (utc(2026, 3, 2, 10, 20), RunStatus.PENDING),
        (utc(2026, 3, 2, 10, 25), RunStatus.SCHEDULED),
    ]
    assert Event.objects.filter(name=cron.CRON_EVENT).count() == 5


@pytest.mark.usefixtures("_no_broker_messages")
def test_the_tick_s_unique_key_alone_fires_it_once(transactional_db, cron_function):
    # Given 8 transactions storing one tick at once, without the function's lock
    spec = cron_function("*/5 * * * *", timezone="UTC")
    now = utc(2026, 3, 2, 10, 1)

    def store() -> Any:
        with transaction.atomic():
            _run_id, run = cron._fire(spec, utc(2026, 3, 2, 10, 5), now, "default")
            time.sleep(0.05)  # hold the transaction open while the others try
        return run

    made = _at_once(8, store)

    # Then one stored it and its run; the others found it
    assert len([run for run in made if run is not None]) == 1
    assert ticks() == [(utc(2026, 3, 2, 10, 5), RunStatus.SCHEDULED)]


# -- the worker's loop ---------------------------------------------------------------------------


@pytest.mark.usefixtures("_no_broker_messages")
def test_the_recovery_loop_makes_each_next_tick_right_after_the_last_is_due(
    transactional_db, cron_function, settings
):
    # Given an every-second function, and a recovery interval far longer than the test
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "RECOVERY_INTERVAL": 60}
    cron_function("* * * * * *", timezone="UTC")
    loop = RecoveryLoop()

    # When a worker's loop runs for a few seconds
    loop.start()
    try:

        def three_made() -> bool:
            """the loop made three ticks"""
            return Event.objects.filter(name=cron.CRON_EVENT, data__function="tests.cron").count() >= 3

        wait_for(three_made, timeout=15)
    finally:
        loop.stop()

    # Then it made the first at once and each next one right after the last came due
    made = [at.astimezone(UTC) for at, _status in ticks()]
    assert all(later - earlier == dt.timedelta(seconds=1) for earlier, later in itertools.pairwise(made))


@pytest.mark.usefixtures("_no_broker_messages")
def test_a_failed_cron_pass_is_logged_and_the_loop_goes_on(
    transactional_db, cron_function, settings, monkeypatch, caplog
):
    # Given a cron pass that fails once, and a recovery interval of one second
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "RECOVERY_INTERVAL": 1}
    cron_function("0 9 * * *", timezone="UTC")
    real = cron.schedule_pass
    calls: list[int] = []

    def once_broken(**kwargs: Any) -> cron.CronPass:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return real(**kwargs)

    monkeypatch.setattr(cron, "schedule_pass", once_broken)
    loop = RecoveryLoop()

    # When the loop runs
    caplog.set_level(logging.ERROR, logger="django_events")
    loop.start()
    try:
        wait_for(lambda: FlowKey.objects.filter(function="tests.cron").exists(), timeout=15)
    finally:
        loop.stop()

    # Then the failure was logged, and the next pass made the tick
    assert "Cron pass failed" in caplog.text
    assert len(ticks()) == 1
