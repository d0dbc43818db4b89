"""The durable-step test functions (``ctx.step``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from typing import Any

import django_events
from django_events.registry import Context

from .models import Call, Effect


def _call(ctx: Context, name: str) -> None:
    Call.objects.create(function=name, run_id=str(ctx.run_id), attempt=ctx.attempt, event_name=ctx.event.name)


def _calls(name: str, ctx: Context) -> int:
    return Call.objects.filter(function=name, run_id=str(ctx.run_id)).count()


@django_events.function("steps/order", id="tests.steps_order", retries=3)
def steps_order(ctx: Context) -> dict[str, Any]:
    """Every step kind, as the issue's example: charge, reserve, cool off, wait, notify, ship."""
    order_id = ctx.event.data["order_id"]

    def charge(order: int) -> dict[str, Any]:
        _call(ctx, "charge")
        return {"charged": order}

    def reserve(order: int) -> int:
        return Effect.objects.create(run_id=str(ctx.run_id), step=f"reserve {order}").pk

    charge_result = ctx.step.run("charge", charge, order_id)
    ctx.step.atomic("reserve", reserve, order_id)
    ctx.step.sleep("cool-off", dt.timedelta(hours=1))
    paid = ctx.step.wait_for_event(
        "paid", event="steps/invoice.paid", match="data.order_id", timeout=dt.timedelta(days=3)
    )
    ctx.step.send_event("notify", "steps/fulfilled", {"order_id": order_id})
    shipped = ctx.step.invoke(
        "ship", function="tests.steps_ship", data={"order_id": order_id}, timeout=dt.timedelta(hours=2)
    )
    return {"charge": charge_result, "paid": None if paid is None else paid.data, "shipped": shipped}


@django_events.function("steps/ship", id="tests.steps_ship")
def steps_ship(ctx: Context) -> dict[str, Any]:
    """Invoked by steps_order; fails when told to."""
    _call(ctx, "ship")
    if ctx.event.data.get("fail"):
        raise django_events.NonRetriableError("cannot ship")
    return {"shipped": ctx.event.data["order_id"]}


@django_events.function("steps/fulfilled", id="tests.steps_fulfilled")
def steps_fulfilled(ctx: Context) -> None:
    """Receives step.send_event's event."""
    _call(ctx, "fulfilled")


@django_events.function("steps/invoke-failing", id="tests.steps_invoke_failing", retries=2)
def steps_invoke_failing(ctx: Context) -> str:
    """Invokes a run that goes dead; catches the error when told to."""
    try:
        ctx.step.invoke("ship", function="tests.steps_ship", data={"order_id": 1, "fail": True})
    except django_events.InvokeFailedError as exc:
        if ctx.event.data.get("catch"):
            return f"caught: {exc.run_id}"
        raise
    return "shipped?"


@django_events.function("steps/loop", id="tests.steps_loop")
def steps_loop(ctx: Context) -> list[Any]:
    """A step id repeated in a loop gets suffixes."""
    return [ctx.step.run("item", lambda n=n: n * 10) for n in range(3)]


@django_events.function("steps/flaky", id="tests.steps_flaky", retries=3)
def steps_flaky(ctx: Context) -> list[Any]:
    """The second step fails on its first try: the first is not run again."""

    def first() -> str:
        _call(ctx, "first")
        return "one"

    def second() -> str:
        _call(ctx, "second")
        if _calls("second", ctx) < 2:
            raise RuntimeError("second step fails once")
        return "two"

    return [ctx.step.run("first", first), ctx.step.run("second", second)]


@django_events.function("steps/nondeterministic", id="tests.steps_nondeterministic", retries=2)
def steps_nondeterministic(ctx: Context) -> None:
    """Meets its steps in another order on its second attempt."""
    names = ["a", "b"] if ctx.attempt == 1 else ["b", "a"]
    ctx.step.run(names[0], lambda: 1)
    if ctx.attempt == 1:
        raise RuntimeError("fail once")
    ctx.step.run(names[1], lambda: 2)


@django_events.function("steps/wait-if", id="tests.steps_wait_if")
def steps_wait_if(ctx: Context) -> Any:
    """Waits for an event its if_ accepts (amount over 100)."""
    got = ctx.step.wait_for_event(
        "big", event="steps/amount", timeout=60, if_=lambda event: event.data.get("amount", 0) > 100
    )
    return None if got is None else got.data


