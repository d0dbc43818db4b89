"""What only the database broker does: messages in the caller's transaction, holds, fencing, wake-ups."""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
from typing import Any

import dramatiq
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout, QueueNotFound
from dramatiq.middleware import Middleware

from django_events.broker import DatabaseBroker, is_transactional
from django_events.exceptions import ConfigurationError
from django_events.models import QueuedMessage, QueuedMessageState
from tests.conftest import wait_for

from .kit import Kit, is_postgresql, nothing_within, take

pytestmark = pytest.mark.parametrize("kit", ["database"], indirect=True)


def _states(kit: Kit) -> dict[str, int]:
    rows = QueuedMessage.objects.in_queue(kit.queue).values_list("state", flat=True)
    return {state: list(rows).count(state) for state in QueuedMessageState.values if state in rows}


class Rollback(Exception):
    pass


def test_message_sent_in_a_rolled_back_transaction_never_exists(kit: Kit) -> None:
    # Given a consumer that is already looking at the queue
    broker = kit.broker()
    consumer = kit.consume(broker, timeout=100)
    assert next(consumer) is None

    # When a message is sent in a transaction that rolls back
    def send_then_fail() -> None:
        with transaction.atomic():
            broker.enqueue(kit.message(1))
            assert QueuedMessage.objects.in_queue(kit.queue).count() == 1  # visible inside it
            raise Rollback

    with pytest.raises(Rollback):
        send_then_fail()

    # Then there is no message, and nothing is delivered
    assert not QueuedMessage.objects.exists()
    assert nothing_within(consumer, 0.5)


def test_message_sent_in_a_transaction_is_delivered_only_after_commit(kit: Kit) -> None:
    # Given a consumer that is already looking at the queue
    broker = kit.broker()
    consumer = kit.consume(broker, timeout=100)
    assert next(consumer) is None

    # When a message is sent in a transaction, the consumer sees nothing until it commits
    with transaction.atomic():
        sent = broker.enqueue(kit.message(1))
        assert nothing_within(consumer, 0.3)

    # Then it gets the message after the commit
    [message] = take(consumer, 1)
    assert message.message_id == sent.message_id


def test_is_transactional_only_for_the_database_broker_on_its_database(kit: Kit) -> None:
    broker = kit.broker()
    assert is_transactional(broker, "default")
    assert not is_transactional(broker, "other")
    redis = RedisBroker(url="redis://127.0.0.1:6379/0")  # type: ignore[no-untyped-call]
    assert not is_transactional(redis, "default")


def test_consumer_holds_at_most_prefetch_messages(kit: Kit) -> None:
    # Given five messages and a consumer with a prefetch of two
    broker = kit.broker()
    for n in range(5):
        broker.enqueue(kit.message(n))
    consumer = kit.consume(broker, prefetch=2, timeout=100)

    # When it has delivered two messages, it takes no more until one is acknowledged
    first, _second = take(consumer, 2)
    assert next(consumer) is None
    assert _states(kit) == {"ready": 3, "taken": 2}
    consumer.ack(first)
    take(consumer, 1)
    assert _states(kit) == {"ready": 2, "taken": 2}


def test_requeued_messages_are_delivered_again_at_once(kit: Kit) -> None:
    # Given two messages taken by a consumer
    broker = kit.broker()
    for n in range(2):
        broker.enqueue(kit.message(n))
    consumer = kit.consume(broker, prefetch=2)
    messages = take(consumer, 2)

    # When it puts them back (as a worker does for messages it never started)
    consumer.requeue(messages)

    # Then another worker gets them at once, well before any visibility timeout
    other = kit.consume(kit.broker(), prefetch=2)
    again = take(other, 2, timeout=5)
    assert sorted(m.message_id for m in again) == sorted(m.message_id for m in messages)
    assert set(QueuedMessage.objects.values_list("delivery_count", flat=True)) == {2}


def test_closing_a_consumer_puts_back_what_it_took_but_did_not_hand_out(kit: Kit) -> None:
    # Given a consumer that took five messages at once and handed out one
    broker = kit.broker()
    for n in range(5):
        broker.enqueue(kit.message(n))
    consumer = kit.consume(broker, prefetch=5)
    take(consumer, 1)
    assert _states(kit) == {"taken": 5}

    # When it is closed
    consumer.close()

    # Then the four others are ready again; the one handed out stays with its worker
    assert _states(kit) == {"ready": 4, "taken": 1}


def test_a_live_worker_keeps_its_messages_past_the_visibility_timeout(kit: Kit) -> None:
    # Given a message held by a consumer whose worker lives (it keeps iterating)
    holder = kit.broker(visibility_timeout=900)
    holder.enqueue(kit.message(1))
    consumer = kit.consume(holder, timeout=50)
    [held] = take(consumer, 1)

    # When three visibility timeouts pass, another worker gets nothing
    other = kit.consume(kit.broker(visibility_timeout=900), timeout=50)
    deadline = time.monotonic() + 2.7
    while time.monotonic() < deadline:
        assert next(consumer) is None  # heartbeats
        assert next(other) is None

    # Then once the holder stops, the other gets it after the timeout
    [again] = take(other, 1, timeout=10)
    assert again.message_id == held.message_id


