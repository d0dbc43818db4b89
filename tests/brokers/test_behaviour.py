"""What Dramatiq expects of a broker, checked the same way on the database broker, Redis and RabbitMQ."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import dramatiq
import pytest

from django_events.broker import DatabaseBroker
from django_events.models import QueuedMessage
from tests.conftest import wait_for

from .kit import SHORT_VISIBILITY_TIMEOUT, Kit, nothing_within, take


def test_enqueued_messages_are_consumed_and_acknowledged_once(kit: Kit) -> None:
    # Given three messages on the queue
    broker = kit.broker()
    sent = [broker.enqueue(kit.message(n)).message_id for n in range(3)]

    # When a consumer takes and acknowledges them
    consumer = kit.consume(broker, prefetch=3)
    messages = take(consumer, 3)
    for message in messages:
        consumer.ack(message)
    consumer.close()

    # Then they were the messages sent, and the queue is empty
    assert sorted(m.message_id for m in messages) == sorted(sent)
    assert sorted(m.args[0] for m in messages) == [0, 1, 2]
    broker.join(kit.queue, timeout=10_000)
    assert nothing_within(kit.consume(broker), 0.5)


def test_delayed_message_runs_after_its_eta_in_a_worker(kit: Kit) -> None:
    # Given a worker running an actor that notes when it runs
    broker = kit.broker()
    ran_at: list[float] = []
    done = threading.Event()

    def note(n: int) -> None:
        ran_at.append(time.monotonic())
        done.set()

    actor = dramatiq.actor(actor_name="tests.brokers.note", queue_name=kit.queue, broker=broker)(note)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        # When a message is sent with a delay of 800 ms
        sent_at = time.monotonic()
        actor.send_with_options(args=(1,), delay=800)

        # Then it runs once, and not before its eta
        assert done.wait(20), "the delayed message never ran"
        broker.join(kit.queue, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
    assert len(ran_at) == 1
    assert ran_at[0] - sent_at >= 0.79  # etas are whole milliseconds


def test_worker_retries_a_failing_actor_then_dead_letters_it(kit: Kit) -> None:
    # Given a worker, an actor that fails once, and one that always fails
    broker = kit.broker()
    calls: Counter[str] = Counter()

    def flaky(n: int) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ValueError("first attempt fails")

    def broken(n: int) -> None:
        calls["broken"] += 1
        raise ValueError("always fails")

    retrying: dict[str, Any] = {"max_retries": 1, "min_backoff": 100, "max_backoff": 100}
    flaky_actor = dramatiq.actor(
        actor_name="tests.brokers.flaky", queue_name=kit.queue, broker=broker, **retrying
    )(flaky)
    broken_actor = dramatiq.actor(
        actor_name="tests.brokers.broken", queue_name=kit.queue, broker=broker, **retrying
    )(broken)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        # When each is sent once
        flaky_actor.send(1)
        broken_actor.send(2)

        # Then Dramatiq's Retries middleware sends each again (a delayed message), and the one
        # that fails again is rejected into the dead letters
        wait_for(lambda: kit.dead_letters(broker) == 1, timeout=20)
        broker.join(kit.queue, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
    assert calls == {"flaky": 2, "broken": 2}


def test_rejected_message_is_dead_lettered(kit: Kit) -> None:
    # Given a message taken by a consumer
    broker = kit.broker()
    broker.enqueue(kit.message(7))
    consumer = kit.consume(broker)
    [message] = take(consumer, 1)

    # When the consumer rejects it
    consumer.nack(message)
    consumer.close()

    # Then it is in the dead letters, and never delivered again
    wait_for(lambda: kit.dead_letters(broker) == 1, timeout=10)
    broker.join(kit.queue, timeout=10_000)
    assert nothing_within(kit.consume(broker), 0.5)
    if kit.kind == "database":
        dead = QueuedMessage.objects.in_queue(kit.queue).dead().get()
        assert dead.message_id == message.message_id


def test_message_of_a_killed_consumer_is_delivered_again(kit: Kit) -> None:
    # Given a message taken, not acknowledged, by a consumer of one worker
    victim = kit.quick_redelivery_broker()
    victim.enqueue(kit.message(42))
    doomed = kit.consume(victim)
    before_take = time.monotonic()
    [lost] = take(doomed, 1)

    # When that worker dies
    kit.kill(doomed)

    # Then a consumer of another worker gets the message
    survivor = kit.quick_redelivery_broker()
    consumer = kit.consume(survivor)
    [again] = take(consumer, 1, timeout=30)
    assert (again.message_id, again.args) == (lost.message_id, (42,))
    if kit.kind == "database":
        # ...and not while the first consumer's hold might still be good
        assert time.monotonic() - before_take >= SHORT_VISIBILITY_TIMEOUT / 1000
    consumer.ack(again)
    consumer.close()
    survivor.join(kit.queue, timeout=10_000)


def test_two_consumers_never_get_the_same_message(kit: Kit) -> None:
    # Given many messages, and two workers' consumers taking them in two threads
    count = 200
    producer = kit.broker()
    for n in range(count):
        producer.enqueue(kit.message(n))
    brokers = [kit.broker(), kit.broker()]
    received: list[tuple[int, Any]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def consume(index: int) -> None:
        try:
            consumer = brokers[index].consume(kit.queue, prefetch=4, timeout=50)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with lock:
                        if len(received) >= count:
                            break
                    message = next(consumer)
                    if message is None:
                        continue
                    with lock:
                        received.append((index, message.args[0]))
                    consumer.ack(message)
            finally:
                consumer.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # When both drain the queue
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)

    # Then every message was received exactly once, by one consumer or the other
    assert not errors, errors
    numbers = Counter(n for _i, n in received)
    assert sorted(numbers) == list(range(count))
    assert max(numbers.values()) == 1
    producer.join(kit.queue, timeout=10_000)


@pytest.mark.parametrize("kit", ["database"], indirect=True)
def test_database_consumer_holds_delayed_message_until_its_eta(kit: Kit) -> None:
    # Given a message delayed by 700 ms
    broker = kit.broker()
    sent_at = time.monotonic()
    sent = broker.enqueue(kit.message(1), delay=700)
    row = QueuedMessage.objects.get()
    assert row.available_at > row.created_at
    assert "eta" in sent.options

    # When a consumer looks for messages: nothing before the eta, the message after it
    consumer = kit.consume(broker, timeout=100)
    assert next(consumer) is None
    [message] = take(consumer, 1)

    assert time.monotonic() - sent_at >= 0.69
    assert isinstance(broker, DatabaseBroker)
    # Delivered without its eta, so that the Worker runs it at once
    assert "eta" not in message.options
    assert message.queue_name == kit.queue
