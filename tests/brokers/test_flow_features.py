"""Flow control through real workers: delays, wildcards and filters, rate limits, debounce, batches,
priority, cancel-on-event and timeouts, each run by two ``manage.py rundramatiq`` processes.

Every test runs with Redis (a delayed message goes through Dramatiq's delay queue) and with
``DatabaseBroker`` (a delayed message is a row not deliverable before its time), on the test
database: PostgreSQL with ``DATABASE_URL``, else SQLite. The functions are in
``tests/testapp/flow_events.py``, with periods of seconds; the workers run recovery every half
second (``tests/faults/harness.py``'s ``WORKER_SETTINGS``), which wakes and times out held runs.
Each test waits on conditions with deadlines; the time a run may start late is measured
against each broker's delay precision (``LATENESS``). Concurrency and throttle under load are
in ``test_flow_workers.py``; cron in its own tests.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

import django_events
from django_events.apps import install_broker_middleware
from django_events.control import cancel_runs
from django_events.execution import RUN_DEAD_EVENT
from django_events.models import FINAL_STATUSES, Attempt, Event, QueuedMessage, Run, RunStatus
from tests.conftest import make_broker
from tests.faults.harness import Workers, wait_until, worker_env
from tests.testapp.models import Call, Span

from .kit import new_broker

pytestmark = [pytest.mark.e2e, pytest.mark.flow_workers, pytest.mark.flow_features]

#: Worker processes per test, each with ``Workers.COMMAND``'s threads.
PROCESSES = 2

#: The settings of the worker processes for each broker.
SETTINGS = {"redis": "tests.settings", "database": "tests.brokers.settings_database"}

#: How long after its time a waiting run may start, in seconds. Redis: a delayed message waits
#: in a worker's memory until its delay consumer next wakes, which moves it to the queue, where
#: a consumer takes it when it next polls; an idle consumer polls less and less often, down to
#: once per worker timeout (one second): up to two seconds, and the claim (measured: up to 1.4 s
#: on a loaded machine). DatabaseBroker: the consumer wakes when the row falls due (measured: up
#: to 0.07 s).
LATENESS = {"redis": 2.5, "database": 1.0}

#: How long after its time a held run past its start timeout may still be held: recovery
#: cancels it, in a pass every RECOVERY_INTERVAL (0.5 s in the workers, tests/faults/harness.py).
RECOVERY_LATENESS = 1.5


@dataclass
class Cluster:
    """The worker processes of a test, and the broker they share with the test (the sender)."""

    kind: str
    workers: Workers

    @property
    def lateness(self) -> float:
        return LATENESS[self.kind]


@pytest.fixture(params=list(SETTINGS))
def cluster(request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path) -> Iterator[Cluster]:
    """Two ``rundramatiq`` processes on the test database and a broker of each kind in turn."""
    kind = request.param
    if kind == "redis":
        broker = make_broker("redis")  # flushes what earlier tests left in the session's queues
    else:
        broker = new_broker("database")
        install_broker_middleware(broker)
    previous = dramatiq.get_broker()
    dramatiq.set_broker(broker)
    env = worker_env(
        DJANGO_SETTINGS_MODULE=SETTINGS[kind],
        DJANGO_EVENTS_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
    )
    workers = Workers(env, tmp_path)
    try:
        workers.start(PROCESSES)

        def ready() -> bool:
            workers.assert_alive()
            return workers.log_text().count("Worker process is ready for action") >= PROCESSES

        wait_until(ready, timeout=60, what="every worker process is ready", describe=workers.tail)
        yield Cluster(kind, workers)
        workers.assert_alive()
    finally:
        workers.stop()
        print(workers.tail())
        try:
            broker.flush_all()
        finally:
            broker.close()
            dramatiq.set_broker(previous)


# -- helpers ---------------------------------------------------------------------------------------


def runs_of(function: str) -> list[Run]:
    """The runs of ``function``, in the order they were sent."""
    return list(Run.objects.filter(function=function).select_related("event").order_by("created_at", "id"))


def run_of(event: Event) -> Run:
    return Run.objects.select_related("event").get(event=event)


def span_of(run: Run) -> Span | None:
    return Span.objects.filter(run_id=str(run.pk)).first()


def statuses(function: str) -> dict[str, int]:
    """``status -> runs`` of ``function``: what a failed wait shows."""
    counts: dict[str, int] = {}
    for status in Run.objects.filter(function=function).values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def settle(function: str, count: int, *, timeout: float = 20.0) -> list[Run]:
    """Wait until ``function`` has ``count`` runs, all final; return them in the order sent."""

    def settled() -> bool:
        runs = Run.objects.filter(function=function)
        return runs.count() == count and not runs.not_final().exists()

    wait_until(
        settled,
        timeout=timeout,
        what=f"{count} runs of {function} are final",
        describe=lambda: statuses(function),
    )
    return runs_of(function)


def wait_status(run: Run, status: str, *, timeout: float = 15.0) -> Run:
    """Wait until ``run`` is in ``status``; return it as it is then. Fail at once if it ended otherwise."""

    def reached() -> bool:
        run.refresh_from_db()
        if run.status != status and run.status in FINAL_STATUSES:
            raise AssertionError(
                f"run {run.pk} ended {run.status}, not {status}: {run.reason or run.last_error}"
            )
        return run.status == status

    wait_until(
        reached, timeout=timeout, what=f"run {run.pk} is {status}", describe=lambda: (run.status, run.reason)
    )
    return run


def wait_started(run: Run, *, timeout: float = 15.0) -> Span:
    """Wait until ``run``'s function has started in a worker; return its span."""
    return wait_until(lambda: span_of(run), timeout=timeout, what=f"run {run.pk} started")


def seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> float:
    assert later is not None
    assert earlier is not None
    return (later - earlier).total_seconds()


def dead_events(run: Run) -> int:
    """How many ``django_events/run.dead`` events were sent for ``run``."""
    return Event.objects.filter(name=RUN_DEAD_EVENT, data__run_id=str(run.pk)).count()


def burst(items: Sequence[tuple[str, dict[str, Any]]], *, threads: int) -> None:
    """Send ``items`` from ``threads`` threads at once (each its own connection), as concurrent requests."""
    chunks = [list(items[n::threads]) for n in range(threads)]
    barrier = threading.Barrier(threads)

    def send(chunk: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            barrier.wait(timeout=30)
            for name, data in chunk:
                django_events.send(name, data)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, chunks))


def in_another_connection(query: Callable[[], Any]) -> Any:
    """What ``query`` returns in a connection of its own (not the caller's transaction)."""
    found: list[Any] = []

    def read() -> None:
        try:
            found.append(query())
        finally:
            connections.close_all()

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(timeout=30)
    assert found, "the query in another connection did not return"
    return found[0]


def at_offset(start: float, offset: float) -> None:
    """Pace a stream of sends: return at ``offset`` seconds after ``start`` (``time.monotonic()``)."""
    pause = start + offset - time.monotonic()
    if pause > 0:
        time.sleep(pause)


# -- delays ----------------------------------------------------------------------------------------


def test_a_delayed_run_is_scheduled_at_once_and_starts_at_its_time_not_before(cluster: Cluster) -> None:
    # When one event is sent with delay=2 and another with run_at 3 s ahead
    before = timezone.now()
    delayed = run_of(django_events.send("flow/unlimited", {"n": 1}, delay=2))
    run_at = timezone.now() + dt.timedelta(seconds=3)
    timed = run_of(django_events.send("flow/unlimited", {"n": 2}, run_at=run_at))

    # Then their runs exist at once, scheduled at their times
    assert (delayed.status, timed.status) == (RunStatus.SCHEDULED, RunStatus.SCHEDULED)
    assert before + dt.timedelta(seconds=2) <= delayed.due_at <= timezone.now() + dt.timedelta(seconds=2)
    assert timed.due_at == run_at

    # And each starts at its time, not before, within the broker's delay precision
    for run in (delayed, timed):
        due = run.due_at
        wait_status(run, RunStatus.SUCCEEDED)
        late = seconds(run.started_at, due)
        print(f"[{cluster.kind}] a run due at {due:%H:%M:%S.%f} started {late:.3f} s after")
        assert 0 <= late <= cluster.lateness
        assert run.attempts == 1
        span = span_of(run)
        assert span is not None
        assert span.started_at >= due


