"""``manage.py events prune``: never a run that is not final when it is deleted; clear errors for bad values.

The races are made deterministic with the command's seam ``_locked`` (called with each
batch's ids, locked, just before they are deleted): there another transaction acts, and
the test waits on conditions (a backend waiting for a lock on PostgreSQL), never on sleeps.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

import django_events
from django_events import control
from django_events.management.commands import events as events_command
from django_events.models import Attempt, Event, Run, RunStatus
from django_events.testing import run_all
from tests.conftest import wait_for

OLD = dt.timedelta(days=40)


def _old_dead_run() -> Run:
    """A dead run with its three attempts, created 40 days ago."""
    event = django_events.send("test/always-fails")
    run_all()
    Run.objects.filter(event=event).update(created_at=timezone.now() - OLD)
    Event.objects.filter(pk=event.pk).update(created_at=timezone.now() - OLD)
    run = Run.objects.get(event=event)
    assert run.status == RunStatus.DEAD
    assert Attempt.objects.filter(run=run).count() == 3
    return run


def _prune(*args: str) -> str:
    out = StringIO()
    call_command("events", "prune", "--older-than", "30", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def at_delete(monkeypatch: pytest.MonkeyPatch) -> Callable[[type, Callable[[list[Any]], None]], None]:
    """Make ``action(ids)`` run when prune has locked a batch of ``model`` and is about to delete it."""

    def install(model: type, action: Callable[[list[Any]], None]) -> None:
        def seam(batch_model: type, ids: list[Any]) -> None:
            if batch_model is model:
                action(ids)

        monkeypatch.setattr(events_command, "_locked", seam)

    return install


class _Thread(threading.Thread):
    """A thread with a database connection of its own, closed when it ends; re-raises its error on join."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._work = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def finish(self) -> Any:
        self.join(60)
        assert not self.is_alive(), "the other transaction never ended"
        if self.error is not None:
            raise self.error
        return self.result


