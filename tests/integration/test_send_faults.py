"""send() when the broker is down, and when two transactions race with one idempotency key."""

from __future__ import annotations

import logging
import threading

import dramatiq
import pytest
from django.db import connection, connections, transaction
from dramatiq.brokers.redis import RedisBroker

import django_events
from django_events.apps import install_broker_middleware
from django_events.models import Event, Run, RunStatus
from tests.conftest import wait_for


@pytest.fixture
def unreachable_broker():
    """A Redis broker pointed at a closed port, made the global broker."""
    previous = dramatiq.get_broker()
    broker = RedisBroker(url="redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    install_broker_middleware(broker)
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        dramatiq.set_broker(previous)


def test_broker_down_at_commit_does_not_fail_the_request(transactional_db, unreachable_broker, caplog):
    # Given a broker that refuses connections
    caplog.set_level(logging.ERROR, logger="django_events")

    # When a view commits a send
    with transaction.atomic():
        event = django_events.send("test/fanout")

    # Then the send succeeded, the runs are committed and pending, and the failure was logged
    assert Run.objects.filter(event=event, status=RunStatus.PENDING).count() == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "django_events"]
    # one line for the commit: sending stops at the first failure instead of waiting on each run
    assert len(messages) == 1
    assert "Could not enqueue run" in messages[0]
    assert "and 2 more run(s) of this commit" in messages[0]


def _waiting_on_a_lock() -> bool:
    """another connection is blocked on a lock (PostgreSQL)"""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # the view is a per-transaction snapshot
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        return cursor.fetchone()[0] > 0


def test_racing_sends_with_one_id_store_one_event_and_neither_fails(transactional_db):
    # Given transaction A has inserted the event with id "race" but not committed
    results: dict[str, object] = {}
    a_inserted = threading.Event()
    b_started = threading.Event()

    def a() -> None:
        try:
            with transaction.atomic():
                results["a"] = django_events.send("test/ok", {"by": "a"}, id="race")
                a_inserted.set()
                b_started.wait(10)
                if connection.vendor == "postgresql":
                    # commit only once B's INSERT is blocked behind ours
                    wait_for(_waiting_on_a_lock, timeout=10)
        except Exception as exc:  # pragma: no cover - reported below
            results["a"] = exc
        finally:
            connection.close()

    def b() -> None:
        a_inserted.wait(10)
        b_started.set()
        try:
            results["b"] = django_events.send("test/ok", {"by": "b"}, id="race")
        except Exception as exc:  # pragma: no cover - reported below
            results["b"] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Then both sends returned the one stored event, with one run
    assert isinstance(results["a"], Event), results["a"]
    assert isinstance(results["b"], Event), results["b"]
    assert results["a"].pk == results["b"].pk
    assert Event.objects.filter(idempotency_key="race").count() == 1
    assert Run.objects.count() == 1
