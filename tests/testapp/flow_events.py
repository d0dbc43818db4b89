"""Functions with flow control, for the tests of issue 12; each records its attempts in ``Span`` rows."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from django.utils import timezone

import django_events
from django_events import (
    Batch,
    CancelOn,
    Concurrency,
    Debounce,
    RateLimit,
    RetryAfterError,
    Throttle,
    Timeouts,
)
from django_events.registry import Context

from .models import Call, Span


def _span(ctx: Context, name: str) -> Any:
    """Record the attempt's start, sleep ``data["sleep"]`` seconds, record its end."""
    span = Span.objects.create(
        function=name,
        run_id=str(ctx.run_id),
        key=str(ctx.event.data.get("k", "")),
        started_at=timezone.now(),
        pid=os.getpid(),
    )
    time.sleep(float(ctx.event.data.get("sleep", 0)))
    Span.objects.filter(pk=span.pk).update(ended_at=timezone.now())
    return ctx.event.data.get("n")


@django_events.function(
    "flow/limited", id="tests.flow_limited", concurrency=Concurrency(2, key="data.k"), retries=5
)
def limited(ctx: Context) -> Any:
    return _span(ctx, "limited")


@django_events.function(
    "flow/limited-one", id="tests.flow_limited_one", concurrency=1, priority=lambda e: e.data.get("p", 0)
)
def limited_one(ctx: Context) -> Any:
    return _span(ctx, "limited_one")


@django_events.function(
    "flow/two-limits",
    id="tests.flow_two_limits",
    concurrency=[Concurrency(2), Concurrency(1, key="data.k")],
    retries=5,
)
def two_limits(ctx: Context) -> Any:
    return _span(ctx, "two_limits")


@django_events.function("flow/unlimited", id="tests.flow_unlimited")
def unlimited(ctx: Context) -> Any:
    return _span(ctx, "unlimited")


@django_events.function("flow/throttled", id="tests.flow_throttled", throttle=Throttle(2, 1.0, key="data.k"))
def throttled(ctx: Context) -> Any:
    return _span(ctx, "throttled")


@django_events.function(
    "flow/rate", id="tests.flow_rate", rate_limit=RateLimit(1, dt.timedelta(hours=4), key="data.company")
)
def rate(ctx: Context) -> Any:
    return _span(ctx, "rate")


@django_events.function(
    "flow/debounced", id="tests.flow_debounced", debounce=Debounce(10, key="data.user", timeout=60)
)
def debounced(ctx: Context) -> Any:
    return _span(ctx, "debounced")


@django_events.function("flow/batched", id="tests.flow_batched", batch=Batch(3, 30, key="data.k"))
def batched(ctx: Context) -> list[Any]:
    _span(ctx, "batched")
    return [event.data.get("n") for event in ctx.events]


@django_events.function("flow/order.*", id="tests.flow_wildcard")
def wildcard(ctx: Context) -> str:
    Call.objects.create(
        function="wildcard", run_id=str(ctx.run_id), attempt=ctx.attempt, event_name=ctx.event.name
    )
    return ctx.event.name


@django_events.function(
    "flow/filtered", id="tests.flow_filtered", if_=lambda event: bool(event.data.get("go"))
)
def filtered(ctx: Context) -> str:
    return "went"


@django_events.function(
    "flow/reminder",
    id="tests.flow_reminder",
    cancel_on=CancelOn("flow/reminder.cancel", match="data.user"),
)
def reminder(ctx: Context) -> str:
    return "reminded"


@django_events.function("flow/start-timeout", id="tests.flow_start_timeout", timeouts=Timeouts(start=5))
def start_timeout(ctx: Context) -> str:
    return "started"


# Used by tests/brokers/test_flow_features.py, through real workers: the same policies with
# periods of seconds, so that each test waits for its windows in real time and stays short.


@django_events.function(
    "flow/rate-three", id="tests.flow_rate_three", rate_limit=RateLimit(3, 60, key="data.company")
)
def rate_three(ctx: Context) -> Any:
    return _span(ctx, "rate_three")


@django_events.function(
    "flow/debounced-short", id="tests.flow_debounced_short", debounce=Debounce(1.5, key="data.user")
)
def debounced_short(ctx: Context) -> Any:
    return _span(ctx, "debounced_short")


@django_events.function(
    "flow/debounced-capped",
    id="tests.flow_debounced_capped",
    debounce=Debounce(1.5, key="data.user", timeout=4),
)
def debounced_capped(ctx: Context) -> Any:
    return _span(ctx, "debounced_capped")


@django_events.function("flow/batched-short", id="tests.flow_batched_short", batch=Batch(3, 2, key="data.k"))
def batched_short(ctx: Context) -> list[Any]:
    _span(ctx, "batched_short")
    return [event.data.get("n") for event in ctx.events]


@django_events.function(
    "flow/job",
    id="tests.flow_job",
    concurrency=1,
    cancel_on=CancelOn("flow/job.stop", match="data.user"),
)
def job(ctx: Context) -> Any:
    return _span(ctx, "job")


@django_events.function(
    "flow/held-start-timeout",
    id="tests.flow_held_start_timeout",
    concurrency=1,
    timeouts=Timeouts(start=2),
)
def held_start_timeout(ctx: Context) -> Any:
    return _span(ctx, "held_start_timeout")


@django_events.function(
    "flow/delayed-start-timeout",
    id="tests.flow_delayed_start_timeout",
    concurrency=1,
    timeouts=Timeouts(start=4),
)
def delayed_start_timeout(ctx: Context) -> Any:
    return _span(ctx, "delayed_start_timeout")


@django_events.function(
    "flow/finish-timeout", id="tests.flow_finish_timeout", retries=20, timeouts=Timeouts(finish=2)
)
def finish_timeout(ctx: Context) -> None:
    """Fails every attempt after ``data["sleep"]`` seconds: only ``Timeouts.finish`` ends its retries."""
    _span(ctx, "finish_timeout")
    raise RuntimeError(f"deliberate failure on attempt {ctx.attempt}")


# Used by tests/faults/test_flow_kill.py: one attempt at a time per key, and a short time limit, so
# that a slot of a killed worker (held until its lease ends: the time limit plus LEASE_MARGIN) comes
# back within seconds.


@django_events.function(
    "faults/limited",
    id="tests.faults_limited",
    concurrency=Concurrency(1, key="data.k"),
    retries=20,
    time_limit=2,
)
def faults_limited(ctx: Context) -> Any:
    return _span(ctx, "faults_limited")


@django_events.function(
    "flow/finish-held",
    id="tests.flow_finish_held",
    retries=5,
    concurrency=1,
    timeouts=Timeouts(finish=1.5),
)
def finish_held(ctx: Context) -> Any:
    """Sleeps ``data["sleep"]`` seconds and returns; with ``data["retry_after"]``, asks for a retry
    that many seconds later instead."""
    result = _span(ctx, "finish_held")
    if "retry_after" in ctx.event.data:
        raise RetryAfterError(ctx.event.data["retry_after"], "try again later")
    return result
