"""A long backlog drained by one slow worker: duplicate messages, and the drain rate as the backlog ages.

``python benchmarks/backlog.py [--jobs 100000] [--inflow 20000 --inflow-rate 100] [--label NAME]``

It sends ``--jobs`` events with one no-op function (``bench/noop``, with ``send_many``,
1,000 a call, every message queued), then starts one worker, ``manage.py rundramatiq
--processes 1 --threads 1``, with a short grace period (``RECOVERY_GRACE`` 5 s,
``RECOVERY_INTERVAL`` 1 s; see ``backlog_settings.py``), so that the backlog takes many
grace periods to drain. With ``--inflow``, new events keep coming while it drains, as
they would in production: that many, ``--inflow-rate`` a second from the worker's
start. Every second it reads the runs that succeeded, the messages the worker processed
(``benchapp/probe.py``), the messages ready in the queue, and the runs the worker's
recovery sent again (its log lines ``Recovery: re-enqueued N overdue run(s)``). Once
every run is done it goes on until the worker has emptied the queue (duplicates left
in it) or ``--tail-timeout`` has passed. It prints, for ten equal windows of the drain,
the runs drained per second and the messages sent again, and writes every sample to
``benchmarks/results/backlog-<time>-<label>.json``.

Duplicates are counted twice over: the runs recovery sent again (each is one more
message in the queue), and the messages processed beyond one per run (a message for a
run already claimed or done is dropped, after a query).

PostgreSQL and Redis by default, on a database and a queue of the benchmark's own
(``django_events_bench_backlog``, ``bench_backlog``), so that it can run beside the suite
(not beside itself). Run it from the checkout whose django-events is measured: the
worker runs that checkout's ``manage.py``, and this script puts the checkout first on
``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.backlog_settings")
os.environ.setdefault("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/django_events_bench_backlog")
os.environ.setdefault("BENCH_QUEUE", "bench_backlog")
sys.path.insert(0, str(ROOT))

import dramatiq  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection, connections  # noqa: E402

import django_events  # noqa: E402
from benchmarks.driver import empty_queue, fresh_database, read_figures, stop  # noqa: E402
from django_events.models import Run, RunStatus  # noqa: E402
from django_events.tasks import ACTOR_NAME  # noqa: E402

#: Seconds between two samples.
SAMPLE = 1.0
#: Windows the drain is cut into for the report.
WINDOWS = 10
_RESENT = re.compile(r"^Recovery: re-enqueued (\d+) overdue run", re.MULTILINE)


def queued() -> int | None:
    """Run messages ready in the queue (Redis only: the list's length), or ``None``."""
    broker: Any = dramatiq.get_broker()
    client = getattr(broker, "client", None)
    if client is None:
        return None
    return int(client.llen(f"{broker.namespace}:{settings.QUEUE}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--inflow", type=int, default=0, help="events sent while the backlog drains")
    parser.add_argument("--inflow-rate", type=float, default=100.0, help="of --inflow, per second")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the drain may take")
    parser.add_argument(
        "--tail-timeout",
        type=float,
        default=900,
        help="seconds left to the duplicates once every run is done",
    )
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    conf = settings.DJANGO_EVENTS
    print(
        f"django-events from {Path(django_events.__file__).parent}; {connection.vendor}, "
        f"{settings.BROKER}; grace {conf['RECOVERY_GRACE']} s, interval {conf['RECOVERY_INTERVAL']} s",
        flush=True,
    )
    fresh_database()
    empty_queue()
    began_sending = time.time()
    for start in range(0, args.jobs, 1000):
        django_events.send_many([{"name": "bench/noop"} for _ in range(min(1000, args.jobs - start))])
    sent_in = time.time() - began_sending
    print(f"sent {args.jobs} events in {sent_in:.1f} s; {queued()} messages queued", flush=True)
    connections.close_all()

    samples: list[dict[str, Any]] = []
    succeeded = Run.objects.filter(status=RunStatus.SUCCEEDED)
    total = args.jobs + args.inflow
    inflow_sent = 0
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as out:
        log_path = Path(out) / "rundramatiq.log"
        env = {**os.environ, "BENCH_OUT_DIR": out, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "manage.py", "rundramatiq", "--processes", "1", "--threads", "1"]
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        started = time.time()
        drained_at: float | None = None
        try:
            while True:
                time.sleep(SAMPLE)
                if worker.poll() is not None:
                    raise RuntimeError(f"rundramatiq exited:\n{log_path.read_text()[-3000:]}")
                if inflow_sent < args.inflow:
                    # New events keep coming while the backlog drains, as they would in production.
                    batch = min(round(args.inflow_rate * SAMPLE), args.inflow - inflow_sent)
                    django_events.send_many([{"name": "bench/noop"} for _ in range(batch)])
                    inflow_sent += batch
                done = succeeded.count()
                actor = read_figures(Path(out))["actors"].get(ACTOR_NAME, {})
                text = log_path.read_text(errors="replace")
                now = time.time() - started
                samples.append(
                    {
                        "t": round(now, 2),
                        "succeeded": done,
                        "processed": int(actor.get("count", 0)),
                        "resent": sum(int(n) for n in _RESENT.findall(text)),
                        "queued": queued(),
                    }
                )
                if drained_at is None and done >= total:
                    drained_at = now
                if now > args.timeout:
                    break
                if drained_at is not None:
                    # Then the worker goes on with the duplicates still queued, until none is left.
                    idle = len(samples) > 2 and samples[-1]["processed"] == samples[-2]["processed"]
                    if (samples[-1]["queued"] == 0 and idle) or now - drained_at > args.tail_timeout:
                        break
        finally:
            stop(worker)
        errors = [line for line in log_path.read_text(errors="replace").splitlines() if "ERROR" in line]

    result = summarise(samples, total)
    result.update(
        jobs=args.jobs,
        inflow=inflow_sent,
        inflow_rate=args.inflow_rate,
        label=args.label,
        django_events=str(Path(django_events.__file__).parent),
        database=connection.vendor,
        broker=settings.BROKER,
        recovery_grace_s=conf["RECOVERY_GRACE"],
        recovery_interval_s=conf["RECOVERY_INTERVAL"],
        send_s=round(sent_in, 1),
        worker_error_lines=len(errors),
        samples=samples,
    )
    print_report(result)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = ROOT / "benchmarks" / "results" / f"backlog-{stamp}{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def summarise(samples: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """Totals, and per window of the drain: runs drained per second and messages sent again."""
    last = samples[-1]
    # The drain: from the first sample with a run done to the first with every run done.
    first = next((s for s in samples if s["succeeded"]), samples[0])
    end = next((s for s in samples if s["succeeded"] >= jobs), last)
    span = max(end["t"] - first["t"], SAMPLE)
    windows = []
    previous = first
    for n in range(1, WINDOWS + 1):
        edge = first["t"] + span * n / WINDOWS
        sample = min((s for s in samples if s["t"] >= edge - 1e-9), key=lambda s: s["t"], default=end)
        seconds = max(sample["t"] - previous["t"], 1e-9)
        windows.append(
            {
                "from_s": previous["t"],
                "to_s": sample["t"],
                "runs_per_s": round((sample["succeeded"] - previous["succeeded"]) / seconds, 1),
                "resent": sample["resent"] - previous["resent"],
                "queued_at_end": sample["queued"],
            }
        )
        previous = sample
    tail = samples[-1]
    return {
        "drained": end["succeeded"],
        "queue_empty_s": tail["t"] if tail["queued"] == 0 else None,
        "duplicates_processed_total": tail["processed"] - tail["succeeded"],
        "drain_s": round(span, 1),
        "runs_per_s": round((end["succeeded"] - first["succeeded"]) / span, 1),
        "resent_total": last["resent"],
        "processed_when_drained": end["processed"],
        "duplicates_processed_when_drained": end["processed"] - end["succeeded"],
        "queued_when_drained": end["queued"],
        "windows": windows,
    }


def print_report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['drained']} of {result['jobs'] + result['inflow']} runs drained in {result['drain_s']} s "
        f"({result['runs_per_s']} runs/s); recovery sent {result['resent_total']} message(s) again; "
        f"{result['duplicates_processed_when_drained']} duplicate message(s) processed and "
        f"{result['queued_when_drained']} still queued when the last run was done"
    )
    empty = result["queue_empty_s"]
    when = f"after {empty} s" if empty is not None else "never (timeout)"
    print(
        f"the worker was done with the queue {when}, having processed "
        f"{result['duplicates_processed_total']} duplicate message(s) in all"
    )
    print(f"\n{'window':>15} {'runs/s':>8} {'sent again':>11} {'queued at end':>14}")
    for window in result["windows"]:
        span = f"{window['from_s']:.0f}-{window['to_s']:.0f} s"
        print(f"{span:>15} {window['runs_per_s']:>8} {window['resent']:>11} {window['queued_at_end']!s:>14}")


if __name__ == "__main__":
    main()