def test_a_scheduled_run_cancelled_before_its_time_never_runs(cluster: Cluster) -> None:
    # Given a run scheduled 1.5 s ahead, cancelled at once, and another scheduled a second later
    cancelled = run_of(django_events.send("flow/unlimited", {"n": 1}, delay=1.5))
    later = run_of(django_events.send("flow/unlimited", {"n": 2}, delay=2.5))
    assert cancel_runs([cancelled.pk]).done == 1

    # When the later one has run (its message came after the cancelled run's)
    wait_status(later, RunStatus.SUCCEEDED)
    if cluster.kind == "database":
        wait_until(lambda: not QueuedMessage.objects.exists(), timeout=10, what="every message was taken")

    # Then the cancelled run never ran
    cancelled.refresh_from_db()
    assert (cancelled.status, cancelled.attempts) == (RunStatus.CANCELLED, 0)
    assert not Attempt.objects.filter(run=cancelled).exists()
    assert span_of(cancelled) is None


# -- wildcards and filters -------------------------------------------------------------------------


def test_wildcards_and_filters_decide_at_send_time_in_the_senders_transaction(cluster: Cluster) -> None:
    names = ["flow/order.created", "flow/order.item.added", "flow/order", "flow/orders.created"]
    with transaction.atomic():
        # When events are sent in a transaction
        events = {name: django_events.send(name) for name in names}
        refused = django_events.send("flow/filtered", {"go": False})
        taken = django_events.send("flow/filtered", {"go": True})

        # Then, before it commits, each event already has its runs, and the refused one says why
        def functions(event: Event) -> list[str]:
            return list(Run.objects.filter(event=event).values_list("function", flat=True))

        assert [functions(events[name]) for name in names] == [
            ["tests.flow_wildcard"],
            ["tests.flow_wildcard"],
            [],
            [],
        ]
        assert functions(refused) == []
        assert Event.objects.get(pk=refused.pk).skipped_by == {"tests.flow_filtered": "if_ returned False"}
        assert functions(taken) == ["tests.flow_filtered"]
        # ...which no worker sees yet
        assert in_another_connection(lambda: Run.objects.filter(event=taken).exists()) is False

    # And once committed, the workers run exactly those
    wildcard = settle("tests.flow_wildcard", 2)
    (went,) = settle("tests.flow_filtered", 1)
    assert [run.status for run in wildcard] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
    assert sorted(Call.objects.filter(function="wildcard").values_list("event_name", flat=True)) == [
        "flow/order.created",
        "flow/order.item.added",
    ]
    assert (went.event_id, went.status, went.result) == (taken.pk, RunStatus.SUCCEEDED, "went")
    # ...and the events no function took say so: none subscribed, or a filter refused
    for event in (events["flow/order"], events["flow/orders.created"]):
        assert not Run.objects.filter(event=event).exists()
        assert Event.objects.get(pk=event.pk).skipped_by == {}
    assert not Run.objects.filter(event=refused).exists()
    assert Event.objects.get(pk=refused.pk).skipped_by == {"tests.flow_filtered": "if_ returned False"}


# -- rate limit ------------------------------------------------------------------------------------


def test_a_burst_over_the_rate_limit_runs_the_limit_and_skips_the_rest_saying_why(cluster: Cluster) -> None:
    # When ten requests send an event of company 7 at once to each function, and one of company 8
    items = [(name, {"company": 7, "n": n}) for n in range(10) for name in ("flow/rate", "flow/rate-three")]
    burst([*items, ("flow/rate", {"company": 8}), ("flow/rate-three", {"company": 8})], threads=8)

    # Then each function ran its limit for company 7 (1, and 3), and once for company 8
    expected = {"tests.flow_rate": (1, "1 per 4 h"), "tests.flow_rate_three": (3, "3 per 1 min")}
    for function, (limit, rate) in expected.items():
        runs = settle(function, 11)
        company_7 = [run for run in runs if run.event.data["company"] == 7]
        ran = [run for run in company_7 if run.status != RunStatus.SKIPPED]
        skipped = [run for run in company_7 if run.status == RunStatus.SKIPPED]
        assert len(ran) == limit, statuses(function)
        assert all(run.status == RunStatus.SUCCEEDED for run in ran)
        # ...the rest skipped, saying why, never started
        assert {run.reason for run in skipped} == {f"skipped: rate limit {rate} for company 7"}
        assert all(run.attempts == 0 and run.finished_at is not None for run in skipped)
        assert not Span.objects.filter(run_id__in=[str(run.pk) for run in skipped]).exists()
        # ...and company 8 was not held back by company 7
        (company_8,) = [run for run in runs if run.event.data["company"] == 8]
        assert (company_8.status, company_8.reason) == (RunStatus.SUCCEEDED, "")
        assert Span.objects.filter(run_id__in=[str(run.pk) for run in [*ran, company_8]]).count() == limit + 1


