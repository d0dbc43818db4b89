"""The Dramatiq middleware django-events installs on the broker by itself."""

from __future__ import annotations

from typing import Any

import dramatiq
from django.db import close_old_connections, connections
from dramatiq.middleware import Middleware

from .recovery import RecoveryLoop

__all__ = ["EventsMiddleware"]


class EventsMiddleware(Middleware):
    """Runs the recovery loop in each worker, and keeps worker database connections healthy.

    Django closes stale connections around each request; a worker thread has
    no requests, so this does the same around each message, and closes every
    connection when the worker stops. Each worker process also runs the
    recovery loop (``recovery.RecoveryLoop``) from boot to shutdown.
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
        close_old_connections()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        close_old_connections()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        close_old_connections()

    def before_worker_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        connections.close_all()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        connections.close_all()
