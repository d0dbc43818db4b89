"""Concurrency and throttle through real workers: two ``rundramatiq`` processes of four threads each.

Each test runs on Redis (a private ``redis-server``) and on the database broker, on the
test session's database (PostgreSQL or SQLite). The handlers of ``tests/testapp/flow_events.py``
write a ``Span`` row around their work (start, end, key, process); the limits are read back
from those rows, and from the ledger's ``Attempt`` rows (each attempt's claim and record
times, under which the handler's span lies).

Throttle tolerances (what the assertions allow, and why):

* of any two runs of a key, one's handler starts at least the interval after the other's
  claim, exactly (but for :data:`CLOCK_SLACK`): each start the throttle counts lies between
  the attempt's claim and its handler's start, and the counted starts are the interval apart
  (burst 1). Every worker here reads the machine's one clock (microseconds); the
  millisecond allows only for rounding;
* the claims of one key's attempts (``Attempt.started_at``) are at least the interval
  apart, but for :data:`CLOCK_SLACK`, if the claim's time is the start the throttle counted.
  At 06d22e2 it is not (the claim's time is taken before the throttle key's lock, the start
  counted after it): claims came up to 65 ms closer on PostgreSQL and 6 ms on SQLite, so
  that check ends the test as an expected failure until the fix;
* a handler starts inside its attempt, after its claim, so two handler starts of a key may
  be closer than the interval by the first one's start-up after its claim (the claim's
  commit, the event loaded, the ``Span`` row inserted): :data:`HANDLER_SLACK`, from the
  ``claim_to_handler_s`` figures measured on this machine (2 CPUs, shared with other test
  sessions): at most 0.19 s (p99 under 0.15 s) over 34 runs of the test on PostgreSQL and
  SQLite with both brokers, and 0.55 s once in an earlier session on SQLite with Redis;
  handler starts came at most 71 ms closer than the interval;
* the last run of a key starts at most :data:`LATE_SLACK` after the last turn its key handed
  out (``FlowKey.tat`` less one interval): the broker's delay precision (a delayed Redis
  message is moved to the queue by a worker's consumer thread; a delayed database-broker row
  becomes visible to the next poll) plus the wait for a free thread: measured up to 1.2 s
  with Redis, 0.64 s with the database broker on this machine, and 2.6 s (p50 1.85 s) on
  CI with Redis and SQLite (the run of 2026-11-29 20:46, whose CI failed on the 2 s then
  allowed). The bound stays under recovery's grace (``RECOVERY_GRACE``, 5 s): a throttled
  run whose message was lost, and that only recovery sends again, still fails the test.

The figures measured are printed (``pytest -s``) and kept in ``var/faults/``; the throttle's
include the turns each key handed out (a run that comes back before the starts allow gets a
new turn, so a key hands out more turns than it has runs) and how long each key took to drain.
"""

from __future__ import annotations

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
from django_events.models import Attempt, FlowKey, Run, RunStatus, Slot
from tests.faults.harness import RedisServer, Workers, chunks, report, wait_until, worker_env
from tests.testapp.models import Span

from .kit import new_broker

pytestmark = [pytest.mark.e2e, pytest.mark.flow_workers]

#: The concurrency test: the issue's figures, runs across keys, each run's handler sleeping this long.
CONCURRENCY_RUNS, CONCURRENCY_KEYS, CONCURRENCY_SLEEP = 1000, 50, 0.01
#: ``tests.flow_limited``: ``Concurrency(2, key="data.k")``.
CONCURRENCY_LIMIT = 2

#: The test of two limits (``tests.flow_two_limits``: ``[Concurrency(2), Concurrency(1, key="data.k")]``).
TWO_LIMITS_RUNS, TWO_LIMITS_KEYS = 200, 10

#: The throttle test: keys, and runs of each key sent at once.
THROTTLE_KEYS, THROTTLE_PER_KEY = 20, 8
#: ``tests.flow_throttled``: ``Throttle(2, 1.0, key="data.k")``: one start per 0.5 s per key, burst 1.
THROTTLE_INTERVAL, THROTTLE_BURST = 0.5, 1
#: How much closer than the interval two claims of a key may be (see the module docstring).
CLOCK_SLACK = 0.001
#: How much closer than the interval two handler starts of a key may be (see the module docstring).
HANDLER_SLACK = 0.3
#: How long after its key's last turn the last run of a key may start (see the module docstring).
LATE_SLACK = 4.0
CLAIM_WINDOW = THROTTLE_INTERVAL - CLOCK_SLACK
HANDLER_WINDOW = THROTTLE_INTERVAL - HANDLER_SLACK

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


