"""Time the admin pages of django-events against a big database (see ``fake_history.py``).

Usage (from the repository root, after filling the database)::

    .venv/bin/python benchmarks/admin_pages.py \\
        --database-url postgres://postgres@127.0.0.1:5432/django_events_bench

Each page is requested in-process with Django's test ``Client`` as a superuser, so the
wall time is the server's time (URL resolution, middleware, the view, the queries and
the template rendering), without a network or a browser. Every page is requested once
to warm up, then ``--requests`` times; the SQL queries of each request are captured
(``CaptureQueriesContext``, which turns on ``force_debug_cursor``) for their count and
time. Prints a table (median and 95th percentile in ms, queries, SQL ms) and writes the
raw figures, with the slowest queries of each page, to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/django_events_bench"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "admin_pages.json"
#: The page must render within this many ms (median): the requirement.
BUDGET_MS = 300
ROW = "{:<34} {:>3} {:>9} {:>8} {:>7} {:>7} {:>7}"


def _p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def pages() -> list[tuple[str, str]]:
    """(name, URL) of the pages to time, with ids and values taken from the database."""
    from django.urls import reverse
    from django.utils import timezone

    from django_events.models import Event, Run

    runs = reverse("admin:django_events_run_changelist")
    events = reverse("admin:django_events_event_changelist")

    def runs_where(**query: str) -> str:
        return f"{runs}?{urlencode(query)}"

    # a dead run with three attempts, hence three tracebacks
    detail = Run.objects.filter(status="dead", attempts=3).order_by("-created_at").first()
    if detail is None:
        sys.exit("No dead run with 3 attempts: fill the database with fake_history.py first.")
    event_id = detail.event_id
    keyed = (
        Event.objects.exclude(idempotency_key=None)
        .order_by("-created_at")
        .values_list("idempotency_key", flat=True)[:1]
    )
    rare_error = (
        Run.objects.filter(
            status="dead", function="sources.sync_to_crm", last_error__contains="no longer exists"
        )
        .order_by("-created_at")
        .values_list("last_error", flat=True)[:1]
    )
    rare = rare_error[0].partition(": ")[2] if rare_error else "no longer exists"
    month = timezone.localtime() - dt.timedelta(days=30)
    return [
        ("run list", runs),
        ("run list, status=dead", runs_where(status__exact="dead")),
        ("run list, status=succeeded", runs_where(status__exact="succeeded")),
        ("run list, status=pending", runs_where(status__exact="pending")),
        ("run list, function (common)", runs_where(function="sources.sync_to_crm")),
        ("run list, function (rare)", runs_where(function="tests.flaky")),
        ("run list, event name (common)", runs_where(event_name="api/source.connected")),
        ("run list, event name (rare)", runs_where(event_name="test/flaky")),
        ("run list, status + function", runs_where(status__exact="dead", function="sources.backfill")),
        ("run list, year", runs_where(created_at__year=str(month.year))),
        (
            "run list, year + month",
            runs_where(created_at__year=str(month.year), created_at__month=str(month.month)),
        ),
        (
            "run list, year + month + day",
            runs_where(
                created_at__year=str(month.year),
                created_at__month=str(month.month),
                created_at__day=str(month.day),
            ),
        ),
        ("run search, error text (common)", runs_where(q="Read timed out")),
        ("run search, error text (rare)", runs_where(q=rare)),
        ("run search, run id", runs_where(q=str(detail.pk))),
        ("run search, event id", runs_where(q=str(event_id))),
        ("run search, idempotency key", runs_where(q=keyed[0] if keyed else "missing")),
        ("run detail, 3 attempts", reverse("admin:django_events_run_change", args=[detail.pk])),
        ("event list", events),
        ("event detail", reverse("admin:django_events_event_change", args=[event_id])),
        ("event search, user_id=42", f"{events}?{urlencode({'q': 'user_id=42'})}"),
        (
            "event list, year + month",
            f"{events}?{urlencode({'created_at__year': month.year, 'created_at__month': month.month})}",
        ),
        ("overview", reverse("admin:django_events_run_overview")),
    ]


def measure(client: Any, url: str, requests: int, budget: float) -> dict[str, Any]:
    """Request ``url`` once to warm up, then ``requests`` times; wall and SQL figures in ms.

    A slow page stops early, after at least 3 requests, once it has taken ``budget`` seconds.
    """
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    warm = client.get(url)
    if warm.status_code != 200:
        raise SystemExit(f"{url} answered {warm.status_code}")
    times: list[float] = []
    cpu_times: list[float] = []
    sql_times: list[float] = []
    queries: list[int] = []
    captured: list[dict[str, str]] = []
    deadline = time.perf_counter() + budget
    for _ in range(requests):
        if len(times) >= 3 and time.perf_counter() > deadline:
            break
        with CaptureQueriesContext(connection) as context:
            start, cpu = time.perf_counter(), time.process_time()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
            cpu_times.append((time.process_time() - cpu) * 1000)
        assert response.status_code == 200, (url, response.status_code)
        captured = context.captured_queries
        queries.append(len(captured))
        sql_times.append(sum(float(query["time"]) for query in captured) * 1000)
    slowest = sorted(captured, key=lambda query: float(query["time"]), reverse=True)[:3]
    return {
        "url": url,
        "requests": len(times),
        "times_ms": [round(value, 2) for value in times],
        "median_ms": round(statistics.median(times), 1),
        "p95_ms": round(_p95(times), 1),
        "cpu_median_ms": round(statistics.median(cpu_times), 1),  # this process: Django and Python
        "queries": max(queries),
        "sql_ms": [round(value, 1) for value in sql_times],
        "sql_median_ms": round(statistics.median(sql_times), 1),
        "bytes": len(response.content),
        "slowest_queries": [
            {"ms": float(query["time"]) * 1000, "sql": query["sql"][:2000]} for query in slowest
        ],
    }


def environment() -> dict[str, Any]:
    """The machine, the versions and the size of the history."""
    import django
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        postgres = cursor.fetchone()[0]
        counts = {}
        for table in ("django_events_event", "django_events_run", "django_events_attempt"):
            cursor.execute(f"SELECT count(*) FROM {table}")  # once, for the record
            counts[table] = cursor.fetchone()[0]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "postgresql": postgres,
        "rows": counts,
        "load_average": os.getloadavg(),  # other work on the machine skews the timings
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page (default 20)")
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds per page after which a slow page stops early"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    parser.add_argument("--only", default="", help="time only the pages whose name contains this")
    args = parser.parse_args(argv)

    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.test import Client

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-admin").first()
    if user is None:
        user = user_model.objects.create_superuser("bench-admin", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)

    results = []
    print(ROW.format("page", "n", "median ms", "p95 ms", "queries", "SQL ms", "CPU ms"), flush=True)
    for name, url in pages():
        if args.only not in name:
            continue
        figures = {"page": name, **measure(client, url, args.requests, args.budget)}
        results.append(figures)
        row = ROW.format(
            name,
            figures["requests"],
            f"{figures['median_ms']:.1f}",
            f"{figures['p95_ms']:.1f}",
            figures["queries"],
            f"{figures['sql_median_ms']:.1f}",
            f"{figures['cpu_median_ms']:.1f}",
        )
        print(row + ("  SLOW" if figures["median_ms"] > BUDGET_MS else ""), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": environment(),
        "requests_per_page": args.requests,
        "budget_seconds_per_page": args.budget,
        "pages": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
