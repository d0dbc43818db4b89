"""Helpers for your own tests: execute runs synchronously, with no broker or worker.

Example (pytest-django)::

    from django_events import send
    from django_events.testing import run_all

    def test_connecting_a_source_backfills(db):
        send("api/source.connected", {"source_id": 1})
        runs = run_all()
        assert [run.status for run in runs] == ["succeeded"]

The runs go through the same claim, call and record code as in a worker, so
attempts, results, tracebacks and retry counts are stored exactly as in
production. Function time limits are not enforced here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.utils import timezone

from .execution import Execution, execute_run
from .models import Run, RunStatus
from .registry import lease_seconds

__all__ = ["RunsDidNotSettle", "run_all", "run_due"]


class RunsDidNotSettle(AssertionError):
    """Raised by ``run_all`` when runs keep coming (a function that sends its own event, say)."""


def run_due() -> list[Run]:
    """Execute once every pending or retrying run whose due time has come.

    Returns the runs executed, reloaded from the database, oldest first.
    Retries scheduled by these attempts are left for a later call.
    """
    due = Run.objects.due(timezone.now()).order_by("created_at", "id").values_list("pk", "function")
    executed = [pk for pk, function in due if _execute(pk, function) is not Execution.SKIPPED]
    return _reload(executed)


def run_all(*, max_rounds: int = 100) -> list[Run]:
    """Execute every pending and retrying run until all are final, skipping backoff delays.

    Retries run at once instead of after their delay, and runs created by the
    functions themselves (events they send) are executed too.

    Args:
        max_rounds: give up after this many passes over the waiting runs.

    Returns:
        Every run executed, reloaded from the database, in the order first executed.

    Raises:
        RunsDidNotSettle: runs were still waiting after ``max_rounds`` passes.
    """
    executed: dict[Any, None] = {}
    for _ in range(max_rounds):
        waiting = list(Run.objects.waiting().order_by("created_at", "id").values_list("pk", "function"))
        if not waiting:
            return _reload(list(executed))
        for pk, function in waiting:
            if _execute(pk, function, ignore_due=True) is not Execution.SKIPPED:
                executed.setdefault(pk)
    still = Run.objects.waiting().count()
    raise RunsDidNotSettle(
        f"{still} run(s) were still {RunStatus.PENDING} or retrying after {max_rounds} rounds."
    )


def _execute(run_id: Any, function_id: str, *, ignore_due: bool = False) -> Execution:
    """Execute a run as a worker would (the lease from its function), without sending retries."""
    lease = lease_seconds(function_id)
    return execute_run(run_id, ignore_due=ignore_due, enqueue=False, lease=lease)


def _reload(ids: Sequence[Any]) -> list[Run]:
    runs = Run.objects.select_related("event").in_bulk(ids)
    return [runs[pk] for pk in ids if pk in runs]
