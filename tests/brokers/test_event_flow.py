"""The whole django-events flow on each broker, the database broker included, with a real Dramatiq worker."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import dramatiq
import pytest
from django.db import transaction

import django_events
from django_events.execution import Execution, execute_run
from django_events.models import Attempt, QueuedMessage, Run, RunStatus
from tests.conftest import wait_for
from tests.testapp.models import Call


def _settled(expected_runs: int) -> Callable[[], bool]:
    def check() -> bool:
        """every run is final"""
        return Run.objects.count() == expected_runs and not Run.objects.not_final().exists()

    return check


def test_sent_events_run_every_function_once(
    worker: dramatiq.Worker, broker: dramatiq.Broker, queue_name: str
) -> None:
    # Given events sent in a view-like transaction and outside one
    with transaction.atomic():
        fanout = django_events.send("test/fanout", {"n": 1})
    ok = django_events.send("test/ok", {"x": 1})

    # When the worker drains the queue
    wait_for(_settled(4))
    broker.join(queue_name, timeout=10_000)

    # Then every function ran once and succeeded
    assert set(Run.objects.filter(event=fanout).values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    assert Run.objects.get(event=ok).result == {"echo": {"x": 1}, "attempt": 1}
    assert sorted(Call.objects.values_list("function", flat=True)) == [
        "fanout_a",
        "fanout_b",
        "fanout_c",
        "ok",
    ]
    assert not QueuedMessage.objects.pending().exists()


def test_retries_go_through_the_broker_with_delays(worker: dramatiq.Worker, broker: dramatiq.Broker) -> None:
    # Given a function that fails twice, and one that always fails
    django_events.send("test/flaky", {"succeed_on": 3})
    django_events.send("test/always-fails")

    # When the worker has retried them (delayed messages, 50-200 ms backoff)
    wait_for(_settled(2))

    # Then the first succeeded on its third attempt and the second is dead after three
    flaky = Run.objects.get(event_name="test/flaky")
    assert (flaky.status, flaky.attempts) == (RunStatus.SUCCEEDED, 3)
    dead = Run.objects.get(event_name="test/always-fails")
    assert (dead.status, dead.attempts) == (RunStatus.DEAD, 3)
    assert Attempt.objects.count() == 6


def test_rolled_back_send_enqueues_nothing(worker: dramatiq.Worker, broker: dramatiq.Broker) -> None:
    class Rollback(Exception):
        pass

    try:
        with transaction.atomic():
            django_events.send("test/fanout")
            raise Rollback
    except Rollback:
        pass
    django_events.send("test/ok")
    wait_for(_settled(1))
    assert list(Call.objects.values_list("function", flat=True)) == ["ok"]


def _queued_run_ids() -> list[str]:
    """The run ids of the messages in the database broker's table, oldest first."""
    bodies = QueuedMessage.objects.order_by("id").values_list("body", flat=True)
    return [dramatiq.Message.decode(bytes(body)).args[0] for body in bodies]


@pytest.mark.parametrize("broker", ["database"], indirect=True)
def test_database_broker_send_writes_messages_inside_the_transaction(broker: dramatiq.Broker) -> None:
    # When events are sent in a transaction, with the queues in the same database
    with transaction.atomic():
        event = django_events.send("test/fanout")
        run_ids = sorted(str(pk) for pk in Run.objects.filter(event=event).values_list("pk", flat=True))

        # Then the messages are written before the commit, in the transaction itself:
        # nothing is left to send after it, so no crash between the two can lose them
        assert sorted(_queued_run_ids()) == run_ids

    # And they are still there after it
    assert sorted(_queued_run_ids()) == run_ids


@pytest.mark.parametrize("broker", ["database"], indirect=True)
def test_database_broker_rolled_back_send_leaves_no_message(broker: dramatiq.Broker) -> None:
    class Rollback(Exception):
        pass

    # When a send's transaction rolls back after its messages were written
    def send_then_fail() -> None:
        with transaction.atomic():
            django_events.send("test/fanout")
            assert len(_queued_run_ids()) == 3
            raise Rollback

    with pytest.raises(Rollback):
        send_then_fail()

    # Then neither the runs nor their messages exist
    assert not Run.objects.exists()
    assert not QueuedMessage.objects.exists()


@pytest.mark.parametrize("broker", ["database"], indirect=True)
def test_database_broker_retry_message_is_written_with_the_failed_attempt(broker: dramatiq.Broker) -> None:
    # Given a run of a function that fails, whose first message was taken by a worker
    event = django_events.send("test/always-fails")
    run = Run.objects.get(event=event)
    QueuedMessage.objects.all().delete()

    # When its attempt is recorded inside an outer transaction that has not committed yet
    with transaction.atomic():
        assert execute_run(run.pk) == Execution.RETRYING

        # Then the retry's delayed message is already written beside the attempt
        message = QueuedMessage.objects.get()
        run.refresh_from_db()
        assert _queued_run_ids() == [str(run.pk)]
        assert message.available_at == pytest.approx(run.due_at, abs=dt.timedelta(milliseconds=50))
        assert run.due_at > message.created_at
