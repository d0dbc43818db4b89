"""Durable steps under faults: workers SIGKILLed at random moments, between two steps, while woken
runs run after a sleep or a wait; a sender SIGKILLed while it resolves waits; PostgreSQL restarted
while runs sleep and wait.

Of the sender's kill: the wait it had resolved before dying is woken by recovery (its run is
pending without a message); the waits it had not reached yet stay ``waiting`` although their events
are committed, and find them when their timeout comes (``waits.deliver`` runs after the commit, in
the sender, and nothing else looks for them sooner): not missed, but as late as the timeout.

The functions (``tests/testapp/step_events.py``: ``tests.steps_kill_atomic``, ``steps_kill_sleepy``,
``steps_kill_wait``) insert an ``Effect`` row in a ``step.atomic`` and write a ``Call`` row in each
``step.run``, whose memo keeps the attempt that ran it. They have a time limit of 2 s, so a lease of
3 s with the faults' ``LEASE_MARGIN`` of 1 s: a killed attempt's run is recorded lost and taken again
within seconds. :func:`check_steps` then asserts, run by run:

* the run succeeded, and its ``Effect`` exists exactly once (its ``insert`` memo and its result
  name that row): a ``step.atomic`` is exactly once;
* a ``step.run`` ran again only in place of an attempt that did not finish (killed, or cut off by
  the database): the attempt its memo names wrote one ``Call``, every other ``Call`` of the step
  comes from an earlier attempt that failed or was lost, none from a later one (a step is never
  run again once its memo is stored).

``DJANGO_EVENTS_FAULT_SCALE`` (default 0.2) scales the runs: the exactly-once test sends 200 at
the default scale, the issue's 1,000 with ``DJANGO_EVENTS_FAULT_SCALE=1``. The figures are printed
(``pytest -s``) and kept in ``var/faults/<scenario>.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction
from django.utils import timezone

import django_events
from django_events.models import Attempt, AttemptOutcome, Run, RunStatus, Step
from tests.testapp.models import Call, Effect

from .harness import (
    ROOT,
    PostgresCluster,
    RedisServer,
    Workers,
    patience,
    private_postgres,
    report,
    scaled,
    wait_until,
    worker_env,
)

_ON_POSTGRES = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.flow_workers,
    pytest.mark.skipif(not _ON_POSTGRES, reason="the step kill tests run workers on PostgreSQL"),
]

ATOMIC, SLEEPY, WAITER = "tests.steps_kill_atomic", "tests.steps_kill_sleepy", "tests.steps_kill_wait"
#: Each function's ``step.run`` ids and the ``Call.function`` each writes; and its Effect's ``step``.
CALLS = {
    ATOMIC: {"before": "kill_before", "after": "kill_after"},
    SLEEPY: {"before": "sleepy_before", "after": "sleepy_after"},
    WAITER: {"before": "wait_before", "after": "wait_after"},
}
EFFECT = {ATOMIC: "insert", SLEEPY: "woken", WAITER: "answered"}
#: Attempt outcomes after which a step may run again: the attempt did not finish.
UNFINISHED = {"failed", "lost", "timed_out", "interrupted"}
READY = "Worker process is ready for action"


# --- checks ---------------------------------------------------------------------------------------


def check_steps(cursor: Any, function: str, total: int) -> dict[str, Any]:
    """Assert the steps' guarantees for the ``total`` runs of ``function`` (all must have succeeded);
    return the figures. ``cursor``: a DB-API cursor on the PostgreSQL database (Django's or psycopg's).
    """
    cursor.execute(
        "SELECT id::text, status, result::text FROM django_events_run WHERE function = %s", [function]
    )
    runs = {run: (status, None if result is None else json.loads(result)) for run, status, result in cursor}
    cursor.execute(
        "SELECT a.run_id::text, a.number, a.outcome, a.started_at FROM django_events_attempt a "
        "JOIN django_events_run r ON r.id = a.run_id WHERE r.function = %s",
        [function],
    )
    attempts: dict[str, dict[int, str]] = defaultdict(dict)
    lost_started: list[dt.datetime] = []
    for run, number, outcome, started in cursor.fetchall():
        attempts[run][number] = outcome
        if outcome == "lost":
            lost_started.append(started)
    cursor.execute(
        "SELECT s.run_id::text, s.step_id, s.status, s.result::text FROM django_events_step s "
        "JOIN django_events_run r ON r.id = s.run_id WHERE r.function = %s",
        [function],
    )
    memos = {
        (run, step): (status, None if result is None else json.loads(result))
        for run, step, status, result in cursor.fetchall()
    }
    names = CALLS[function]
    cursor.execute(
        "SELECT run_id, function, attempt FROM testapp_call WHERE function = ANY(%s)", [list(names.values())]
    )
    calls: dict[tuple[str, str], list[int]] = defaultdict(list)
    for run, name, attempt in cursor.fetchall():
        calls[run, name].append(attempt)
    cursor.execute("SELECT run_id, id FROM testapp_effect WHERE step = %s", [EFFECT[function]])
    effects: dict[str, list[int]] = defaultdict(list)
    for run, pk in cursor.fetchall():
        effects[run].append(pk)

    problems: list[str] = []
    statuses = Counter(status for status, _result in runs.values())
    if len(runs) != total or statuses["succeeded"] != total:
        problems.append(f"expected {total} succeeded runs, found {len(runs)}: {dict(statuses)}")
    strays = set(effects) - set(runs)
    if strays:
        problems.append(f"Effect rows of {len(strays)} unknown run(s)")
    reruns = 0
    for run, (status, result) in runs.items():
        if status != "succeeded":
            problems.append(f"run {run} is {status}: attempts {sorted(attempts[run].items())}")
            continue
        outcomes = [outcome for _n, outcome in sorted(attempts[run].items())]
        if outcomes.count("succeeded") != 1 or outcomes[-1] != "succeeded":
            problems.append(f"run {run}: attempt outcomes {outcomes}")
        if len(effects[run]) != 1:
            problems.append(f"run {run}: {len(effects[run])} Effect rows, not 1")
        elif memos.get((run, "insert")) != ("completed", effects[run][0]) or result != effects[run][0]:
            problems.append(
                f"run {run}: Effect {effects[run]}, insert memo {memos.get((run, 'insert'))}, result {result}"
            )
        for step, name in names.items():
            memo_status, by = memos.get((run, step), (None, None))
            ran = sorted(calls[run, name])
            if memo_status != "completed" or not isinstance(by, int):
                problems.append(f"run {run}: step {step!r} memo {memos.get((run, step))}")
                continue
            earlier = [n for n in ran if n != by]
            if ran.count(by) != 1 or any(n > by or attempts[run].get(n) not in UNFINISHED for n in earlier):
                problems.append(
                    f"run {run}: step {step!r} stored by attempt {by}, ran in attempts {ran}; "
                    f"outcomes {sorted(attempts[run].items())}"
                )
            reruns += len(earlier)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])
    return {
        "runs": len(runs),
        "runs_succeeded": statuses["succeeded"],
        "effects": sum(len(pks) for pks in effects.values()),
        "duplicate_effects": sum(len(pks) - 1 for pks in effects.values() if len(pks) > 1),
        "missing_effects": sum(1 for run in runs if not effects[run]),
        "attempts": sum(len(numbers) for numbers in attempts.values()),
        "attempts_lost": len(lost_started),
        "attempts_failed": sum(
            1 for numbers in attempts.values() for outcome in numbers.values() if outcome == "failed"
        ),
        "runs_with_an_attempt_lost": sum(1 for numbers in attempts.values() if "lost" in numbers.values()),
        "most_attempts_lost_by_one_run": max(
            (list(numbers.values()).count("lost") for numbers in attempts.values()), default=0
        ),
        "step_runs_again_after_an_unfinished_attempt": reruns,
        "_lost_started": lost_started,
    }


def kills_landed(kills: list[dt.datetime], lost_started: list[dt.datetime]) -> int:
    """How many kills cost an attempt: each lost attempt is put down to the first kill after its start
    (nothing else loses attempts in these tests)."""
    hit = set()
    for started in lost_started:
        after = [i for i, at in enumerate(kills) if at >= started]
        if after:
            hit.add(after[0])
    return len(hit)


def django_check(function: str, total: int) -> dict[str, Any]:
    with connection.cursor() as cursor:
        return check_steps(cursor, function, total)


# --- workers and kills ----------------------------------------------------------------------------


def ready(log: Path) -> bool:
    return log.exists() and READY in log.read_text(errors="replace")


def start_ready(workers: Workers, count: int) -> None:
    """Start ``count`` workers and wait until each is ready for action."""
    first = len(workers.logs)
    workers.start(count)
    wait_until(
        lambda: workers.assert_alive() or all(ready(log) for log in workers.logs[first:]),
        timeout=90,
        what=f"{count} new worker(s) ready",
        describe=workers.tail,
    )


def kill_until(
    workers: Workers,
    done: Callable[[], bool],
    *,
    rng: random.Random,
    timeout: float,
    max_kills: int,
    describe: Callable[[], object],
) -> tuple[list[dt.datetime], float]:
    """Until ``done()``: at a random moment (0.1-1 s after the newest worker is ready) SIGKILL one
    of the workers at random, its whole process group, and start another in its place. At most
    ``max_kills``; then wait for ``done()``. Return the kills' times and the seconds taken."""
    kills: list[dt.datetime] = []
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, f"not done within {timeout:.0f}s: {describe()}"
        if len(kills) >= max_kills:
            time.sleep(0.2)
            continue
        workers.assert_alive()
        # the moment is random on purpose: it is not waiting for anything
        time.sleep(rng.uniform(0.1, 1.0))
        if done():
            break
        kills.append(timezone.now())
        workers.kill_one(rng.randrange(len(workers.processes)))
        start_ready(workers, 1)
    return kills, time.monotonic() - started


