"""Settings without django_dramatiq: startup must fail with a clear message."""

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_dramatiq"]  # noqa: F405
