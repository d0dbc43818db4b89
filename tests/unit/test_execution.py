"""Executing runs: results, retries, dead runs, tracebacks, claims and fencing (no broker needed)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

import django_events
from django_events.execution import Execution, backoff_delay, execute_run
from django_events.models import Attempt, AttemptOutcome, Run, RunStatus
from django_events.registry import function, unregister
from django_events.testing import RunsDidNotSettle, run_all, run_due
from tests.testapp.models import Call

# Every test here runs with the ledger's vendor statements and with its portable forms.
pytestmark = pytest.mark.usefixtures("ledger_form")


def _run(event) -> Run:
    return Run.objects.get(event=event)


def test_success_stores_result_and_one_attempt(db):
    event = django_events.send("test/ok", {"x": 1})
    [run] = run_all()
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"echo": {"x": 1}, "attempt": 1}
    assert run.attempts == 1
    assert run.finished_at is not None
    assert run.started_at is not None
    assert run.lease_expires_at is None
    assert run.due_at is None
    [attempt] = Attempt.objects.filter(run=run)
    assert attempt.outcome == AttemptOutcome.SUCCEEDED
    assert attempt.number == 1
    assert attempt.traceback == ""
    assert attempt.worker_pid
    assert attempt.worker_host
    assert Call.objects.get().event_name == event.name


def test_fan_out_runs_every_subscribed_function(db):
    django_events.send("test/fanout")
    runs = run_all()
    assert {run.function: run.result for run in runs} == {
        "tests.fanout_a": "a",
        "tests.fanout_b": "b",
        "tests.fanout_c": None,
    }
    assert {run.status for run in runs} == {RunStatus.SUCCEEDED}


def test_failure_with_attempts_left_schedules_retry_with_backoff(db, settings):
    settings.DJANGO_EVENTS = {"RETRY_BACKOFF_MIN": 30, "RETRY_BACKOFF_MAX": 300}
    event = django_events.send("test/flaky", {"succeed_on": 3})
    before = timezone.now()

    # When the first attempt fails
    assert run_due()[0].status == RunStatus.RETRYING

    # Then the run is due again within the backoff window, with the error kept
    run = _run(event)
    assert run.attempts == 1
    assert before + dt.timedelta(seconds=30) <= run.due_at <= timezone.now() + dt.timedelta(seconds=45)
    assert run.last_error == "ConnectionError: flaky failure on attempt 1"
    assert run.lease_expires_at is None
    # and it is not due now, so a second pass does nothing
    assert run_due() == []


def test_retry_then_success_keeps_each_failed_attempts_traceback(db):
    event = django_events.send("test/flaky", {"succeed_on": 3})
    [run] = run_all()
    assert run.status == RunStatus.SUCCEEDED
    assert run.attempts == 3
    assert run.result == {"attempt": 3}
    attempts = list(Attempt.objects.filter(run=run).order_by("number"))
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    assert [a.number for a in attempts] == [1, 2, 3]
    for number, attempt in enumerate(attempts[:2], start=1):
        assert attempt.exc_type == "ConnectionError"
        assert attempt.message == f"flaky failure on attempt {number}"
        assert "Traceback (most recent call last)" in attempt.traceback
        assert "in flaky" in attempt.traceback
    assert Call.objects.filter(run_id=str(run.pk)).count() == 3
    assert event.runs.get().status == RunStatus.SUCCEEDED


def test_retries_exhausted_go_dead_with_one_traceback_per_attempt(db):
    django_events.send("test/always-fails")  # retries=2
    [run] = run_all()
    assert run.status == RunStatus.DEAD
    assert run.attempts == run.max_attempts == 3
    assert run.finished_at is not None
    attempts = Attempt.objects.filter(run=run).order_by("number")
    assert [a.outcome for a in attempts] == ["failed"] * 3
    assert all("ValueError: <b>broken</b>" in a.traceback for a in attempts)
    assert run.last_error == "ValueError: <b>broken</b> on attempt 3"


def test_non_retriable_error_goes_dead_at_once(db):
    django_events.send("test/non-retriable")  # retries=5
    [run] = run_all()
    assert run.status == RunStatus.DEAD
    assert run.attempts == 1
    attempt = Attempt.objects.get(run=run)
    assert attempt.exc_type == "django_events.exceptions.NonRetriableError"
    assert attempt.message == "the source was deleted"


def test_retry_after_error_sets_exact_due_time(db):
    event = django_events.send("test/retry-after", {"seconds": 120})
    [run] = run_due()
    assert run.status == RunStatus.RETRYING
    attempt = Attempt.objects.get(run=run)
    assert run.due_at == attempt.finished_at + dt.timedelta(seconds=120)
    assert attempt.message == "rate limited"
    # the retry runs when due (run_all skips the wait) and succeeds
    [run] = run_all()
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == 2
    assert _run(event).attempts == 2


def test_retry_after_on_last_attempt_goes_dead(db):
    @function("test/retry-after-last", id="tests.retry_after_last", retries=0)
    def fn(ctx):
        raise django_events.RetryAfterError(5)

    try:
        django_events.send("test/retry-after-last")
        [run] = run_all()
        assert run.status == RunStatus.DEAD
    finally:
        unregister("tests.retry_after_last")


def test_non_json_result_goes_dead_with_clear_error(db):
    django_events.send("test/bad-result")
    [run] = run_all()
    assert run.status == RunStatus.DEAD
    assert run.attempts == 1
    attempt = Attempt.objects.get(run=run)
    assert attempt.exc_type == "django_events.exceptions.ResultNotSerializableError"
    assert "JSON" in attempt.message


def test_run_of_removed_function_goes_dead_without_calling_anything(db):
    @function("test/temporary", id="tests.temporary")
    def temporary(ctx):  # pragma: no cover - must never be called
        raise AssertionError("called")

    event = django_events.send("test/temporary")
    unregister("tests.temporary")  # the code is removed before a worker gets to it

    assert execute_run(_run(event).pk) is Execution.DEAD
    run = _run(event)
    assert run.status == RunStatus.DEAD
    attempt = Attempt.objects.get(run=run)
    assert attempt.exc_type == "django_events.exceptions.FunctionNotFoundError"
    assert "tests.temporary" in attempt.message
    # and a second delivery of its message does nothing
    assert execute_run(run.pk) is Execution.SKIPPED


def test_duplicate_delivery_executes_once(db):
    event = django_events.send("test/ok")
    run_id = _run(event).pk
    assert execute_run(run_id) is Execution.SUCCEEDED
    assert execute_run(run_id) is Execution.SKIPPED
    assert Call.objects.count() == 1
    assert Attempt.objects.count() == 1


def test_unknown_run_id_is_skipped(db):
    assert execute_run("00000000-0000-7000-8000-000000000000") is Execution.SKIPPED


def test_run_held_by_live_lease_is_not_claimed(db):
    event = django_events.send("test/ok")
    run = _run(event)
    Run.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, attempts=1, lease_expires_at=timezone.now() + dt.timedelta(minutes=5)
    )
    assert execute_run(run.pk) is Execution.SKIPPED
    assert not Call.objects.exists()


def test_run_with_expired_lease_is_not_claimed_by_a_message(db):
    # Given a run whose worker died during attempt 1: recovery, not a message, takes it back
    event = django_events.send("test/ok")
    run = _run(event)
    Run.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, attempts=1, lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    assert execute_run(run.pk) is Execution.SKIPPED
    assert not Call.objects.exists()


def test_stale_worker_cannot_overwrite_newer_attempt(db):
    # Given a run whose lease is taken over by attempt 2 while attempt 1 is still running
    @function("test/overtaken", id="tests.overtaken")
    def overtaken(ctx):
        if ctx.attempt == 1:
            Run.objects.filter(pk=ctx.run_id).update(attempts=2, lease_expires_at=timezone.now())
        return ctx.attempt

    try:
        event = django_events.send("test/overtaken")
        # When attempt 1 finishes late
        assert execute_run(_run(event).pk) is Execution.STALE
        # Then its result is not applied to the run, though its attempt is kept in the history
        run = _run(event)
        assert run.status == RunStatus.RUNNING
        assert run.result is None
        assert Attempt.objects.get(run=run).number == 1
    finally:
        unregister("tests.overtaken")


def test_early_message_for_retrying_run_is_skipped(db, settings):
    settings.DJANGO_EVENTS = {"RETRY_BACKOFF_MIN": 60, "RETRY_BACKOFF_MAX": 60}
    event = django_events.send("test/flaky", {"succeed_on": 2})
    run_due()
    assert execute_run(_run(event).pk, enqueue=False) is Execution.SKIPPED
    assert Call.objects.count() == 1


def test_cancelled_run_is_never_executed(db):
    event = django_events.send("test/ok")
    assert Run.objects.filter(event=event).move(RunStatus.CANCELLED, finished_at=timezone.now()) == 1
    assert execute_run(_run(event).pk) is Execution.SKIPPED
    assert run_all() == []
    assert not Call.objects.exists()


def test_context_carries_event_run_and_attempt(db):
    seen = {}

    @function("test/context", id="tests.context", retries=2)
    def ctx_fn(ctx):
        seen.update(
            name=ctx.event.name,
            data=ctx.event.data,
            event_id=ctx.event.id,
            run_id=ctx.run_id,
            attempt=ctx.attempt,
            max_attempts=ctx.max_attempts,
            last=ctx.is_last_attempt,
            function_id=ctx.function_id,
        )
        ctx.logger.info("hello from the function")

    try:
        event = django_events.send("test/context", {"k": "v"})
        run_all()
        assert seen == {
            "name": "test/context",
            "data": {"k": "v"},
            "event_id": event.pk,
            "run_id": _run(event).pk,
            "attempt": 1,
            "max_attempts": 3,
            "last": False,
            "function_id": "tests.context",
        }
    finally:
        unregister("tests.context")


def test_run_all_raises_when_runs_never_settle(db):
    @function("test/loop", id="tests.loop")
    def loop(ctx):
        django_events.send("test/loop")

    try:
        django_events.send("test/loop")
        with pytest.raises(RunsDidNotSettle):
            run_all(max_rounds=3)
    finally:
        unregister("tests.loop")


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 10, 50, 500])
def test_backoff_stays_within_bounds_and_grows(settings, attempt):
    settings.DJANGO_EVENTS = {"RETRY_BACKOFF_MIN": 2, "RETRY_BACKOFF_MAX": 100}
    base = min(100, 2 * 2 ** (attempt - 1))
    for _ in range(50):
        delay = backoff_delay(attempt)
        assert 2 <= delay <= 100
        assert base <= delay <= base * 1.5


def test_backoff_has_jitter(settings):
    settings.DJANGO_EVENTS = {"RETRY_BACKOFF_MIN": 10, "RETRY_BACKOFF_MAX": 1000}
    assert len({backoff_delay(3) for _ in range(20)}) > 1
