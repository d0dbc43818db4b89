"""Settings with an app whose events.py raises on import: startup must fail loudly."""

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.broken_app"]  # noqa: F405
