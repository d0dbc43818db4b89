"""What a concurrency limit costs a drain: ``python benchmarks/flow.py``.

The suite's drain (``driver.py drain events``: 20,000 committed events with one no-op
function, then ``rundramatiq --processes 2 --threads 8`` on Redis, PostgreSQL holding the
history) once per *case*, each in a subprocess of its own (``--one CASE``), the cases
one after the other in each of ``--rounds`` rounds:

- ``no-flow``: the suite's own ``bench/noop``, in an app with no flow control at all;
- ``unlimited``: a no-op with no flow control, in an app where other functions have some
  (the baseline: the same worker settings and registry as the limited cases);
- ``limit16``: ``concurrency=Concurrency(16)``, a limit 16 worker threads never pass:
  only the bookkeeping (the claim's transaction under the key's lock, the slot, its
  release and the look for held runs in the record's transaction);
- ``limit4``: ``Concurrency(4)``, a limit that binds: runs are held and woken;
- ``keyed-spread`` / ``keyed-grouped``: ``Concurrency(1, key="data.k")`` over ``--keys``
  keys (1,000), the same number of runs per key; ``spread`` sends the keys in turn
  (event i has key i mod 1,000: neighbours in the queue differ), ``grouped`` sends
  each key's runs one after the other (20 in a row share a key: all but one are held).

Each case starts from a new database and an empty queue, measures the single-connection
commit rate just before its drain (``driver.commit_rate``), and reports jobs/s from the
first job's start to the last run's finish, ``pg_stat_wal`` per run, CPU per run by
program, the messages processed (a held run takes two: the one that held it and the one
that woke it), the longest time in which no attempt started (a stall), and what the
database's busy backends were waiting on, sampled every 20 ms from ``pg_stat_activity``.
It checks that every run succeeded once and that no slot is left.

``--statements`` instead runs ``--statement-runs`` runs of each case's function in one
thread of a subprocess, with no worker and no broker round trip (``execution.execute_run``),
and reports per run: the statements by kind and their time, the commits of the benchmark
database, the server's WAL flushes and bytes (``pg_stat_wal``: the whole server's), and
the process's CPU time.

Examples::

    .venv/bin/python benchmarks/flow.py --rounds 2 --label flow
    .venv/bin/python benchmarks/flow.py --cases unlimited limit16 --rounds 3
    .venv/bin/python benchmarks/flow.py --statements
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import itertools
import json
import os
import platform
import pstats
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/django_events_bench_flow"
QUEUE = "bench_flow"

#: case -> (event name, how event ``i`` of ``jobs`` over ``keys`` keys gets its key, or None: no data)
CASES: dict[str, tuple[str, str | None]] = {
    "no-flow": ("bench/noop", None),
    "unlimited": ("bench/flow.unlimited", None),
    "limit16": ("bench/flow.limit16", None),
    "limit4": ("bench/flow.limit4", None),
    "keyed-spread": ("bench/flow.keyed", "spread"),
    "keyed-grouped": ("bench/flow.keyed", "grouped"),
}
#: The cases ``--statements`` measures by default (a limit that binds changes nothing in one thread).
STATEMENT_CASES = ["no-flow", "unlimited", "limit16", "keyed-spread"]
#: The case every other one is set against, in the same round.
BASELINE = "unlimited"
#: Seconds between two samples of pg_stat_activity.
SAMPLE_EVERY = 0.02


def key_of(i: int, jobs: int, keys: int, order: str) -> int:
    """Event ``i``'s key: in turn (``spread``) or ``jobs / keys`` in a row (``grouped``)."""
    return i % keys if order == "spread" else i * keys // jobs


# -- one case, in a process of its own ------------------------------------------------------------