def test_stopping_a_worker_puts_back_the_messages_it_had_not_started(kit: Kit) -> None:
    # Given a one-thread worker busy with the first of five messages, holding a second one
    broker = kit.broker()
    started, release = threading.Event(), threading.Event()

    def block(n: int) -> None:
        started.set()
        release.wait(10)

    actor = dramatiq.actor(actor_name="tests.brokers.block", queue_name=kit.queue, broker=broker)(block)
    for n in range(5):
        actor.send(n)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    assert started.wait(10)
    wait_for(lambda: _states(kit) == {"ready": 3, "taken": 2}, timeout=10)  # prefetch: 2 per thread

    # When it is stopped while the first message is still running
    threading.Timer(0.3, release.set).start()
    worker.stop()

    # Then the first is acknowledged and every other one is ready again for the next worker
    assert _states(kit) == {"ready": 4}
    assert not QueuedMessage.objects.filter(delivery_count__gt=1, state="taken").exists()


def test_a_late_acknowledgement_cannot_settle_a_later_delivery(kit: Kit) -> None:
    # Given a message redelivered to a second worker after the first one's hold ran out
    first_broker = kit.broker(visibility_timeout=300)
    first_broker.enqueue(kit.message(1))
    first = kit.consume(first_broker)
    [stale] = take(first, 1)
    second = kit.consume(kit.broker(visibility_timeout=300))
    [current] = take(second, 1, timeout=10)

    # When the first worker acknowledges (or rejects) its stale delivery
    first.nack(stale)
    first.ack(stale)

    # Then the second delivery is untouched, and its own acknowledgement deletes it
    assert _states(kit) == {"taken": 1}
    second.ack(current)
    assert not QueuedMessage.objects.exists()


def test_undecodable_message_is_dead_lettered(kit: Kit) -> None:
    broker = kit.broker()
    broker.enqueue(kit.message(1))
    QueuedMessage.objects.update(body=b"\x00not a message")
    consumer = kit.consume(broker)
    assert nothing_within(consumer, 0.3)
    assert _states(kit) == {"dead": 1}


def test_join_waits_for_acknowledgement_and_times_out(kit: Kit) -> None:
    broker = kit.broker()
    broker.enqueue(kit.message(1))
    consumer = kit.consume(broker)
    [message] = take(consumer, 1)
    with pytest.raises(QueueJoinTimeout):
        broker.join(kit.queue, timeout=200)
    consumer.ack(message)
    broker.join(kit.queue, timeout=1000)


def test_flush_deletes_every_message_of_the_queue_dead_ones_included(kit: Kit) -> None:
    broker = kit.broker()
    broker.declare_queue("other")
    for n in range(3):
        broker.enqueue(kit.message(n))
    broker.enqueue(dramatiq.Message(queue_name="other", actor_name="a", args=(), kwargs={}, options={}))
    consumer = kit.consume(broker)
    [message] = take(consumer, 1)
    consumer.nack(message)

    broker.flush(kit.queue)
    assert list(QueuedMessage.objects.values_list("queue_name", flat=True)) == ["other"]
    broker.flush_all()
    assert not QueuedMessage.objects.exists()


class _Declarations(Middleware):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def before_declare_queue(self, broker: dramatiq.Broker, queue_name: str) -> None:
        self.seen.append(("before", queue_name))

    def after_declare_queue(self, broker: dramatiq.Broker, queue_name: str) -> None:
        self.seen.append(("after", queue_name))

    def after_declare_delay_queue(self, broker: dramatiq.Broker, queue_name: str) -> None:
        self.seen.append(("delay", queue_name))


def test_queues_are_declared_once_with_signals_and_without_delay_queues(kit: Kit) -> None:
    broker = kit.broker()
    spy = _Declarations()
    broker.add_middleware(spy)
    broker.declare_queue("fresh")
    broker.declare_queue("fresh")
    broker.declare_queue("fresh.DQ")
    assert spy.seen == [("after", kit.queue), ("before", "fresh"), ("after", "fresh")]
    assert broker.get_declared_queues() == {kit.queue, "fresh"}
    assert broker.get_declared_delay_queues() == set()
    with pytest.raises(QueueNotFound):
        broker.consume("never-declared")


