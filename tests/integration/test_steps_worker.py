"""Every durable step kind through a real Dramatiq worker, on Redis and on the database broker.

The worker runs in this process (threads, as in ``test_worker.py``) on the test
database: PostgreSQL with ``DATABASE_URL``, else SQLite. Nothing here calls
``run_all``: each run is claimed, suspended (``sleeping`` / ``waiting``) and woken
by the worker and the broker, by an event the test sends, or by recovery. The
functions are in ``tests/testapp/step_events.py``. The tests that wait out a real
sleep or timeout are marked ``flow_workers`` (tox runs them in the Django 6.x envs,
on SQLite and PostgreSQL); the others run everywhere.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import Middleware

import django_events
from django_events.apps import install_broker_middleware
from django_events.conf import get_settings
from django_events.control import Outcome, cancel_runs
from django_events.models import (
    FINAL_STATUSES,
    Attempt,
    AttemptOutcome,
    Event,
    QueuedMessage,
    Run,
    RunStatus,
    Step,
    StepStatus,
)
from django_events.recovery import recover
from django_events.testing import advance
from tests.brokers.kit import new_broker
from tests.conftest import as_global_broker, wait_for
from tests.testapp.models import Call, Effect

#: The brokers every test runs on: Redis (a delayed message waits in Dramatiq's delay queue and a
#: worker's memory) and the database broker (a delayed message is a row not deliverable before its time).
KINDS = ["redis", "database"]

#: How long the sleeps here last, in seconds: long enough for another run to go through a worker
#: thread, and for the test to cancel the run, while it sleeps, on a loaded machine.
NAP = 2


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[dramatiq.Broker]:
    """A broker of each kind in turn with django-events installed, the global broker for the test."""
    broker = new_broker(request.param)
    install_broker_middleware(broker)
    broker.flush_all()
    yield from as_global_broker(broker)


class Workers:
    """In-process Dramatiq workers on the test's broker, started and stopped by the test."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        self.running: list[dramatiq.Worker] = []
        broker.emit_after("process_boot")  # as the dramatiq CLI does: starts the TimeLimit watcher

    def start(self, threads: int = 2) -> dramatiq.Worker:
        worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=50)
        worker.start()
        self.running.append(worker)
        return worker

    def stop(self, worker: dramatiq.Worker) -> None:
        """Stop ``worker``: Dramatiq puts the messages it holds in memory back in the broker."""
        self.running.remove(worker)
        worker.stop()

    def stop_all(self) -> None:
        for worker in list(self.running):
            self.stop(worker)


@pytest.fixture
def workers(broker: dramatiq.Broker, transactional_db: None) -> Iterator[Workers]:
    started = Workers(broker)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def worker(workers: Workers) -> dramatiq.Worker:
    """A worker with two threads, stopped after the test."""
    return workers.start()


class Messages(Middleware):
    """The run ids of the messages enqueued and of those a worker processed, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enqueued: list[str] = []
        self.processed: list[str] = []

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
        with self._lock:
            self.enqueued.extend(str(arg) for arg in message.args)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message[Any],
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        with self._lock:
            self.processed.extend(str(arg) for arg in message.args)

    def times_processed(self, run: Run) -> int:
        with self._lock:
            return self.processed.count(str(run.pk))


@pytest.fixture
def messages(broker: dramatiq.Broker) -> Messages:
    spy = Messages()
    broker.add_middleware(spy)
    return spy


# -- helpers ---------------------------------------------------------------------------------------


def _in(event: Event, *statuses: str) -> Callable[[], Run | None]:
    def check() -> Run | None:
        """the event's run reached the expected status"""
        return Run.objects.filter(event=event, status__in=statuses).first()

    return check


def _final(event: Event) -> Callable[[], Run | None]:
    return _in(event, *FINAL_STATUSES)


def _calls(function: str, run: Run | None = None) -> int:
    calls = Call.objects.filter(function=function)
    return (calls if run is None else calls.filter(run_id=str(run.pk))).count()


def _attempts(run: Run) -> list[Attempt]:
    return list(Attempt.objects.filter(run=run).order_by("started_at", "number"))


def _outcomes(run: Run) -> list[str]:
    return [attempt.outcome for attempt in _attempts(run)]


# -- step.run, step.atomic -------------------------------------------------------------------------


