"""What durable steps cost: ``python benchmarks/steps.py``.

In one thread of a subprocess per database (``--databases postgres sqlite``), with no
worker: runs of ``benchapp/step_events.py``'s function executed as the actor executes
them (``execution.execute_run``, the claim, the call and the record; a sleep's wake
message goes to Redis, as a worker sends it). The cases, each on runs made beforehand:

- ``plain``: no step (the baseline of every ratio);
- ``run1`` / ``run10``: 1 / 10 ``ctx.step.run`` of a callable that does nothing;
- ``atomic1`` / ``atomic10``: the same with ``ctx.step.atomic``;
- ``sleep0``: ``ctx.step.sleep(0)``: over at once, only its memo is written;
- ``sleep``: ``ctx.step.sleep(--sleep-seconds)`` (1 s): the run leaves the worker
  (``suspend``: the attempt recorded as suspended, the run ``sleeping``, the sleep's row
  and the wake message), then, once due, is claimed again and replayed past the sleep
  (``wake``): the two passes over a round's runs, the second once the last sleep is over
  (the time between is not counted). A sleep is counted from its call: on a loaded
  machine one of 0.01 s was over for 1 to 3% of the runs by the time the step had read
  the run's memos, and those runs did not suspend.

The cases take turns in ``--rounds`` rounds of ``--runs`` runs each. For each it reports
per run: wall and CPU time, statements by kind (an execute wrapper), and on PostgreSQL
the database's commits and the server's WAL flushes and bytes (``pg_stat_wal``). Per
step: the difference to ``plain`` over ``k``. The single-connection commit rate (INSERT +
COMMIT of one row in a loop, 3 s) is measured on the same database before and after,
and every figure is also given against it.

Then the sends (``--sends``): ``send()`` of one ``bench/noop`` event in
``transaction.atomic()``, its message to Redis, with no wait anywhere, in turns with and
without ``waits.deliver`` (replaced, in this process only, by a function that does
nothing: the send as it was before durable steps). ``waits.deliver``'s own time is
measured by a wrapper in the turns that keep it.

``--drain`` adds, on PostgreSQL and Redis, drains through ``rundramatiq --processes 2
--threads 8`` of ``--jobs`` committed runs that sleep once (``--drain-sleep-seconds``, 1 s:
a sleep is counted from its call, so one of 0.01 s is often over, with nothing to
suspend, by the time a busy worker has read the run's steps) against as
many plain runs, in turns, each from a new database, with the commit rate measured just
before each drain.

Examples::

    .venv/bin/python benchmarks/steps.py --label steps
    .venv/bin/python benchmarks/steps.py --databases postgres --drain --drain-only --rounds 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATABASES = {
    "postgres": "postgres://postgres@127.0.0.1:5432/django_events_bench_steps",
    "sqlite": "sqlite:////tmp/django_events_bench_steps.sqlite3",
}
QUEUE = "bench_steps"

#: case -> the event's data (``benchapp/step_events.py`` reads it).
CASES: dict[str, dict[str, Any]] = {
    "plain": {"kind": "plain"},
    "run1": {"kind": "run", "k": 1},
    "run10": {"kind": "run", "k": 10},
    "atomic1": {"kind": "atomic", "k": 1},
    "atomic10": {"kind": "atomic", "k": 10},
    "sleep0": {"kind": "sleep", "seconds": 0},
    "sleep": {"kind": "sleep"},  # seconds: --sleep-seconds
}
#: Runs of each case executed before any is measured (statement caches, the connection).
WARM_UP = 30


# -- in one process -------------------------------------------------------------------------------


class StatementTally:
    """A Django execute wrapper counting statements by their first word and table."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        from benchmarks.flow import statement_kind

        self.counts[statement_kind(sql)] += 1
        return execute(sql, params, many, context)


def commit_rate(seconds: float = 3.0) -> float:
    """Single-connection commits per second: INSERT of one row, autocommit, in a loop (any database)."""
    from django.db import connection

    key = "bigserial PRIMARY KEY" if connection.vendor == "postgresql" else "INTEGER PRIMARY KEY"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS bench_commit_probe (id {key}, n int)")
        for _ in range(200):  # warm up
            cursor.execute("INSERT INTO bench_commit_probe (n) VALUES (1)")
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            cursor.execute("INSERT INTO bench_commit_probe (n) VALUES (1)")
            done += 1
        elapsed = time.perf_counter() - began
        cursor.execute("DROP TABLE bench_commit_probe")
    return done / elapsed


