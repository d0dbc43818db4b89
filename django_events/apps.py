"""App config: checks the setup, discovers ``events.py`` and equips the Dramatiq broker."""

from __future__ import annotations

import importlib

import dramatiq
from django.apps import AppConfig, apps
from django.conf import settings
from django.utils.module_loading import autodiscover_modules
from dramatiq.middleware import CurrentMessage

from .exceptions import ConfigurationError

__all__ = ["DjangoEventsConfig"]


class DjangoEventsConfig(AppConfig):
    """Runs at startup in every process: web servers, ``rundramatiq`` workers, tests."""

    name = "django_events"
    verbose_name = "Events"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        check_installed_apps()
        importlib.import_module("django_events.checks")  # registers the system checks
        # Every installed app's events.py: a missing module is skipped, a broken one raises.
        autodiscover_modules("events")
        if uses_task_backend():
            # Registers the function that runs Django tasks, in workers too (which may not
            # import the task modules until a task's run arrives).
            importlib.import_module("django_events.task_backend")
        install_broker_middleware()


def uses_task_backend() -> bool:
    """Whether ``settings.TASKS`` (Django 6.0+) names ``django_events.task_backend.EventsTaskBackend``."""
    backends = getattr(settings, "TASKS", None) or {}
    return isinstance(backends, dict) and any(
        isinstance(params, dict) and params.get("BACKEND") == "django_events.task_backend.EventsTaskBackend"
        for params in backends.values()
    )


def check_installed_apps() -> None:
    """Fail loudly unless django_dramatiq is installed, and listed before django_events."""
    labels = [config.name for config in apps.get_app_configs()]
    if "django_dramatiq" not in labels:
        raise ConfigurationError(
            "django_events runs its functions through Dramatiq: add 'django_dramatiq' to "
            "INSTALLED_APPS, before 'django_events', and set DRAMATIQ_BROKER."
        )
    if labels.index("django_dramatiq") > labels.index("django_events"):
        raise ConfigurationError(
            "'django_dramatiq' must come before 'django_events' in INSTALLED_APPS, so that the "
            "Dramatiq broker is set up before django_events declares its actor on it."
        )


def install_broker_middleware(broker: dramatiq.Broker | None = None) -> None:
    """Declare the run actor on ``broker`` (default: the global one) and add our middleware, once.

    The middleware: ``EventsMiddleware`` (recovery loop, worker connections) and
    Dramatiq's ``CurrentMessage``, from which the actor reads its message's time
    limit. Call it yourself only if you replace the global broker after startup
    (in tests, say).
    """
    # The worker's modules import the models: they load here, once the app registry is ready,
    # not when Django imports this module to find the app config.
    tasks = importlib.import_module("django_events.tasks")
    middleware = importlib.import_module("django_events.middleware")
    broker = broker or dramatiq.get_broker()
    tasks.get_actor(broker)
    for kind in (middleware.EventsMiddleware, CurrentMessage):
        if not any(isinstance(m, kind) for m in broker.middleware):
            broker.add_middleware(kind())
