"""Settings for the example project, read from the environment with django-environ.

Every variable is optional; the defaults run the demo on one machine with
nothing but an SQLite file (the queues are a table in it too):

- ``DATABASE_URL``: default ``sqlite:///<repo>/var/example.sqlite3``.
- ``DRAMATIQ_BROKER_URL``: ``redis://...`` or ``amqp://...`` to use Redis or RabbitMQ; unset or
  empty (the default), run messages are queued in the database by
  ``django_events.broker.DatabaseBroker``.
- ``DJANGO_EVENTS_QUEUE``: the Dramatiq queue for run messages; default ``django_events``.
- ``SECRET_KEY``: default an insecure development key. Set it anywhere but your laptop.
- ``DEBUG``: default ``True``.
- ``ALLOWED_HOSTS``: comma-separated; default ``127.0.0.1,localhost,[::1]``.
- ``EMAIL_FILE_PATH``: where e-mails are written as files; default ``<repo>/var/mail/``.
- ``ONBOARDING_REMINDER_AFTER``: seconds a new user has to connect a first source before the
  onboarding flow sends a reminder; default 86400 (a day). The demo's worker gets 3.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import django
import environ
from django.core.exceptions import ImproperlyConfigured

#: The repository root (where ``manage.py`` lives).
BASE_DIR = Path(__file__).resolve().parent.parent
#: Local state of the example: the SQLite database and the e-mails (``/var/`` is gitignored).
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

# Insecure on purpose, for local development only: set SECRET_KEY in any real deployment.
SECRET_KEY = env.str("SECRET_KEY", default="django-insecure-example-project-dev-only-do-not-deploy")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_dramatiq",  # must come before django_events
    "django_events",
    "example_project.sources",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

# Database ----------------------------------------------------------------------------------------

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'example.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker processes share the file: wait for locks instead of
    # failing, take the write lock when a transaction starts, and let readers run alongside.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        timeout=30,
        transaction_mode="IMMEDIATE",
        init_command="PRAGMA journal_mode=WAL;",
    )
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        # A relative path is relative to the repository, whatever the current directory.
        _sqlite_path = BASE_DIR / DATABASES["default"]["NAME"]
        _sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        DATABASES["default"]["NAME"] = str(_sqlite_path)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Dramatiq and django-events -----------------------------------------------------------------------

#: Where the web process sends run messages and the workers take them: Redis or RabbitMQ
#: when set, else the database itself (no service to run).
DRAMATIQ_BROKER_URL = env.str("DRAMATIQ_BROKER_URL", default="")

_BROKERS = {
    "redis": "dramatiq.brokers.redis.RedisBroker",
    "rediss": "dramatiq.brokers.redis.RedisBroker",
    "amqp": "dramatiq.brokers.rabbitmq.RabbitmqBroker",
    "amqps": "dramatiq.brokers.rabbitmq.RabbitmqBroker",
}
_scheme = urlsplit(DRAMATIQ_BROKER_URL).scheme.lower()
if DRAMATIQ_BROKER_URL and _scheme not in _BROKERS:
    raise ImproperlyConfigured(
        f"DRAMATIQ_BROKER_URL must start with redis://, rediss://, amqp:// or amqps://, "
        f"not {_scheme + '://' if _scheme else repr(DRAMATIQ_BROKER_URL)}; for example "
        "redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672/%2F. Leave it unset to "
        "queue messages in the database."
    )

DRAMATIQ_BROKER = {
    "BROKER": _BROKERS[_scheme] if DRAMATIQ_BROKER_URL else "django_events.broker.DatabaseBroker",
    "OPTIONS": {"url": DRAMATIQ_BROKER_URL} if DRAMATIQ_BROKER_URL else {"database": "default"},
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
    ],
}

DJANGO_EVENTS = {
    "QUEUE_NAME": env.str("DJANGO_EVENTS_QUEUE", default="django_events"),
    # Short delays, so that the demo's retries happen while you watch.
    "RETRY_BACKOFF_MIN": 1,
    "RETRY_BACKOFF_MAX": 4,
}

#: Seconds the onboarding flow (``sources.onboarding``) waits for a new user's first source before
#: it sends a reminder e-mail.
ONBOARDING_REMINDER_AFTER = env.float("ONBOARDING_REMINDER_AFTER", default=24 * 60 * 60)

# E-mail: written as files, one per message, so you can read what was "sent" --------------------

# A relative path is relative to the repository; the directory is created on the first e-mail.
MAIL_DIR = str(BASE_DIR / env.str("EMAIL_FILE_PATH", default=str(VAR_DIR / "mail")))
_FILE_MAIL = "django.core.mail.backends.filebased.EmailBackend"
if django.VERSION >= (6, 1):  # MAILERS replaces EMAIL_BACKEND and EMAIL_FILE_PATH (deprecated)
    MAILERS = {"default": {"BACKEND": _FILE_MAIL, "OPTIONS": {"file_path": MAIL_DIR}}}
else:
    EMAIL_BACKEND = _FILE_MAIL
    EMAIL_FILE_PATH = MAIL_DIR
DEFAULT_FROM_EMAIL = "Example Sources <hello@example.com>"

# Internationalisation and static files -----------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

# Logging: what the functions and django-events do, on stderr --------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        # Not propagated: the dramatiq command line configures the root logger too.
        "django_events": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "example_project": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