def run_one(case: str, jobs: int, keys: int, processes: int, threads: int, timeout: float) -> dict[str, Any]:
    """Drain ``jobs`` runs of ``case``'s function; the driver's figures plus flow control's own."""
    from django.db import connections

    import django_events
    from benchmarks import driver
    from django_events.models import Attempt, Run, RunStatus, Slot
    from django_events.tasks import ACTOR_NAME

    name, order = CASES[case]
    driver.fresh_database()
    driver.empty_queue()
    for start in range(0, jobs, 1000):
        django_events.send_many(
            [
                {"name": name}
                if order is None
                else {"name": name, "data": {"k": key_of(i, jobs, keys, order)}}
                for i in range(start, min(jobs, start + 1000))
            ]
        )
    connections.close_all()
    commits_per_s = driver.commit_rate()
    wal_before = driver.wal_totals()
    sampler = WaitSampler(connections["default"].settings_dict)

    began = time.time()
    succeeded = Run.objects.filter(status=RunStatus.SUCCEEDED)
    with driver.workers(processes, threads) as figures:
        driver.wait_until(lambda: succeeded.count() >= jobs // 10, timeout, "a tenth of the runs")
        cpu_from, runs_from = own_cpu_seconds(), succeeded.count()
        sampler.start()
        not_done = Run.objects.exclude(status=RunStatus.SUCCEEDED)
        driver.wait_until(lambda: not not_done.exists(), timeout, "the runs")
        sampler.stop()
        cpu_to, runs_to = own_cpu_seconds(), succeeded.count()
        done_seen = time.time()
        # Woken runs' messages are sent in the record's transaction: every one is processed by now
        # or is a duplicate; wait a moment for the workers' last figures.
        time.sleep(0.3)
        entry = figures()["actors"][ACTOR_NAME]
    finished = Run.objects.order_by("-finished_at").values_list("finished_at", flat=True).first()
    assert finished is not None
    seconds = finished.timestamp() - entry["first"]
    starts = [
        at.timestamp() for at in Attempt.objects.order_by("started_at").values_list("started_at", flat=True)
    ]
    gap, after = max((b - a, a - starts[0]) for a, b in itertools.pairwise(starts))
    result: dict[str, Any] = {
        "case": case,
        "event": name,
        "keys": keys if order else None,
        "order": order,
        "jobs": jobs,
        "processes": processes,
        "threads": threads,
        "wall_s": done_seen - began,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "messages_processed": int(entry["count"]),
        "messages_failed": int(entry["failed"]),
        "extra_messages_per_run": round((entry["count"] - jobs) / jobs, 3),
        # The longest time no attempt started, and when (seconds after the first start): a stall.
        "longest_start_gap_s": round(gap, 3),
        "longest_start_gap_after_s": round(after, 3),
        "runs_succeeded": Run.objects.filter(status=RunStatus.SUCCEEDED).count(),
        "attempts": Attempt.objects.count(),
        "slots_left": Slot.objects.count(),
        "cpu_ms_per_job": {
            program: round(spent * 1000 / max(1, runs_to - runs_from), 4)
            for program, spent in cpu_spent(cpu_from, cpu_to).items()
        },
        "waits": sampler.summary(),
    }
    result["wal_per_job"] = driver.wal_per_job(wal_before, driver.wal_totals(), jobs)
    if commits_per_s is not None:
        result["commit_rate_per_s"] = commits_per_s
        result["jobs_per_commit_rate"] = result["jobs_per_s"] / commits_per_s
    if result["runs_succeeded"] != jobs or result["attempts"] != jobs or result["slots_left"]:
        result["error"] = (
            f"{result['runs_succeeded']} runs succeeded, {result['attempts']} attempts, "
            f"{result['slots_left']} slots left, for {jobs} runs"
        )
    return result


def own_cpu_seconds() -> dict[str, dict[int, float]]:
    """CPU seconds so far, by process, of this benchmark's own: its workers and its database's backends.

    Unlike ``driver.cpu_seconds``, which counts every ``dramatiq`` and ``postgres`` process,
    this leaves out other programs sharing the machine (tests with workers of their own):
    the workers are this process's descendants, the backends those of ``pg_stat_activity``
    on the benchmark database. PostgreSQL's shared processes (the WAL writer, the
    checkpointer) are left out too. See :func:`cpu_spent`.
    """
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        backends = {row[0] for row in cursor.fetchall()}
    parents: dict[int, int] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {
        "workers": {pid: seconds for pid, seconds in used.items() if descends(pid)},
        "postgres": {pid: seconds for pid, seconds in used.items() if pid in backends},
    }


def cpu_spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds by program from ``before`` to ``after`` (:func:`own_cpu_seconds`).

    Counted for the processes alive at ``after`` (from ``before``, or from their start): a
    backend that closed its connection meanwhile is not counted (the workers keep theirs).
    """
    return {
        program: sum(seconds - before[program].get(pid, 0.0) for pid, seconds in processes.items())
        for program, processes in after.items()
    }


class WaitSampler:
    """Samples, every ``SAMPLE_EVERY`` s, what the benchmark database's busy backends wait on."""

    def __init__(self, database: dict[str, Any]) -> None:
        self.database = database
        self.counts: Counter[str] = Counter()
        self.lock_waits: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wait-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psycopg

        db = self.database
        with psycopg.connect(
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
            user=db.get("USER") or "postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            while not self._stop.wait(SAMPLE_EVERY):
                rows = conn.execute(
                    "SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event, "
                    "'CPU') ELSE state END, wait_event_type = 'Lock', left(query, 60), count(*) "
                    "FROM pg_stat_activity WHERE datname = %s AND state IN ('active', 'idle in transaction') "
                    "AND pid <> pg_backend_pid() GROUP BY 1, 2, 3",
                    [db["NAME"]],
                ).fetchall()
                self.samples += 1
                for what, lock, query, count in rows:
                    self.counts[what] += count
                    if lock:
                        self.lock_waits[" ".join(query.replace('"', "").split()[:4])] += count

    def summary(self) -> dict[str, Any]:
        """Backends per sample: active ones by what they waited on (``CPU``: not waiting), and
        those idle in a transaction (its client is busy between two statements); and the
        statements (their first words) of those waiting for a lock."""
        per_sample = {
            what: round(count / max(1, self.samples), 3) for what, count in self.counts.most_common()
        }
        lock_waits = {
            query: round(count / max(1, self.samples), 3) for query, count in self.lock_waits.most_common()
        }
        return {
            "samples": self.samples,
            "active_per_sample": per_sample,
            "lock_waits_by_statement": lock_waits,
        }


# -- statements per run, in this process ------------------------------------------------------------


def statements(case: str, runs: int, keys: int, profile: bool = False) -> dict[str, Any]:
    """Statements, commits, WAL and time per run of ``case``'s function: one thread, no worker.

    With ``profile``, the runs are also profiled (cProfile) and the ledger's and flow
    control's functions that take the most CPU, with their callees, are printed to stderr.
    """
    from django.db import connection

    import django_events
    from benchmarks import driver
    from django_events.execution import execute_run
    from django_events.models import Run

    driver.fresh_database()
    driver.empty_queue()
    name, order = CASES[case]
    django_events.send_many(
        [
            {"name": name} if order is None else {"name": name, "data": {"k": i % keys}}
            for i in range(runs + 50)
        ]
    )
    driver.empty_queue()
    runs_of = list(Run.objects.order_by("created_at", "pk").values_list("pk", "function"))
    for run_id, function_id in runs_of[:50]:  # warm up: statement caches, the keys' rows
        execute_run(run_id, lease=660.0, function_id=function_id)
    tally = StatementTally()
    profiler = cProfile.Profile() if profile else None
    counters_before = server_counters()
    began, cpu = time.perf_counter(), time.process_time()
    with connection.execute_wrapper(tally):
        if profiler is not None:
            profiler.enable()
        for run_id, function_id in runs_of[50:]:
            execute_run(run_id, lease=660.0, function_id=function_id)  # as the actor calls it
        if profiler is not None:
            profiler.disable()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(r"django_events/(flow|ledger|execution)\.py", 25)
    counters_after = server_counters()
    driver.empty_queue()
    return {
        "case": case,
        "runs": runs,
        **{
            f"{counter}_per_run": round((counters_after[counter] - counters_before[counter]) / runs, 3)
            for counter in counters_before
        },
        "ms_per_run": round(wall * 1000 / runs, 3),
        "cpu_ms_per_run": round(cpu * 1000 / runs, 3),
        "statements_per_run": round(sum(tally.counts.values()) / runs, 2),
        "by_kind": {
            kind: {
                "per_run": round(count / runs, 2),
                "ms_per_run": round(tally.seconds[kind] * 1000 / runs, 3),
            }
            for kind, count in tally.counts.most_common()
        },
    }


class StatementTally:
    """A Django execute wrapper that counts statements and their time by :func:`statement_kind`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        kind = statement_kind(sql)
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.counts[kind] += 1
            self.seconds[kind] += time.perf_counter() - began


def server_counters() -> dict[str, float]:
    """The benchmark database's commits and the server's WAL flushes and bytes so far.

    As ``driver.wal_totals``: this backend's counters reach the statistics when it exits.
    """
    from django.db import connection, connections

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    connections.close_all()
    time.sleep(0.5)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), "
            "wal_sync, wal_bytes FROM pg_stat_wal"
        )
        commits, syncs, wal_bytes = cursor.fetchone()
    connections.close_all()
    return {"commits": float(commits), "wal_syncs": float(syncs), "wal_bytes": float(wal_bytes)}


def statement_kind(sql: str) -> str:
    """A statement's first words and its table: ``"UPDATE django_events_flowkey"``."""
    words = sql.replace('"', "").split()
    head = words[0].upper() if words else "?"
    if head in ("SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT", "BEGIN"):
        return head
    for word in words:
        if word.startswith("django_events_"):
            return f"{head} {word.split('.')[0].rstrip(',(')}"
    return head


# -- the rounds, each case in a subprocess -----------------------------------------------------------


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``case`` (its drain, or with ``--statements`` its statements per run) in a subprocess."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.bench_settings",
        "BENCH_BROKER": "redis",
        "BENCH_DATABASE_URL": args.database_url,
        "BENCH_QUEUE": QUEUE,
        "BENCH_FLOW": "0" if case == "no-flow" else "1",
    }
    command = [
        sys.executable,
        "-m",
        "benchmarks.flow",
        "--one",
        case,
        "--jobs",
        str(args.jobs),
        "--keys",
        str(args.keys),
        "--processes",
        str(args.processes),
        "--threads",
        str(args.threads),
        "--timeout",
        str(args.timeout),
        *(["--statements", "--statement-runs", str(args.statement_runs)] if args.statements else []),
        *(["--profile"] if args.profile else []),
    ]
    print(f"  {case:<14} ...", end="", flush=True, file=sys.stderr)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(" failed", file=sys.stderr)
        return {"case": case, "error": (done.stderr or done.stdout)[-3000:]}
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.statements:
        print(
            f" {figures['statements_per_run']:.1f} statements, {figures['ms_per_run']:.2f} ms,"
            f" {figures['cpu_ms_per_run']:.2f} ms CPU per run",
            file=sys.stderr,
        )
        if args.profile:
            print(done.stderr, file=sys.stderr)
        return figures
    print(
        f" {figures['jobs_per_s']:,.0f} jobs/s, commits {figures.get('commit_rate_per_s', 0):,.0f}/s"
        f"{'  ERROR ' + figures['error'] if 'error' in figures else ''}",
        file=sys.stderr,
    )
    if done.stderr.strip():
        figures["stderr"] = done.stderr[-2000:]
    return figures


def table(rounds: list[dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'round':<6}{'case':<15}{'jobs/s':>8}{'vs ' + BASELINE:>14}{'commits/s':>11}{'vs commits':>11}"
        f"{'WAL syncs':>10}{'WAL B':>7}{'msgs/run':>9}{'CPU ms w+pg':>13}  top waits"
    ]
    for number, cases in enumerate(rounds, 1):
        base = cases.get(BASELINE, {}).get("jobs_per_s")
        for case, r in cases.items():
            if "jobs_per_s" not in r:
                lines.append(f"{number:<6}{case:<15}  failed: {r.get('error', '')[:200]!r}")
                continue
            wal, cpu = r.get("wal_per_job", {}), r["cpu_ms_per_job"]
            waits = ", ".join(
                f"{what} {n:.1f}" for what, n in list(r["waits"]["active_per_sample"].items())[:3]
            )
            against = f"{r['jobs_per_s'] / base:.2f}x" if base else "-"
            lines.append(
                f"{number:<6}{case:<15}{r['jobs_per_s']:>8,.0f}{against:>14}"
                f"{r.get('commit_rate_per_s', 0):>11,.0f}{r.get('jobs_per_commit_rate', 0):>10.2f}x"
                f"{wal.get('wal_sync', 0):>10.2f}{wal.get('wal_bytes', 0):>7,.0f}"
                f"{1 + r['extra_messages_per_run']:>9.2f}"
                f"{cpu['workers']:>7.2f}+{cpu['postgres']:<5.2f}  {waits}"
                f"{'  ERROR ' + r['error'] if 'error' in r else ''}"
            )
    return "\n".join(lines)


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of ``django_events/`` that differ from it (uncommitted)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "changed": git("status", "--porcelain", "--", "django_events", "benchmarks").splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="default: all (statements: four)")
    parser.add_argument("--rounds", type=int, default=1, help="times each case runs, the cases in turn")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=1000, help="keys of the keyed cases")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_POSTGRES))
    parser.add_argument("--label", default="")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--one", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--statements", action="store_true", help="statements per run, in this process")
    parser.add_argument("--statement-runs", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="with --statements: profile (to stderr)")
    args = parser.parse_args()

    if args.one:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.bench_settings")
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        if args.statements:
            print(json.dumps(statements(args.one, args.statement_runs, args.keys, args.profile)))
        else:
            print(
                json.dumps(
                    run_one(args.one, args.jobs, args.keys, args.processes, args.threads, args.timeout)
                )
            )
        return
    if args.statements:
        cases = args.cases or STATEMENT_CASES
        figures: dict[str, Any] = {"statements": {case: run_case(case, args) for case in cases}}
        print(json.dumps(figures["statements"], indent=2))
    else:
        rounds = []
        for number in range(1, args.rounds + 1):
            print(f"round {number} of {args.rounds}", file=sys.stderr)
            rounds.append({case: run_case(case, args) for case in args.cases or list(CASES)})
        print(table(rounds))
        figures = {"rounds": rounds}

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    kind = "flow-statements" if args.statements else "flow"
    output = (
        args.output
        or ROOT / "benchmarks" / "results" / f"{kind}-{stamp}{'-' + args.label if args.label else ''}.json"
    )
    document = {
        "when": stamp,
        "code": code_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        **figures,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nRaw figures: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
