"""The function of the durable-step benchmarks (``benchmarks/steps.py``).

Registered only when ``BENCH_STEPS=1`` (``events.py`` imports this module then), so that
the suite (``benchmarks/suite.py``) keeps measuring the app it always measured.

One function; its event's data says what it does, so that every case shares the same
function, registry and event size:

- ``{"kind": "plain"}``: nothing (no step): the baseline;
- ``{"kind": "run", "k": k}``: ``k`` ``ctx.step.run`` of a callable that does nothing;
- ``{"kind": "atomic", "k": k}``: the same with ``ctx.step.atomic``;
- ``{"kind": "sleep", "seconds": s}``: one ``ctx.step.sleep`` of ``s`` seconds (0: the
  sleep is over at once and only its memo is written; more: the run leaves the worker
  and is woken by its message).
"""

from __future__ import annotations

import django_events
from django_events import Context

#: The event name ``benchmarks/steps.py`` sends to.
STEPS = "bench/steps"


def _nothing() -> None:
    """A step's code that does nothing: what is measured is the step's own bookkeeping."""


@django_events.function(STEPS, id="bench.steps", retries=0)
def steps(ctx: Context) -> None:
    """Runs the steps its event's data asks for (see the module's docstring)."""
    data = ctx.event.data
    kind = data.get("kind", "plain")
    if kind == "run":
        for i in range(data["k"]):
            ctx.step.run(f"step-{i}", _nothing)
    elif kind == "atomic":
        for i in range(data["k"]):
            ctx.step.atomic(f"step-{i}", _nothing)
    elif kind == "sleep":
        ctx.step.sleep("nap", data["seconds"])
