"""Plain Dramatiq's side of the benchmarks: actors called directly, on the same queue and broker."""

from __future__ import annotations

import dramatiq
from django.conf import settings

from .probe import started

QUEUE = settings.DJANGO_EVENTS["QUEUE_NAME"]


@dramatiq.actor(queue_name=QUEUE, max_retries=0, actor_name="bench.plain_noop")
def plain_noop(i: int) -> None:
    """Does nothing."""


@dramatiq.actor(queue_name=QUEUE, max_retries=0, actor_name="bench.plain_latency")
def plain_latency(i: int) -> None:
    """Notes when it started, for the latency benchmark."""
    started(i)


@dramatiq.actor(queue_name=QUEUE, max_retries=0, actor_name="bench.plain_history")
def plain_history(run_id: str) -> None:
    """The drain's floor: only the statements of a run's history (``floor.run_history``)."""
    from .floor import run_history

    run_history(run_id)