def statuses(function: str) -> Counter[str]:
    return Counter(Run.objects.filter(function=function).values_list("status", flat=True))


def all_final(function: str, total: int) -> bool:
    return statuses(function)[RunStatus.SUCCEEDED] + statuses(function)[RunStatus.DEAD] >= total


@pytest.fixture
def fleet(workers: Workers, private_broker: object) -> Workers:
    """Two workers ready on the private Redis, and ``send()`` in this process sending to it."""
    start_ready(workers, 2)
    return workers


# --- 1. exactly once --------------------------------------------------------------------------------


def test_atomic_step_exactly_once_under_sigkill(fleet: Workers) -> None:
    # Given runs of a function whose step.atomic inserts a row and stays 0.1-0.5 s in its transaction
    # (chosen at random per run), between two step.run steps (the second 50 ms long on the first
    # attempt)
    total = scaled(1000)
    rng = random.Random()
    started = time.monotonic()
    for first in range(0, total, 100):
        django_events.send_many(
            [
                {
                    "name": "steps/kill-atomic",
                    "data": {"n": n, "pause": round(rng.uniform(0.1, 0.5), 3), "after_pause": 0.05},
                }
                for n in range(first, min(total, first + 100))
            ]
        )

    # When the two workers are SIGKILLed, one at a time at random moments, until every run has ended
    # (each replaced by a new one at once)
    kills, took = kill_until(
        fleet,
        lambda: all_final(ATOMIC, total),
        rng=rng,
        timeout=patience(240),
        max_kills=max(10, total // 8),
        describe=lambda: (statuses(ATOMIC), fleet.tail()),
    )
    seconds = time.monotonic() - started

    # Then every run succeeded, with its row inserted exactly once, and its steps' memos kept
    figures = django_check(ATOMIC, total)
    landed = kills_landed(kills, figures.pop("_lost_started"))
    figures.update(kills=len(kills), kills_that_cost_an_attempt=landed, seconds=round(seconds, 1))
    figures["seconds_killing"] = round(took, 1)
    figures.update(where_attempts_were_lost())
    report("steps_atomic_exactly_once_under_sigkill", figures)
    assert figures["runs_succeeded"] == total
    assert figures["effects"] == total
    assert figures["duplicate_effects"] == figures["missing_effects"] == 0
    # and the kills did cut runs off in flight (else this proves nothing)
    assert figures["attempts_lost"] > 0


def where_attempts_were_lost() -> dict[str, int]:
    """Where in ``tests.steps_kill_atomic`` the lost attempts were cut off, as their rows show: before
    the "before" step's memo (it was stored by a later attempt); after it but before the insert
    committed (the Effect row is younger than the next attempt's start: the kill came, almost
    always, inside the insert's transaction, which rolled back); or after the insert committed."""
    started = {
        (str(run), number): at
        for run, number, at in Attempt.objects.filter(run__function=ATOMIC).values_list(
            "run_id", "number", "started_at"
        )
    }
    before = {
        str(run): result
        for run, result in Step.objects.filter(run__function=ATOMIC, step_id="before").values_list(
            "run_id", "result"
        )
    }
    inserted = dict(Effect.objects.filter(step="insert").values_list("run_id", "created_at"))
    where: Counter[str] = Counter()
    lost = Attempt.objects.filter(run__function=ATOMIC, outcome=AttemptOutcome.LOST)
    for run, number in lost.values_list("run_id", "number"):
        run = str(run)
        if before[run] > number:
            where["lost_before_the_first_step_was_kept"] += 1
        elif inserted[run] > started[run, number + 1]:
            where["lost_inside_the_insert_rolled_back"] += 1
        else:
            where["lost_after_the_insert_committed"] += 1
    return dict(where)


# --- 2. between two steps ---------------------------------------------------------------------------


def test_kill_between_two_steps_keeps_the_steps_before(workers: Workers, private_broker: object) -> None:
    # Given one worker (four threads) running four runs, each in its "after" step (1.5 s long on the
    # first attempt), after its "before" step and its atomic insert
    start_ready(workers, 1)
    count = 4
    django_events.send_many(
        [{"name": "steps/kill-atomic", "data": {"n": n, "after_pause": 1.5}} for n in range(count)]
    )
    wait_until(
        lambda: Call.objects.filter(function="kill_after").count() == count,
        timeout=60,
        what="every run in its 'after' step",
        describe=workers.tail,
        interval=0.02,
    )

    # When the worker is SIGKILLed there, and another started
    workers.kill_one()
    start_ready(workers, 1)

    # Then every run finishes...
    wait_until(
        lambda: all_final(ATOMIC, count),
        timeout=patience(60),
        what="every run final",
        describe=lambda: (statuses(ATOMIC), workers.tail()),
    )
    figures = django_check(ATOMIC, count)
    figures.pop("_lost_started")
    report("steps_kill_between_two_steps", figures)
    # ...with its first attempt lost, the steps before the kill not run again ("before" once, its
    # memo from attempt 1; the Effect once), and "after" run again by the second attempt
    runs = list(Run.objects.filter(function=ATOMIC))
    for run in runs:
        outcomes = list(run.attempt_set.order_by("number").values_list("outcome", flat=True))
        assert outcomes == ["lost", "succeeded"], outcomes
        memos = {step.step_id: step for step in Step.objects.filter(run=run)}
        assert (memos["before"].result, memos["before"].attempts) == (1, 1)
        assert (memos["after"].result, memos["after"].attempts) == (2, 1)
        calls = Call.objects.filter(run_id=str(run.pk))
        assert sorted(calls.filter(function="kill_before").values_list("attempt", flat=True)) == [1]
        assert sorted(calls.filter(function="kill_after").values_list("attempt", flat=True)) == [1, 2]
    assert figures["effects"] == count
    assert figures["duplicate_effects"] == 0


# --- 3. during wake-ups -----------------------------------------------------------------------------


def test_kill_during_sleep_wake_ups(fleet: Workers) -> None:
    # Given runs that sleep 2-8 s between a step and an atomic insert (then a step, each 0.5 s long:
    # a dozen or so woken runs running at any time), all asleep
    total = scaled(500)
    rng = random.Random()
    django_events.send_many(
        [
            {"name": "steps/kill-sleepy", "data": {"n": n, "seconds": rng.uniform(2, 8), "pause": 0.5}}
            for n in range(total)
        ]
    )
    wait_until(
        lambda: Step.objects.filter(run__function=SLEEPY, step_id="nap").count() == total,
        timeout=patience(60),
        what="every run asleep",
        describe=lambda: (statuses(SLEEPY), fleet.tail()),
    )
    asleep = statuses(SLEEPY)[RunStatus.SLEEPING]

    # When workers are SIGKILLed at random moments while the runs wake up and go on, until all ended
    kills, took = kill_until(
        fleet,
        lambda: all_final(SLEEPY, total),
        rng=rng,
        timeout=patience(180),
        max_kills=max(10, total // 8),
        describe=lambda: (statuses(SLEEPY), fleet.tail()),
    )

    # Then every run succeeded, no step ran again once its memo was kept, no Effect twice
    figures = django_check(SLEEPY, total)
    landed = kills_landed(kills, figures.pop("_lost_started"))
    figures.update(
        asleep_when_kills_began=asleep,
        kills=len(kills),
        kills_that_cost_an_attempt=landed,
        seconds=round(took, 1),
    )
    report("steps_kill_during_sleep_wake_ups", figures)
    assert figures["duplicate_effects"] == figures["missing_effects"] == 0
    assert figures["attempts_lost"] > 0, "no kill cut a woken run off"


def test_kill_while_waits_are_resolved(fleet: Workers) -> None:
    # Given runs that wait for an answer (matched on data.i) between a step and an atomic insert
    total = scaled(500)
    rng = random.Random()
    django_events.send_many(
        [{"name": "steps/kill-wait", "data": {"i": i, "pause": 0.3}} for i in range(total)]
    )

    # ...and answers sent by this process, five per transaction, from when half the runs wait (some
    # answers come before their run waits), each transaction resolving waits and waking runs
    wait_until(
        lambda: statuses(WAITER)[RunStatus.WAITING] >= total // 2,
        timeout=patience(60),
        what="half the runs waiting",
        describe=lambda: (statuses(WAITER), fleet.tail()),
    )
    order = list(range(total))
    rng.shuffle(order)
    sent = threading.Event()
    failures: list[BaseException] = []

    def answer() -> None:
        try:
            for first in range(0, total, 5):
                with transaction.atomic():
                    for i in order[first : first + 5]:
                        django_events.send("steps/kill-answer", {"i": i})
                time.sleep(0.25)  # spreads the answers over a few seconds
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            sent.set()
            close_old_connections()
            connections.close_all()

    sender = threading.Thread(target=answer, daemon=True)
    sender.start()

    # When workers are SIGKILLed at random moments meanwhile, until every run ended
    kills, took = kill_until(
        fleet,
        lambda: sent.is_set() and all_final(WAITER, total),
        rng=rng,
        timeout=patience(180),
        max_kills=max(10, total // 8),
        describe=lambda: (statuses(WAITER), fleet.tail()),
    )
    sender.join(timeout=30)
    assert not failures, failures

    # Then every run succeeded, no step ran again once its memo was kept, no Effect twice
    figures = django_check(WAITER, total)
    landed = kills_landed(kills, figures.pop("_lost_started"))
    resolved = Step.objects.filter(run__function=WAITER, step_id="answer", resolved_event__isnull=False)
    figures.update(
        waits_resolved=resolved.count(),
        kills=len(kills),
        kills_that_cost_an_attempt=landed,
        seconds=round(took, 1),
    )
    report("steps_kill_while_waits_are_resolved", figures)
    assert figures["waits_resolved"] == total
    assert figures["duplicate_effects"] == figures["missing_effects"] == 0
    assert figures["attempts_lost"] > 0, "no kill cut a run off"


def test_sender_killed_while_it_resolves_waits(fleet: Workers) -> None:
    # Given runs waiting for their answers (for 60 s at most: far longer than recovery's grace, 5 s)
    count, timeout = scaled(100), 60.0
    django_events.send_many(
        [{"name": "steps/kill-wait", "data": {"i": i, "timeout": timeout}} for i in range(count)]
    )
    wait_until(
        lambda: statuses(WAITER)[RunStatus.WAITING] == count,
        timeout=patience(60),
        what="every run waiting",
        describe=lambda: (statuses(WAITER), fleet.tail()),
    )
    waiting_at = timezone.now()
    waits = Step.objects.filter(run__function=WAITER, step_id="answer")
    assert min(waits.values_list("wake_at", flat=True)) > waiting_at

    # When a process commits all the answers in one transaction, then, resolving the waits after the
    # commit, is SIGKILLed as it sends the first woken run's message: after that wait's resolution
    # and the run's move to pending committed, before the message (tests.faults.driver
    # --die-after-commit kills it in its first enqueue)
    sender = subprocess.run(
        [
            *(sys.executable, "-m", "tests.faults.driver", f"steps/kill-answer={count}"),
            *("--per-transaction", str(count), "--die-after-commit"),
        ],
        cwd=ROOT,
        env=fleet.env,
        timeout=120,
        capture_output=True,
        text=True,
        check=False,
    )
    killed_at = timezone.now()
    assert sender.returncode == -9, sender.stderr[-3000:]
    resolved_by_sender = waits.filter(resolved_event__isnull=False).count()

    # Then every run succeeds with its answer, long before the waits' timeout: the run the sender
    # woke is sent again by recovery, and recovery matches the answers the sender never reached
    # (recovery.recover's rematch, once RECOVERY_GRACE has passed)
    wait_until(
        lambda: all_final(WAITER, count),
        timeout=patience(90),
        what="every run final",
        describe=lambda: (statuses(WAITER), fleet.tail()),
    )
    figures = django_check(WAITER, count)
    figures.pop("_lost_started")
    ended = sorted(
        (finished - killed_at).total_seconds()
        for finished in Run.objects.filter(function=WAITER).values_list("finished_at", flat=True)
    )
    figures.update(
        waits_resolved_by_the_killed_sender=resolved_by_sender,
        first_run_ended_after_the_kill_s=round(ended[0], 2),
        last_run_ended_after_the_kill_s=round(ended[-1], 2),
        wait_timeout_s=timeout,
    )
    report("steps_sender_killed_while_it_resolves_waits", figures)
    assert resolved_by_sender == 1
    assert waits.filter(resolved_event__isnull=False).count() == count
    assert ended[-1] < timeout / 2, "the waits ended by their timeout, not by recovery's rematch"
    assert figures["duplicate_effects"] == figures["missing_effects"] == 0


# --- 4. PostgreSQL restarts -------------------------------------------------------------------------

DATABASE = "django_events_steps_restart"


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster of this test's own, removed after it."""
    with private_postgres() as cluster:
        yield cluster


@pytest.mark.own_postgres
def test_postgres_restarts_while_runs_sleep_and_wait(
    postgres: PostgresCluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    count = scaled(250)
    url = postgres.url(DATABASE)
    env = worker_env(DATABASE_URL=url, DJANGO_EVENTS_TEST_DATABASE_NAME=None, REDIS_URL=redis_server.url)
    postgres.migrated_database(DATABASE, env)

    def send(*specs: str, data: str = "{}") -> None:
        """Send events from a process of its own (``tests.faults.driver``), into the private cluster."""
        command = [sys.executable, "-m", "tests.faults.driver", *specs, "--per-transaction", "10"]
        sender = subprocess.run(
            [*command, "--data", data],
            cwd=ROOT,
            env=env,
            timeout=patience(300),
            capture_output=True,
            text=True,
            check=False,
        )
        assert sender.returncode == 0, sender.stderr[-3000:]

    def counts(function: str) -> Counter[str] | None:
        """status -> runs of ``function``, or None while the database is restarting"""
        try:
            with psycopg.connect(url, connect_timeout=3) as conn, conn.cursor() as cursor:
                cursor.execute(
                    "SELECT status, COUNT(*) FROM django_events_run WHERE function = %s GROUP BY status",
                    [function],
                )
                return Counter(dict(cursor.fetchall()))
        except psycopg.OperationalError:
            return None

    def reached(function: str, status: str, n: int) -> bool:
        found = counts(function)
        return found is not None and found[status] >= n

    # Given runs that sleep 12 s, and runs that wait for an answer, between a step and an atomic
    # insert; all asleep or waiting
    send(f"steps/kill-sleepy={count}", data='{"seconds": 12, "pause": 0.05}')
    send(f"steps/kill-wait={count}", data='{"pause": 0.05}')
    workers = Workers(env, tmp_path)
    try:
        workers.start(2)
        first = workers.processes[:]
        wait_until(
            lambda: reached(SLEEPY, "sleeping", count) and reached(WAITER, "waiting", count),
            timeout=patience(90),
            what="every run asleep or waiting",
            describe=lambda: (counts(SLEEPY), counts(WAITER), workers.tail()),
        )

        # When PostgreSQL restarts (pg_ctl restart -m fast: every connection cut) while they sleep
        # and wait
        postgres.restart()
        at_first_restart = (counts(SLEEPY), counts(WAITER))

        # ...then the answers are sent, and PostgreSQL restarts again when half the waiting runs
        # have succeeded (the others woken or about to be, and the sleepers waking meanwhile)
        send(f"steps/kill-answer={count}")
        wait_until(
            lambda: reached(WAITER, "succeeded", count // 2),
            timeout=patience(90),
            what="half the waiting runs succeeded",
            describe=lambda: (counts(SLEEPY), counts(WAITER), workers.tail()),
        )
        at_second_restart = (counts(SLEEPY), counts(WAITER))
        postgres.restart()

        # Then every run succeeds, by the same two workers, which reconnected by themselves
        wait_until(
            lambda: reached(SLEEPY, "succeeded", count) and reached(WAITER, "succeeded", count),
            timeout=patience(120),
            what="every run succeeded",
            describe=lambda: (counts(SLEEPY), counts(WAITER), workers.tail()),
        )
        workers.assert_alive()
        assert workers.processes == first
        with psycopg.connect(url) as conn, conn.cursor() as cursor:
            sleepy = check_steps(cursor, SLEEPY, count)
            waiter = check_steps(cursor, WAITER, count)
    finally:
        workers.stop()
        print(workers.tail())

    # ...and nothing was duplicated: no Effect twice, no step run again once its memo was kept
    for figures in (sleepy, waiter):
        figures.pop("_lost_started")
        assert figures["duplicate_effects"] == figures["missing_effects"] == 0
    report(
        "steps_postgres_restarts_while_runs_sleep_and_wait",
        {
            "sleeping_runs": sleepy,
            "waiting_runs": waiter,
            "restarts": postgres.restarts,
            "at_first_restart": [dict(c or {}) for c in at_first_restart],
            "at_second_restart": [dict(c or {}) for c in at_second_restart],
        },
    )
    assert postgres.restarts == 2
    assert at_second_restart[1] is not None
    assert at_second_restart[1]["succeeded"] < count