def test_message_for_a_delay_queue_waits_in_its_own_queue(kit: Kit) -> None:
    broker = kit.broker()
    eta = int(time.time() * 1000) + 400
    message = kit.message(1).copy(queue_name=f"{kit.queue}.DQ", options={"eta": eta})
    stored = broker.enqueue(message)
    assert stored.queue_name == kit.queue
    consumer = kit.consume(broker, timeout=100)
    [delivered] = take(consumer, 1)
    assert time.time() * 1000 >= eta - 1
    assert delivered.queue_name == kit.queue
    assert "eta" not in delivered.options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"database": "nope"}, "no such alias"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"visibility_timeout": -5}, "visibility_timeout"),
        ({"visibility_timeout": True}, "visibility_timeout"),
        ({"channel": "x" * 64}, "channel"),
    ],
)
def test_bad_options_are_configuration_errors(kit: Kit, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        DatabaseBroker(**options)


def test_idle_consumer_wakes_up_on_notify_well_before_its_poll_interval(kit: Kit) -> None:
    if not is_postgresql():
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    # Given a consumer that polls only every 5 s and waits up to 10 s per call
    consumer_broker = kit.broker(poll_interval=5000)
    producer = kit.broker()
    assert isinstance(consumer_broker, DatabaseBroker)
    assert consumer_broker.uses_notify
    consumer = kit.consume(consumer_broker, timeout=10_000)
    latencies: list[float] = []
    received = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            message = next(consumer)
            if message is not None:
                latencies.append(time.monotonic() - message.args[0])
                consumer.ack(message)
                received.set()

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        # the consumer listens (its LISTEN is the last statement of its own connection)
        wait_for(_listening, timeout=10)
        # When messages are sent one at a time to the idle consumer
        for _ in range(5):
            time.sleep(0.2)  # let it go idle: waiting on LISTEN, next poll seconds away
            received.clear()
            producer.enqueue(kit.message().copy(args=(time.monotonic(),)))
            assert received.wait(4), "not delivered before the poll interval"
    finally:
        stop.set()
        producer.enqueue(kit.message().copy(args=(time.monotonic(),)))  # wake it to stop
        thread.join(15)

    # Then each one was delivered in milliseconds, not at the next poll
    print(f"NOTIFY latency: {_summary(latencies)}")
    assert max(latencies[:5]) < 1.0


def _listening() -> bool:
    """a consumer's connection is listening"""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def test_polling_consumer_gets_messages_of_another_process_within_its_poll_interval(kit: Kit) -> None:
    # Given a consumer without notifications, polling every 100 ms, and a producer elsewhere
    consumer_broker = kit.broker(notify=False, poll_interval=100)
    producer = kit.broker()
    consumer = kit.consume(consumer_broker, timeout=5000)
    latencies = []

    # When messages are sent one at a time
    for _ in range(5):
        sent_at = time.monotonic()
        producer.enqueue(kit.message())
        [message] = take(consumer, 1, timeout=5)
        latencies.append(time.monotonic() - sent_at)
        consumer.ack(message)

    # Then each arrives within about one poll interval
    print(f"polling latency: {_summary(latencies)}")
    assert max(latencies) < 1.0


def _summary(latencies: list[float]) -> str:
    return f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"


def test_consumer_reports_a_lost_connection_and_then_reconnects(kit: Kit) -> None:
    if not is_postgresql():
        pytest.skip("needs a server to drop the connections")
    # Given a consumer connected and listening
    broker = kit.broker()
    consumer = kit.consume(broker, timeout=100)
    assert next(consumer) is None
    wait_for(_listening, timeout=10)

    # When the server drops its connections
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    broker.enqueue(kit.message(5))

    # Then it raises Dramatiq's connection error (the worker restarts the consumer on it)...
    with pytest.raises(ConnectionClosed):
        take(consumer, 1)
    # ...and then connects again and delivers the message
    [message] = take(consumer, 1)
    assert message.args == (5,)


def test_enqueue_many_writes_every_message_in_one_statement_with_hooks_for_each(kit: Kit) -> None:
    # Given a broker with a middleware that counts enqueues
    class Count(Middleware):
        def __init__(self) -> None:
            self.before: list[str] = []
            self.after: list[str] = []

        def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
            self.before.append(message.message_id)

        def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
            self.after.append(message.message_id)

    broker = kit.broker()
    counter = Count()
    broker.add_middleware(counter)
    assert isinstance(broker, DatabaseBroker)
    messages = [kit.message(n) for n in range(5)]

    # When five messages are enqueued at once, delayed
    with CaptureQueriesContext(connection) as queries:
        stored = broker.enqueue_many(messages, delay=60_000)

    # Then one statement wrote them all, each hook saw each message, and each waits for its delay
    assert len(queries) == 1
    assert counter.before == counter.after == [m.message_id for m in messages]
    rows = list(QueuedMessage.objects.in_queue(kit.queue).order_by("id"))
    assert [row.message_id for row in rows] == [m.message_id for m in stored]
    assert all(row.available_at > row.created_at + dt.timedelta(seconds=59) for row in rows)
    assert [dramatiq.Message.decode(bytes(row.body)).args for row in rows] == [m.args for m in messages]


@pytest.mark.parametrize("eta", [float("inf"), 1e300, 10**400])
def test_an_infinite_or_enormous_eta_waits_ten_years_instead_of_failing(kit: Kit, eta: Any) -> None:
    # Given a message whose eta is not a date
    broker = kit.broker()

    # When it is enqueued, then it is stored, due in ten years, and not delivered now
    broker.enqueue(kit.message(1).copy(options={"eta": eta}))
    row = QueuedMessage.objects.in_queue(kit.queue).get()
    in_ten_years = row.created_at + dt.timedelta(days=3650)
    assert abs(row.available_at - in_ten_years) < dt.timedelta(minutes=1)
    assert nothing_within(kit.consume(broker), 0.2)
