"""A worker SIGKILLed in the middle of a cron tick: the tick is neither lost nor doubled.

Two ``rundramatiq`` processes run an every-second cron function (``tests/cronapp``).
The first attempt of one tick records its call and blocks; its worker is SIGKILLed
(its whole process group). The other worker takes the run back when its lease ends
and runs it, and goes on firing the ticks, the killed worker's included.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from django_events.cron import CRON_EVENT
from django_events.models import Attempt, AttemptOutcome, Event, Run, RunStatus
from tests.cronapp import BLOCK_ENV, EVERY_SECOND, EVERY_SECOND_CALL
from tests.testapp.models import Call

from .harness import RedisServer, Workers, child_pids, patience, report, wait_until, worker_env

pytestmark = pytest.mark.flow_workers


@pytest.fixture
def cron_workers(transactional_db: None, redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    """Workers (started by the test) with the every-second function, on the private Redis; the tick
    that blocks is written to ``tmp_path / "blocked"``."""
    env = worker_env(
        DJANGO_SETTINGS_MODULE="tests.cronapp.settings",
        DJANGO_EVENTS_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
        REDIS_URL=redis_server.url,
        **{BLOCK_ENV: str(tmp_path / "blocked")},
    )
    fleet = Workers(env, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()
        print(fleet.tail())


def tick_time(event: Event) -> dt.datetime:
    return dt.datetime.fromisoformat(event.data["scheduled_at"])


def test_a_worker_killed_in_the_middle_of_a_tick_loses_no_tick_and_doubles_none(
    cron_workers: Workers, tmp_path: Path
) -> None:
    # Given two workers firing a tick every second
    cron_workers.start(2)

    # When the function of one tick has recorded its call and blocks in a worker, that worker is
    # SIGKILLed with its whole process group
    blocked = tmp_path / "blocked"

    def blocking() -> list[str]:
        """a tick's function blocks in a worker"""
        return blocked.read_text().split() if blocked.exists() else []

    pid, run_id = wait_until(blocking, timeout=120, what=blocking.__doc__, describe=cron_workers.tail)
    victim = next(p for p in cron_workers.processes if int(pid) in child_pids(p.pid))
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    cron_workers.processes.remove(victim)
    killed_at = timezone.now()

    # Then the other worker runs that tick again once its lease is over, and the ticks go on: wait
    # until every tick up to 10 s after the kill has run
    cutoff = killed_at + dt.timedelta(seconds=10)

    def caught_up() -> bool:
        """every tick up to 10 s after the kill ran"""
        runs = Run.objects.filter(function=EVERY_SECOND).select_related("event")
        due = [run for run in runs if tick_time(run.event) <= cutoff]
        return bool(due) and all(run.status == RunStatus.SUCCEEDED for run in due) and timezone.now() > cutoff

    wait_until(caught_up, timeout=patience(120), what=caught_up.__doc__, describe=cron_workers.tail)
    cron_workers.assert_alive()
    cron_workers.stop()

    # ...the blocked tick: its first attempt lost with the worker, its second succeeded, one call each
    run = Run.objects.get(pk=run_id)
    outcomes = list(Attempt.objects.filter(run=run).order_by("number").values_list("outcome", flat=True))
    assert (run.status, outcomes) == (RunStatus.SUCCEEDED, [AttemptOutcome.LOST, AttemptOutcome.SUCCEEDED])
    assert sorted(Call.objects.filter(run_id=run_id).values_list("attempt", flat=True)) == [1, 2]

    # ...each second has one tick event with one run (none lost, none doubled), and every tick up to
    # the cutoff succeeded, its function succeeding once (a call per attempt, the last one succeeded)
    events = sorted(Event.objects.filter(name=CRON_EVENT, data__function=EVERY_SECOND), key=tick_time)
    times = [tick_time(event) for event in events]
    assert all(later - earlier == dt.timedelta(seconds=1) for earlier, later in itertools.pairwise(times))
    runs = {run.event_id: run for run in Run.objects.filter(function=EVERY_SECOND)}
    assert Counter(Run.objects.filter(function=EVERY_SECOND).values_list("event_id", flat=True)) == Counter(
        {event.pk: 1 for event in events}
    )
    calls = Counter(Call.objects.filter(function=EVERY_SECOND_CALL).values_list("run_id", "attempt"))
    assert set(calls.values()) == {1}
    due = [event for event in events if tick_time(event) <= cutoff]
    for event in due:
        tick = runs[event.pk]
        assert tick.status == RunStatus.SUCCEEDED, (event.data, tick.status)
        history = list(Attempt.objects.filter(run=tick).order_by("number").values_list("outcome", flat=True))
        assert history[-1] == AttemptOutcome.SUCCEEDED
        assert set(history[:-1]) <= {AttemptOutcome.LOST}
        assert calls[(str(tick.pk), tick.attempts)] == 1
    report(
        "cron_worker_killed_mid_tick",
        {
            "ticks": len(events),
            "ticks_checked": len(due),
            "ticks_run_twice": sum(1 for event in due if runs[event.pk].attempts > 1),
            "seconds_from_kill_to_blocked_tick_done": round(
                ((run.finished_at or killed_at) - killed_at).total_seconds(), 1
            ),
        },
    )
