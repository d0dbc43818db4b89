"""The whole django-events flow on each broker, the database broker included, with a real Dramatiq worker."""

from __future__ import annotations

from collections.abc import Callable

import dramatiq
from django.db import transaction

import django_events
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
