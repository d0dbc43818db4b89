"""Scenario 5: bad input to send(), and bad messages on the queue.

Each is answered with a clear error (``EventValidationError`` for ``send``), or is dropped
with a line in the worker's log, and nothing half-written is left in the database.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

import django_events
from django_events import EventValidationError
from django_events.conf import get_settings
from django_events.dispatch import send_now
from django_events.execution import RUN_DEAD_EVENT
from django_events.models import Attempt, Event, Run, RunStatus
from django_events.tasks import get_actor
from tests.testapp.models import Call

from .harness import RedisServer, Workers, report, wait_until


def _circular() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["self"] = data
    return data


def _send(name: Any = "faults/ok", data: Any = None, **kwargs: Any) -> Callable[[], object]:
    return lambda: django_events.send(name, data, **kwargs)


def _send_many(items: Any) -> Callable[[], object]:
    return lambda: django_events.send_many(items)


BAD_SENDS: list[tuple[str, Callable[[], object], str]] = [
    ("empty name", _send(""), "cannot be empty"),
    ("name too long", _send("x" * 256), "at most 255"),
    ("name None", _send(None), "must be a str"),
    ("name int", _send(42), "must be a str"),
    ("name bytes", _send(b"faults/ok"), "must be a str"),
    ("name with a space", _send("faults ok"), "whitespace"),
    ("name with a tab", _send("faults\tok"), "whitespace"),
    ("name with a newline", _send("faults/ok\n"), "whitespace"),
    ("name with NUL", _send("faults/ok\x00"), "control"),
    ("data list", _send(data=[1, 2]), "must be a dict"),
    ("data str", _send(data="text"), "must be a dict"),
    ("data int", _send(data=7), "must be a dict"),
    ("datetime value", _send(data={"when": dt.datetime(2026, 1, 1)}), "not JSON-serialisable"),
    ("Decimal value", _send(data={"amount": decimal.Decimal("1.5")}), "not JSON-serialisable"),
    ("bytes value", _send(data={"blob": b"\x00\x01"}), "not JSON-serialisable"),
    ("object value", _send(data={"obj": object()}), "not JSON-serialisable"),
    ("set value", _send(data={"set": {1, 2}}), "not JSON-serialisable"),
    ("NaN value", _send(data={"nan": float("nan")}), "not JSON-serialisable"),
    ("infinite value", _send(data={"inf": float("-inf")}), "not JSON-serialisable"),
    ("tuple key", _send(data={(1, 2): "x"}), "not JSON-serialisable"),
    ("circular data", lambda: django_events.send("faults/ok", _circular()), "not JSON-serialisable"),
    ("NUL in a string", _send(data={"s": "a\x00b"}), "NUL"),
    ("NUL in a key", _send(data={"a\x00b": 1}), "NUL"),
    ("data over 256 KiB", _send(data={"blob": "x" * (256 * 1024)}), "over the limit"),
    ("empty id", _send(id=""), "event id"),
    ("id too long", _send(id="k" * 256), "event id"),
    ("id int", _send(id=5), "event id"),
    ("send_many: not a mapping", _send_many(["faults/ok"]), "takes mappings"),
    (
        "send_many: unknown key",
        _send_many([{"name": "faults/ok", "extra": 1}]),
        "may have 'data', 'id', 'delay' and 'run_at'",
    ),
    ("send_many: no name", _send_many([{"data": {}}]), "must have a 'name'"),
    (
        "send_many: good items then a bad one",
        _send_many(
            [{"name": "faults/ok", "data": {"i": i}} for i in range(5)] + [{"name": "faults/ok", "data": 1}]
        ),
        "Item 5 of send_many",
    ),
]


@pytest.mark.parametrize(
    ("call", "message"), [case[1:] for case in BAD_SENDS], ids=[case[0] for case in BAD_SENDS]
)
def test_bad_send_input_raises_a_clear_error_and_stores_nothing(
    db: None, call: Callable[[], object], message: str
) -> None:
    # Given a transaction that has sent a good event (a view's, say)
    with transaction.atomic():
        good = django_events.send("faults/ok", {"good": "before"})

        # When a bad send follows in it
        with pytest.raises(EventValidationError, match=re.escape(message)):
            call()

        # Then the transaction is still usable, and commits the good events only
        later = django_events.send("faults/ok", {"good": "after"})
    assert set(Event.objects.values_list("pk", flat=True)) == {good.pk, later.pk}
    assert Run.objects.count() == 2


def test_at_least_twenty_kinds_of_bad_send_input() -> None:
    assert len(BAD_SENDS) >= 20


def _worker_log_has(workers: Workers, text: str, count: int = 1) -> Callable[[], bool]:
    def check() -> bool:
        return workers.log_text().count(text) >= count

    check.__doc__ = f"the worker log shows {text!r}" + (f" {count} times" if count > 1 else "")
    return check


def test_bad_messages_are_dropped_with_a_log_line_and_a_good_event_still_completes(
    workers: Workers, redis_server: RedisServer, private_broker: dramatiq.Broker
) -> None:
    queue = get_settings().QUEUE_NAME
    namespace = settings.REDIS_NAMESPACE
    actor = get_actor()
    workers.start(1)

    def settled(event: Event, status: str) -> Callable[[], bool]:
        def check() -> bool:
            return Run.objects.filter(event=event, status=status).exists()

        check.__doc__ = f"the run of {event.name} {event.data} is {status}"
        return check

    # Given a worker that has run an event
    first = django_events.send("faults/ok", {"n": 1})
    wait_until(
        settled(first, RunStatus.SUCCEEDED), timeout=60, what="the first run succeeds", describe=workers.tail
    )
    first_run = Run.objects.get(event=first)

    # And runs that no worker may execute: one of a function since removed, one cancelled
    now = timezone.now()
    removed_event = Event.objects.create(name="faults/removed", data={})
    removed = Run.objects.create(
        event=removed_event,
        event_name=removed_event.name,
        function="tests.removed_function",
        max_attempts=3,
        due_at=now,
    )
    cancelled_event = Event.objects.create(name="faults/cancelled", data={})
    cancelled = Run.objects.create(
        event=cancelled_event,
        event_name=cancelled_event.name,
        function="tests.faults_ok",
        max_attempts=3,
        status=RunStatus.CANCELLED,
        finished_at=now,
    )
    unknown_id = str(uuid.uuid4())

    # When well-formed messages with bad content are queued
    actor.send_with_options(args=("not-a-uuid",))  # 1. not a run id
    actor.send_with_options(args=(12345,))  # 2. not even a string
    actor.send_with_options(args=(unknown_id,))  # 3. a run that does not exist
    actor.send_with_options(args=())  # 4. no run id at all
    private_broker.enqueue(  # 5. an actor nobody declared
        dramatiq.Message(
            queue_name=queue, actor_name="django_events.no_such_actor", args=(), kwargs={}, options={}
        )
    )
    send_now([(removed.pk, removed.function)])  # 6. a run of a function that was removed
    send_now([(cancelled.pk, cancelled.function)])  # 7. a cancelled run
    send_now([(first_run.pk, first_run.function)])  # 8. a run that already succeeded (a duplicate)
    second = django_events.send("faults/ok", {"n": 2})

    # Then each is dropped, or recorded as the run's failure, with a line in the worker's log
    wait_until(
        settled(second, RunStatus.SUCCEEDED),
        timeout=60,
        what="the second run succeeds",
        describe=workers.tail,
    )
    wait_until(settled(removed_event, RunStatus.DEAD), timeout=60, what="the removed function's run is dead")
    expected_lines = [
        "Dropped a message for run 'not-a-uuid': not a run id.",
        "Dropped a message for run 12345: not a run id.",
        f"Dropped a message for run {unknown_id}: no such run.",
        "Dropped a malformed run message: args=() kwargs={}.",
        "Received message for undefined actor 'django_events.no_such_actor'. Moving it to the DLQ.",
        f"Run {removed.pk} of tests.removed_function for faults/removed is dead after attempt 1.",
        "No function is registered with the id 'tests.removed_function': was it removed or renamed?",
    ]
    for line in expected_lines:
        wait_until(_worker_log_has(workers, line), timeout=30, what=line, describe=workers.tail)

    # When bodies that are not Dramatiq messages at all are pushed into the queue the way the Redis
    # broker stores messages (an id in the list, the body in the hash), one at a time
    client = redis_server.client()
    garbage = [b"\x00\xff definitely not json", b'{"hello": "world"}']
    for n, body in enumerate(garbage, start=1):
        message_id = f"garbage-{n}"
        client.hset(f"{namespace}:{queue}.msgs", message_id, body)
        client.rpush(f"{namespace}:{queue}", message_id)
        # 9-10. the consumer cannot decode it, logs the error and starts again (after 3 s)
        wait_until(
            _worker_log_has(workers, "dramatiq.errors.DecodeError: Failed to decode message.", n),
            timeout=30,
            what=f"the worker reports garbage body {n}",
            describe=workers.tail,
        )
    client.close()

    # Then the worker still runs events
    third = django_events.send("faults/ok", {"n": 3})
    wait_until(
        settled(third, RunStatus.SUCCEEDED), timeout=60, what="the third run succeeds", describe=workers.tail
    )
    workers.assert_alive()

    # And nothing half-written is left: no run for the unknown id, the removed function's run dead
    # with its error, the cancelled run untouched, the succeeded run not executed again
    assert not Run.objects.filter(pk=unknown_id).exists()
    removed.refresh_from_db()
    assert (removed.status, removed.attempts) == (RunStatus.DEAD, 1)
    [attempt] = Attempt.objects.filter(run=removed)
    assert attempt.exc_type == "django_events.exceptions.FunctionNotFoundError"
    assert "was it removed or renamed" in attempt.message
    cancelled.refresh_from_db()
    assert (cancelled.status, cancelled.attempts) == (RunStatus.CANCELLED, 0)
    assert not Attempt.objects.filter(run=cancelled).exists()
    first_run.refresh_from_db()
    assert (first_run.status, first_run.attempts) == (RunStatus.SUCCEEDED, 1)
    assert Call.objects.filter(run_id=str(first_run.pk)).count() == 1
    assert set(Run.objects.values_list("status", flat=True).distinct()) <= {"succeeded", "dead", "cancelled"}
    assert Run.objects.count() == 5  # first, second, third, removed, cancelled
    assert Attempt.objects.count() == 4  # one each for first, second, third and removed
    assert Event.objects.filter(name=RUN_DEAD_EVENT).count() == 1
    report(
        "bad_input",
        {
            "bad_send_kinds": len(BAD_SENDS),
            "bad_message_kinds": 8 + len(garbage),
            "runs": Run.objects.count(),
            "attempts": Attempt.objects.count(),
        },
    )
