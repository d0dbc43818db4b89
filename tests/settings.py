"""Settings for the test suite.

The database comes from ``DATABASE_URL`` (default: an SQLite file), the
Dramatiq broker is the real Redis at ``REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) under a namespace and queue of its own per tox
environment, so that environments running side by side never meet.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import django
import environ

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_dramatiq",
    "django_events",
    "tests.testapp",
    "example_project.sources",  # for the README's testing example
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"

# A name of its own per tox environment (or per test session outside tox), so that runs may go
# side by side without sharing a database or a queue; processes the tests start inherit it.
DJANGO_EVENTS_TEST_SUFFIX = _suffix = os.environ.setdefault(
    "DJANGO_EVENTS_TEST_SUFFIX", re.sub(r"\W", "_", os.environ.get("TOX_ENV_NAME") or f"local_{os.getpid()}")
)
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR.parent / 'var' / 'tests.sqlite3'}")
}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: worker threads and processes must see the same database.
    _db.setdefault("TEST", {})["NAME"] = str(BASE_DIR.parent / "var" / f"test_{_suffix}.sqlite3")
    _db.setdefault("OPTIONS", {}).update(
        timeout=30,
        transaction_mode="IMMEDIATE",
        init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    )
    (BASE_DIR.parent / "var").mkdir(exist_ok=True)
else:
    _db.setdefault("TEST", {})["NAME"] = f"test_django_events_{_suffix}"
# Processes started by the tests (rundramatiq) are pointed at the test database with this.
if os.environ.get("DJANGO_EVENTS_TEST_DATABASE_NAME"):
    _db["NAME"] = os.environ["DJANGO_EVENTS_TEST_DATABASE_NAME"]

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
RABBITMQ_URL = env.str("RABBITMQ_URL", default="amqp://guest:guest@127.0.0.1:5672/%2F")
# Per tox environment, so that environments running side by side never share a queue.
REDIS_NAMESPACE = f"django-events-test-{_suffix}"

DRAMATIQ_BROKER = {
    "BROKER": "dramatiq.brokers.redis.RedisBroker",
    "OPTIONS": {"url": REDIS_URL, "namespace": REDIS_NAMESPACE},
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
    ],
}

DJANGO_EVENTS = {
    "RETRY_BACKOFF_MIN": 0.05,
    "RETRY_BACKOFF_MAX": 0.2,
    "QUEUE_NAME": f"django_events_tests_{_suffix}",
}
# Processes started by the fault-injection tests (tests/faults) get short recovery timings with
# this: a JSON object merged into DJANGO_EVENTS, such as {"RECOVERY_INTERVAL": 0.5, "LEASE_MARGIN": 1}.
DJANGO_EVENTS.update(json.loads(os.environ.get("DJANGO_EVENTS_TEST_SETTINGS") or "{}"))

if django.VERSION >= (6, 0):  # django.tasks: tests/unit/test_task_backend.py, tests/testapp/task_functions.py
    TASKS = {
        "default": {
            "BACKEND": "django_events.task_backend.EventsTaskBackend",
            "QUEUES": ["default", "emails"],
        }
    }

if django.VERSION >= (6, 1):  # MAILERS replaces EMAIL_BACKEND (deprecated)
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
else:
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_events": {"handlers": ["console"], "level": env.str("DJANGO_EVENTS_LOG_LEVEL", "WARNING")}
    },
}