def test_a_failed_step_is_retried_without_running_the_completed_steps_again(worker: dramatiq.Worker) -> None:
    # Given a function whose second step fails on its first try
    event = django_events.send("steps/flaky")

    # When the worker has run it, retrying through the broker
    run = wait_for(_final(event))

    # Then the run succeeded on its retry, which replayed the first step from its memo
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == ["one", "two"]
    assert _outcomes(run) == [AttemptOutcome.FAILED, AttemptOutcome.SUCCEEDED]
    assert (_calls("first", run), _calls("second", run)) == (1, 2)
    steps = Step.objects.filter(run=run).order_by("position")
    assert [(s.step_id, s.status, s.attempts) for s in steps] == [
        ("first", StepStatus.COMPLETED, 1),
        ("second", StepStatus.COMPLETED, 2),
    ]


def test_an_atomic_step_commits_its_row_with_its_memo(worker: dramatiq.Worker) -> None:
    # Given runs whose atomic step inserts a row
    events = [django_events.send("steps/atomic", {"pause": 0, "i": i}) for i in range(3)]

    # When the worker has run them
    runs = [wait_for(_final(event)) for event in events]

    # Then each run inserted exactly one row, the one its step's memo names
    for run in runs:
        assert run.status == RunStatus.SUCCEEDED, run.last_error
        [effect] = Effect.objects.filter(run_id=str(run.pk))
        assert run.result == effect.pk
        insert = Step.objects.get(run=run, step_id="insert")
        assert (insert.status, insert.result) == (StepStatus.COMPLETED, effect.pk)
    assert Effect.objects.count() == len(runs)


# -- step.sleep ------------------------------------------------------------------------------------


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_a_sleeping_run_holds_no_worker_thread_and_is_woken_by_its_message(
    workers: Workers, messages: Messages
) -> None:
    # Given a worker with one thread, and a run that sleeps between two steps
    workers.start(threads=1)
    sleepy = django_events.send("steps/sleepy", {"seconds": NAP})
    sleeper = wait_for(_in(sleepy, RunStatus.SLEEPING))

    # When another run is sent while it sleeps
    other = django_events.send("test/ok", {"x": 1})

    # Then the worker's only thread runs the other run while the first sleeps
    ok = wait_for(_final(other))
    sleeper = wait_for(_final(sleepy))
    assert ok.status == RunStatus.SUCCEEDED
    [ok_attempt] = _attempts(ok)
    suspended, resumed = _attempts(sleeper)
    assert suspended.outcome == AttemptOutcome.SUSPENDED
    assert suspended.finished_at <= ok_attempt.started_at
    assert ok_attempt.finished_at <= resumed.started_at

    # And the sleeper is woken at its time by its own delayed message (recovery waits a minute's
    # grace): two messages in all, and it succeeds having run its first step once
    nap = Step.objects.get(run=sleeper, step_id="nap")
    assert (nap.kind, nap.status) == ("sleep", StepStatus.COMPLETED)
    assert resumed.started_at >= nap.wake_at
    assert messages.times_processed(sleeper) == 2
    assert (sleeper.status, sleeper.result) == (RunStatus.SUCCEEDED, "rested")
    assert resumed.outcome == AttemptOutcome.SUCCEEDED
    assert (_calls("before", sleeper), _calls("after", sleeper)) == (1, 1)


# -- step.wait_for_event ---------------------------------------------------------------------------


def test_a_waiting_run_is_resumed_by_the_event_it_waits_for(worker: dramatiq.Worker) -> None:
    # Given a run waiting for steps/answer with its key
    event = django_events.send("steps/wait", {"key": "k1"})
    wait_for(_in(event, RunStatus.WAITING))

    # When another key's answer is sent, then its own
    django_events.send("steps/answer", {"key": "other", "n": 0})
    answer = django_events.send("steps/answer", {"key": "k1", "n": 1})

    # Then the worker resumes it with its own answer
    run = wait_for(_final(event))
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == {"key": "k1", "n": 1}
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED, AttemptOutcome.SUCCEEDED]
    wait = Step.objects.get(run=run, step_id="answer")
    assert (wait.status, wait.resolved_event) == (StepStatus.COMPLETED, answer.pk)


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_a_wait_that_times_out_returns_none(worker: dramatiq.Worker, messages: Messages) -> None:
    # Given a run waiting a second for an event nobody sends
    event = django_events.send("steps/wait-cancellable", {"key": "t1", "timeout": 1})

    # When the worker has run it
    run = wait_for(_final(event))

    # Then its wait ended at the timeout, woken by its message, with no event: the function got None
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result is None
    suspended, resumed = _attempts(run)
    assert (suspended.outcome, resumed.outcome) == (AttemptOutcome.SUSPENDED, AttemptOutcome.SUCCEEDED)
    wait = Step.objects.get(run=run, step_id="answer")
    assert (wait.status, wait.resolved_event) == (StepStatus.COMPLETED, None)
    assert resumed.started_at >= wait.wake_at
    assert messages.times_processed(run) == 2
    assert (_calls("before-wait", run), _calls("after-wait", run)) == (1, 1)