# -- debounce --------------------------------------------------------------------------------------


def test_debounce_runs_a_burst_once_with_its_last_event(cluster: Cluster) -> None:
    # When five events of user 1 come in a burst, and one of user 2
    for n in range(5):
        django_events.send("flow/debounced-short", {"user": 1, "n": n})
    django_events.send("flow/debounced-short", {"user": 2, "n": 9})

    # Then one run per user is executed, with its last event, Debounce.period after it
    runs = settle("tests.flow_debounced_short", 6)
    user_1 = [run for run in runs if run.event.data["user"] == 1]
    last = user_1[-1]
    assert [run.status for run in user_1] == [RunStatus.SKIPPED] * 4 + [RunStatus.SUCCEEDED]
    assert last.result == 4
    late = seconds(last.started_at, last.created_at + dt.timedelta(seconds=1.5))
    print(f"[{cluster.kind}] the debounced run started {late:.3f} s after its window closed")
    assert 0 <= late <= cluster.lateness
    # ...each of the others was folded into the next one, and says so
    for run, successor in itertools.pairwise(user_1):
        assert (run.merged_into, run.reason) == (successor.pk, f"debounced into run {successor.pk}")
        assert run.attempts == 0
    (user_2,) = [run for run in runs if run.event.data["user"] == 2]
    assert (user_2.status, user_2.result) == (RunStatus.SUCCEEDED, 9)
    # ...and no other run of the function ever started
    assert sorted(Span.objects.filter(function="debounced_short").values_list("run_id", flat=True)) == sorted(
        [str(last.pk), str(user_2.pk)]
    )


def test_debounce_with_a_timeout_runs_a_steady_stream_by_its_timeout(cluster: Cluster) -> None:
    # Debounce(1.5 s, timeout=4 s): an event every half second for 7 s never leaves a quiet period
    start = time.monotonic()
    first_sent = timezone.now()
    count = 15
    for n in range(count):
        at_offset(start, 0.5 * n)
        django_events.send("flow/debounced-capped", {"user": 1, "n": n})
    stream_end = timezone.now()

    runs = settle("tests.flow_debounced_capped", count)
    executed = sorted(
        (run for run in runs if run.status == RunStatus.SUCCEEDED), key=lambda run: run.started_at
    )
    by_id = {run.pk: run for run in runs}

    # Then a run started by the timeout, while events still came
    first_late = seconds(executed[0].started_at, first_sent + dt.timedelta(seconds=4))
    print(f"[{cluster.kind}] the first debounced run started {first_late:.3f} s after the timeout")
    assert first_late <= cluster.lateness
    assert executed[0].started_at < stream_end
    # ...and the stream's last event ran too, last
    assert executed[-1].result == count - 1
    assert all(run.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED) for run in runs)
    # ...every other event was folded into a later run, which ran it with its newer event
    for run in runs:
        if run.status == RunStatus.SUCCEEDED:
            continue
        assert run.reason == f"debounced into run {run.merged_into}"
        into = by_id[run.merged_into]
        while into.status == RunStatus.SKIPPED:
            into = by_id[into.merged_into]
        assert into.result > run.event.data["n"]
    assert Span.objects.filter(function="debounced_capped").count() == len(executed) >= 2


# -- batch -----------------------------------------------------------------------------------------


