"""``manage.py events``: operator commands for django-events.

``events recover [--dry-run]``
    One recovery pass now: re-enqueue overdue pending and retrying runs, and take
    back running runs whose lease expired. Prints what it did (or would do).

``events prune --older-than DAYS [--status STATUS ...] [--dead-messages] [--batch-size N] [--dry-run]``
    Delete finished runs (succeeded, dead, cancelled; or the statuses given) created
    more than DAYS days ago, with their attempts, then the events left with no runs,
    in batches of short transactions so that no lock is held for long. With
    ``--dead-messages``, also the database broker's dead messages rejected more than
    DAYS days ago, in batches too.
"""

from __future__ import annotations

import datetime as dt
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_events.models import FINAL_STATUSES, Attempt, Event, QueuedMessage, Run
from django_events.recovery import recover


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
            type=float,
            required=True,
            metavar="DAYS",
            help="Delete history created before this.",
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
            "--batch-size", type=int, default=1000, help="Runs (or messages) deleted per transaction."
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
        self.stdout.write(self.style.SUCCESS(("Dry run: " if dry_run else "") + summary + "."))

    def _prune(
        self, *, days: float, statuses: list[str], batch_size: int, dry_run: bool, dead_messages: bool
    ) -> None:
        if days < 0:
            raise CommandError("--older-than takes a number of days, 0 or more.")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
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
                ids = list(runs.order_by("created_at").values_list("pk", flat=True)[:batch_size])
                if not ids:
                    break
                _total, per_model = Run.objects.using(using).filter(pk__in=ids).delete()
                deleted_runs += per_model.get(Run._meta.label, 0)
                deleted_attempts += per_model.get(Attempt._meta.label, 0)
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
                ids = list(orphans.order_by("created_at").values_list("pk", flat=True)[:batch_size])
                if not ids:
                    return deleted
                deleted += Event.objects.using(using).filter(pk__in=ids, runs__isnull=True).delete()[0]

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
                deleted += old.filter(pk__in=ids).delete()[0]
