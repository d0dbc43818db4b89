"""Shared fixtures: real Dramatiq workers on real brokers, and waiting on conditions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from django.conf import settings
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Retries, TimeLimit

from django_events import ledger
from django_events.apps import install_broker_middleware
from django_events.conf import get_settings
from django_events.testing import reset_clock


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate.__doc__ or predicate}")
        time.sleep(interval)


def _middleware() -> list[dramatiq.Middleware]:
    return [AgeLimit(), TimeLimit(interval=100), Callbacks(), Retries()]


def make_broker(kind: str) -> dramatiq.Broker:
    """A fresh broker of ``kind`` ("redis" or "rabbitmq") with django-events installed on it."""
    if kind == "redis":
        broker: dramatiq.Broker = RedisBroker(
            url=settings.REDIS_URL, namespace=settings.REDIS_NAMESPACE, middleware=_middleware()
        )
    elif kind == "rabbitmq":
        broker = RabbitmqBroker(url=settings.RABBITMQ_URL, middleware=_middleware())
    else:  # pragma: no cover
        raise ValueError(kind)
    install_broker_middleware(broker)
    broker.flush_all()
    return broker


def as_global_broker(broker: dramatiq.Broker) -> Iterator[dramatiq.Broker]:
    """Make ``broker`` the global one while the caller's fixture is active; flush and close it after."""
    previous = dramatiq.get_broker()
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        broker.flush_all()
        broker.close()
        dramatiq.set_broker(previous)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[dramatiq.Broker]:
    """A real broker, made the global one for the duration of the test."""
    yield from as_global_broker(make_broker(request.param))


@pytest.fixture
def worker(broker: dramatiq.Broker, transactional_db: None) -> Iterator[dramatiq.Worker]:
    """A Dramatiq worker with two threads consuming the broker, stopped after the test."""
    broker.emit_after("process_boot")  # as the dramatiq CLI does: starts the TimeLimit watcher
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(params=["fast", "portable"])
def ledger_form(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test runs twice: with the ledger's vendor statements ("fast") and with its portable ORM forms.

    Every CI database runs the vendor statements by default, so without this the portable
    form (the one for other databases) would never run in CI.
    """
    with ledger.fast_statements(request.param == "fast"):
        yield request.param


@pytest.fixture(autouse=True)
def _wall_clock() -> Iterator[None]:
    """Every test starts and ends on the wall clock, whatever ``django_events.testing.advance`` did."""
    reset_clock()
    yield
    reset_clock()


@pytest.fixture
def queue_name() -> str:
    return get_settings().QUEUE_NAME


@pytest.fixture(scope="session", autouse=True)
def _drop_rabbitmq_queues_of_local_sessions() -> Iterator[None]:
    """A session outside tox has queue names of its own (per pid): delete them from RabbitMQ after it."""
    yield
    if not settings.DJANGO_EVENTS_TEST_SUFFIX.startswith("local_"):
        return  # a tox env reuses its queue names from run to run
    import pika

    queue = get_settings().QUEUE_NAME
    connection = pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL))
    try:
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
    finally:
        connection.close()
