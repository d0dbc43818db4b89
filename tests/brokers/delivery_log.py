"""A worker middleware that writes down every delivery, so that tests can look for overlaps."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

#: The environment variable naming the file to append to; without it the middleware does nothing.
LOG_ENV = "DJANGO_EVENTS_TEST_DELIVERY_LOG"


class DeliveryLog(Middleware):
    """Appends one JSON line per processed message: its id, args, the process, start and end (wall clock)."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self._started[id(message)] = time.time()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        self._write(message)

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self._write(message)

    def _write(self, message: dramatiq.MessageProxy) -> None:
        path = os.environ.get(LOG_ENV)
        start = self._started.pop(id(message), None)
        if not path:
            return
        line = json.dumps(
            {
                "message_id": message.message_id,
                "args": list(message.args),
                "pid": os.getpid(),
                "start": start,
                "end": time.time(),
            }
        )
        with self._lock, open(path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


def read(path: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """The deliveries written to ``path``."""
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]
