"""Concurrency and throttle through real workers: two ``rundramatiq`` processes of four threads each.

Each test runs on Redis (a private ``redis-server``) and on the database broker, on the
test session's database (PostgreSQL or SQLite). The handlers of ``tests/testapp/flow_events.py``
write a ``Span`` row around their work (start, end, key, process); the limits are read back
from those rows, and from the ledger's ``Attempt`` rows (each attempt's claim and record
times, under which the handler's span lies).

Throttle tolerances (what the assertions allow, and why):

* the claim times of one key's attempts are at least the interval apart, exactly: the
  turn is computed and checked in the claim's transaction, on the claiming worker's clock
  (all workers here share the machine's clock);
* the handlers' own start times may be closer by up to :data:`HANDLER_SLACK`: a handler
  starts a little after its claim (the event is loaded, the ``Span`` row inserted), and
  that delay varies with the load of the machine;
* a run starts at most :data:`LATE_SLACK` after its turn: the broker's delay precision
  (a delayed Redis message is moved to the queue by a worker's consumer thread; a delayed
  database-broker row becomes visible to the next poll) plus the wait for a free thread.
  The figures measured are printed (``pytest -s``) and kept in ``var/faults/``.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import itertools
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Count
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Retries, TimeLimit

import django_events
from django_events.apps import install_broker_middleware
from django_events.models import Attempt, Run, RunStatus, Slot
from tests.faults.harness import RedisServer, Workers, chunks, report, wait_until, worker_env
from tests.testapp.models import Span

from .kit import new_broker

pytestmark = pytest.mark.e2e

#: The concurrency test: the issue's figures, runs across keys, each run's handler sleeping this long.
CONCURRENCY_RUNS, CONCURRENCY_KEYS, CONCURRENCY_SLEEP = 1000, 50, 0.01
#: ``tests.flow_limited``: ``Concurrency(2, key="data.k")``.
CONCURRENCY_LIMIT = 2

#: The throttle test: keys, and runs of each key sent at once.
THROTTLE_KEYS, THROTTLE_PER_KEY = 20, 8
#: ``tests.flow_throttled``: ``Throttle(2, 1.0, key="data.k")``: one start per 0.5 s per key, burst 1.
THROTTLE_INTERVAL, THROTTLE_BURST = 0.5, 1
#: How much closer than the interval two handler starts of a key may be (see the module docstring).
HANDLER_SLACK = 0.1
#: How long after its turn a throttled run may start (see the module docstring).
LATE_SLACK = 2.0

WORKER_PROCESSES = 2


def _sender_broker(kind: str, redis_url: str) -> dramatiq.Broker:
    """The test process's broker, for ``send()``: the one the workers consume."""
    if kind == "redis":
        broker: dramatiq.Broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=redis_url,
            namespace=settings.REDIS_NAMESPACE,
            middleware=[AgeLimit(), TimeLimit(), Callbacks(), Retries()],
        )
    else:
        broker = new_broker("database")
    install_broker_middleware(broker)
    return broker


def _ready(workers: Workers) -> bool:
    """every worker process is ready"""
    workers.assert_alive()
    return all(
        log.exists() and "Worker process is ready for action" in log.read_text(errors="replace")
        for log in workers.logs
    )


@pytest.fixture(params=["redis", "database"])
def workers(request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path) -> Iterator[Workers]:
    """Two ``rundramatiq`` processes (four threads each) on the test database, ready, and the test
    process sending to the same broker: a private Redis, or the database broker."""
    kind: str = request.param
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {"DJANGO_EVENTS_TEST_DATABASE_NAME": str(connection.settings_dict["NAME"])}
        redis_url = ""
        if kind == "redis":
            server = RedisServer(tmp_path)
            server.start()
            stack.callback(server.stop)
            redis_url = extra["REDIS_URL"] = server.url
        else:
            extra["DJANGO_SETTINGS_MODULE"] = "tests.brokers.settings_database"
        previous = dramatiq.get_broker()
        broker = _sender_broker(kind, redis_url)
        dramatiq.set_broker(broker)
        stack.callback(dramatiq.set_broker, previous)
        stack.callback(broker.close)
        fleet = Workers(worker_env(**extra), tmp_path)
        stack.callback(lambda: print(fleet.tail()))
        stack.callback(fleet.stop)
        fleet.start(WORKER_PROCESSES)
        wait_until(lambda: _ready(fleet), timeout=90, what=_ready.__doc__ or "", describe=fleet.tail)
        yield fleet


def _scenario(name: str) -> str:
    return f"{name}_{dramatiq.get_broker().__class__.__name__}_{connection.vendor}"


# -- reading the limits back -----------------------------------------------------------------------


