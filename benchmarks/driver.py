"""One benchmark, one mode, in one process: ``python -m benchmarks.driver WORKLOAD MODE [options]``.

``benchmarks/suite.py`` runs this once per broker, workload and mode, with the
environment of ``benchmarks/bench_settings.py``, and reads the JSON object it prints
last on stdout. Workloads:

- ``send``: ``--iterations`` transactions, each inserting one ``Item`` and sending one
  event (``events``) or sending one message from ``transaction.on_commit`` (``plain``);
  ``--fanout`` sends the event ten functions subscribe to. No worker runs.
- ``send_many``: ``--iterations`` calls, each sending 1,000 events with ``send_many``
  (``events``) or bulk-inserting 1,000 items and sending 1,000 messages on commit (``plain``).
- ``drain``: ``--jobs`` events with one no-op function (or no-op messages) committed
  first, then ``rundramatiq`` with ``--processes`` processes: jobs per second from the
  first job's start until every run is ``succeeded`` in the database (``events``) or every
  message was processed (``plain``).
- ``latency``: workers started and idle, then ``--jobs`` jobs at ``--rate`` per second;
  for each, the time from its transaction's commit to the function (or actor) starting.

Each run starts from a new database (PostgreSQL: dropped and created; SQLite: a new file)
and an empty queue.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.bench_settings")
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

import dramatiq  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections, transaction  # noqa: E402

import django_events  # noqa: E402
from django_events.models import Attempt, Run, RunStatus  # noqa: E402
from django_events.tasks import ACTOR_NAME  # noqa: E402

from .benchapp import floor  # noqa: E402
from .benchapp.models import Item  # noqa: E402
from .benchapp.tasks import plain_history, plain_latency, plain_noop  # noqa: E402

#: Seconds between two looks at the workers' figures or the database while waiting.
POLL = 0.05


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
    }


# -- Setting up ------------------------------------------------------------------------------------


def fresh_database() -> None:
    """Drop and create the benchmark database (or delete the SQLite file), then migrate it."""
    db = settings.DATABASES["default"]
    connections.close_all()
    if db["ENGINE"] == "django.db.backends.sqlite3":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db['NAME']}{suffix}").unlink(missing_ok=True)
    else:
        import psycopg

        server = {
            "host": db.get("HOST") or "127.0.0.1",
            "port": db.get("PORT") or 5432,
            "user": db.get("USER") or "postgres",
            "dbname": "postgres",
            "autocommit": True,
        }
        with psycopg.connect(**server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{db["NAME"]}"')
    call_command("migrate", verbosity=0, interactive=False)


def empty_queue() -> None:
    broker = dramatiq.get_broker()
    broker.declare_queue(settings.QUEUE)
    broker.flush_all()


@contextmanager
def workers(processes: int, threads: int) -> Iterator[Callable[[], dict[str, Any]]]:
    """``manage.py rundramatiq`` on the benchmark settings; yields a function reading its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        env = {**os.environ, "BENCH_OUT_DIR": out, "PYTHONUNBUFFERED": "1"}
        log_path = Path(out) / "rundramatiq.log"
        command = [
            sys.executable,
            "manage.py",
            "rundramatiq",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def figures() -> dict[str, Any]:
            if process.poll() is not None:
                raise RuntimeError(
                    f"rundramatiq exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            return read_figures(Path(out))

        try:
            yield figures
        finally:
            stop(process)
            errors = [line for line in log_path.read_text(errors="replace").splitlines() if "ERROR" in line]
            if errors:
                print(
                    f"rundramatiq logged {len(errors)} error line(s), the first: {errors[0]}", file=sys.stderr
                )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``rundramatiq`` (it passes the signal on); SIGKILL its process group after 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_figures(out: Path) -> dict[str, Any]:
    """The worker processes' figures, merged: per actor count, first start, last end; latency starts."""
    actors: dict[str, dict[str, float]] = {}
    starts: dict[int, float] = {}
    for path in out.glob("worker-*.json"):
        try:
            figures = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced: read at the next look
        for name, entry in figures["actors"].items():
            merged = actors.setdefault(name, {"count": 0, "failed": 0, "first": entry["first"], "last": 0.0})
            merged["count"] += entry["count"]
            merged["failed"] += entry["failed"]
            merged["first"] = min(merged["first"], entry["first"])
            merged["last"] = max(merged["last"], entry["last"])
        for index, at in figures["starts"]:
            starts.setdefault(index, at)  # a duplicate delivery: the first start counts
    return {"actors": actors, "starts": starts}


#: Programs whose CPU time the drain reports: name -> the names its processes' command lines start with.
PROGRAMS = {
    "workers": ("python", "dramatiq"),  # python .../dramatiq (rundramatiq runs dramatiq's command)
    "postgres": ("postgres",),  # the server and its processes ("postgres: ...")
    "redis": ("redis-server",),
    "rabbitmq": ("beam.smp",),
}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) used so far by the running processes of each of ``PROGRAMS``.

    Linux only (``/proc``). Connections are kept open by the workers, so the database
    processes serving them live from the first sample to the last.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(PROGRAMS, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        names = [Path(argv[0].split(" ")[0]).name.rstrip(":"), *(Path(arg).name for arg in argv[1:2])]
        for program, starts in PROGRAMS.items():
            if all(name.startswith(start) for name, start in zip(names, starts, strict=False)) and len(
                names
            ) >= len(starts):
                fields = stat.rsplit(")", 1)[1].split()
                totals[program] += (int(fields[11]) + int(fields[12])) / ticks
                break
    return totals


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def processed(figures: Callable[[], dict[str, Any]], actor: str) -> int:
    return int(figures()["actors"].get(actor, {}).get("count", 0))


#: The columns of ``pg_stat_wal`` the benchmarks report, per job.
WAL_COLUMNS = ("wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync")


def wal_totals() -> dict[str, float] | None:
    """PostgreSQL's WAL counters so far (``pg_stat_wal``, every process), or ``None`` on SQLite.

    Backends report their counters now and then and when they exit: read it after the
    workers stopped, and this process's own after ``pg_stat_force_next_flush()``.
    """
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    connections.close_all()  # this process's backend reports as it exits
    time.sleep(0.5)  # the counters of exiting backends reach the statistics a moment later
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(WAL_COLUMNS)} FROM pg_stat_wal")
        row = cursor.fetchone()
    return {name: float(value) for name, value in zip(WAL_COLUMNS, row, strict=True)}


def wal_per_job(
    before: dict[str, float] | None, after: dict[str, float] | None, jobs: int
) -> dict[str, float]:
    if before is None or after is None:
        return {}
    return {name: round((after[name] - before[name]) / jobs, 3) for name in WAL_COLUMNS}


def commit_rate(seconds: float = 3.0) -> float | None:
    """The machine's single-connection commit rate: INSERT + COMMIT of one row in a loop, per second.

    What a drain that commits once per job on one connection could reach if nothing but WAL
    flushes limited it; the drain's figure is reported against it. ``None`` on SQLite.
    """
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (id bigserial PRIMARY KEY, n int)")
        for _ in range(200):  # warm up
            cursor.execute("INSERT INTO bench_commit_probe (n) VALUES (1)")
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            cursor.execute("INSERT INTO bench_commit_probe (n) VALUES (1)")  # autocommit: one commit each
            done += 1
        elapsed = time.perf_counter() - began
        cursor.execute("DROP TABLE bench_commit_probe")
    return done / elapsed


# -- Workloads ---------------------------------------------------------------------------------------


def bench_send(mode: str, iterations: int, fanout: bool) -> dict[str, Any]:
    """``mode`` ``both``: the two sides alternate, iteration by iteration, in one process, so that
    a change in the machine's speed (the disk's, mostly) during the run weighs on both alike."""
    fresh_database()
    empty_queue()
    name = "bench/fanout" if fanout else "bench/noop"

    def once(n: int, side: str) -> None:
        with transaction.atomic():
            Item.objects.create(name=f"item {n}")
            if side == "events":
                django_events.send(name, {"n": n})
            else:
                if side == "floor":
                    floor.store_event()
                transaction.on_commit(lambda: plain_noop.send(n))

    sides = ["events", "plain"] if mode == "both" else [mode]
    if mode == "both" and not fanout and connection.vendor == "postgresql":
        sides.append("floor")  # the floor runs django-events' PostgreSQL statement
    for n in range(min(100, iterations)):  # warm up: connections, statement caches
        for side in sides:
            once(n, side)
    times: dict[str, list[float]] = {side: [] for side in sides}
    wal: dict[str, list[int]] = {side: [] for side in sides}
    postgres = connection.vendor == "postgresql"
    for n in range(iterations):
        for side in sides if n % 2 else reversed(sides):
            lsn = _lsn() if postgres else 0
            began = time.perf_counter()
            once(n, side)
            times[side].append(time.perf_counter() - began)
            if postgres:
                wal[side].append(_lsn() - lsn)  # the WAL this transaction wrote (and the LSN query)
    empty_queue()

    def figures(side: str) -> dict[str, Any]:
        result: dict[str, Any] = summary_ms(times[side])
        if postgres:
            result["wal_bytes_median"] = statistics.median(wal[side])
        return result

    if mode == "both":
        return {side: figures(side) for side in sides}
    return figures(mode)


def _lsn() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
        return int(cursor.fetchone()[0])


def bench_send_many(mode: str, iterations: int, batch: int = 1000) -> dict[str, Any]:
    fresh_database()
    empty_queue()

    def once(side: str) -> None:
        if side == "events":
            django_events.send_many([{"name": "bench/noop", "data": {"i": i}} for i in range(batch)])
        else:
            with transaction.atomic():
                Item.objects.bulk_create([Item(name=f"item {i}") for i in range(batch)])
                transaction.on_commit(lambda: [plain_noop.send(i) for i in range(batch)])

    sides = ["events", "plain"] if mode == "both" else [mode]
    for side in sides:
        once(side)  # warm up
    times: dict[str, list[float]] = {side: [] for side in sides}
    for n in range(iterations):
        for side in sides if n % 2 else reversed(sides):
            began = time.perf_counter()
            once(side)
            times[side].append(time.perf_counter() - began)
        empty_queue()
    if mode == "both":
        return {side: {**summary_ms(values), "batch": batch} for side, values in times.items()}
    return {**summary_ms(times[mode]), "batch": batch}


def bench_drain(mode: str, jobs: int, processes: int, threads: int, timeout: float) -> dict[str, Any]:
    fresh_database()
    empty_queue()
    if mode == "events":
        for start in range(0, jobs, 1000):
            django_events.send_many([{"name": "bench/noop"} for _ in range(min(1000, jobs - start))])
        actor = ACTOR_NAME
    elif mode == "floor":
        run_ids = floor.pending_run_ids(jobs)
        empty_queue()  # the runs' own messages: this side sends its own
        for run_id in run_ids:
            plain_history.send(run_id)
        actor = plain_history.actor_name
    else:
        for i in range(jobs):
            plain_noop.send(i)
        actor = plain_noop.actor_name
    connections.close_all()
    commits_per_s = commit_rate()
    wal_before = wal_totals()

    began = time.time()
    with workers(processes, threads) as figures:
        # CPU time by program, from a tenth of the jobs to the end: what one job costs each.
        wait_until(lambda: processed(figures, actor) >= jobs // 10, timeout, "a tenth of the jobs")
        cpu_from, count_from = cpu_seconds(), processed(figures, actor)
        if mode != "plain":
            not_done = Run.objects.exclude(status=RunStatus.SUCCEEDED)
            wait_until(
                lambda: processed(figures, actor) >= jobs and not not_done.exists(), timeout, "the runs"
            )
        else:
            wait_until(lambda: processed(figures, actor) >= jobs, timeout, "the messages")
        done_seen = time.time()
        cpu_to, count_to = cpu_seconds(), processed(figures, actor)
        # The figures that showed every job processed hold the last end time too.
        entry = figures()["actors"][actor]
    result: dict[str, Any] = {
        "jobs": jobs,
        "processes": processes,
        "threads": threads,
        "messages_processed": int(entry["count"]),
        "messages_failed": int(entry["failed"]),
        "wall_s": done_seen - began,
    }
    result["cpu_ms_per_job"] = {
        program: round((cpu_to[program] - seconds) * 1000 / max(1, count_to - count_from), 4)
        for program, seconds in cpu_from.items()
    }
    end = entry["last"]
    if mode != "plain":
        finished = Run.objects.order_by("-finished_at").values_list("finished_at", flat=True).first()
        assert finished is not None
        end = finished.timestamp()
        result["runs_succeeded"] = Run.objects.filter(status=RunStatus.SUCCEEDED).count()
        result["attempts"] = Attempt.objects.count()
    result["seconds"] = end - entry["first"]
    result["jobs_per_s"] = jobs / result["seconds"]
    # WAL per job over the whole drain (workers started and stopped included), and the commit rate
    # measured just before it on the same database: the drain is reported against it.
    result["wal_per_job"] = wal_per_job(wal_before, wal_totals(), jobs)
    if commits_per_s is not None:
        result["commit_rate_per_s"] = commits_per_s
        result["jobs_per_commit_rate"] = result["jobs_per_s"] / commits_per_s
    return result


def bench_latency(
    mode: str, jobs: int, rate: float, processes: int, threads: int, timeout: float
) -> dict[str, Any]:
    fresh_database()
    empty_queue()
    commits: dict[int, float] = {}
    with workers(processes, threads) as figures:
        # Warm up: every worker thread has connected and processed something; then they are idle.
        warm_actor = ACTOR_NAME if mode == "events" else plain_noop.actor_name
        for n in range(4 * processes * threads):
            if mode == "events":
                django_events.send("bench/noop", {"n": n})
            else:
                plain_noop.send(n)
        wait_until(lambda: processed(figures, warm_actor) >= 4 * processes * threads, timeout, "the warm-up")

        began = time.perf_counter()
        late = 0
        for i in range(jobs):
            target = began + i / rate
            pause = target - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # pacing the sender at `rate`, not waiting for anything
            else:
                late += 1
            with transaction.atomic():
                # Registered first, so it runs right after COMMIT, before any enqueue on commit.
                transaction.on_commit(lambda i=i: commits.__setitem__(i, time.time()))
                Item.objects.create(name=f"item {i}")
                if mode == "events":
                    django_events.send("bench/latency", {"i": i})
                else:
                    transaction.on_commit(lambda i=i: plain_latency.send(i))
        sent_in = time.perf_counter() - began
        wait_until(lambda: len(figures()["starts"]) >= jobs, timeout, "the latency probes")
        starts = figures()["starts"]
    latencies = [starts[i] - commits[i] for i in range(jobs)]
    return {
        **summary_ms(latencies),
        "min_ms": min(latencies) * 1000,
        "jobs": jobs,
        "rate": rate,
        "achieved_rate": jobs / sent_in,
        "late_sends": late,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workload", choices=["send", "send_many", "drain", "latency"])
    parser.add_argument(
        "mode",
        choices=["events", "plain", "floor", "both"],
        help="floor: plain Dramatiq plus only the history's SQL (send and drain); both: send workloads only",
    )
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--fanout", action="store_true")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    if args.workload == "send":
        result = bench_send(args.mode, args.iterations, args.fanout)
    elif args.workload == "send_many":
        result = bench_send_many(args.mode, args.iterations)
    elif args.mode == "both":
        parser.error("mode 'both' is for the send workloads")
    elif args.mode == "floor" and (args.workload != "drain" or connection.vendor != "postgresql"):
        parser.error("mode 'floor' is for drain on PostgreSQL (send's floor runs within 'both')")
    elif args.workload == "drain":
        result = bench_drain(args.mode, args.jobs, args.processes, args.threads, args.timeout)
    else:
        result = bench_latency(args.mode, args.jobs, args.rate, args.processes, args.threads, args.timeout)
    context = {"database": connection.vendor, "broker": type(dramatiq.get_broker()).__name__}
    if args.mode == "both":
        result = {side: {**figures, **context} for side, figures in result.items()}
    else:
        result.update(context)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
