"""The test settings with the database broker: for the ``rundramatiq`` processes of ``test_processes.py``."""

from __future__ import annotations

from tests.settings import *  # noqa: F403
from tests.settings import DRAMATIQ_BROKER as _BASE_BROKER

DRAMATIQ_BROKER = {
    "BROKER": "django_events.broker.DatabaseBroker",
    "OPTIONS": {"database": "default"},
    "MIDDLEWARE": [*_BASE_BROKER["MIDDLEWARE"], "tests.brokers.delivery_log.DeliveryLog"],
}
