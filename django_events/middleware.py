"""The Dramatiq middleware django-events installs on the broker by itself."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from django.db import connections
from dramatiq.middleware import Middleware

from .conf import get_settings
from .recovery import RecoveryLoop

__all__ = ["EventsMiddleware", "release_connections"]


class EventsMiddleware(Middleware):
    """Runs the recovery loop in each worker, and keeps worker database connections healthy.

    Django closes stale connections around each request; a worker thread has
    no requests, so this does the same around each message (see
    :func:`release_connections`), and closes every connection when the worker
    stops. Each worker process also runs the recovery loop
    (``recovery.RecoveryLoop``) from boot to shutdown.
    """

    def __init__(self) -> None:
        self._loops: dict[int, RecoveryLoop] = {}

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        loop = RecoveryLoop()
        self._loops[id(worker)] = loop
        loop.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        loop = self._loops.pop(id(worker), None)
        if loop is not None:
            loop.stop()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        release_connections()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        release_connections()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        release_connections()

    def before_worker_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        connections.close_all()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        connections.close_all()


def release_connections() -> None:
    """Between two messages: keep this thread's healthy connections, close the others.

    A connection is closed if it failed and is no longer usable, if it was left
    outside autocommit (a function that opened a transaction and never closed it),
    or once it is older than ``DJANGO_EVENTS["WORKER_CONN_MAX_AGE"]`` seconds; this
    is Django's own check (``close_if_unusable_or_obsolete``) with the worker's
    maximum age instead of ``CONN_MAX_AGE``, whose default of 0 would open a new
    connection for every message. With ``WORKER_CONN_MAX_AGE = None``,
    ``CONN_MAX_AGE`` applies as in a request.
    """
    max_age = get_settings().WORKER_CONN_MAX_AGE
    for conn in connections.all(initialized_only=True):
        if (
            max_age is not None
            and conn.connection is not None
            and getattr(conn, "_events_aged", None) is not conn.connection
        ):
            # A connection this thread opened since the last look: give it the worker's age.
            conn.close_at = time.monotonic() + max_age
            conn._events_aged = conn.connection  # type: ignore[attr-defined]
        conn.close_if_unusable_or_obsolete()
