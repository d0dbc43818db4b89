"""Brokers of every kind for the behavioural suite: the database broker, Redis and RabbitMQ.

The database broker uses the test session's database (SQLite or PostgreSQL,
from ``DATABASE_URL``); Redis and RabbitMQ are the real servers of
``tests/settings.py``. Every test gets a queue of its own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from django.conf import settings
from django.db import connection
from django_dramatiq.middleware import DbConnectionsMiddleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Retries, TimeLimit

from django_events.broker import DatabaseBroker
from django_events.models import QueuedMessage

KINDS = ["database", "redis", "rabbitmq"]

#: The database broker's visibility timeout in the tests that let a consumer die, in milliseconds.
SHORT_VISIBILITY_TIMEOUT = 1000


def middleware() -> list[dramatiq.Middleware]:
    # DbConnectionsMiddleware: worker threads that send (Retries) close their Django connections.
    return [AgeLimit(), TimeLimit(interval=100), Callbacks(), Retries(), DbConnectionsMiddleware()]


def new_broker(kind: str, **options: Any) -> dramatiq.Broker:
    """A broker of ``kind``: each one stands for a worker process of its own."""
    if kind == "database":
        return DatabaseBroker(middleware=middleware(), **options)
    if kind == "redis":
        return RedisBroker(  # type: ignore[no-untyped-call]
            url=settings.REDIS_URL, namespace=settings.REDIS_NAMESPACE, middleware=middleware(), **options
        )
    if kind == "rabbitmq":
        return RabbitmqBroker(url=settings.RABBITMQ_URL, middleware=middleware(), **options)
    raise ValueError(kind)  # pragma: no cover


def is_postgresql() -> bool:
    return connection.vendor == "postgresql"


class Kit:
    """Brokers of one kind on one queue, and what differs between kinds, for one test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.queue = f"brokers_{kind}_{uuid.uuid4().hex[:10]}"
        self.brokers: list[dramatiq.Broker] = []
        self.consumers: list[dramatiq.Consumer] = []

    def broker(self, **options: Any) -> dramatiq.Broker:
        """A new broker (a worker process of its own) with the test's queue declared."""
        broker = new_broker(self.kind, **options)
        broker.declare_queue(self.queue)
        self.brokers.append(broker)
        return broker

    def consume(self, broker: dramatiq.Broker, *, prefetch: int = 1, timeout: int = 100) -> dramatiq.Consumer:
        """A consumer of the test's queue, closed after the test."""
        consumer = broker.consume(self.queue, prefetch=prefetch, timeout=timeout)
        self.consumers.append(consumer)
        return consumer

    def quick_redelivery_broker(self) -> dramatiq.Broker:
        """A broker that redelivers the messages of a dead consumer within a couple of seconds."""
        if self.kind == "database":
            return self.broker(visibility_timeout=SHORT_VISIBILITY_TIMEOUT)
        if self.kind == "redis":
            # Every command runs the maintenance that requeues the messages of silent brokers.
            return self.broker(heartbeat_timeout=1000, maintenance_chance=MAINTENANCE_SCALE)
        return self.broker()  # RabbitMQ requeues a closed connection's unacknowledged messages

    def message(self, n: int = 0, actor_name: str = "tests.brokers.echo") -> dramatiq.Message[Any]:
        return dramatiq.Message(
            queue_name=self.queue, actor_name=actor_name, args=(n,), kwargs={}, options={}
        )

    def kill(self, consumer: dramatiq.Consumer) -> None:
        """Make ``consumer`` vanish as if its process were killed: no ack, no requeue."""
        if self.kind == "rabbitmq":
            # A killed process's TCP connection closes; closing it here is what the server sees.
            consumer.connection.close()  # type: ignore[attr-defined]
        # The database and Redis consumers simply stop: no more heartbeats.

    def dead_letters(self, broker: dramatiq.Broker) -> int:
        """How many messages of the queue are dead-lettered."""
        if self.kind == "database":
            return QueuedMessage.objects.in_queue(self.queue).dead().count()
        if self.kind == "redis":
            assert isinstance(broker, RedisBroker)
            return int(broker.client.zcard(f"{settings.REDIS_NAMESPACE}:{self.queue}.XQ"))
        assert isinstance(broker, RabbitmqBroker)
        return broker.get_queue_message_counts(self.queue)[2]

    def close(self) -> None:
        for consumer in self.consumers:
            with contextlib.suppress(Exception):  # a killed one may fail to close
                consumer.close()
        for broker in self.brokers:
            try:
                broker.flush(self.queue)
            finally:
                broker.close()
        if self.kind == "rabbitmq":
            import pika  # type: ignore[import-untyped]

            conn = pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL))
            try:
                channel = conn.channel()
                for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
                    channel.queue_delete(name)
            finally:
                conn.close()


def take(consumer: dramatiq.Consumer, count: int, *, timeout: float = 10.0) -> list[dramatiq.MessageProxy]:
    """The next ``count`` messages of ``consumer``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    messages: list[dramatiq.MessageProxy] = []
    while len(messages) < count:
        if time.monotonic() >= deadline:
            raise AssertionError(f"got {len(messages)} of {count} messages within {timeout}s")
        message = next(consumer)
        if message is not None:
            messages.append(message)
    return messages


def nothing_within(consumer: dramatiq.Consumer, seconds: float) -> bool:
    """Whether ``consumer`` delivers nothing for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if next(consumer) is not None:
            return False
    return True


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    value = function()
    return value, time.monotonic() - start
