"""``manage.py events``: operator commands for django-events.

``events recover [--dry-run]``
    One recovery pass now: re-enqueue overdue pending and retrying runs, and take
    back running runs whose lease expired. Prints what it did (or would do).

``events prune --older-than DAYS [--status STATUS ...] [--dead-messages] [--batch-size N] [--dry-run]``
    Delete finished runs (succeeded, dead, cancelled; or the statuses given) created
    more than DAYS days ago (0 to 36,500), with their attempts, then the events left
    with no runs, in batches (1 to 10,000 rows) of short transactions so that no lock
    is held for long. With ``--dead-messages``, also the database broker's dead
    messages rejected more than DAYS days ago, in batches too.

    A run is deleted only if it is still in one of those statuses when it is deleted:
    each batch locks its runs (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite lets one
    writer in at a time) and deletes them with a ``DELETE`` that checks the status
    again, then deletes the attempts of the runs that went. A run retried from the
    admin at the same moment is either deleted before the retry (which then skips it)
    or kept, pending, with its attempts. An event goes only if it still has no run.
"""

from __future__ import annotations

import argparse
import datetime as dt
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_events.models import FINAL_STATUSES, Attempt, Event, QueuedMessage, Run
from django_events.recovery import recover

#: The largest ``--older-than``, in days (a hundred years; a cutoff earlier than that is no cutoff).
MAX_DAYS = 36_500
#: The largest ``--batch-size`` (each batch's ids are parameters of one statement).
MAX_BATCH_SIZE = 10_000


def _days(text: str) -> float:
    """``--older-than``: a finite number of days from 0 to ``MAX_DAYS``."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a number of days") from None
    if not 0 <= days <= MAX_DAYS:  # nan and inf too
        raise argparse.ArgumentTypeError(f"give a number of days from 0 to {MAX_DAYS}, not {text[:50]!r}")
    return days


def _batch_size(text: str) -> int:
    """``--batch-size``: a whole number from 1 to ``MAX_BATCH_SIZE``."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a whole number") from None
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"give a whole number from 1 to {MAX_BATCH_SIZE}, not {text[:50]!r}")
    return size


def _locked(model: type[Run] | type[Event] | type[QueuedMessage], ids: list[Any]) -> None:
    """Called with each batch's ids just before they are deleted (runs and events locked). Does nothing.

    A seam for tests: they make another transaction act at this moment.
    """