# -- step.send_event, step.invoke ------------------------------------------------------------------


def test_the_order_flow_goes_through_every_step_kind_end_to_end(worker: dramatiq.Worker) -> None:
    # Given an order run that charged, reserved and now sleeps for an hour
    event = django_events.send("steps/order", {"order_id": 7})
    run = wait_for(_in(event, RunStatus.SLEEPING))

    # When the hour passes: django-events' clock, which this in-process worker shares, moves past
    # the sleep's end and recovery's grace, and a recovery pass sends the overdue run (its own wake
    # message waits for the wall clock's hour in the broker)
    advance(dt.timedelta(hours=1, seconds=get_settings().RECOVERY_GRACE + 1))
    recover()

    # Then the worker resumes it and it waits for its invoice
    wait_for(_in(event, RunStatus.WAITING))
    assert Step.objects.get(run=run, step_id="paid").status == StepStatus.WAITING

    # And when another order's invoice is paid, then its own
    django_events.send("steps/invoice.paid", {"order_id": 8})
    django_events.send("steps/invoice.paid", {"order_id": 7, "amount": 5})

    # Then it notifies, invokes the shipping run, waits for it, and ends with every step's result
    run = wait_for(_final(event))
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == {
        "charge": {"charged": 7},
        "paid": {"order_id": 7, "amount": 5},
        "shipped": {"shipped": 7},
    }
    steps = Step.objects.filter(run=run).order_by("position")
    assert [(s.step_id, s.kind, s.status) for s in steps] == [
        ("charge", "run", StepStatus.COMPLETED),
        ("reserve", "atomic", StepStatus.COMPLETED),
        ("cool-off", "sleep", StepStatus.COMPLETED),
        ("paid", "wait", StepStatus.COMPLETED),
        ("notify", "send", StepStatus.COMPLETED),
        ("ship", "invoke", StepStatus.COMPLETED),
    ]
    # The sleep, the wait and the invoke each made the run leave the worker, and every step ran once
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED] * 3 + [AttemptOutcome.SUCCEEDED]
    assert _calls("charge", run) == 1
    assert Effect.objects.filter(run_id=str(run.pk)).count() == 1
    [fulfilled] = Event.objects.filter(name="steps/fulfilled")
    assert fulfilled.data == {"order_id": 7}
    fulfilled_run = wait_for(_final(fulfilled))
    assert fulfilled_run.status == RunStatus.SUCCEEDED
    assert _calls("fulfilled") == 1
    [child] = Run.objects.filter(function="tests.steps_ship")
    assert (child.parent, child.status, child.result) == (run.pk, RunStatus.SUCCEEDED, {"shipped": 7})
    assert _calls("ship") == 1
    assert Step.objects.get(run=run, step_id="ship").invoked_run == child.pk


def test_an_invoked_run_that_dies_raises_in_the_run_that_invoked_it(worker: dramatiq.Worker) -> None:
    # Given a run that invokes a run that fails for good, and catches the error
    event = django_events.send("steps/invoke-failing", {"catch": True})

    # When the worker has run both
    run = wait_for(_final(event))

    # Then the invoked run is dead, and the caller, woken by its end, caught InvokeFailedError
    [child] = Run.objects.filter(function="tests.steps_ship")
    assert (child.parent, child.status) == (run.pk, RunStatus.DEAD)
    assert _calls("ship") == 1
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == f"caught: {child.pk}"
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED, AttemptOutcome.SUCCEEDED]