def most_at_once(intervals: Sequence[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most ``[start, end)`` intervals that overlap at any instant (one that ends as another
    starts does not overlap it)."""
    moments = sorted([(end, -1) for _start, end in intervals] + [(start, 1) for start, _end in intervals])
    most = current = 0
    for _at, step in moments:  # at equal times, -1 sorts first: an end before a start
        current += step
        most = max(most, current)
    return most


def most_starts_within(starts: Sequence[dt.datetime], window: float) -> int:
    """The most of ``starts`` that fall in any window ``[t, t + window)``."""
    ordered = sorted(starts)
    span = dt.timedelta(seconds=window)
    return max((bisect.bisect_left(ordered, t + span) - i for i, t in enumerate(ordered)), default=0)


def _by_key(rows: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = defaultdict(list)
    for key, value in rows:
        grouped[key].append(value)
    return grouped


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }


def _check_every_run_once(function_id: str, span_name: str, count: int) -> dict[str, str]:
    """Assert that ``count`` runs of ``function_id`` all succeeded on their first and only attempt,
    with one handler span each, ended; return ``run id -> key``."""
    runs = dict(Run.objects.filter(function=function_id).values_list("pk", "status"))
    assert len(runs) == count, f"{len(runs)} runs of {count}: lost or extra"
    assert Counter(runs.values()) == {RunStatus.SUCCEEDED: count}
    attempts = Counter(
        (run_id, outcome)
        for run_id, outcome in Attempt.objects.filter(run__function=function_id).values_list(
            "run_id", "outcome"
        )
    )
    assert sum(attempts.values()) == count, "a run had more than one attempt"
    assert set(attempts) == {(run_id, "succeeded") for run_id in runs}
    assert set(Run.objects.filter(function=function_id).values_list("attempts", flat=True)) == {1}
    spans = list(Span.objects.filter(function=span_name).values_list("run_id", "key", "ended_at"))
    per_run = Counter(run_id for run_id, _key, _end in spans)
    assert [r for r, n in per_run.items() if n > 1] == [], "a handler ran twice for one run"
    assert set(per_run) == {str(run_id) for run_id in runs}, "a run succeeded without its handler"
    assert all(end is not None for _r, _k, end in spans)
    return {run_id: key for run_id, key, _end in spans}


def _settle(function_id: str, count: int, timeout: float) -> int:
    """Wait until every run of ``function_id`` is final; return the most runs seen held at once."""
    peak_held = 0
    latest: Counter[str] = Counter()

    def settled() -> bool:
        nonlocal peak_held, latest
        latest = Counter(
            dict(Run.objects.filter(function=function_id).values_list("status").annotate(n=Count("pk")))
        )
        peak_held = max(peak_held, latest[RunStatus.HELD])
        return sum(latest[s] for s in (RunStatus.SUCCEEDED, RunStatus.DEAD, RunStatus.CANCELLED)) >= count

    wait_until(settled, timeout=timeout, what=f"{count} runs of {function_id} final", describe=lambda: latest)
    return peak_held


# -- the tests -------------------------------------------------------------------------------------


def test_concurrency_never_exceeds_the_limit_per_key_over_1000_runs_across_50_keys(workers: Workers) -> None:
    # Given two worker processes of four threads, and a function limited to 2 attempts at once per key
    keys = [f"k{i}" for i in range(CONCURRENCY_KEYS)]
    per_key = CONCURRENCY_RUNS // CONCURRENCY_KEYS
    order = random.Random(12)

    # When 1,000 events are sent, 20 per key, in ten transactions of five keys each (shuffled), so
    # that the workers' threads meet many runs of one key at once
    started = time.monotonic()
    n = 0
    for group in chunks(keys, 5):
        items = [{"k": key} for key in group for _ in range(per_key)]
        order.shuffle(items)
        batch = []
        for item in items:
            batch.append({"name": "flow/limited", "data": {**item, "n": n, "sleep": CONCURRENCY_SLEEP}})
            n += 1
        django_events.send_many(batch)
    peak_held = _settle("tests.flow_limited", CONCURRENCY_RUNS, timeout=300)
    took = time.monotonic() - started
    workers.assert_alive()

    # Then every run succeeded, once, on its first attempt: none lost, none run twice
    key_of = _check_every_run_once("tests.flow_limited", "limited", CONCURRENCY_RUNS)
    assert Counter(key_of.values()) == dict.fromkeys(keys, per_key)

    # ...no key ever had more than 2 handlers running at once...
    spans = _by_key(
        [
            (key, (start, end))
            for key, start, end in Span.objects.filter(function="limited").values_list(
                "key", "started_at", "ended_at"
            )
        ]
    )
    at_once = {key: most_at_once(intervals) for key, intervals in spans.items()}
    over = {key: most for key, most in at_once.items() if most > CONCURRENCY_LIMIT}
    assert over == {}, f"keys over the limit of {CONCURRENCY_LIMIT}: {over}"

    # ...the limit was reached (else this proved nothing), runs waited for a slot, and nothing is
    # left held or holding a slot
    assert sum(1 for most in at_once.values() if most == CONCURRENCY_LIMIT) >= CONCURRENCY_KEYS // 2
    assert peak_held > 0
    assert not Run.objects.filter(status=RunStatus.HELD).exists()
    assert not Slot.objects.exists()
    pids = set(Span.objects.filter(function="limited").values_list("pid", flat=True))
    assert len(pids) == WORKER_PROCESSES, f"handlers ran in {pids}"

    report(
        _scenario("flow_concurrency"),
        {
            "runs": CONCURRENCY_RUNS,
            "keys": CONCURRENCY_KEYS,
            "seconds": round(took, 1),
            "runs_per_second": round(CONCURRENCY_RUNS / took, 1),
            "most_held_seen": peak_held,
            "keys_at_the_limit": sum(1 for most in at_once.values() if most == CONCURRENCY_LIMIT),
        },
    )


@pytest.mark.xfail(
    reason="flow.claim starts a throttled run whenever its message comes after its turn, so runs "
    "whose delayed messages come late start back to back (3-6 starts of a key within 0.5 s): "
    "reported to the lead; remove this mark with the fix",
    strict=False,
)
def test_throttle_starts_each_key_no_more_than_once_per_interval_and_drops_none(workers: Workers) -> None:
    # Given two worker processes of four threads, and a function throttled to 2 starts per second per key
    keys = [f"t{i}" for i in range(THROTTLE_KEYS)]

    # When 8 events per key are sent at once (160 runs, shuffled)
    items = [{"k": key} for key in keys for _ in range(THROTTLE_PER_KEY)]
    random.Random(7).shuffle(items)
    total = len(items)
    started = time.monotonic()
    django_events.send_many(
        [{"name": "flow/throttled", "data": {**item, "n": n, "sleep": 0.005}} for n, item in enumerate(items)]
    )
    _settle("tests.flow_throttled", total, timeout=120)
    took = time.monotonic() - started
    workers.assert_alive()

    # Then every run succeeded, once, on its first attempt: none dropped, none doubled
    key_of = _check_every_run_once("tests.flow_throttled", "throttled", total)
    assert Counter(key_of.values()) == dict.fromkeys(keys, THROTTLE_PER_KEY)

    # ...and, measured first (then asserted below): the claims of a key's attempts, the handlers'
    # starts, how late each run started after its turn (the i-th claim of a key, all sent at once,
    # is due at the first claim plus i intervals), and how long a handler takes to start after its claim
    claimed_at = {
        str(run_id): start
        for run_id, start in Attempt.objects.filter(run__function="tests.flow_throttled").values_list(
            "run_id", "started_at"
        )
    }
    claims = _by_key([(key_of[run_id], start) for run_id, start in claimed_at.items()])
    spans = list(Span.objects.filter(function="throttled").values_list("run_id", "key", "started_at"))
    starts = _by_key([(key, start) for _run_id, key, start in spans])
    late, gaps = [], []
    for times in claims.values():
        ordered = sorted(times)
        late += [(at - ordered[0]).total_seconds() - i * THROTTLE_INTERVAL for i, at in enumerate(ordered)]
        gaps += [(b - a).total_seconds() for a, b in itertools.pairwise(ordered)]
    window = THROTTLE_INTERVAL - HANDLER_SLACK
    claims_over = {k: m for k, s in claims.items() if (m := most_starts_within(s, THROTTLE_INTERVAL)) > 1}
    starts_over = {k: m for k, s in starts.items() if (m := most_starts_within(s, window)) > THROTTLE_BURST}
    figures = {
        "runs": total,
        "keys": THROTTLE_KEYS,
        "seconds": round(took, 1),
        "ideal_seconds_per_key": (THROTTLE_PER_KEY - 1) * THROTTLE_INTERVAL,
        "late_after_turn_s": _quantiles(late),
        "gap_between_claims_s": _quantiles(gaps) | {"min": round(min(gaps), 4)},
        "claim_to_handler_s": _quantiles([(start - claimed_at[r]).total_seconds() for r, _k, start in spans]),
        "keys_with_claims_too_close": len(claims_over),
        "most_claims_of_a_key_within_the_interval": max(claims_over.values(), default=1),
    }
    report(_scenario("flow_throttle"), figures)

    # Then no more than `burst` claims of a key fell in any window shorter than the interval: exactly,
    # the turn is decided with the claim's time...
    assert claims_over == {}, (
        f"more than {THROTTLE_BURST} claim(s) of a key within {THROTTLE_INTERVAL} s: {claims_over}; {figures}"
    )
    # ...nor of its handlers' starts, but for the handler's start-up...
    assert starts_over == {}, f"more than {THROTTLE_BURST} handler start(s) of a key within {window} s"
    # ...and each run started in its turn, within the broker's delay precision of it
    assert min(late) >= 0
    assert max(late) <= LATE_SLACK, f"a run started {max(late):.2f} s after its turn: {figures}"
