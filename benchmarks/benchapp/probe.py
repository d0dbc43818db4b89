"""What worker processes remember for the benchmark driver, and how they hand it over.

``Stopwatch`` is a Dramatiq middleware (installed by ``bench_settings``) that, in each
worker process, counts processed messages per actor with the wall-clock times of the
first start and the last end, and keeps the start times that the latency functions
report with :func:`started`. A thread writes all of it to ``$BENCH_OUT_DIR/worker-<pid>.json``
every ``WRITE_INTERVAL`` seconds when something changed, and once more at shutdown; the
driver reads those files. Nothing here touches the database or the broker.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

#: Seconds between two writes of a worker process's figures.
WRITE_INTERVAL = 0.1

_lock = threading.Lock()
_counts: dict[str, dict[str, float]] = {}
_starts: list[tuple[int, float]] = []
_changes = 0


def started(index: int) -> None:
    """Called first thing by a latency function or actor: job ``index`` started now."""
    global _changes
    now = time.time()
    with _lock:
        _starts.append((index, now))
        _changes += 1


class Stopwatch(Middleware):
    """Counts processed messages per actor and writes the process's figures for the driver."""

    def __init__(self) -> None:
        self._began: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = -1

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._began[message.message_id] = time.time()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        global _changes
        began = self._began.pop(message.message_id, None)
        now = time.time()
        with _lock:
            entry = _counts.setdefault(
                message.actor_name, {"count": 0, "failed": 0, "first": now, "last": now}
            )
            entry["count"] += 1
            entry["failed"] += exception is not None
            if began is not None:
                entry["first"] = min(entry["first"], began)
            entry["last"] = max(entry["last"], now)
            _changes += 1

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._thread = threading.Thread(target=self._write_loop, name="bench-stopwatch", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._write()

    def _write_loop(self) -> None:
        while not self._stop.wait(WRITE_INTERVAL):
            self._write()

    def _write(self) -> None:
        out = os.environ.get("BENCH_OUT_DIR")
        if not out:
            return
        with _lock:
            if _changes == self._written:
                return
            figures = {"pid": os.getpid(), "actors": dict(_counts), "starts": list(_starts)}
            self._written = _changes
        path = Path(out) / f"worker-{os.getpid()}.json"
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(figures))
        partial.replace(path)
