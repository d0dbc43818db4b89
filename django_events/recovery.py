"""Recovery: find runs whose message was lost or whose worker died, and put them back in line.

Three kinds of run are overdue:

* ``pending`` past the grace period: the broker was down at commit time, or the
  process died between commit and enqueue;
* ``retrying`` past its due time plus the grace period: the delayed message was lost;
* ``running`` with an expired lease: the worker was killed mid-run. The attempt is
  recorded as ``lost`` and the run goes to ``retrying`` (due now), or ``dead`` if
  that was its last attempt, exactly as if the function had failed.

A pass is safe in every worker at once: on PostgreSQL the overdue rows are locked
with ``SKIP LOCKED``, so two workers never take the same ones; everywhere, a
waiting run's ``due_at`` is moved forward by the pass that takes it, so the next
pass leaves it alone for another grace period, and a lost attempt is recorded with
the same fenced write as any attempt. Workers run :func:`recover` every
``RECOVERY_INTERVAL`` seconds in a thread started by ``EventsMiddleware``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from django.db import close_old_connections, connections, router, transaction
from django.utils import timezone

from . import dispatch, ledger
from .conf import get_settings
from .exceptions import WorkerLostError
from .execution import Execution, Failure, backoff_delay, record
from .models import AttemptOutcome, Run

__all__ = ["RecoveryLoop", "RecoveryReport", "recover"]

logger = logging.getLogger("django_events")


@dataclass
class RecoveryReport:
    """What one recovery pass found and did."""

    #: Pending or retrying runs whose message was sent again: ``(run id, function, status)``.
    requeued: list[tuple[Any, str, str]] = field(default_factory=list)
    #: Running runs whose lease had expired: ``(run id, function, what became of it)``.
    lost: list[tuple[Any, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many runs the pass touched."""
        return len(self.requeued) + len(self.lost)


def recover(
    *, now: dt.datetime | None = None, dry_run: bool = False, limit: int | None = None
) -> RecoveryReport:
    """Run one recovery pass; return what it re-enqueued (or, with ``dry_run``, would have).

    Args:
        now: the time to judge overdue runs by (default: now).
        dry_run: only report; change and send nothing.
        limit: at most this many runs of each kind (default ``RECOVERY_BATCH``).
    """
    conf = get_settings()
    now = now or timezone.now()
    limit = limit or conf.RECOVERY_BATCH
    using = router.db_for_write(Run)
    report = RecoveryReport()
    _requeue_waiting(report, now - dt.timedelta(seconds=conf.RECOVERY_GRACE), now, limit, using, dry_run)
    _recover_lost(report, now, limit, using, dry_run)
    if report.total and not dry_run:
        logger.warning(
            "Recovery: re-enqueued %d overdue run(s) and took back %d run(s) whose worker died.",
            len(report.requeued),
            len(report.lost),
        )
    return report


def _requeue_waiting(
    report: RecoveryReport, cutoff: dt.datetime, now: dt.datetime, limit: int, using: str, dry_run: bool
) -> None:
    if dry_run:
        overdue = Run.objects.using(using).waiting().filter(due_at__lt=cutoff).order_by("due_at")
        report.requeued.extend(overdue.values_list("pk", "function", "status")[:limit])
        return
    with transaction.atomic(using=using):
        rows = ledger.take_overdue(cutoff=cutoff, now=now, limit=limit, using=using)
        dispatch.send_with_transaction([(pk, function) for pk, function, _status in rows], using)
    report.requeued.extend(rows)


def _recover_lost(report: RecoveryReport, now: dt.datetime, limit: int, using: str, dry_run: bool) -> None:
    if dry_run:
        expired = Run.objects.using(using).lease_expired(now).order_by("lease_expires_at")
        report.lost.extend(
            (pk, function, "lost") for pk, function in expired.values_list("pk", "function")[:limit]
        )
        return
    with transaction.atomic(using=using):
        for run in ledger.lease_expired(now=now, limit=limit, using=using):
            attempt = run.attempts
            error = WorkerLostError(
                f"The worker running attempt {attempt} stopped before it finished (killed, out of memory, "
                f"or its host was lost): its lease expired at {run.lease_expires_at:%Y-%m-%d %H:%M:%S%z}."
            )
            # Counted like any failure: a run that kills its worker every time goes dead in the end.
            retry_in = (
                None if attempt >= run.max_attempts else (0.0 if attempt == 1 else backoff_delay(attempt - 1))
            )
            started = run.attempt_started_at or run.lease_expires_at or now
            outcome = record(
                run,
                attempt,
                started,
                None,
                Failure(error, AttemptOutcome.LOST, retry_in),
                using=using,
            )
            if outcome is not Execution.STALE:
                report.lost.append((run.pk, run.function, outcome.value))


class RecoveryLoop:
    """A daemon thread that runs :func:`recover` every ``RECOVERY_INTERVAL`` seconds (with jitter)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, unless ``RECOVERY_INTERVAL`` is ``None`` or it runs already."""
        if get_settings().RECOVERY_INTERVAL is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="django-events-recovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait for the pass in progress, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        interval = get_settings().RECOVERY_INTERVAL or 0
        # Start at a random point of the interval, so that workers started together spread out.
        while not self._stop.wait(random.uniform(0.5, 1.0) * interval):
            try:
                close_old_connections()
                recover()
            except Exception:
                logger.exception("Recovery pass failed; trying again in %s s.", interval)
            finally:
                connections.close_all()