def test_a_batch_run_sees_every_event_of_its_key_and_starts_when_full_or_at_its_timeout(
    cluster: Cluster,
) -> None:
    # When seven events of key x come (two full batches of 3 and one left) and two of key y
    for n in range(7):
        django_events.send("flow/batched-short", {"k": "x", "n": n})
    for n in range(2):
        django_events.send("flow/batched-short", {"k": "y", "n": n})

    # Then each batch ran once, its function seeing all its events in order
    runs = settle("tests.flow_batched_short", 9)
    executed = [run for run in runs if run.status == RunStatus.SUCCEEDED]
    assert sorted((run.event.data["k"], run.result) for run in executed) == [
        ("x", [0, 1, 2]),
        ("x", [3, 4, 5]),
        ("x", [6]),
        ("y", [0, 1]),
    ]
    # ...every other run was batched into the run that handled its event, and never started
    batch_of = {run.pk: run for run in executed}
    for run in runs:
        if run.status == RunStatus.SKIPPED:
            assert run.reason == f"batched into run {run.merged_into}"
            assert run.event.data["n"] in batch_of[run.merged_into].result
            assert run.attempts == 0
            assert span_of(run) is None
    # ...a full batch at once (before its timeout), a partial one at its timeout
    for run in executed:
        waited = seconds(run.started_at, run.created_at)
        print(f"[{cluster.kind}] a batch of {len(run.result)} started {waited:.3f} s after it opened")
        if len(run.result) == 3:
            assert waited < 2
        else:
            assert 2 <= waited <= 2 + cluster.lateness
        assert span_of(run) is not None


def test_concurrent_senders_put_every_event_in_exactly_one_batch(cluster: Cluster) -> None:
    # When 24 events of one key are sent by six requests at once
    burst([("flow/batched-short", {"k": "z", "n": n}) for n in range(24)], threads=6)

    # Then every event is in exactly one batch run, each of at most 3 events
    runs = settle("tests.flow_batched_short", 24)
    executed = [run for run in runs if run.status == RunStatus.SUCCEEDED]
    assert sorted(n for run in executed for n in run.result) == list(range(24))
    assert all(1 <= len(run.result) <= 3 for run in executed)
    # ...one that is not full only because its timeout came first
    for run in executed:
        if len(run.result) < 3:
            assert seconds(run.started_at, run.created_at) >= 2
    assert Span.objects.filter(function="batched_short").count() == len(executed)


# -- priority --------------------------------------------------------------------------------------


def test_a_backlog_behind_a_concurrency_limit_starts_in_priority_then_arrival_order(cluster: Cluster) -> None:
    # Given a run of the concurrency-1 function running for 5 s
    blocker = run_of(django_events.send("flow/limited-one", {"n": 0, "p": 0, "sleep": 5}))
    wait_started(blocker)

    # When seven more come one after the other, of various priorities
    priorities = [1, 5, 3, 5, 2, 9, 0]
    for n, p in enumerate(priorities, 1):
        django_events.send("flow/limited-one", {"n": n, "p": p})

    # Then, while it runs, each of them waits for the slot, saying so
    def all_held() -> bool:
        held = Run.objects.filter(function="tests.flow_limited_one", status=RunStatus.HELD)
        return held.count() == len(priorities)

    # (within 4 s: less than recovery's grace of 5 s, so a message lost on the way fails this)
    wait_until(
        all_held,
        timeout=4,
        what="the backlog is held while the first run runs",
        describe=lambda: statuses("tests.flow_limited_one"),
    )
    assert set(Run.objects.filter(status=RunStatus.HELD).values_list("reason", flat=True)) == {
        "waiting for a concurrency slot (limit 1)"
    }
    blocker_span = span_of(blocker)
    assert blocker_span is not None
    assert blocker_span.ended_at is None

    # And they start one at a time, highest priority first, then in the order sent, each as soon
    # as the one before it ended
    settle("tests.flow_limited_one", 1 + len(priorities), timeout=30)
    spans = list(Span.objects.filter(function="limited_one").order_by("started_at"))
    order = [Run.objects.get(pk=span.run_id).event.data["n"] for span in spans]
    expected = [n for n, _p in sorted(enumerate(priorities, 1), key=lambda item: (-item[1], item[0]))]
    assert order == [0, *expected]
    gaps = [seconds(after.started_at, before.ended_at) for before, after in itertools.pairwise(spans)]
    print(f"[{cluster.kind}] gaps between the runs: {[round(gap, 3) for gap in gaps]}")
    assert all(0 <= gap <= cluster.lateness for gap in gaps), gaps
    assert all(
        run.status == RunStatus.SUCCEEDED and run.attempts == 1 for run in runs_of("tests.flow_limited_one")
    )