def counters() -> dict[str, float]:
    """PostgreSQL: the database's commits, the server's WAL flushes and bytes so far; else nothing."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return {}
    from benchmarks.flow import server_counters

    figures = server_counters()
    with connection.cursor() as cursor:  # connect again before the clock starts
        cursor.execute("SELECT 1")
    return figures


class Totals:
    """One case's (or one pass's) sums over its rounds."""

    def __init__(self) -> None:
        self.runs = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.statements: Counter[str] = Counter()
        self.server: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.ms_per_round: list[float] = []

    def add(
        self, runs: int, wall: float, cpu: float, tally: StatementTally, before: dict, after: dict
    ) -> None:
        self.runs += runs
        self.wall += wall
        self.cpu += cpu
        self.statements.update(tally.counts)
        for name in before:
            self.server[name] += after[name] - before[name]
        self.ms_per_round.append(wall * 1000 / runs)

    def figures(self) -> dict[str, Any]:
        runs = max(1, self.runs)
        return {
            "runs": self.runs,
            "ms_per_run": round(self.wall * 1000 / runs, 4),
            "ms_per_run_by_round": [round(ms, 4) for ms in self.ms_per_round],
            "cpu_ms_per_run": round(self.cpu * 1000 / runs, 4),
            "statements_per_run": round(sum(self.statements.values()) / runs, 3),
            "statements_by_kind": {kind: round(n / runs, 3) for kind, n in self.statements.most_common()},
            **{f"{name}_per_run": round(value / runs, 3) for name, value in self.server.items()},
            "outcomes": dict(self.outcomes),
        }


def timed_pass(run_ids: list[tuple[Any, str]], totals: Totals) -> None:
    """Execute ``run_ids`` as the actor does, adding the time, statements and counters to ``totals``."""
    from django.db import connection

    from django_events.execution import execute_run

    tally = StatementTally()
    before = counters()
    outcomes: Counter[str] = Counter()
    began, cpu = time.perf_counter(), time.process_time()
    with connection.execute_wrapper(tally):
        for run_id, function_id in run_ids:
            outcomes[execute_run(run_id, lease=660.0, function_id=function_id).value] += 1
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    totals.add(len(run_ids), wall, cpu, tally, before, counters())
    totals.outcomes.update(outcomes)


def bench_steps(runs: int, rounds: int, sleep_seconds: float) -> dict[str, Any]:
    """The cases, in turns: figures per case (``sleep``: its ``suspend`` and ``wake`` passes too)."""
    import django_events
    from benchmarks import driver
    from benchmarks.benchapp.step_events import STEPS
    from django_events.models import Run

    per_case = WARM_UP + runs * rounds
    ids: dict[str, list[tuple[Any, str]]] = {}
    for case, data in CASES.items():
        data = {**data, "seconds": sleep_seconds} if case == "sleep" else data
        events: list[Any] = []
        for start in range(0, per_case, 1000):
            events += django_events.send_many(
                [{"name": STEPS, "data": data} for _ in range(min(1000, per_case - start))]
            )
        event_ids = [event.pk for event in events]
        ids[case] = []
        for start in range(0, len(event_ids), 1000):
            ids[case] += list(
                Run.objects.filter(event_id__in=event_ids[start : start + 1000])
                .order_by("created_at", "pk")
                .values_list("pk", "function")
            )
        assert len(ids[case]) == per_case, (case, len(ids[case]))
    driver.empty_queue()
    warm = Totals()
    for case in CASES:
        timed_pass(ids[case][:WARM_UP], warm)
    if "sleep" in CASES:
        time.sleep(sleep_seconds)
        timed_pass(ids["sleep"][:WARM_UP], warm)  # the warm-up sleepers' wakes

    totals = {case: Totals() for case in CASES}
    suspend, wake = Totals(), Totals()
    for number in range(rounds):
        order = list(CASES)
        order = order[number % len(order) :] + order[: number % len(order)]  # each case goes first once
        for case in order:
            chunk = ids[case][WARM_UP + number * runs : WARM_UP + (number + 1) * runs]
            if case != "sleep":
                timed_pass(chunk, totals[case])
                continue
            timed_pass(chunk, suspend)
            time.sleep(sleep_seconds)  # the last one's sleep is over too
            timed_pass(chunk, wake)
    driver.empty_queue()
    expected = {case: {"succeeded": totals[case].runs} for case in CASES if case != "sleep"}
    expected["sleep (suspend)"], expected["sleep (wake)"] = (
        {"sleeping": suspend.runs},
        {"succeeded": wake.runs},
    )
    seen = {case: dict(totals[case].outcomes) for case in CASES if case != "sleep"}
    seen["sleep (suspend)"], seen["sleep (wake)"] = dict(suspend.outcomes), dict(wake.outcomes)
    unexpected = {case: seen[case] for case in expected if seen[case] != expected[case]}
    assert not unexpected, f"runs did not end as their case says: {unexpected}"
    figures = {case: totals[case].figures() for case in CASES if case != "sleep"}
    if "sleep" in CASES:
        cycle = Totals()
        cycle.runs = suspend.runs
        cycle.wall, cycle.cpu = suspend.wall + wake.wall, suspend.cpu + wake.cpu
        cycle.statements = suspend.statements + wake.statements
        cycle.server = suspend.server + wake.server
        cycle.outcomes = suspend.outcomes + wake.outcomes
        cycle.ms_per_round = [a + b for a, b in zip(suspend.ms_per_round, wake.ms_per_round, strict=True)]
        figures["sleep"] = {**cycle.figures(), "suspend": suspend.figures(), "wake": wake.figures()}
    return figures


def bench_sends(sends: int, rounds: int) -> dict[str, Any]:
    """``send()`` of one event in its transaction, in turns with and without ``waits.deliver``."""
    from django.db import connection, transaction

    import django_events
    from benchmarks import driver
    from django_events import waits
    from django_events.models import WaitPath

    assert not WaitPath.objects.exists(), "the sends measure a database where nothing waits"
    deliver = waits.deliver
    spent = {"seconds": 0.0, "calls": 0}

    def timed_deliver(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return deliver(*args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - began
            spent["calls"] += 1

    def no_deliver(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    sides = {"with_deliver": timed_deliver, "without_deliver": no_deliver}
    per_chunk = max(1, sends // rounds)
    wall: Counter[str] = Counter()
    done: Counter[str] = Counter()
    statements: dict[str, Counter[str]] = {side: Counter() for side in sides}
    by_round: dict[str, list[float]] = {side: [] for side in sides}
    for n in range(50):  # warm up
        with transaction.atomic():
            django_events.send("bench/noop", {"n": n})
    try:
        for number in range(rounds * 2):
            side = list(sides)[number % 2]
            waits.deliver = sides[side]  # type: ignore[assignment]
            tally = StatementTally()
            began = time.perf_counter()
            with connection.execute_wrapper(tally):
                for n in range(per_chunk):
                    with transaction.atomic():
                        django_events.send("bench/noop", {"n": n})
            seconds = time.perf_counter() - began
            wall[side] += seconds
            done[side] += per_chunk
            statements[side].update(tally.counts)
            by_round[side].append(seconds * 1000 / per_chunk)
            driver.empty_queue()
    finally:
        waits.deliver = deliver  # type: ignore[assignment]
    figures: dict[str, Any] = {
        side: {
            "sends": done[side],
            "ms_per_send": round(wall[side] * 1000 / done[side], 4),
            "ms_per_send_by_round": [round(ms, 4) for ms in by_round[side]],
            "statements_per_send": round(sum(statements[side].values()) / done[side], 3),
            "statements_by_kind": {
                kind: round(n / done[side], 3) for kind, n in statements[side].most_common()
            },
        }
        for side in sides
    }
    figures["deliver_ms_per_send"] = round(spent["seconds"] * 1000 / max(1, spent["calls"]), 4)
    figures["deliver_calls"] = spent["calls"]
    return figures


def inprocess(runs: int, rounds: int, sleep_seconds: float, sends: int) -> dict[str, Any]:
    from django.db import connection

    from benchmarks import driver

    driver.fresh_database()
    driver.empty_queue()
    rate_before = commit_rate()
    cases = bench_steps(runs, rounds, sleep_seconds)
    send_figures = bench_sends(sends, rounds)
    rate_after = commit_rate()
    return {
        "vendor": connection.vendor,
        "commit_rate_per_s": {"before": round(rate_before, 1), "after": round(rate_after, 1)},
        "cases": cases,
        "sends": send_figures,
    }


# -- a drain through a worker, in a process of its own ------------------------------------------------


def drain(case: str, jobs: int, processes: int, threads: int, timeout: float, sleep_seconds: float) -> dict:
    """Drain ``jobs`` committed runs of ``case`` (``plain`` or ``sleep``) through ``rundramatiq``."""
    from django.db import connections

    import django_events
    from benchmarks import driver
    from benchmarks.benchapp.step_events import STEPS
    from benchmarks.flow import cpu_spent, own_cpu_seconds
    from django_events.models import Attempt, Run, RunStatus

    data = {"kind": "sleep", "seconds": sleep_seconds} if case == "sleep" else {"kind": "plain"}
    driver.fresh_database()
    driver.empty_queue()
    for start in range(0, jobs, 1000):
        django_events.send_many([{"name": STEPS, "data": data} for _ in range(min(1000, jobs - start))])
    connections.close_all()
    rate = driver.commit_rate()
    wal_before = driver.wal_totals()
    succeeded = Run.objects.filter(status=RunStatus.SUCCEEDED)
    with driver.workers(processes, threads):
        driver.wait_until(lambda: succeeded.count() >= jobs // 10, timeout, "a tenth of the runs")
        cpu_from, runs_from = own_cpu_seconds(), succeeded.count()
        not_done = Run.objects.exclude(status=RunStatus.SUCCEEDED)
        driver.wait_until(lambda: not not_done.exists(), timeout, "the runs")
        cpu_to, runs_to = own_cpu_seconds(), succeeded.count()
    first = Attempt.objects.order_by("started_at").values_list("started_at", flat=True).first()
    last = Run.objects.order_by("-finished_at").values_list("finished_at", flat=True).first()
    assert first is not None
    assert last is not None
    seconds = (last - first).total_seconds()
    attempts = Counter(Attempt.objects.values_list("outcome", flat=True))
    result: dict[str, Any] = {
        "case": case,
        "jobs": jobs,
        "processes": processes,
        "threads": threads,
        "seconds": round(seconds, 3),
        "runs_per_s": round(jobs / seconds, 1),
        "commit_rate_per_s": round(rate, 1) if rate else None,
        "runs_per_commit_rate": round(jobs / seconds / rate, 4) if rate else None,
        "attempts_by_outcome": dict(attempts),
        "cpu_ms_per_run": {
            program: round(used * 1000 / max(1, runs_to - runs_from), 4)
            for program, used in cpu_spent(cpu_from, cpu_to).items()
        },
        "wal_per_run": driver.wal_per_job(wal_before, driver.wal_totals(), jobs),
    }
    # A run whose sleep was over before its worker reached it did not suspend: counted, not an error.
    result["runs_suspended"] = attempts.get("suspended", 0)
    if attempts.get("succeeded") != jobs or set(attempts) - {"succeeded", "suspended"}:
        result["error"] = f"attempts {dict(attempts)}, for {jobs} runs"
    return result


# -- the parent: subprocesses, the table, the file ---------------------------------------------------


def child(args: argparse.Namespace, database: str, one: str, extra: list[str]) -> dict[str, Any]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.bench_settings",
        "BENCH_BROKER": "redis",
        "BENCH_DATABASE_URL": DATABASES[database],
        "BENCH_QUEUE": QUEUE,
        "BENCH_STEPS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "benchmarks.steps",
        "--one",
        one,
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  {database} {one}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"error": (done.stderr or done.stdout)[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def derived(figures: dict[str, Any]) -> dict[str, Any]:
    """The ratios: per case against ``plain`` and the commit rate; per step; atomic against run; sends."""
    cases = figures["cases"]
    rate = statistics.mean(figures["commit_rate_per_s"].values())
    plain = cases["plain"]
    out: dict[str, Any] = {"commit_rate_per_s": round(rate, 1), "cases": {}, "per_step": {}}
    for case, c in cases.items():
        out["cases"][case] = {
            "ms_per_run": c["ms_per_run"],
            "vs_plain": round(c["ms_per_run"] / plain["ms_per_run"], 3),
            "runs_per_s_vs_commit_rate": round(1000 / c["ms_per_run"] / rate, 4),
            "statements_per_run": c["statements_per_run"],
            "commits_per_run": c.get("commits_per_run"),
            "wal_syncs_per_run": c.get("wal_syncs_per_run"),
        }
        k = CASES[case].get("k")
        if k:
            step_ms = (c["ms_per_run"] - plain["ms_per_run"]) / k
            out["per_step"][case] = {
                "ms_per_step": round(step_ms, 4),
                "cpu_ms_per_step": round((c["cpu_ms_per_run"] - plain["cpu_ms_per_run"]) / k, 4),
                "in_commits": round(step_ms * rate / 1000, 3),  # one step costs this many commits' time
                "steps_per_s_vs_commit_rate": round(1000 / step_ms / rate, 4) if step_ms > 0 else None,
                "statements_per_step": round((c["statements_per_run"] - plain["statements_per_run"]) / k, 3),
                "commits_per_step": (
                    round((c["commits_per_run"] - plain["commits_per_run"]) / k, 3)
                    if "commits_per_run" in c
                    else None
                ),
                "wal_syncs_per_step": (
                    round((c["wal_syncs_per_run"] - plain["wal_syncs_per_run"]) / k, 3)
                    if "wal_syncs_per_run" in c
                    else None
                ),
            }
    steps = out["per_step"]
    for k in (1, 10):
        if f"atomic{k}" in steps and f"run{k}" in steps:
            out[f"atomic_vs_run_per_step_k{k}"] = round(
                steps[f"atomic{k}"]["ms_per_step"] / steps[f"run{k}"]["ms_per_step"], 3
            )
    if "sleep" in cases:
        s = cases["sleep"]
        out["sleep_cycle"] = {
            "ms": s["ms_per_run"],
            "vs_plain": round(s["ms_per_run"] / plain["ms_per_run"], 3),
            "suspend_vs_plain": round(s["suspend"]["ms_per_run"] / plain["ms_per_run"], 3),
            "wake_vs_plain": round(s["wake"]["ms_per_run"] / plain["ms_per_run"], 3),
            "statements": s["statements_per_run"],
            "statements_plain": plain["statements_per_run"],
            "commits": s.get("commits_per_run"),
            "wal_syncs": s.get("wal_syncs_per_run"),
        }
    sends = figures["sends"]
    with_, without = sends["with_deliver"]["ms_per_send"], sends["without_deliver"]["ms_per_send"]
    out["send"] = {
        "ms_with_deliver": with_,
        "ms_without_deliver": without,
        "with_vs_without": round(with_ / without, 3),
        "deliver_share_of_send": round(sends["deliver_ms_per_send"] / with_, 3),
        "statements_added": round(
            sends["with_deliver"]["statements_per_send"] - sends["without_deliver"]["statements_per_send"], 3
        ),
    }
    return out


def print_inprocess(database: str, d: dict[str, Any]) -> None:
    print(
        f"\n{database}: single-connection commit rate {d['commit_rate_per_s']:,.0f}/s (one thread, no worker)"
    )
    print(
        f"{'case':<10}{'ms/run':>8}{'vs plain':>10}{'runs/s vs commits':>19}{'statements':>12}{'commits':>9}"
    )
    for case, c in d["cases"].items():
        commits = "" if c["commits_per_run"] is None else f"{c['commits_per_run']:.2f}"
        print(
            f"{case:<10}{c['ms_per_run']:>8.3f}{c['vs_plain']:>9.2f}x{c['runs_per_s_vs_commit_rate']:>18.3f}x"
            f"{c['statements_per_run']:>12.2f}{commits:>9}"
        )
    for case, s in d["per_step"].items():
        print(
            f"  per step, {case:<9} {s['ms_per_step']:.3f} ms = {s['in_commits']:.2f} commits' time, "
            f"{s['statements_per_step']:.2f} statements, {s['commits_per_step']} commits"
        )
    for k in (1, 10):
        if f"atomic_vs_run_per_step_k{k}" in d:
            print(f"  atomic vs run per step, k={k}: {d[f'atomic_vs_run_per_step_k{k}']:.2f}x")
    if "sleep_cycle" in d:
        s = d["sleep_cycle"]
        print(
            f"  sleep cycle: {s['ms']:.3f} ms = {s['vs_plain']:.2f}x plain"
            f" (suspend {s['suspend_vs_plain']:.2f}x, wake {s['wake_vs_plain']:.2f}x);"
            f" {s['statements']} statements (plain {s['statements_plain']})"
        )
    s = d["send"]
    print(
        f"  send: {s['ms_with_deliver']:.3f} ms with waits.deliver, {s['ms_without_deliver']:.3f} without"
        f" ({s['with_vs_without']:.3f}x); deliver's own time {s['deliver_share_of_send']:.3f} of the send;"
        f" +{s['statements_added']} statements"
    )


def code_version() -> dict[str, Any]:
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
    parser.add_argument("--databases", nargs="+", choices=list(DATABASES), default=list(DATABASES))
    parser.add_argument("--runs", type=int, default=300, help="runs of each case per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--sleep-seconds",
        type=float,
        default=1.0,
        help="the sleep in one thread (the wake pass waits for it once per round)",
    )
    parser.add_argument(
        "--drain-sleep-seconds",
        type=float,
        default=1.0,
        help="the sleep in the drains (a shorter one may be over before a busy worker reaches it)",
    )
    parser.add_argument("--sends", type=int, default=2000, help="sends of each side")
    parser.add_argument(
        "--drain", action="store_true", help="also drain through a worker (PostgreSQL, Redis)"
    )
    parser.add_argument("--drain-only", action="store_true", help="only the drains")
    parser.add_argument("--drain-rounds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.bench_settings")
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        if args.one == "inprocess":
            figures = inprocess(args.runs, args.rounds, args.sleep_seconds, args.sends)
        else:
            figures = drain(
                args.one, args.jobs, args.processes, args.threads, args.timeout, args.sleep_seconds
            )
        print(json.dumps(figures))
        return

    code = code_version()  # now: others may commit while it runs (measure from a worktree)
    document: dict[str, Any] = {}
    if not args.drain_only:
        document["inprocess"] = {}
        for database in args.databases:
            print(f"{database}: in one thread ...", file=sys.stderr)
            raw = child(
                args,
                database,
                "inprocess",
                [
                    *("--runs", str(args.runs), "--rounds", str(args.rounds), "--sends", str(args.sends)),
                    *("--sleep-seconds", str(args.sleep_seconds)),
                ],
            )
            entry: dict[str, Any] = {"raw": raw}
            if "error" not in raw:
                entry["derived"] = derived(raw)
                print_inprocess(database, entry["derived"])
            document["inprocess"][database] = entry
    if args.drain or args.drain_only:
        rounds = []
        extra = ["--jobs", str(args.jobs), "--processes", str(args.processes), "--threads", str(args.threads)]
        extra += ["--timeout", str(args.timeout)]
        for number in range(args.drain_rounds):
            cases = {}
            for case in ("plain", "sleep") if number % 2 == 0 else ("sleep", "plain"):
                print(f"drain round {number + 1}: {case} ...", file=sys.stderr)
                cases[case] = child(
                    args, "postgres", case, [*extra, "--sleep-seconds", str(args.drain_sleep_seconds)]
                )
            if "error" not in cases["plain"] and "runs_per_s" in cases["sleep"]:
                cases["sleep_vs_plain"] = round(
                    cases["sleep"]["runs_per_s"] / cases["plain"]["runs_per_s"], 3
                )
            rounds.append(cases)
            print(f"\ndrain round {number + 1} ({args.jobs:,} runs, Redis, PostgreSQL):")
            for case in ("plain", "sleep"):
                r = cases[case]
                if "runs_per_s" not in r:
                    print(f"  {case}: failed")
                    continue
                error = f"  ERROR {r['error']}" if "error" in r else ""
                print(
                    f"  {case:<6} {r['runs_per_s']:>8,.0f} runs/s"
                    f" = {r['runs_per_commit_rate']:.3f}x the commit rate ({r['commit_rate_per_s']:,.0f}/s);"
                    f" CPU ms/run {r['cpu_ms_per_run']};"
                    f" WAL syncs/run {r['wal_per_run'].get('wal_sync')};"
                    f" {r['runs_suspended']:,} runs suspended{error}"
                )
            if "sleep_vs_plain" in cases:
                print(f"  sleeping runs drain at {cases['sleep_vs_plain']:.3f}x the plain runs")
        document["drain"] = rounds

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = (
        args.output
        or ROOT / "benchmarks" / "results" / f"steps-{stamp}{'-' + args.label if args.label else ''}.json"
    )
    full = {
        "when": stamp,
        "code": code,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        **document,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(full, indent=2) + "\n")
    print(f"\nRaw figures: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
