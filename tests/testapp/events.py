"""Functions the tests subscribe; each records its calls in ``Call`` rows."""

from __future__ import annotations

import time
import uuid
from typing import Any

import django_events
from django_events import NonRetriableError, RetryAfterError
from django_events.registry import Context

from .models import Call


def _record(ctx: Context, name: str) -> None:
    Call.objects.create(function=name, run_id=str(ctx.run_id), attempt=ctx.attempt, event_name=ctx.event.name)


@django_events.function("test/ok", "test/also-ok", id="tests.ok")
def ok(ctx: Context) -> dict[str, Any]:
    _record(ctx, "ok")
    return {"echo": ctx.event.data, "attempt": ctx.attempt}


@django_events.function("test/fanout", id="tests.fanout_a")
def fanout_a(ctx: Context) -> str:
    _record(ctx, "fanout_a")
    return "a"


@django_events.function("test/fanout", id="tests.fanout_b")
def fanout_b(ctx: Context) -> str:
    _record(ctx, "fanout_b")
    return "b"


@django_events.function("test/fanout", id="tests.fanout_c")
def fanout_c(ctx: Context) -> None:
    _record(ctx, "fanout_c")


@django_events.function("test/flaky", id="tests.flaky", retries=3)
def flaky(ctx: Context) -> dict[str, int]:
    """Fails until attempt ``data["succeed_on"]``."""
    _record(ctx, "flaky")
    if ctx.attempt < ctx.event.data["succeed_on"]:
        raise ConnectionError(f"flaky failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@django_events.function("test/always-fails", id="tests.always_fails", retries=2)
def always_fails(ctx: Context) -> None:
    _record(ctx, "always_fails")
    raise ValueError(f"<b>broken</b> on attempt {ctx.attempt}")


@django_events.function("test/non-retriable", id="tests.non_retriable", retries=5)
def non_retriable(ctx: Context) -> None:
    _record(ctx, "non_retriable")
    raise NonRetriableError("the source was deleted")


@django_events.function("test/retry-after", id="tests.retry_after", retries=2)
def retry_after(ctx: Context) -> int:
    _record(ctx, "retry_after")
    if ctx.attempt == 1:
        raise RetryAfterError(ctx.event.data["seconds"], "rate limited")
    return ctx.attempt


@django_events.function("test/bad-result", id="tests.bad_result")
def bad_result(ctx: Context) -> object:
    _record(ctx, "bad_result")
    return object()


@django_events.function("test/slow", id="tests.slow", retries=0, time_limit=0.5)
def slow(ctx: Context) -> None:
    _record(ctx, "slow")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # interruptible busy wait, like real CPU-bound work
        sum(range(1000))


@django_events.function("test/sleepy", id="tests.sleepy", retries=0, time_limit=60)
def sleepy(ctx: Context) -> str:
    """Works for ``data["seconds"]`` (a run in flight when the worker is told to stop)."""
    _record(ctx, "sleepy")
    time.sleep(ctx.event.data["seconds"])
    return "finished"


# Used by the fault-injection tests (tests/faults): short time limits, so that a killed
# worker's lease (time limit + LEASE_MARGIN) expires within seconds.


@django_events.function("faults/ok", id="tests.faults_ok", retries=20, time_limit=2)
def faults_ok(ctx: Context) -> int:
    """Records the call (duplicates are counted from ``Call`` rows); sleeps ``data["sleep"]`` seconds."""
    _record(ctx, "faults_ok")
    time.sleep(ctx.event.data.get("sleep", 0))
    return ctx.attempt


@django_events.function("faults/marked", id="tests.faults_marked", retries=3, time_limit=5)
def faults_marked(ctx: Context) -> int:
    """Works ``data["seconds"]`` without touching the database, and writes when it started and ended
    to the file ``data["marker"]``: a line ``start TOKEN TIME`` and a line ``end TOKEN TIME`` per
    execution (``time.time()``), so that a test can tell whether two executions overlapped."""
    token = uuid.uuid4().hex
    with open(ctx.event.data["marker"], "a") as marker:
        marker.write(f"start {token} {time.time()}\n")
    time.sleep(ctx.event.data["seconds"])
    with open(ctx.event.data["marker"], "a") as marker:
        marker.write(f"end {token} {time.time()}\n")
    return ctx.attempt


@django_events.function("faults/fail", id="tests.faults_fail", retries=1, time_limit=2)
def faults_fail(ctx: Context) -> None:
    """Always fails: its runs end dead after two attempts."""
    _record(ctx, "faults_fail")
    raise RuntimeError(f"deliberate failure on attempt {ctx.attempt}")


# Used by tests/integration/test_odd_outcomes.py: a function whose output the database would
# refuse, or that raises what a worker thread must survive. ``data["kind"]`` says which.


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class _NotAnException(BaseException):
    """A BaseException that is not a shutdown: Dramatiq's worker thread catches it and goes on."""


class _RetryAfterForever(RetryAfterError):
    def __init__(self) -> None:
        super().__init__(1)
        self.seconds = float("inf")  # changed after the constructor checked it


def _odd_exception_type() -> type[Exception]:
    odd = type("Odd", (Exception,), {})
    odd.__qualname__ = "Odd\x00Name\ud800"  # a class name may not hold these; a qualname may
    return odd


ODD_OUTCOMES: dict[str, Any] = {
    "str-raises": lambda: _StrRaises(),
    "nul-message": lambda: ValueError("before\x00after"),
    "surrogate-message": lambda: ValueError("before\ud800after"),
    "huge-message": lambda: ValueError("x" * 3_000_000),
    "odd-type": lambda: _odd_exception_type()("odd"),
    "base-exception": lambda: _NotAnException("not a shutdown"),
    "system-exit": lambda: SystemExit(3),
    "keyboard-interrupt": lambda: KeyboardInterrupt(),
    "retry-after-nan": lambda: RetryAfterError(float("nan")),
    "retry-after-huge": lambda: RetryAfterError(1e300),
    "retry-after-forever": lambda: _RetryAfterForever(),
    "refused": lambda: ValueError("REFUSE-ME in the traceback"),
}
ODD_RESULTS: dict[str, Any] = {
    "nul-result": {"text": "before\x00after", "key\x00": 1},
    "surrogate-result": {"text": "before\udc80after", "key\ud800": [1, "\udfff"]},
    "deep-result": "deep",
    "refused-result": {"x": "REFUSE-ME"},
}


@django_events.function("test/odd", id="tests.odd", retries=1)
def odd(ctx: Context) -> Any:
    """Raises or returns something odd (``ODD_OUTCOMES``, ``ODD_RESULTS``), on every attempt."""
    _record(ctx, "odd")
    kind = ctx.event.data["kind"]
    if kind in ODD_OUTCOMES:
        raise ODD_OUTCOMES[kind]()
    if kind == "deep-result":
        value: Any = []
        for _ in range(100_000):
            value = [value]
        return value
    return ODD_RESULTS[kind]


from . import flow_events, step_events  # noqa: E402, F401  (flow-control and step test functions)
