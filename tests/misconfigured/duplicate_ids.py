"""Settings with an app registering a function id the test app already uses."""

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.duplicate_app"]  # noqa: F405