# -- cancelling suspended runs ---------------------------------------------------------------------


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_a_cancelled_sleeping_run_never_runs_again_when_its_wake_message_comes(
    worker: dramatiq.Worker, messages: Messages
) -> None:
    # Given a sleeping run
    event = django_events.send("steps/sleepy", {"seconds": NAP})
    run = wait_for(_in(event, RunStatus.SLEEPING))

    # When it is cancelled while it sleeps
    assert cancel_runs([run.pk]) == Outcome(done=1, skipped=0)

    # Then its wake message still comes at the sleep's end, and the worker runs nothing
    wait_for(lambda: messages.times_processed(run) >= 2, timeout=NAP + 30)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED]
    assert (_calls("before", run), _calls("after", run)) == (1, 0)
    assert Step.objects.get(run=run, step_id="nap").status == StepStatus.CANCELLED


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_a_cancelled_waiting_run_is_not_resumed_by_its_event_nor_by_its_timeout(
    worker: dramatiq.Worker, messages: Messages
) -> None:
    # Given a run waiting for an event
    event = django_events.send("steps/wait-cancellable", {"key": "c1", "timeout": NAP})
    run = wait_for(_in(event, RunStatus.WAITING))

    # When it is cancelled while it waits, and then its event is sent
    assert cancel_runs([run.pk]) == Outcome(done=1, skipped=0)
    django_events.send("steps/wait-cancellable.answer", {"key": "c1"})

    # Then its wake message still comes at the timeout, and the worker runs nothing
    wait_for(lambda: messages.times_processed(run) >= 2, timeout=NAP + 30)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED]
    assert (_calls("before-wait", run), _calls("after-wait", run)) == (1, 0)
    wait = Step.objects.get(run=run, step_id="answer")
    assert (wait.status, wait.resolved_event) == (StepStatus.CANCELLED, None)


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_cancel_on_cancels_a_matching_run_while_it_waits(worker: dramatiq.Worker, messages: Messages) -> None:
    # Given two runs waiting for an event, with keys c2 and c3
    doomed = django_events.send("steps/wait-cancellable", {"key": "c2", "timeout": NAP})
    spared = django_events.send("steps/wait-cancellable", {"key": "c3", "timeout": NAP})
    run = wait_for(_in(doomed, RunStatus.WAITING))
    wait_for(_in(spared, RunStatus.WAITING))

    # When the function's cancelling event is sent for key c2
    stop = django_events.send("steps/wait-cancellable.stop", {"key": "c2"})

    # Then the c2 run is cancelled by it while it waits, and its wake message runs nothing
    run.refresh_from_db()
    assert (run.status, run.cancelled_by) == (RunStatus.CANCELLED, stop.pk)
    wait_for(lambda: messages.times_processed(run) >= 2, timeout=NAP + 30)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert _outcomes(run) == [AttemptOutcome.SUSPENDED]
    assert _calls("after-wait", run) == 0
    assert Step.objects.get(run=run, step_id="answer").status == StepStatus.CANCELLED

    # And the c3 run waits on, until its timeout
    other = wait_for(_final(spared))
    assert (other.status, other.result, other.cancelled_by) == (RunStatus.SUCCEEDED, None, None)


# -- recovery --------------------------------------------------------------------------------------


@pytest.mark.flow_workers  # waits for real seconds: the Django 6.x envs run it
def test_a_sleeping_run_whose_wake_message_is_lost_is_sent_again_by_recovery(
    workers: Workers, broker: dramatiq.Broker, settings: Any
) -> None:
    # Given a sleeping run
    worker = workers.start()
    event = django_events.send("steps/sleepy", {"seconds": 1})
    run = wait_for(_in(event, RunStatus.SLEEPING))

    # When its worker stops (the wake message it held goes back to the broker) and the broker loses it
    workers.stop(worker)
    broker.flush_all()
    assert not QueuedMessage.objects.exists()
    run.refresh_from_db()
    assert run.status == RunStatus.SLEEPING

    # And a worker starts whose recovery passes every half second, with a second's grace
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "RECOVERY_INTERVAL": 0.5, "RECOVERY_GRACE": 1}
    spy = Messages()
    broker.add_middleware(spy)
    workers.start()

    # Then recovery sends the overdue run again, and the worker finishes it
    run = wait_for(_final(event))
    assert (run.status, run.result) == (RunStatus.SUCCEEDED, "rested")
    assert spy.enqueued.count(str(run.pk)) >= 1
    nap = Step.objects.get(run=run, step_id="nap")
    suspended, resumed = _attempts(run)
    assert resumed.started_at >= nap.wake_at + dt.timedelta(seconds=1)  # not before the grace passed
    assert (suspended.outcome, resumed.outcome) == (AttemptOutcome.SUSPENDED, AttemptOutcome.SUCCEEDED)
    assert (_calls("before", run), _calls("after", run)) == (1, 1)
