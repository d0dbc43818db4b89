"""The functions of the flow-control benchmarks (``benchmarks/flow.py``): no-ops with and without limits.

Registered only when ``BENCH_FLOW=1`` (``events.py`` imports this module then), so that
the suite (``benchmarks/suite.py``) keeps measuring an app with no flow control at all,
and ``flow.py``'s ``no-flow`` case can set one against the other.
"""

from __future__ import annotations

import django_events
from django_events import Concurrency, Context

#: Event name -> function id of each case's function; ``benchmarks/flow.py`` sends to these names.
UNLIMITED = "bench/flow.unlimited"
LIMIT_16 = "bench/flow.limit16"
LIMIT_4 = "bench/flow.limit4"
KEYED = "bench/flow.keyed"


@django_events.function(UNLIMITED, id="bench.flow_unlimited", retries=0)
def unlimited(ctx: Context) -> None:
    """Does nothing, with no flow control: the baseline of the flow-control benchmarks."""


@django_events.function(LIMIT_16, id="bench.flow_limit16", retries=0, concurrency=Concurrency(16))
def limit16(ctx: Context) -> None:
    """Does nothing, at most 16 at once: a limit 2 processes x 8 threads never reach."""


@django_events.function(LIMIT_4, id="bench.flow_limit4", retries=0, concurrency=Concurrency(4))
def limit4(ctx: Context) -> None:
    """Does nothing, at most 4 at once: a limit that binds 16 worker threads."""


@django_events.function(KEYED, id="bench.flow_keyed", retries=0, concurrency=Concurrency(1, key="data.k"))
def keyed(ctx: Context) -> None:
    """Does nothing, at most one at once per value of ``data.k``."""