def test_two_concurrency_limits_hold_together_through_workers(workers: Workers) -> None:
    # Given tests.flow_two_limits: [Concurrency(2), Concurrency(1, key="data.k")], and eight threads
    keys = [f"t{i}" for i in range(TWO_LIMITS_KEYS)]
    items = [{"k": key} for key in keys for _ in range(TWO_LIMITS_RUNS // TWO_LIMITS_KEYS)]
    random.Random(5).shuffle(items)

    # When 200 events over 10 keys are sent at once
    django_events.send_many(
        [{"name": "flow/two-limits", "data": {**item, "n": n, "sleep": 0.01}} for n, item in enumerate(items)]
    )
    peak_held = _settle("tests.flow_two_limits", TWO_LIMITS_RUNS, timeout=180)
    workers.assert_alive()

    # Then every run succeeded once; never more than 2 handlers ran at once, nor 2 of one key
    _check_every_run_once("tests.flow_two_limits", "two_limits", TWO_LIMITS_RUNS)
    rows = list(Span.objects.filter(function="two_limits").values_list("key", "started_at", "ended_at"))
    assert most_at_once([(start, end) for _key, start, end in rows]) == 2
    per_key = _by_key([(key, (start, end)) for key, start, end in rows])
    assert {key: most_at_once(spans) for key, spans in per_key.items()} == dict.fromkeys(keys, 1)
    assert peak_held > 0
    assert not Run.objects.filter(status=RunStatus.HELD).exists()
    assert not Slot.objects.exists()


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

    # ...and, measured first (then asserted below): each attempt's claim and end, its handler's
    # start, the gaps between a key's claims and between its handlers' starts, and each key's last
    # turn (``FlowKey.tat`` less one interval: the turns are handed out one interval apart)
    attempts = {
        str(run_id): (claim, end)
        for run_id, claim, end in Attempt.objects.filter(run__function="tests.flow_throttled").values_list(
            "run_id", "started_at", "finished_at"
        )
    }
    spans = list(Span.objects.filter(function="throttled").values_list("run_id", "key", "started_at"))
    claims = _by_key([(key_of[run_id], claim) for run_id, (claim, _end) in attempts.items()])
    starts = _by_key([(key, start) for _run_id, key, start in spans])
    interval = dt.timedelta(seconds=THROTTLE_INTERVAL)
    last_turn = {
        key: tat - interval
        for key, tat in FlowKey.objects.filter(function="tests.flow_throttled", kind="throttle").values_list(
            "key", "tat"
        )
    }
    assert set(last_turn) == set(keys)
    claim_gaps = _gaps(claims)
    start_gaps = _gaps(starts)
    claim_to_handler = [(start - attempts[run_id][0]).total_seconds() for run_id, _key, start in spans]
    behind_last_turn = [(max(claims[key]) - last_turn[key]).total_seconds() for key in keys]
    turns = [round((last_turn[key] - min(claims[key])) / interval) + 1 for key in keys]
    figures = {
        "runs": total,
        "keys": THROTTLE_KEYS,
        "seconds": round(took, 1),
        "ideal_seconds_per_key": (THROTTLE_PER_KEY - 1) * THROTTLE_INTERVAL,
        "first_to_last_claim_of_a_key_s": _quantiles(
            [(max(times) - min(times)).total_seconds() for times in claims.values()]
        ),
        "gap_between_claims_s": _quantiles(claim_gaps) | {"min": round(min(claim_gaps), 4)},
        "gap_between_handler_starts_s": _quantiles(start_gaps) | {"min": round(min(start_gaps), 4)},
        "claim_to_handler_s": _quantiles(claim_to_handler),
        "last_claim_after_its_turn_s": _quantiles(behind_last_turn)
        | {"min": round(min(behind_last_turn), 4)},
        "turns_handed_out_per_key": _quantiles(turns),
    }
    report(_scenario("flow_throttle"), figures)

    # Then each handler ran inside its attempt, after its claim...
    outside = [
        run_id for run_id, _key, start in spans if not attempts[run_id][0] <= start <= attempts[run_id][1]
    ]
    assert outside == [], f"handlers that started outside their attempt: {outside}"
    # ...of any two runs of a key, one's handler started at least the interval after the other's
    # claim (burst 1): the starts the throttle counted lie between each claim and its handler's
    # start, and were the interval apart; this holds exactly, whatever the load...
    together = {
        key: pair
        for key, runs in _by_key(
            [(key, (attempts[run_id][0], start)) for run_id, key, start in spans]
        ).items()
        if (pair := _started_together(runs, interval))
    }
    assert together == {}, f"two runs of a key started within one interval (claim, start): {together}"
    # ...so no two handler starts of a key came closer than the interval less a handler's start-up
    # after its claim (HANDLER_SLACK, measured: see the module docstring)...
    close_starts = {key: gap for key, times in starts.items() if (gap := _closest(times)) < HANDLER_WINDOW}
    assert close_starts == {}, (
        f"handler starts of a key under {HANDLER_WINDOW:.2f} s apart (closest, s): {close_starts}; {figures}"
    )
    # ...the last run of each key started at or after the last turn its key handed out, within the
    # broker's delay precision of it...
    assert min(behind_last_turn) >= -CLOCK_SLACK, figures
    assert max(behind_last_turn) <= LATE_SLACK, f"a key's last run started late after its turn: {figures}"
    # ...and no two claims of a key (``Attempt.started_at``) came closer than the interval: the claim's
    # time should be the start the throttle counted, taken after the key's lock
    close_claims = {key: gap for key, times in claims.items() if (gap := _closest(times)) < CLAIM_WINDOW}
    assert not close_claims, f"claims of a key closer than the interval: {close_claims}"


def _started_together(
    runs: Sequence[tuple[dt.datetime, dt.datetime]], interval: dt.timedelta
) -> tuple[Any, Any] | None:
    """Two ``(claim, handler start)`` of which neither started an ``interval`` or more after the
    other's claim, less :data:`CLOCK_SLACK` (``None`` if there are none)."""
    slack = dt.timedelta(seconds=CLOCK_SLACK)
    for first, second in itertools.combinations(runs, 2):
        if second[1] < first[0] + interval - slack and first[1] < second[0] + interval - slack:
            return first, second
    return None


def _gaps(times_by_key: dict[str, list[dt.datetime]]) -> list[float]:
    """The seconds between each two consecutive times of each key."""
    return [
        (later - earlier).total_seconds()
        for times in times_by_key.values()
        for earlier, later in itertools.pairwise(sorted(times))
    ]


def _closest(times: Sequence[dt.datetime]) -> float:
    """The seconds between the two closest of ``times``."""
    ordered = sorted(times)
    return min((b - a).total_seconds() for a, b in itertools.pairwise(ordered))
