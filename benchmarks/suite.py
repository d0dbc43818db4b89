"""django-events against plain Dramatiq, on each broker, in one run: ``python benchmarks/suite.py``.

For every broker and workload it runs ``benchmarks/driver.py`` twice in a subprocess,
once through django-events (``events``) and once with plain Dramatiq actors on the
same broker, queue and worker settings (``plain``), then prints one table with both
and their ratio and writes every raw figure to ``--output`` (JSON). For ``send`` and
``drain`` on PostgreSQL it also runs the *floor* (``benchapp/floor.py``): plain Dramatiq
plus django-events' own statements for the same rows, without any of its Python, which
is what the database work alone costs.

Brokers: ``redis`` and ``rabbitmq`` (with PostgreSQL for the history), ``db-postgres``
and ``db-sqlite`` (``DatabaseBroker`` on that database, which also holds the history).
Workloads: ``send``, ``fanout`` (send to ten functions), ``send_many`` (1,000 events a
call), ``drain`` and ``latency``; see ``driver.py`` for what each does.

Examples::

    .venv/bin/python benchmarks/suite.py                                  # everything
    .venv/bin/python benchmarks/suite.py --brokers redis db-postgres db-sqlite --workloads drain latency

Run it on a quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ["redis", "rabbitmq", "db-postgres", "db-sqlite"]
WORKLOADS = ["send", "fanout", "send_many", "drain", "latency"]
#: Workloads whose two sides run in one process, alternating iteration by iteration.
INTERLEAVED = {"send", "fanout", "send_many"}
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/django_events_bench_run"

#: Workloads with a floor side run separately (send's floor runs interleaved with its other sides).
FLOORS = {"drain"}
#: workload -> (driver arguments, the figure compared, its unit, whether more is better)
SPECS: dict[str, tuple[list[str], str, str, bool]] = {
    "send": (["send"], "median_ms", "ms median", False),
    "fanout": (["send", "--fanout"], "median_ms", "ms median", False),
    "send_many": (["send_many"], "median_ms", "ms median", False),
    "drain": (["drain"], "jobs_per_s", "jobs/s", True),
    "latency": (["latency"], "median_ms", "ms p50", False),
}


def run_driver(
    broker: str, workload: str, mode: str, args: argparse.Namespace, sqlite_dir: Path
) -> dict[str, Any]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.bench_settings",
        "BENCH_BROKER": "database" if broker.startswith("db-") else broker,
        "BENCH_DATABASE_URL": (
            f"sqlite:///{sqlite_dir / 'bench.sqlite3'}" if broker == "db-sqlite" else args.database_url
        ),
        "BENCH_QUEUE": "bench",
    }
    extra = SPECS[workload][0][1:]
    if workload in ("send", "fanout"):
        extra += ["--iterations", str(args.iterations)]
    elif workload == "send_many":
        extra += ["--iterations", str(args.send_many_iterations)]
    elif workload == "drain":
        extra += ["--jobs", str(args.drain_jobs), "--processes", str(args.processes)]
    else:
        extra += [
            "--jobs",
            str(args.latency_jobs),
            "--rate",
            str(args.rate),
            "--processes",
            str(args.processes),
        ]
    command = [sys.executable, "-m", "benchmarks.driver", SPECS[workload][0][0], mode, *extra]
    print(f"  {broker:<12} {workload:<10} {mode:<7} ...", end="", flush=True, file=sys.stderr)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(" failed", file=sys.stderr)
        return {"error": (result.stderr or result.stdout)[-3000:]}
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    figure, unit = SPECS[workload][1], SPECS[workload][2]
    if mode == "both":
        shown = " / ".join(f"{side} {figures[side][figure]:,.2f}" for side in ("events", "plain"))
        print(f" {shown} {unit}", file=sys.stderr)
    else:
        print(f" {figures[figure]:,.2f} {unit}", file=sys.stderr)
    if result.stderr.strip():
        figures["stderr"] = result.stderr[-2000:]
    return figures


def fmt(value: float | None, more: str = "") -> str:
    return "-" if value is None else f"{value:,.2f}{more}"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'broker':<12} {'workload':<10} {'django-events':>22} {'plain Dramatiq':>22} {'ratio':>7}"
        f" {'floor':>22} {'ratio':>7}",
    ]
    for key, modes in results.items():
        broker, workload = key.split(" ", 1)
        figure, unit, _more_is_better = SPECS[workload][1], SPECS[workload][2], SPECS[workload][3]
        ours, theirs = modes.get("events", {}).get(figure), modes.get("plain", {}).get(figure)
        ratio = ours / theirs if ours and theirs else None
        least = modes.get("floor", {}).get(figure)
        least_ratio = least / theirs if least and theirs else None
        floor_columns = f" {fmt(least, ' ' + unit):>22} {fmt(least_ratio, 'x'):>7}" if least else ""
        lines.append(
            f"{broker:<12} {workload:<10} {fmt(ours, ' ' + unit):>22} {fmt(theirs, ' ' + unit):>22} "
            f"{fmt(ratio, 'x'):>7}{floor_columns}"
        )
        if workload in ("send", "fanout", "latency"):
            p = "p99_ms"
            ours, theirs = modes.get("events", {}).get(p), modes.get("plain", {}).get(p)
            ratio = ours / theirs if ours and theirs else None
            lines.append(
                f"{'':<12} {'  p99':<10} {fmt(ours, ' ms'):>22} {fmt(theirs, ' ms'):>22} {fmt(ratio, 'x'):>7}"
            )
        if workload == "drain" and modes.get("events", {}).get("commit_rate_per_s"):
            rate = modes["events"]["commit_rate_per_s"]
            against = "  ".join(
                f"{mode} {modes[mode]['jobs_per_s'] / rate:.2f}x"
                for mode in ("events", "plain", "floor")
                if modes.get(mode, {}).get("jobs_per_s")
            )
            lines.append(f"{'':<12} {'  commits':<10} {rate:>18,.0f} /s   jobs/s against it: {against}")
            syncs = "  ".join(
                f"{mode} {modes[mode]['wal_per_job'].get('wal_sync', 0):.2f} syncs, "
                f"{modes[mode]['wal_per_job'].get('wal_bytes', 0):,.0f} B"
                for mode in ("events", "plain", "floor")
                if modes.get(mode, {}).get("wal_per_job")
            )
            lines.append(f"{'':<12} {'  WAL/job':<10} {syncs}")
        if workload in ("send", "fanout") and modes.get("events", {}).get("wal_bytes_median") is not None:
            wal = "  ".join(
                f"{mode} {modes[mode]['wal_bytes_median']:,.0f} B"
                for mode in ("events", "plain", "floor")
                if modes.get(mode, {}).get("wal_bytes_median") is not None
            )
            lines.append(f"{'':<12} {'  WAL/send':<10} {wal}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", nargs="+", choices=BROKERS, default=BROKERS)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["events", "plain", "floor"],
        default=["events", "plain", "floor"],
        help="floor (send and drain): plain Dramatiq plus only the SQL of the history",
    )
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_POSTGRES))
    parser.add_argument("--iterations", type=int, default=2000, help="send and fanout iterations")
    parser.add_argument("--send-many-iterations", type=int, default=20, help="send_many calls of 1,000")
    parser.add_argument("--drain-jobs", type=int, default=20000)
    parser.add_argument("--latency-jobs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="latency jobs per second")
    parser.add_argument("--processes", type=int, default=2, help="rundramatiq processes")
    parser.add_argument("--label", default="", help="added to the output file's name")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = (
        args.output
        or ROOT / "benchmarks" / "results" / f"suite-{stamp}{'-' + args.label if args.label else ''}.json"
    )
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as sqlite_dir:
        for broker in args.brokers:
            for workload in args.workloads:
                if workload in INTERLEAVED and {"events", "plain"} <= set(args.modes):
                    # Both sides in one process, alternating: see driver.bench_send.
                    both = run_driver(broker, workload, "both", args, Path(sqlite_dir))
                    results[f"{broker} {workload}"] = both if "error" not in both else {"events": both}
                    continue
                for mode in args.modes:
                    if mode == "floor" and (workload not in FLOORS or broker == "db-sqlite"):
                        continue  # the floors run django-events' PostgreSQL statements
                    figures = run_driver(broker, workload, mode, args, Path(sqlite_dir))
                    results.setdefault(f"{broker} {workload}", {})[mode] = figures
    print(table(results))
    document = {
        "when": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nRaw figures: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
