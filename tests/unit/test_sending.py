"""send() and send_many(): what is stored, when it is enqueued, and idempotency."""

from __future__ import annotations

import pytest
from django.db import transaction

import django_events
from django_events.models import Event, Run, RunStatus

# Every test here runs with the ledger's vendor statements and with its portable forms.
pytestmark = pytest.mark.usefixtures("ledger_form")


class _Boom(Exception):
    pass


def test_send_stores_event_and_one_pending_run_per_subscribed_function(db):
    # Given three functions subscribed to "test/fanout"
    # When an event is sent
    event = django_events.send("test/fanout", {"n": 1})

    # Then the event is stored with one pending run per function
    stored = Event.objects.get(pk=event.pk)
    assert stored.name == "test/fanout"
    assert stored.data == {"n": 1}
    runs = Run.objects.filter(event=event)
    assert sorted(runs.values_list("function", flat=True)) == [
        "tests.fanout_a",
        "tests.fanout_b",
        "tests.fanout_c",
    ]
    assert {run.status for run in runs} == {RunStatus.PENDING}
    assert all(run.attempts == 0 and run.due_at is not None for run in runs)


def test_function_subscribed_to_two_events_gets_a_run_for_each(db):
    django_events.send("test/ok")
    django_events.send("test/also-ok")
    assert Run.objects.filter(function="tests.ok").count() == 2


def test_max_attempts_is_first_try_plus_retries(db, settings):
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "DEFAULT_RETRIES": 7}
    django_events.send("test/flaky", {"succeed_on": 1})  # retries=3
    django_events.send("test/ok")  # default retries
    assert Run.objects.get(function="tests.flaky").max_attempts == 4
    assert Run.objects.get(function="tests.ok").max_attempts == 8


def test_event_nothing_subscribes_to_is_stored_without_runs(db):
    event = django_events.send("nobody/listens", {"x": 1})
    assert Event.objects.filter(pk=event.pk).exists()
    assert not Run.objects.filter(event=event).exists()


def test_send_inside_rolled_back_transaction_stores_and_enqueues_nothing(
    db, django_capture_on_commit_callbacks
):
    # Given a transaction that sends an event and then fails
    def view() -> None:
        with transaction.atomic():
            django_events.send("test/fanout", {"n": 1})
            raise _Boom

    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(_Boom):
        view()

    # Then nothing is stored and no enqueue is left to run
    assert not Event.objects.exists()
    assert not Run.objects.exists()
    assert callbacks == []


def test_send_inside_transaction_enqueues_only_on_commit(db, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks, transaction.atomic():
        django_events.send("test/fanout")
        django_events.send("test/ok")
    # one enqueue callback per send, registered in the caller's transaction (and one matching
    # the event to the runs that wait for it)
    assert len(_enqueues(callbacks)) == 2
    assert len(callbacks) == 4


def _enqueues(callbacks: list) -> list:
    return [callback for callback in callbacks if "send_with_transaction" in callback.__qualname__]


def test_send_with_nothing_subscribed_registers_no_enqueue(db, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        django_events.send("nobody/listens")
    assert _enqueues(callbacks) == []
    assert len(callbacks) == 1  # a run may wait for it (step.wait_for_event)


def test_data_defaults_to_empty_object_and_is_normalised_as_json(db):
    assert django_events.send("test/ok").data == {}
    event = django_events.send("test/ok", {"pair": (1, 2), 3: "three"})
    assert Event.objects.get(pk=event.pk).data == {"pair": [1, 2], "3": "three"}
    assert event.data == {"pair": [1, 2], "3": "three"}


def test_send_with_same_id_returns_first_event_and_creates_no_new_runs(db):
    first = django_events.send("test/fanout", {"v": 1}, id="source-42-connected")
    again = django_events.send("test/fanout", {"v": 2}, id="source-42-connected")
    assert again.pk == first.pk
    assert again.data == {"v": 1}
    assert Event.objects.count() == 1
    assert Run.objects.count() == 3


def test_send_many_stores_all_events_with_bulk_inserts(db, django_assert_max_num_queries):
    items = [{"name": "test/fanout", "data": {"i": i}} for i in range(50)]
    # Given 50 events of 3 functions each: a fixed number of queries, not 200
    with django_assert_max_num_queries(6):
        events = django_events.send_many(items)
    assert [e.data["i"] for e in events] == list(range(50))
    assert Event.objects.count() == 50
    assert Run.objects.count() == 150


def test_send_many_with_ids_skips_existing_and_repeated_keys(db):
    existing = django_events.send("test/ok", {"v": 0}, id="k1")
    events = django_events.send_many(
        [
            {"name": "test/ok", "data": {"v": 1}, "id": "k1"},
            {"name": "test/ok", "data": {"v": 2}, "id": "k2"},
            {"name": "test/ok", "data": {"v": 3}, "id": "k2"},
            {"name": "test/ok", "data": {"v": 4}},
        ]
    )
    assert events[0].pk == existing.pk
    assert events[1].pk == events[2].pk
    assert events[2].data == {"v": 2}
    assert Event.objects.count() == 3
    assert Run.objects.count() == 3


def test_send_many_of_nothing_returns_empty_list(db):
    assert django_events.send_many([]) == []
    assert not Event.objects.exists()


def test_send_many_stores_nothing_if_one_item_is_invalid(db):
    with pytest.raises(django_events.EventValidationError, match="Item 1"):
        django_events.send_many([{"name": "test/ok"}, {"name": ""}])
    assert not Event.objects.exists()
