"""Django settings of the benchmark suite (``benchmarks/suite.py``), read from the environment.

- ``BENCH_DATABASE_URL``: the database; PostgreSQL by default.
- ``BENCH_BROKER``: ``redis``, ``rabbitmq`` or ``database`` (``DatabaseBroker`` on that database).
- ``BENCH_QUEUE``: the Dramatiq queue of the run (django-events' runs and the plain actors alike).
- ``BENCH_OUT_DIR``: where worker processes write their figures (``benchapp/probe.py``).

Everything else is the defaults a user gets: django-events' settings are untouched
(recovery included) but for the queue name.
"""

from __future__ import annotations

import environ

env = environ.Env()

SECRET_KEY = "benchmarks-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_dramatiq",
    "django_events",
    "benchmarks.benchapp",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": env.db(
        "BENCH_DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/django_events_bench_run"
    )
}
# Django's default (0: a connection per request, or per message in a worker) unless set.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("BENCH_CONN_MAX_AGE", default=0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # As the example project: shared by the driver and the worker processes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        timeout=30, transaction_mode="IMMEDIATE", init_command="PRAGMA journal_mode=WAL;"
    )

BROKER = env.str("BENCH_BROKER", default="redis")
QUEUE = env.str("BENCH_QUEUE", default="bench")
_MIDDLEWARE = [
    "dramatiq.middleware.AgeLimit",
    "dramatiq.middleware.TimeLimit",
    "dramatiq.middleware.Callbacks",
    "dramatiq.middleware.Retries",
    "benchmarks.benchapp.probe.Stopwatch",
]
_BROKERS = {
    "redis": (
        "dramatiq.brokers.redis.RedisBroker",
        {
            "url": env.str("BENCH_REDIS_URL", default="redis://127.0.0.1:6379/0"),
            "namespace": "django-events-bench",
        },
    ),
    "rabbitmq": (
        "dramatiq.brokers.rabbitmq.RabbitmqBroker",
        {"url": env.str("BENCH_RABBITMQ_URL", default="amqp://guest:guest@127.0.0.1:5672/%2F")},
    ),
    "database": ("django_events.broker.DatabaseBroker", {"database": "default"}),
}
DRAMATIQ_BROKER = {"BROKER": _BROKERS[BROKER][0], "OPTIONS": _BROKERS[BROKER][1], "MIDDLEWARE": _MIDDLEWARE}

DJANGO_EVENTS = {"QUEUE_NAME": QUEUE}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_events": {"handlers": ["console"], "level": "WARNING"}},
}
