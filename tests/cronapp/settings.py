"""The test settings plus ``tests.cronapp``, for the ``rundramatiq`` processes of the cron tests.

``DJANGO_EVENTS_TEST_BROKER=database`` makes their broker the database broker (default: Redis).
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DRAMATIQ_BROKER as _BASE_BROKER
from tests.settings import INSTALLED_APPS as _BASE_APPS

INSTALLED_APPS = [*_BASE_APPS, "tests.cronapp"]

if os.environ.get("DJANGO_EVENTS_TEST_BROKER") == "database":
    DRAMATIQ_BROKER = {
        "BROKER": "django_events.broker.DatabaseBroker",
        "OPTIONS": {"database": "default"},
        "MIDDLEWARE": _BASE_BROKER["MIDDLEWARE"],
    }