@django_events.function("steps/wait-twice", id="tests.steps_wait_twice")
def steps_wait_twice(ctx: Context) -> list[Any]:
    """Waits twice for the same event name: each wait takes its own event."""
    got = [
        ctx.step.wait_for_event("tick", event="steps/tick", match="data.key", timeout=600) for _ in range(2)
    ]
    return [None if event is None else event.data["n"] for event in got]


@django_events.function("steps/wait", id="tests.steps_wait", retries=0)
def steps_wait(ctx: Context) -> Any:
    """Waits for steps/answer with the same data.key (the race trials' function)."""
    got = ctx.step.wait_for_event("answer", event="steps/answer", match="data.key", timeout=600)
    return None if got is None else got.data


@django_events.function("steps/sleepy", id="tests.steps_sleepy")
def steps_sleepy(ctx: Context) -> str:
    """Sleeps a short while (seconds in the event) between two steps."""
    ctx.step.run("before", lambda: _call(ctx, "before"))
    ctx.step.sleep("nap", ctx.event.data.get("seconds", 1))
    ctx.step.run("after", lambda: _call(ctx, "after"))
    return "rested"


@django_events.function("steps/atomic", id="tests.steps_atomic", retries=20, time_limit=10)
def steps_atomic(ctx: Context) -> int:
    """Inserts an Effect exactly once in a step.atomic, slowly when told to (the kill tests)."""
    pause = float(ctx.event.data.get("pause", 0))

    def effect() -> int:
        row = Effect.objects.create(run_id=str(ctx.run_id), step="insert")
        if pause:
            time.sleep(pause)
        return row.pk

    ctx.step.run("before", lambda: os.getpid())
    pk = ctx.step.atomic("insert", effect)
    ctx.step.run("after", lambda: pause and time.sleep(pause))
    return int(pk)


@django_events.function("steps/bad-input", id="tests.steps_bad_input", retries=0)
def steps_bad_input(ctx: Context) -> str:
    """Calls one step with the bad input named in the event; the error is the run's outcome."""
    case = ctx.event.data["case"]
    step = ctx.step
    if case == "empty-id":
        step.run("", lambda: 1)
    elif case == "id-not-str":
        step.run(7, lambda: 1)  # type: ignore[arg-type]
    elif case == "not-callable":
        step.run("x", 42)  # type: ignore[arg-type]
    elif case == "negative-sleep":
        step.sleep("nap", -1)
    elif case == "naive-sleep-until":
        step.sleep_until("nap", dt.datetime(2030, 1, 1))
    elif case == "bad-event-name":
        step.wait_for_event("w", event="has space", timeout=10)
    elif case == "missing-match":
        step.wait_for_event("w", event="steps/answer", match="data.absent", timeout=10)
    elif case == "no-timeout":
        step.wait_for_event("w", event="steps/answer", timeout=None)  # type: ignore[arg-type]
    elif case == "unknown-function":
        step.invoke("i", function="no.such.function")
    elif case == "bad-invoke-data":
        step.invoke("i", function="tests.steps_ship", data=["not", "a", "dict"])  # type: ignore[arg-type]
    elif case == "bad-send":
        step.send_event("s", "steps/fulfilled", {"bad": object()})
    elif case == "not-json":
        step.run("x", lambda: object())
    elif case == "nested":
        step.run("outer", lambda: step.run("inner", lambda: 1))
    return "no error"


@django_events.function("steps/any", id="tests.steps_any")
def steps_any(ctx: Context) -> Any:
    """Waits for any steps/ping event (no match, no if_)."""
    got = ctx.step.wait_for_event("ping", event="steps/ping", timeout=60)
    return None if got is None else got.data


@django_events.function("steps/wait-if-key", id="tests.steps_wait_if_key", retries=0)
def steps_wait_if_key(ctx: Context) -> Any:
    """Waits for a steps/answer-if with the same data.key that its if_ accepts (data.ok): the if_ race
    trials' function (a matching event the if_ rejects only pokes the wait)."""
    got = ctx.step.wait_for_event(
        "answer",
        event="steps/answer-if",
        match="data.key",
        timeout=600,
        if_=lambda event: bool(event.data.get("ok")),
    )
    return None if got is None else got.data


@django_events.function(
    "steps/wait-cancellable",
    id="tests.steps_wait_cancellable",
    retries=0,
    cancel_on=django_events.CancelOn("steps/wait-cancellable.stop", match="data.key"),
)
def steps_wait_cancellable(ctx: Context) -> Any:
    """Waits ``data.timeout`` seconds (1 by default) for steps/wait-cancellable.answer with the same
    data.key; steps/wait-cancellable.stop with the key cancels it (the worker tests)."""
    ctx.step.run("before", lambda: _call(ctx, "before-wait"))
    got = ctx.step.wait_for_event(
        "answer",
        event="steps/wait-cancellable.answer",
        match="data.key",
        timeout=ctx.event.data.get("timeout", 1),
    )
    ctx.step.run("after", lambda: _call(ctx, "after-wait"))
    return None if got is None else got.data


