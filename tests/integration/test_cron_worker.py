"""Cron through real workers: two ``rundramatiq`` processes fire each tick of an every-second function once.

The function (``tests/cronapp/events.py``) is installed only in the worker processes
(``tests.cronapp.settings``). No process of ours schedules anything: the workers' own
recovery loops make the ticks, each right after the last came due.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from django.db import connection

from django_events import dispatch
from django_events.cron import CRON_EVENT
from django_events.models import Attempt, Event, Run, RunStatus
from django_events.registry import get_function
from tests.conftest import wait_for
from tests.cronapp import EVERY_SECOND, EVERY_SECOND_CALL
from tests.faults.harness import Workers, worker_env
from tests.testapp.models import Call

pytestmark = [pytest.mark.e2e, pytest.mark.flow_workers]

#: Ticks that must have run before the workers are stopped.
TICKS = 6


@pytest.fixture(params=["redis", "database"])
def cron_workers(request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path) -> Iterator[Workers]:
    """Workers (started by the test) with the every-second function, on Redis or the database broker."""
    env = worker_env(
        DJANGO_SETTINGS_MODULE="tests.cronapp.settings",
        DJANGO_EVENTS_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
        DJANGO_EVENTS_TEST_BROKER=request.param,
    )
    fleet = Workers(env, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()
        print(fleet.tail())
        if request.param == "redis":
            broker = dramatiq.get_broker()  # the test settings' Redis, the workers' namespace and queue
            broker.flush(dispatch.run_queue(broker))


def tick_time(event: Event) -> dt.datetime:
    return dt.datetime.fromisoformat(event.data["scheduled_at"])


def test_two_workers_fire_each_tick_of_an_every_second_function_once(cron_workers: Workers) -> None:
    # Given two worker processes with a function every second (catch_up="all"), which only they know
    assert get_function(EVERY_SECOND) is None
    cron_workers.start(2)

    # When they have run several ticks
    def ticks_ran() -> bool:
        """the workers ran several ticks"""
        return Run.objects.filter(function=EVERY_SECOND, status=RunStatus.SUCCEEDED).count() >= TICKS

    wait_for(ticks_ran, timeout=120, interval=0.2)
    cron_workers.assert_alive()
    cron_workers.stop()

    # Then each second from the first tick on has one tick event, with one run: none lost, none doubled
    events = sorted(Event.objects.filter(name=CRON_EVENT, data__function=EVERY_SECOND), key=tick_time)
    times = [tick_time(event) for event in events]
    assert len(times) >= TICKS
    assert all(later - earlier == dt.timedelta(seconds=1) for earlier, later in itertools.pairwise(times))
    runs = list(Run.objects.filter(function=EVERY_SECOND))
    assert sorted(Counter(run.event_id for run in runs).values()) == [1] * len(events)

    # ...the function ran once per tick that ran, on its first attempt, on time
    by_event = {run.event_id: run for run in runs}
    calls = Counter(Call.objects.filter(function=EVERY_SECOND_CALL).values_list("run_id", flat=True))
    ran = [event for event in events if by_event[event.pk].status == RunStatus.SUCCEEDED]
    assert len(ran) >= TICKS
    for event in ran:
        run = by_event[event.pk]
        assert (run.attempts, calls[str(run.pk)], run.result) == (1, 1, event.data["scheduled_at"])
        assert run.started_at is not None
        assert dt.timedelta(0) <= run.started_at - tick_time(event) < dt.timedelta(seconds=10)
    assert sum(calls.values()) == len(ran)

    # ...and the ticks that did not run are the last ones, still waiting for their time
    waiting = [event for event in events if by_event[event.pk].status != RunStatus.SUCCEEDED]
    assert {by_event[event.pk].status for event in waiting} <= {RunStatus.SCHEDULED, RunStatus.PENDING}
    assert all(tick_time(event) > tick_time(ran[-1]) for event in waiting)
    assert Attempt.objects.filter(run__function=EVERY_SECOND).count() == len(ran)