class Command(BaseCommand):
    help = (
        "Operator commands for django-events: 'recover' (one recovery pass) and 'prune' (delete old history)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True, metavar="{recover,prune}")

        recover_parser = commands.add_parser(
            "recover", help="Re-enqueue overdue runs and take back runs whose worker died, once."
        )
        recover_parser.add_argument("--dry-run", action="store_true", help="Only print what would be done.")

        prune = commands.add_parser(
            "prune",
            help=(
                "Delete finished runs and their events older than some days "
                "(with --dead-messages, the database broker's dead messages too)."
            ),
        )
        prune.add_argument(
            "--older-than",
            type=_days,
            required=True,
            metavar="DAYS",
            help=f"Delete history created more than DAYS days ago (0 to {MAX_DAYS}).",
        )
        prune.add_argument(
            "--status",
            nargs="+",
            choices=sorted(FINAL_STATUSES),
            default=sorted(FINAL_STATUSES),
            help="Only runs in these final statuses (default: all final statuses).",
        )
        prune.add_argument(
            "--dead-messages",
            action="store_true",
            help="Also delete the database broker's dead messages rejected more than DAYS days ago.",
        )
        prune.add_argument(
            "--batch-size",
            type=_batch_size,
            default=1000,
            help=f"Runs (or messages) deleted per transaction (1 to {MAX_BATCH_SIZE}).",
        )
        prune.add_argument("--dry-run", action="store_true", help="Only count what would be deleted.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "recover":
            self._recover(dry_run=options["dry_run"])
        else:
            self._prune(
                days=options["older_than"],
                statuses=options["status"],
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                dead_messages=options["dead_messages"],
            )

    def _recover(self, *, dry_run: bool) -> None:
        report = recover(dry_run=dry_run)
        verb = "Would re-enqueue" if dry_run else "Re-enqueued"
        for pk, function, status in report.requeued:
            self.stdout.write(f"{verb} {status} run {pk} ({function})")
        for pk, function, outcome in report.lost:
            if dry_run:
                self.stdout.write(f"Would take back run {pk} ({function}): its lease expired")
            else:
                self.stdout.write(f"Took back run {pk} ({function}) whose lease expired: now {outcome}")
        summary = f"{len(report.requeued)} overdue run(s), {len(report.lost)} run(s) with an expired lease"
        if report.reason:
            summary += f" (lost messages told from queued ones by: {report.reason})"
        self.stdout.write(self.style.SUCCESS(("Dry run: " if dry_run else "") + summary + "."))

    def _prune(
        self, *, days: float, statuses: list[str], batch_size: int, dry_run: bool, dead_messages: bool
    ) -> None:
        # Checked here too for callers that pass the values themselves (nan and inf fail the range).
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 <= days <= MAX_DAYS:
            raise CommandError(f"--older-than takes a number of days from 0 to {MAX_DAYS}, not {days!r}.")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not 1 <= batch_size <= MAX_BATCH_SIZE
        ):
            raise CommandError(
                f"--batch-size takes a whole number from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}."
            )
        if not statuses or not set(statuses) <= FINAL_STATUSES:
            raise CommandError(f"--status takes final statuses only: {', '.join(sorted(FINAL_STATUSES))}.")
        cutoff = timezone.now() - dt.timedelta(days=days)
        using = router.db_for_write(Run)
        runs = Run.objects.using(using).filter(status__in=statuses, created_at__lt=cutoff)
        if dry_run:
            count = runs.count()
            attempts = Attempt.objects.using(using).filter(run__in=runs).count()
            self.stdout.write(
                f"Dry run: would delete {count} run(s) ({', '.join(statuses)}) created before "
                f"{cutoff:%Y-%m-%d %H:%M}, {attempts} attempt(s), and the events left without runs."
            )
            if dead_messages:
                count = self._old_dead_messages(cutoff).count()
                self.stdout.write(
                    f"Dry run: would delete {count} dead broker message(s) rejected before "
                    f"{cutoff:%Y-%m-%d %H:%M}."
                )
            return
        deleted_runs = deleted_attempts = 0
        while True:
            with transaction.atomic(using=using):
                ids = list(
                    runs.select_for_update().order_by("created_at").values_list("pk", flat=True)[:batch_size]
                )
                if not ids:
                    break
                _locked(Run, ids)
                runs_gone, children_gone = _delete_runs(ids, statuses, using)
                deleted_runs += runs_gone
                deleted_attempts += children_gone
        deleted_events = self._prune_events(cutoff, batch_size, using)
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {deleted_runs} run(s), {deleted_attempts} attempt(s) and {deleted_events} event(s) "
                f"created before {cutoff:%Y-%m-%d %H:%M}."
            )
        )
        if dead_messages:
            deleted_messages = self._prune_dead_messages(cutoff, batch_size)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Deleted {deleted_messages} dead broker message(s) rejected before "
                    f"{cutoff:%Y-%m-%d %H:%M}."
                )
            )

    def _prune_events(self, cutoff: dt.datetime, batch_size: int, using: str) -> int:
        """Delete events older than ``cutoff`` that have no run left (runs still to do keep theirs)."""
        deleted = 0
        orphans = Event.objects.using(using).filter(created_at__lt=cutoff, runs__isnull=True)
        while True:
            with transaction.atomic(using=using):
                batch = orphans.select_for_update(of=("self",)).order_by("created_at")
                ids = list(batch.values_list("pk", flat=True)[:batch_size])
                if not ids:
                    return deleted
                _locked(Event, ids)
                # One DELETE that checks again that each event has no run: never Django's cascade,
                # which would take with it a run added since (a replay from the admin).
                deleted += Event.objects.using(using).filter(pk__in=ids, runs__isnull=True)._raw_delete(using)

    def _old_dead_messages(self, cutoff: dt.datetime) -> QuerySet[QueuedMessage]:
        """Dead messages of the database broker rejected before ``cutoff`` (``available_at`` is when)."""
        using = router.db_for_write(QueuedMessage)
        return QueuedMessage.objects.using(using).dead().filter(available_at__lt=cutoff)

    def _prune_dead_messages(self, cutoff: dt.datetime, batch_size: int) -> int:
        """Delete the old dead messages, ``batch_size`` per transaction, walking the primary key."""
        old = self._old_dead_messages(cutoff)
        deleted = 0
        last = 0
        while True:
            with transaction.atomic(using=old.db):
                ids = list(old.filter(pk__gt=last).order_by("pk").values_list("pk", flat=True)[:batch_size])
                if not ids:
                    return deleted
                last = ids[-1]
                _locked(QueuedMessage, ids)
                # One DELETE that checks again that each is dead (the model has no relation, so
                # Django deletes it without a cascade): a message requeued meanwhile stays.
                deleted += old.filter(pk__in=ids).delete()[0]


def _children() -> list[Any]:
    """The relations whose rows go with a run (its attempts, and any later model's)."""
    return [rel for rel in Run._meta.related_objects if rel.one_to_many or rel.one_to_one]


def _delete_runs(ids: list[Any], statuses: list[str], using: str) -> tuple[int, int]:
    """Delete the runs of ``ids`` still in ``statuses``, then their attempts; how many runs and attempts went.

    The runs go first, in one ``DELETE`` whose condition checks their status at that
    moment (never Django's cascade, whose ``DELETE`` is by primary key only, after a
    ``SELECT``). Then only the attempts whose run is gone are deleted: a run kept
    because its status changed keeps its attempts. The foreign keys are checked at
    commit (Django creates them deferrable), when both are gone.
    """
    runs = Run.objects.using(using)
    deleted = runs.filter(pk__in=ids, status__in=statuses)._raw_delete(using)
    attempts = 0
    if deleted:
        kept = runs.filter(pk__in=ids).values("pk")
        for rel in _children():
            name = rel.field.name
            orphans = rel.related_model._base_manager.using(using).filter(**{f"{name}__in": ids})
            attempts += orphans.exclude(**{f"{name}__in": kept}).delete()[1].get(Attempt._meta.label, 0)
    return deleted, attempts