# -- the kill tests' functions (tests/faults/test_steps_kill.py) ---------------------------------
# A time limit of 2 s, so a lease of 3 s with the faults' LEASE_MARGIN of 1 s: a killed attempt's run
# is taken again within seconds. Each step that writes a Call returns the attempt that ran it, so its
# memo says which execution's Call is the one that counted.


def _mark(ctx: Context, name: str, pause: float = 0.0) -> int:
    """A step's body: a Call row (committed at once), ``pause`` seconds, and the attempt number."""
    _call(ctx, name)
    if pause:
        time.sleep(pause)
    return ctx.attempt


def _insert(ctx: Context, step: str, pause: float) -> int:
    """A step.atomic's body: an Effect row, ``pause`` seconds inside the transaction, its pk."""
    row = Effect.objects.create(run_id=str(ctx.run_id), step=step)
    if pause:
        time.sleep(pause)
    return row.pk


@django_events.function("steps/kill-atomic", id="tests.steps_kill_atomic", retries=20, time_limit=2)
def steps_kill_atomic(ctx: Context) -> int:
    """steps_atomic with a short lease: ``pause`` seconds inside the atomic step, ``after_pause`` in the
    "after" step on the run's first attempt only."""
    data = ctx.event.data
    ctx.step.run("before", _mark, ctx, "kill_before")
    pk = ctx.step.atomic("insert", _insert, ctx, "insert", float(data.get("pause", 0)))
    after_pause = float(data.get("after_pause", 0)) if ctx.attempt == 1 else 0.0
    ctx.step.run("after", _mark, ctx, "kill_after", after_pause)
    return int(pk)


@django_events.function("steps/kill-sleepy", id="tests.steps_kill_sleepy", retries=20, time_limit=2)
def steps_kill_sleepy(ctx: Context) -> int:
    """A step, a sleep of ``seconds``, then an atomic insert and a step of ``pause`` seconds each."""
    data = ctx.event.data
    pause = float(data.get("pause", 0))
    ctx.step.run("before", _mark, ctx, "sleepy_before")
    ctx.step.sleep("nap", float(data.get("seconds", 1)))
    pk = ctx.step.atomic("insert", _insert, ctx, "woken", pause)
    ctx.step.run("after", _mark, ctx, "sleepy_after", pause)
    return int(pk)


@django_events.function("steps/kill-wait", id="tests.steps_kill_wait", retries=20, time_limit=2)
def steps_kill_wait(ctx: Context) -> int:
    """A step, a wait (``timeout`` seconds, 600 by default) for steps/kill-answer with the same data.i,
    then an atomic insert and a step of ``pause`` seconds each."""
    data = ctx.event.data
    pause = float(data.get("pause", 0))
    timeout = float(data.get("timeout", 600))
    ctx.step.run("before", _mark, ctx, "wait_before")
    got = ctx.step.wait_for_event("answer", event="steps/kill-answer", match="data.i", timeout=timeout)
    if got is None:
        raise django_events.NonRetriableError("no answer within the wait's timeout")
    pk = ctx.step.atomic("insert", _insert, ctx, "answered", pause)
    ctx.step.run("after", _mark, ctx, "wait_after", pause)
    return int(pk)


@django_events.function("steps/swallow", id="tests.steps_swallow")
def steps_swallow(ctx: Context) -> str:
    """Catches everything around its sleep (a bare except), then tries another step and returns."""
    with contextlib.suppress(BaseException):
        ctx.step.sleep("nap", 60)
    with contextlib.suppress(BaseException):
        ctx.step.run("after", lambda: _call(ctx, "after-swallow"))
    return "returned"


@django_events.function(
    "steps/start-child", id="tests.steps_start_child", timeouts=django_events.Timeouts(start=60)
)
def steps_start_child(ctx: Context) -> str:
    """An invoked function whose run is cancelled if it has not started within a minute."""
    return "started"


@django_events.function("steps/invoke-start", id="tests.steps_invoke_start")
def steps_invoke_start(ctx: Context) -> str:
    """Invokes tests.steps_start_child; says how it ended."""
    try:
        return ctx.step.invoke("child", function="tests.steps_start_child")
    except django_events.InvokeFailedError as exc:
        return f"failed: {exc}"