def _backend_waits_for_a_lock(query_part: str) -> bool:
    """Another backend of this database waits for a row lock, in a statement containing ``query_part``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # inside a transaction, a fresh look
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{query_part}%"],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


# -- a run whose status changes ----------------------------------------------------------------


def test_a_run_no_longer_final_when_it_is_deleted_is_kept_with_its_attempts(db, at_delete):
    # Given two old dead runs, one of which is retried just before prune deletes its batch
    retried, other = _old_dead_run(), _old_dead_run()
    at_delete(Run, lambda ids: Run.objects.filter(pk=retried.pk).update(status=RunStatus.PENDING))

    # When prune deletes old finished runs
    out = _prune()

    # Then the retried run is kept with its three attempts; the other one went with its attempts
    assert "Deleted 1 run(s), 3 attempt(s)" in out
    assert list(Run.objects.values_list("pk", flat=True)) == [retried.pk]
    assert Attempt.objects.filter(run=retried).count() == 3
    assert not Attempt.objects.filter(run_id=other.pk).exists()
    # and its event stays, since it has a run
    assert Event.objects.filter(pk=retried.event_id).exists()
    assert not Event.objects.filter(pk=other.event_id).exists()


def test_an_event_that_gets_a_run_before_it_is_deleted_is_kept_with_the_run(db, at_delete):
    # Given an old event whose only run prune deletes, and which is replayed just before prune
    # deletes the events left without runs
    run = _old_dead_run()
    event = Event.objects.get(pk=run.event_id)
    at_delete(Event, lambda ids: control.replay_event(event))

    # When prune runs
    out = _prune()

    # Then the event is kept, and so is its new pending run
    assert "Deleted 1 run(s), 3 attempt(s) and 0 event(s)" in out
    assert Event.objects.filter(pk=event.pk).exists()
    assert list(Run.objects.filter(event=event).values_list("status", flat=True)) == [RunStatus.PENDING]


# -- a retry from another connection, at the same moment -------------------------------------


def test_a_retry_while_prune_holds_the_batch_waits_and_then_finds_the_run_gone(transactional_db, at_delete):
    # Given an old dead run, and a retry from the admin that starts while prune holds its batch
    run = _old_dead_run()
    retry = _Thread(lambda: control.retry_runs([run.pk]))

    def start_retry(ids: list[Any]) -> None:
        retry.start()
        if connection.vendor == "postgresql":  # it waits for prune's lock on the run
            wait_for(lambda: _backend_waits_for_a_lock("FOR UPDATE"), timeout=20)
        # SQLite: it waits for the write lock, which prune took when its transaction began

    at_delete(Run, start_retry)

    # When prune deletes the batch and commits
    out = _prune()

    # Then the run went with its attempts, and the retry, let in afterwards, skipped it
    assert "Deleted 1 run(s), 3 attempt(s)" in out
    assert retry.finish() == control.Outcome(done=0, skipped=1)
    assert not Run.objects.exists()
    assert not Attempt.objects.exists()


def test_a_run_retried_while_prune_waits_for_it_is_kept(transactional_db):
    # Given an old dead run that an admin retries in a transaction still open when prune starts
    run = _old_dead_run()
    retried = threading.Event()

    def retry_and_commit_once_prune_waits() -> control.Outcome:
        with transaction.atomic():
            outcome = control.retry_runs([run.pk])
            retried.set()
            if connection.vendor == "postgresql":  # prune waits for this transaction's lock on the run
                wait_for(lambda: _backend_waits_for_a_lock("FOR UPDATE"), timeout=20)
            # SQLite: prune waits for the write lock this transaction holds
        return outcome

    retry = _Thread(retry_and_commit_once_prune_waits)
    retry.start()
    assert retried.wait(20)

    # When prune runs, waiting for the retry to commit
    out = _prune()

    # Then it kept the run, pending again, with its attempts
    assert retry.finish() == control.Outcome(done=1, skipped=0)
    assert "Deleted 0 run(s), 0 attempt(s) and 0 event(s)" in out
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING
    assert Attempt.objects.filter(run=run).count() == 3


# -- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize("days", ["nan", "inf", "-inf", "1e300", "36501", "-1", "-0.5", "ten", ""])
def test_older_than_not_a_finite_number_of_days_in_range_is_a_command_error(db, days):
    with pytest.raises(
        CommandError, match=r"argument --older-than: .*(from 0 to 36500|not a number of days)"
    ):
        call_command("events", "prune", f"--older-than={days}", stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("size", ["0", "-1", "10001", "1" + "0" * 30, "1.5", "x"])
def test_batch_size_not_a_whole_number_in_range_is_a_command_error(db, size):
    with pytest.raises(CommandError, match=r"argument --batch-size: .*(from 1 to 10000|not a whole number)"):
        call_command(
            "events",
            "prune",
            "--older-than",
            "1",
            f"--batch-size={size}",
            stdout=StringIO(),
            stderr=StringIO(),
        )


def test_the_largest_values_are_accepted(db):
    _old_dead_run()
    out = StringIO()
    call_command("events", "prune", "--older-than", "36500", "--batch-size", "10000", stdout=out)
    assert "Deleted 0 run(s)" in out.getvalue()
    out = StringIO()
    call_command("events", "prune", "--older-than", "0", "--batch-size", "10000", stdout=out)
    # the run's event, and the run.dead event nothing subscribes to
    assert "Deleted 1 run(s), 3 attempt(s) and 2 event(s)" in out.getvalue()


def test_a_bad_value_given_to_the_command_object_is_a_command_error(db):
    command = events_command.Command(stdout=StringIO())
    options = {"action": "prune", "status": ["dead"], "dry_run": False, "dead_messages": False}
    with pytest.raises(CommandError, match="--older-than"):
        command.handle(**options, older_than=float("nan"), batch_size=10)
    with pytest.raises(CommandError, match="--older-than"):
        command.handle(**options, older_than=10**400, batch_size=10)
    with pytest.raises(CommandError, match="--batch-size"):
        command.handle(**options, older_than=1.0, batch_size=10**30)
    with pytest.raises(CommandError, match="--status takes final statuses only"):
        command.handle(**{**options, "status": ["pending"]}, older_than=1.0, batch_size=10)
