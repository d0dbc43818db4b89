"""Fixtures of the fault-injection tests: a private Redis, worker processes, the test database.

The event counts scale with DJANGO_EVENTS_FAULT_SCALE (see harness.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from django.conf import settings
from django.db import connection
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Retries, TimeLimit

from django_events.apps import install_broker_middleware

from .harness import RedisServer, Workers, worker_env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` the tests here that run real processes (deselect them with ``-m "not e2e"``)."""
    for item in items:
        in_here = Path(str(item.path)).parent == Path(__file__).parent
        if in_here and "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` of this test's own, which the test may stop and start."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_broker(redis_server: RedisServer) -> Iterator[RedisBroker]:
    """The test process's global Dramatiq broker, on the private Redis, for ``send()`` in the test."""
    previous = dramatiq.get_broker()
    broker = RedisBroker(
        url=redis_server.url,
        namespace=settings.REDIS_NAMESPACE,
        middleware=[AgeLimit(), TimeLimit(), Callbacks(), Retries()],
    )
    install_broker_middleware(broker)
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        dramatiq.set_broker(previous)
        broker.close()


@pytest.fixture
def workers(transactional_db: None, redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    """Starts no process by itself: ``workers.start(n)`` runs ``rundramatiq`` on the test database
    and the private Redis. Every one still running is stopped after the test, and the tail of
    their output printed."""
    env = worker_env(
        DJANGO_EVENTS_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]), REDIS_URL=redis_server.url
    )
    fleet = Workers(env, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()
        print(fleet.tail())
