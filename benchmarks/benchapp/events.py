"""The django-events functions the benchmarks run: no-ops, a fan-out of ten, and a latency probe.

With ``BENCH_FLOW=1`` also the flow-control benchmarks' functions (``flow_events.py``), and
with ``BENCH_STEPS=1`` the durable-step benchmarks' function (``step_events.py``).
"""

from __future__ import annotations

import os

import django_events
from django_events import Context

from .probe import started

FANOUT = 10


@django_events.function("bench/noop", id="bench.noop", retries=0)
def noop(ctx: Context) -> None:
    """Does nothing: the cost measured is django-events' own."""


@django_events.function("bench/latency", id="bench.latency", retries=0)
def latency(ctx: Context) -> None:
    """Notes when it started, for the latency benchmark."""
    started(ctx.event.data["i"])


def _fanout(ctx: Context) -> None:
    """One of the ten functions subscribed to ``bench/fanout``."""


for _n in range(FANOUT):
    django_events.function("bench/fanout", id=f"bench.fanout_{_n}", retries=0)(_fanout)

if os.environ.get("BENCH_FLOW") == "1":
    from . import flow_events  # noqa: F401  (registers the flow-control benchmarks' functions)

if os.environ.get("BENCH_STEPS") == "1":
    from . import step_events  # noqa: F401  (registers the durable-step benchmarks' function)
