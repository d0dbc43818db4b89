"""Settings listing django_events before django_dramatiq: startup must fail with a clear message."""

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_dramatiq"]  # noqa: F405
INSTALLED_APPS.insert(INSTALLED_APPS.index("django_events") + 1, "django_dramatiq")
