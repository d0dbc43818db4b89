"""The whole flow through real brokers (Redis, RabbitMQ) and a real Dramatiq worker."""

from __future__ import annotations

import dramatiq
import pytest
from django.db import transaction
from dramatiq.middleware import Middleware

import django_events
from django_events.dispatch import send_now
from django_events.models import Attempt, AttemptOutcome, Run, RunStatus
from django_events.tasks import get_actor
from tests.conftest import wait_for
from tests.testapp.models import Call

# Every test here runs with the ledger's vendor statements and with its portable forms.
pytestmark = pytest.mark.usefixtures("ledger_form")


def _settled(expected_runs: int):
    def check() -> bool:
        """every run is final"""
        return Run.objects.count() == expected_runs and not Run.objects.not_final().exists()

    return check


def test_committed_send_runs_every_subscribed_function(worker):
    # Given a view-like transaction that sends an event
    with transaction.atomic():
        event = django_events.send("test/fanout", {"n": 1})

    # When the worker drains the queue
    wait_for(_settled(3))

    # Then every function ran once and succeeded
    assert set(Run.objects.filter(event=event).values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    assert sorted(Call.objects.values_list("function", flat=True)) == ["fanout_a", "fanout_b", "fanout_c"]


def test_send_outside_transaction_commits_and_runs(worker):
    event = django_events.send("test/ok", {"x": 1})
    wait_for(_settled(1))
    assert Run.objects.get(event=event).result == {"echo": {"x": 1}, "attempt": 1}


def test_failures_retry_through_the_broker_then_succeed(worker):
    django_events.send("test/flaky", {"succeed_on": 3})
    wait_for(_settled(1))
    run = Run.objects.get()
    assert run.status == RunStatus.SUCCEEDED
    assert run.attempts == 3
    assert list(Attempt.objects.filter(run=run).values_list("outcome", flat=True)) == [
        "failed",
        "failed",
        "succeeded",
    ]


def test_exhausted_retries_end_dead_with_every_traceback(worker):
    django_events.send("test/always-fails")
    wait_for(_settled(1))
    run = Run.objects.get()
    assert run.status == RunStatus.DEAD
    assert run.attempts == 3
    assert [a.traceback.count("ValueError") > 0 for a in Attempt.objects.filter(run=run)] == [True] * 3


def test_retry_after_waits_at_least_the_requested_delay(worker):
    django_events.send("test/retry-after", {"seconds": 0.5})
    wait_for(_settled(1))
    first, second = Attempt.objects.order_by("number")
    assert (second.started_at - first.finished_at).total_seconds() >= 0.5
    assert Run.objects.get().status == RunStatus.SUCCEEDED


def test_time_limit_interrupts_the_attempt(worker):
    django_events.send("test/slow")  # time_limit=0.5, retries=0
    wait_for(_settled(1))
    run = Run.objects.get()
    assert run.status == RunStatus.DEAD
    attempt = Attempt.objects.get(run=run)
    assert attempt.outcome == AttemptOutcome.TIMED_OUT
    assert attempt.exc_type == "dramatiq.middleware.time_limit.TimeLimitExceeded"


def test_duplicate_deliveries_run_the_function_once(worker, broker, queue_name):
    # Given a committed run whose message is delivered five times
    event = django_events.send("test/ok")
    run = Run.objects.get(event=event)
    for _ in range(4):
        send_now([(run.pk, run.function)])

    # When the worker has processed every message
    wait_for(_settled(1))
    broker.join(queue_name, timeout=10_000)
    worker.join()

    # Then the function ran once
    assert Call.objects.count() == 1
    assert Attempt.objects.count() == 1


class _EnqueueSpy(Middleware):
    def __init__(self) -> None:
        self.messages: list[dramatiq.Message] = []

    def after_enqueue(self, broker, message, delay):
        self.messages.append(message)


def test_rolled_back_send_enqueues_and_runs_nothing(worker, broker):
    spy = _EnqueueSpy()
    broker.add_middleware(spy)

    class Rollback(Exception):
        pass

    try:
        with transaction.atomic():
            django_events.send("test/fanout")
            raise Rollback
    except Rollback:
        pass
    # a committed event afterwards runs, so the worker was live the whole time
    django_events.send("test/ok")
    wait_for(_settled(1))
    assert list(Call.objects.values_list("function", flat=True)) == ["ok"]
    assert len(spy.messages) == 1


def test_messages_carry_only_the_run_id(worker, broker):
    spy = _EnqueueSpy()
    broker.add_middleware(spy)
    event = django_events.send("test/ok", {"secret": "not in the broker"})
    wait_for(_settled(1))
    [message] = spy.messages
    assert message.args == (str(Run.objects.get(event=event).pk),)
    assert message.kwargs == {}


def test_bad_messages_are_dropped_and_worker_keeps_going(worker, broker, queue_name):
    actor = get_actor(broker)
    actor.send("not-a-uuid")
    actor.send("00000000-0000-7000-8000-000000000000")
    django_events.send("test/ok")
    wait_for(_settled(1))
    broker.join(queue_name, timeout=10_000)
    worker.join()
    assert Run.objects.get().status == RunStatus.SUCCEEDED


def test_fan_out_costs_the_sender_one_message_and_runs_every_function(worker, broker):
    spy = _EnqueueSpy()
    broker.add_middleware(spy)

    # When an event with three functions is sent
    with transaction.atomic():
        event = django_events.send("test/fanout")
    run_ids = {str(pk) for pk in Run.objects.filter(event=event).values_list("pk", flat=True)}
    wait_for(_settled(3))

    # Then the sender's commit sent one message carrying the three run ids; the worker sent the two
    # runs it did not execute itself a message each; each function ran once
    first, *resent = spy.messages
    assert set(first.args) == run_ids
    assert len(first.args) == 3
    assert len(resent) == 2
    assert {message.args for message in resent} == {(run_id,) for run_id in set(first.args[1:])}
    assert sorted(Call.objects.values_list("function", flat=True)) == ["fanout_a", "fanout_b", "fanout_c"]
    assert set(Run.objects.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}


def test_send_many_sends_a_message_per_run(worker, broker):
    spy = _EnqueueSpy()
    broker.add_middleware(spy)

    events = django_events.send_many([{"name": "test/fanout", "data": {"i": i}} for i in range(3)])
    wait_for(_settled(9))

    # Not grouped: a bulk send keeps one message per run, so that workers do not do its enqueueing
    run_ids = {str(pk) for pk in Run.objects.filter(event__in=events).values_list("pk", flat=True)}
    assert sorted(message.args for message in spy.messages) == sorted((run_id,) for run_id in run_ids)
    assert Attempt.objects.count() == 9  # each run executed once
