"""Fixtures of the broker suite: each test runs on the database broker, Redis and RabbitMQ in turn."""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import pytest

from django_events.apps import install_broker_middleware
from tests.conftest import as_global_broker

from .kit import KINDS, Kit, new_broker


@pytest.fixture(params=KINDS)
def kit(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[Kit]:
    """Brokers of each kind in turn, on a queue of the test's own."""
    kit = Kit(request.param)
    try:
        yield kit
    finally:
        kit.close()


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[dramatiq.Broker]:
    """Overrides ``tests/conftest.py``'s: a broker of each kind, the database one included,
    with django-events installed, made the global broker for the test (for its ``worker`` fixture).
    """
    broker = new_broker(request.param)
    install_broker_middleware(broker)
    broker.flush_all()
    yield from as_global_broker(broker)