# -- cancel on event -------------------------------------------------------------------------------


class _RolledBack(Exception):
    pass


def test_cancel_on_cancels_scheduled_and_held_runs_in_the_senders_transaction_but_not_a_running_one(
    cluster: Cluster,
) -> None:
    # Given reminders scheduled for users 1 and 2, and a job of user 9 running with jobs of users
    # 1 and 2 held behind it (concurrency 1)
    reminder_1 = run_of(django_events.send("flow/reminder", {"user": 1}, delay=4))
    reminder_2 = run_of(django_events.send("flow/reminder", {"user": 2}, delay=4))
    job_9 = run_of(django_events.send("flow/job", {"user": 9, "sleep": 4}))
    wait_started(job_9)
    job_1 = run_of(django_events.send("flow/job", {"user": 1}))
    job_2 = run_of(django_events.send("flow/job", {"user": 2}))
    wait_status(job_1, RunStatus.HELD)
    wait_status(job_2, RunStatus.HELD)

    # When the cancelling events are sent in a transaction that rolls back
    cancelled = Run.objects.filter(pk__in=[reminder_1.pk, job_1.pk], status=RunStatus.CANCELLED)

    def rolled_back() -> None:
        with transaction.atomic():
            django_events.send("flow/reminder.cancel", {"user": 1})
            django_events.send("flow/job.stop", {"user": 1})
            # (the sender sees the runs cancelled in its transaction; nobody else does)
            assert cancelled.count() == 2
            assert in_another_connection(cancelled.count) == 0
            raise _RolledBack

    with pytest.raises(_RolledBack):
        rolled_back()

    # Then nothing is cancelled
    for run, status in ((reminder_1, RunStatus.SCHEDULED), (job_1, RunStatus.HELD)):
        run.refresh_from_db()
        assert (run.status, run.cancelled_by) == (status, None)

    # When they are sent and committed, with one matching the running job of user 9
    with transaction.atomic():
        stop_reminder = django_events.send("flow/reminder.cancel", {"user": 1})
        stop_job = django_events.send("flow/job.stop", {"user": 1})
        django_events.send("flow/job.stop", {"user": 9})

    # Then the scheduled and the held run of user 1 are cancelled, each saying by which event
    for run, event in ((reminder_1, stop_reminder), (job_1, stop_job)):
        run.refresh_from_db()
        assert (run.status, run.cancelled_by) == (RunStatus.CANCELLED, event.pk)
        assert run.reason == f"cancelled by event {event.name} {event.pk}"

    # And the running job finishes, and the runs of user 2 run; those of user 1 never do
    for run in (job_9, job_2, reminder_2):
        wait_status(run, RunStatus.SUCCEEDED)
        assert run.cancelled_by is None
    for run in (reminder_1, job_1):
        run.refresh_from_db()
        assert (run.status, run.attempts) == (RunStatus.CANCELLED, 0)
        assert not Attempt.objects.filter(run=run).exists()
    assert span_of(job_1) is None


# -- timeouts --------------------------------------------------------------------------------------


def test_a_run_held_past_its_start_timeout_is_cancelled_and_never_runs(cluster: Cluster) -> None:
    # Given a slow run holding the only slot (Timeouts(start=2), concurrency 1)
    blocker = run_of(django_events.send("flow/held-start-timeout", {"n": 0, "sleep": 4}))
    wait_started(blocker)

    # When another run waits for the slot
    late = run_of(django_events.send("flow/held-start-timeout", {"n": 1}))
    wait_status(late, RunStatus.HELD)

    # Then it is cancelled once it has waited 2 s, while the slow run still runs, saying why
    wait_status(late, RunStatus.CANCELLED, timeout=10)
    waited = seconds(late.finished_at, late.created_at)
    print(f"[{cluster.kind}] a held run was cancelled {waited:.3f} s after it was sent")
    assert 2 <= waited <= 2 + RECOVERY_LATENESS
    assert late.reason == "cancelled: not started within 2 s (Timeouts.start)"
    blocker_span = span_of(blocker)
    assert blocker_span is not None
    assert blocker_span.ended_at is None or blocker_span.ended_at > late.finished_at

    # And it never runs, not even once the slot is free
    wait_status(blocker, RunStatus.SUCCEEDED)
    late.refresh_from_db()
    assert (late.status, late.attempts) == (RunStatus.CANCELLED, 0)
    assert span_of(late) is None


