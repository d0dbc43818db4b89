"""Check that the admin's index-friendly date hierarchy shows what Django's own tag shows.

Usage (from the repository root, against the database ``fake_history.py`` filled)::

    .venv/bin/python benchmarks/check_date_hierarchy.py \\
        --database-url postgres://postgres@127.0.0.1:5432/django_events_bench

For a set of run and event lists (plain, filtered, searched, drilled down to a year,
a month, a day, and empty), it builds the change list as the admin does and compares
``cl.date_hierarchy_links`` (MIN, MAX and EXISTS probes) with the context of Django's
``{% date_hierarchy %}`` tag (``SELECT DISTINCT`` over the rows), timing both. Exits
with status 1 if any differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/django_events_bench"


def _plain(context: dict[str, Any]) -> dict[str, Any]:
    """The context with its lazy strings made plain, to compare."""
    back = context.get("back")
    return {
        "show": context.get("show"),
        "back": back and {key: str(value) for key, value in back.items()},
        "choices": [
            {key: str(value) for key, value in choice.items()} for choice in context.get("choices", [])
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    args = parser.parse_args(argv)
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib import admin
    from django.contrib.admin.templatetags.admin_list import date_hierarchy
    from django.contrib.auth import get_user_model
    from django.test import RequestFactory
    from django.utils import timezone

    from django_events.models import Event, Run

    latest = Run.objects.order_by("-created_at").values_list("created_at", flat=True).first()
    if latest is None:
        sys.exit("No runs: fill the database with fake_history.py first.")
    latest = timezone.localtime(latest)
    year, month, day = latest.year, latest.month, latest.day
    rare_error = (
        Run.objects.filter(status="dead").exclude(last_error="").values_list("last_error", flat=True)[:1]
    )
    cases = [
        (Run, ""),
        (Run, "status__exact=dead"),
        (Run, "status__exact=pending"),
        (Run, "function=tests.flaky"),
        (Run, "status__exact=dead&function=sources.backfill"),
        (Run, f"created_at__year={year}"),
        (Run, f"created_at__year={year}&created_at__month={month}"),
        (Run, f"created_at__year={year}&created_at__month={month}&function=tests.flaky"),
        (Run, f"created_at__year={year}&created_at__month={month}&created_at__day={day}"),
        (Run, f"created_at__year={year - 1}"),  # no rows
        (Run, "q=Read+timed+out"),
        (Run, "q=" + (rare_error[0].partition(": ")[2] if rare_error else "nothing")),
        (Run, "q=nothing+matches+this"),
        (Event, ""),
        (Event, "q=user_id%3D42"),
        (Event, f"created_at__year={year}&created_at__month={month}"),
    ]
    user = get_user_model().objects.filter(is_superuser=True).first()
    if user is None:
        user = get_user_model().objects.create_superuser("bench-admin", "bench@example.com", "bench")
    factory = RequestFactory()
    failures = 0
    print(f"{'list':<6} {'query':<62} {'result':<9} {'ours ms':>8} {'Django ms':>10}")
    for model, query in cases:
        request = factory.get(f"/?{query}")
        request.user = user
        changelist = admin.site._registry[model].get_changelist_instance(request)
        start = time.perf_counter()
        ours = _plain(changelist.date_hierarchy_links)  # type: ignore[attr-defined]
        middle = time.perf_counter()
        theirs = _plain(date_hierarchy(changelist) or {})
        end = time.perf_counter()
        same = ours == theirs
        failures += not same
        print(
            f"{model.__name__:<6} {query[:62]:<62} {'same' if same else 'DIFFERENT':<9} "
            f"{(middle - start) * 1000:>8.1f} {(end - middle) * 1000:>10.1f}"
        )
        if not same:
            print(f"  ours:   {ours}\n  Django: {theirs}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
