"""CPU per run and per send in one thread, django-events against the floor.

``.venv/bin/python benchmarks/inprocess.py [--count N]``

The drain and send workloads of ``suite.py`` measure wall-clock figures of whole
systems. This measures the part that is django-events' own Python, without Dramatiq,
threads or a broker round trip: the process CPU time (``time.process_time``) of

- ``run``: ``execute_run`` of a pending no-op run (claim, call, record) against the
  floor's ``run_history`` (the same two statements, values made by hand);
- ``send``: ``send()`` of one event in ``transaction.atomic()`` against the floor's
  ``store_event`` (the same statement, values made beforehand) and an ``on_commit``
  callback; both with the transaction's commit and without a broker: the message
  that plain Dramatiq would send too is not sent.

The two sides alternate in chunks, on PostgreSQL (``BENCH_DATABASE_URL``, default the
suite's database, dropped and created again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.bench_settings")
os.environ.setdefault("BENCH_BROKER", "redis")
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

from django.db import transaction  # noqa: E402

import django_events  # noqa: E402
from benchmarks.benchapp import floor  # noqa: E402
from benchmarks.driver import empty_queue, fresh_database  # noqa: E402
from django_events import dispatch  # noqa: E402
from django_events.execution import execute_run  # noqa: E402
from django_events.models import Run  # noqa: E402

CHUNKS = 6


def cpu_ms(work: Callable[[int], object], items: list) -> float:
    began = time.process_time()
    for item in items:
        work(item)
    return (time.process_time() - began) * 1000 / len(items)


def bench_runs(count: int) -> dict[str, float]:
    for start in range(0, count, 1000):
        django_events.send_many([{"name": "bench/noop"} for _ in range(min(1000, count - start))])
    empty_queue()
    run_ids = [str(pk) for pk in Run.objects.values_list("pk", flat=True)]
    sides: dict[str, list[float]] = {"events": [], "floor": []}
    for chunk in range(CHUNKS):
        ids = run_ids[chunk::CHUNKS]
        side = "events" if chunk % 2 == 0 else "floor"
        work = (lambda run_id: execute_run(run_id, lease=660.0)) if side == "events" else floor.run_history
        sides[side].append(cpu_ms(work, ids))
    return {side: statistics.median(values) for side, values in sides.items()}


def bench_sends(count: int) -> dict[str, float]:
    def events(n: int) -> None:
        with transaction.atomic():
            django_events.send("bench/noop", {"n": n})

    def least(n: int) -> None:
        with transaction.atomic():
            floor.store_event()
            transaction.on_commit(lambda: None)  # as plain Dramatiq registers its send

    sides: dict[str, list[float]] = {"events": [], "floor": []}
    for chunk in range(CHUNKS):
        side = "events" if chunk % 2 == 0 else "floor"
        sides[side].append(cpu_ms(events if side == "events" else least, list(range(count // CHUNKS))))
    return {side: statistics.median(values) for side, values in sides.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=24000, help="runs, and sends")
    args = parser.parse_args()
    fresh_database()
    # No broker round trip in the sends: their messages are what plain Dramatiq sends too.
    dispatch._send_after_commit = lambda refs, delay, group: None  # type: ignore[assignment]
    runs = bench_runs(args.count)
    sends = bench_sends(args.count)
    print(f"{'':8} {'django-events':>14} {'floor':>8} {'difference':>11}   (CPU ms, one thread)")
    for name, figures in (("run", runs), ("send", sends)):
        difference = figures["events"] - figures["floor"]
        print(f"{name:8} {figures['events']:>14.3f} {figures['floor']:>8.3f} {difference:>11.3f}")


if __name__ == "__main__":
    main()
