"""The database broker and queue rows that hold no message a worker can process.

A row whose body decodes but whose fields have the wrong types (written by hand, by another
program, or by a broken encoder) is dead-lettered as it is taken, with a short warning, and
never stalls the other rows of its batch or the consumer.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import dramatiq
import pytest
from django.urls import reverse
from django.utils import timezone
from dramatiq.errors import DecodeError

from django_events.broker import DatabaseBroker, read_message
from django_events.models import QueuedMessage, QueuedMessageState
from tests.conftest import wait_for

from .kit import Kit, take

pytestmark = pytest.mark.parametrize("kit", ["database"], indirect=True)

DEAD = QueuedMessageState.DEAD


def _good(queue: str = "q") -> dict[str, Any]:
    return dramatiq.Message(queue_name=queue, actor_name="a", args=(1,), kwargs={}, options={}).asdict()


#: Bodies that decode as JSON but are no message a worker can process, and what the error names.
MALFORMED: dict[str, tuple[Any, str]] = {
    "every field of the wrong type": (
        {
            "queue_name": 5,
            "actor_name": None,
            "args": "x",
            "kwargs": [],
            "options": "o",
            "message_id": 7,
            "message_timestamp": "t",
        },
        "queue_name is 5",
    ),
    "missing fields": ({"queue_name": "q", "actor_name": "a"}, "has no args, kwargs, options"),
    "an unknown field": ({**_good(), "extra": 1}, "unknown fields ['extra']"),
    "args a string": ({**_good(), "args": "xyz"}, "args is 'xyz', not a list"),
    "args an object": ({**_good(), "args": {"a": 1}}, "args is {'a': 1}, not a list"),
    "kwargs a list": ({**_good(), "kwargs": []}, "kwargs is [], not an object"),
    "options a string": ({**_good(), "options": "o"}, "options is 'o', not an object"),
    "actor name a list": ({**_good(), "actor_name": ["a"]}, "actor_name is ['a']"),
    "actor name empty": ({**_good(), "actor_name": ""}, "actor_name is ''"),
    "message id a number": ({**_good(), "message_id": 7}, "message_id is 7"),
    "timestamp a string": ({**_good(), "message_timestamp": "t"}, "message_timestamp is 't'"),
    "timestamp a float": ({**_good(), "message_timestamp": 1.5}, "message_timestamp is 1.5"),
    "retries a string": ({**_good(), "options": {"retries": "3"}}, "options['retries'] is '3'"),
    "time limit infinite": (
        {**_good(), "options": {"time_limit": float("inf")}},
        "options['time_limit'] is inf",
    ),
    "time limit nan": ({**_good(), "options": {"time_limit": float("nan")}}, "options['time_limit'] is nan"),
    "time limit huge": ({**_good(), "options": {"time_limit": 1e300}}, "options['time_limit'] is 1e+300"),
    "min backoff null": ({**_good(), "options": {"min_backoff": None}}, "options['min_backoff'] is None"),
    "callback not a name": ({**_good(), "options": {"on_success": [1]}}, "options['on_success'] is [1]"),
    "throws a string": ({**_good(), "options": {"throws": "ValueError"}}, "options['throws']"),
    "pipeline's next message broken": (
        {**_good(), "options": {"pipe_target": {**_good(), "args": 5}}},
        "a message it carries: args is 5",
    ),
    "group callback broken": (
        {**_good(), "options": {"group_completion_callbacks": [_good(), {"queue_name": "q"}]}},
        "a message it carries has no actor_name",
    ),
    "a list": ([1, 2], "the body is [1, 2], not an object"),
    "a string": ("hello", "the body is 'hello', not an object"),
    "null": (None, "the body is None, not an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_read_message_names_what_is_wrong(kit: Kit, case: str) -> None:
    fields, expected = MALFORMED[case]
    with pytest.raises(DecodeError) as error:
        read_message(json.dumps(fields).encode())
    assert str(error.value).startswith("Malformed message: ")
    assert expected in str(error.value)


def test_read_message_reads_what_dramatiq_writes(kit: Kit) -> None:
    # Given a message with the options Dramatiq's middleware set, carrying a pipeline 300 deep
    target: dict[str, Any] | None = None
    for n in range(300):
        message = dramatiq.Message(
            queue_name="q",
            actor_name="a",
            args=(n, "x"),
            kwargs={"k": [1]},
            options={"pipe_target": target} if target else {},
        )
        target = message.asdict()
    message = message.copy(
        options={
            "retries": 2,
            "max_retries": None,
            "time_limit": 60_000,
            "traceback": "...",
            "eta": 1,
            "on_success": "done",
            "min_backoff": 10.5,
        }
    )

    # When it is read back for queue "other"
    read = read_message(message.encode(), "other")

    # Then it is the message Dramatiq decodes, on that queue, without its eta
    decoded = dramatiq.Message.decode(message.encode())
    options = {k: v for k, v in decoded.options.items() if k != "eta"}
    assert read.asdict() == {**decoded.asdict(), "queue_name": "other", "options": options}


def test_read_message_refuses_undecodable_bodies_with_a_short_reason(kit: Kit) -> None:
    for body in [b"\x00not a message", b"\xff\xfe", b"[" * 100_000, b"{" + b"x" * 10_000_000]:
        with pytest.raises(DecodeError) as error:
            read_message(body)
        assert str(error.value).startswith("Undecodable message: ")
        assert len(str(error.value)) < 400


def _insert(kit: Kit, body: bytes) -> QueuedMessage:
    """A row written by hand, as another program could."""
    now = timezone.now()
    return QueuedMessage.objects.create(
        queue_name=kit.queue, actor_name="x", message_id="x", body=body, available_at=now, created_at=now
    )


def _bodies() -> list[bytes]:
    """Every malformed body, and two undecodable ones."""
    return [json.dumps(fields).encode() for fields, _ in MALFORMED.values()] + [b"\x00", b"\xff"]


def test_malformed_rows_are_dead_and_the_rest_of_their_batch_is_delivered(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    # Given good messages with malformed rows between them, all due at once
    broker = kit.broker()
    good = [broker.enqueue(kit.message(n)) for n in range(3)]
    bad = [_insert(kit, body) for body in _bodies()]
    good += [broker.enqueue(kit.message(n)) for n in range(3, 6)]

    # When a consumer takes them all in one batch
    consumer = kit.consume(broker, prefetch=len(good) + len(bad))
    with caplog.at_level(logging.WARNING, logger="django_events"):
        delivered = take(consumer, len(good))

    # Then every good message is delivered, in order, and every bad row is dead, with a warning each
    assert [m.message_id for m in delivered] == [m.message_id for m in good]
    assert set(QueuedMessage.objects.in_queue(kit.queue).dead().values_list("pk", flat=True)) == {
        row.pk for row in bad
    }
    warnings = [r.getMessage() for r in caplog.records if "is dead:" in r.getMessage()]
    assert len(warnings) == len(bad)
    assert f"Message {bad[0].pk} of queue {kit.queue!r} is dead: Malformed message:" in warnings[0]

    # And the consumer goes on: its next message is delivered
    for message in delivered:
        consumer.ack(message)
    later = broker.enqueue(kit.message(99))
    [message] = take(consumer, 1)
    assert message.message_id == later.message_id


def test_a_worker_processes_the_good_rows_around_bad_ones_and_keeps_consuming(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker on a queue where bad rows sit between good messages
    broker = kit.broker()
    seen: list[int] = []
    lock = threading.Lock()

    def record(n: int) -> None:
        with lock:
            seen.append(n)

    actor = dramatiq.actor(actor_name="tests.brokers.bad_rows.record", queue_name=kit.queue, broker=broker)(
        record
    )
    for n in range(5):
        actor.send(n)
    bad = [_insert(kit, body) for body in _bodies()]
    for n in range(5, 10):
        actor.send(n)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        # When it runs, then every good message is processed and acknowledged, every bad row is dead
        wait_for(lambda: sorted(seen) == list(range(10)), timeout=20)
        wait_for(lambda: not QueuedMessage.objects.in_queue(kit.queue).pending().exists(), timeout=10)
        assert QueuedMessage.objects.in_queue(kit.queue).dead().count() == len(bad)

        # And it keeps consuming: a message sent afterwards is processed too
        actor.send(100)
        wait_for(lambda: 100 in seen, timeout=10)
    finally:
        worker.stop()

    # And its consumer never failed (it would have been restarted with a critical log)
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]


def test_the_warning_about_a_huge_malformed_row_is_short(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    # Given rows of 10 MB: a message id of the wrong type, and a body that does not decode
    broker = kit.broker()
    huge = "x" * 10_000_000
    _insert(kit, json.dumps({**_good(kit.queue), "message_id": [huge]}).encode())
    _insert(kit, json.dumps({**_good(kit.queue), "args": huge}).encode())
    _insert(kit, b"\x00" + huge.encode())
    broker.enqueue(kit.message(1))

    # When a consumer takes them
    consumer = kit.consume(broker, prefetch=4)
    with caplog.at_level(logging.WARNING, logger="django_events"):
        take(consumer, 1)

    # Then each is dead, with a warning of a few hundred characters that says how long the value was
    assert QueuedMessage.objects.in_queue(kit.queue).dead().count() == 3
    warnings = [r.getMessage() for r in caplog.records if "is dead:" in r.getMessage()]
    assert len(warnings) == 3
    assert all(len(text) < 1200 for text in warnings), [len(text) for text in warnings]
    assert all("[cut: " in text for text in warnings)


def test_a_malformed_row_is_listed_and_shown_in_the_admin_as_dead(kit: Kit, admin_client: Any) -> None:
    # Given a malformed row dead-lettered by a consumer
    broker = kit.broker()
    row = _insert(kit, json.dumps({**_good(kit.queue), "args": "x", "options": {"retries": "many"}}).encode())
    broker.enqueue(kit.message(1))
    take(kit.consume(broker, prefetch=2), 1)
    row.refresh_from_db()
    assert row.state == DEAD

    # When an admin looks at the dead broker messages, then it is there, and its page shows its body
    changelist = admin_client.get(reverse("admin:django_events_queuedmessage_changelist"), {"state": DEAD})
    assert changelist.status_code == 200
    assert reverse("admin:django_events_queuedmessage_change", args=[row.pk]) in changelist.text
    page = admin_client.get(reverse("admin:django_events_queuedmessage_change", args=[row.pk]))
    assert page.status_code == 200
    assert "many" in page.text


def test_messages_a_failed_close_could_not_put_back_are_put_back_by_the_next_consumer(kit: Kit) -> None:
    # Given a consumer that took three messages, handed out one, and lost its connection
    broker = kit.broker()
    assert isinstance(broker, DatabaseBroker)
    sent = [broker.enqueue(kit.message(n)) for n in range(3)]
    consumer = kit.consume(broker, prefetch=3)
    [first] = take(consumer, 1)
    consumer._db.connection.close()  # type: ignore[attr-defined]

    # When it is closed (as the worker does before starting a new consumer), it cannot put them back
    consumer.close()
    assert QueuedMessage.objects.in_queue(kit.queue).filter(state=QueuedMessageState.TAKEN).count() == 3

    # Then the broker's next consumer puts them back and delivers them, without waiting for the
    # visibility timeout
    again = take(kit.consume(broker, prefetch=2), 2, timeout=5)
    assert sorted(m.message_id for m in again) == sorted(m.message_id for m in sent[1:])
    assert first.message_id == sent[0].message_id