def test_the_start_timeout_of_a_delayed_run_held_for_a_slot_counts_from_its_time(cluster: Cluster) -> None:
    # Given a slow run holding the only slot for 5 s (Timeouts(start=4), concurrency 1)
    blocker = run_of(django_events.send("flow/delayed-start-timeout", {"n": 0, "sleep": 5}))
    wait_started(blocker)

    # When a run sent with delay=2 comes due while the slot is still taken
    delayed = run_of(django_events.send("flow/delayed-start-timeout", {"n": 1}, delay=2))
    due = delayed.due_at
    wait_status(delayed, RunStatus.HELD)

    # Then it starts once the slow run ends, about 3 s after its time: within its start timeout,
    # which counts from its time (README, Timeouts), not from when it was sent (2 s earlier)
    wait_status(delayed, RunStatus.SUCCEEDED, timeout=10)
    waited = seconds(delayed.started_at, due)
    print(f"[{cluster.kind}] the delayed run started {waited:.3f} s after its time")
    assert 0 <= waited <= 4
    assert (delayed.attempts, delayed.cancelled_by) == (1, None)


def test_a_failing_run_past_its_finish_timeout_ends_dead_before_its_retries_run_out(cluster: Cluster) -> None:
    # When a function that always fails (after 0.3 s), with 20 retries and Timeouts(finish=2), runs
    run = run_of(django_events.send("flow/finish-timeout", {"sleep": 0.3}))

    # Then it ends dead about 2 s after its first attempt started, with retries left
    wait_status(run, RunStatus.DEAD, timeout=20)
    attempts = list(Attempt.objects.filter(run=run).order_by("number"))
    assert 2 <= run.attempts == len(attempts) < run.max_attempts == 21
    assert all(attempt.outcome == "failed" for attempt in attempts)
    deadline = run.started_at + dt.timedelta(seconds=2)
    # ...no attempt started after its finish timeout
    assert all(attempt.started_at <= deadline for attempt in attempts)
    ended = seconds(run.finished_at, deadline)
    print(f"[{cluster.kind}] {run.attempts} attempts; dead {ended:.3f} s after the finish timeout")
    assert -0.5 <= ended <= 0.3 + cluster.lateness
    assert "Timeouts.finish" in run.last_error
    assert Span.objects.filter(run_id=str(run.pk)).count() == run.attempts
    # ...and, like any run that goes dead, it sent the run.dead event
    assert dead_events(run) == 1


def test_a_retry_held_for_a_slot_past_the_finish_timeout_ends_dead_like_any_dead_run(
    cluster: Cluster,
) -> None:
    # Given a run (Timeouts(finish=1.5), concurrency 1) whose first attempt asks for a retry in 1 s
    run = run_of(django_events.send("flow/finish-held", {"n": 1, "retry_after": 1}))
    wait_status(run, RunStatus.RETRYING)
    # ...and a run of the same function that takes the slot for 3 s meanwhile
    blocker = run_of(django_events.send("flow/finish-held", {"n": 0, "sleep": 3}))
    wait_started(blocker)

    # When the retry comes due (held: no slot), and gets the slot after its finish timeout
    wait_status(blocker, RunStatus.SUCCEEDED)

    # Then it ends dead, without another attempt, saying why
    wait_status(run, RunStatus.DEAD)
    assert run.attempts == 1
    assert "Timeouts.finish" in run.last_error
    assert Span.objects.filter(run_id=str(run.pk)).count() == 1
    # ...and, like any run that goes dead, it sent the run.dead event
    assert dead_events(run) == 1
