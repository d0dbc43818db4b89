"""``manage.py events prune --dead-messages``: old dead messages of the database broker go, nothing else."""

from __future__ import annotations

import datetime as dt
from io import StringIO

import dramatiq
import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_events
from django_events.management.commands import events as events_command
from django_events.models import QueuedMessage, QueuedMessageState, Run
from django_events.testing import run_all

READY, TAKEN, DEAD = QueuedMessageState.READY, QueuedMessageState.TAKEN, QueuedMessageState.DEAD


def _row(state: str, *, days_ago: float) -> QueuedMessage:
    message = dramatiq.Message(queue_name="q", actor_name="tests.other", args=(), kwargs={}, options={})
    return QueuedMessage.objects.create(
        queue_name="q",
        actor_name=message.actor_name,
        message_id=message.message_id,
        body=message.encode(),
        state=state,
        available_at=timezone.now() - dt.timedelta(days=days_ago),
        created_at=timezone.now() - dt.timedelta(days=days_ago + 1),
    )


@pytest.fixture
def messages(db: None) -> dict[str, QueuedMessage]:
    """Two dead messages rejected 40 days ago, one dead yesterday, and old ready and taken ones."""
    return {
        "old_dead_1": _row(DEAD, days_ago=40),
        "old_dead_2": _row(DEAD, days_ago=35),
        "recent_dead": _row(DEAD, days_ago=1),
        "old_ready": _row(READY, days_ago=40),  # a backlog: overdue, never pruned
        "old_taken": _row(TAKEN, days_ago=40),  # a hold that ended: will be delivered again
    }


def _left(messages: dict[str, QueuedMessage]) -> set[str]:
    by_pk = {row.pk: name for name, row in messages.items()}
    return {by_pk[pk] for pk in QueuedMessage.objects.values_list("pk", flat=True)}


def test_prune_dead_messages_deletes_old_dead_ones_only_in_batches(messages):
    out = StringIO()
    call_command("events", "prune", "--older-than", "30", "--dead-messages", "--dry-run", stdout=out)
    assert "Dry run: would delete 0 run(s)" in out.getvalue()  # the runs' report is unchanged
    assert "Dry run: would delete 2 dead broker message(s) rejected before" in out.getvalue()
    assert len(_left(messages)) == 5

    with CaptureQueriesContext(connection) as queries:
        call_command(
            "events", "prune", "--older-than", "30", "--dead-messages", "--batch-size", "1", stdout=out
        )

    assert "Deleted 2 dead broker message(s) rejected before" in out.getvalue()
    assert _left(messages) == {"recent_dead", "old_ready", "old_taken"}
    table = QueuedMessage._meta.db_table
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith(f'DELETE FROM "{table}"')]
    assert len(deletes) == 2  # one batch of one message each


def test_prune_without_the_option_keeps_dead_messages_and_its_output(messages):
    django_events.send("test/ok")
    run_all()
    Run.objects.update(created_at=timezone.now() - dt.timedelta(days=40))
    out = StringIO()

    call_command("events", "prune", "--older-than", "30", stdout=out)

    assert out.getvalue().startswith("Deleted 1 run(s), 1 attempt(s) and 0 event(s)")
    assert "message" not in out.getvalue()
    assert len(_left(messages)) == 5
    assert not Run.objects.exists()


def test_prune_runs_and_dead_messages_together(messages):
    django_events.send("test/ok")
    run_all()
    Run.objects.update(created_at=timezone.now() - dt.timedelta(days=40))
    out = StringIO()

    call_command("events", "prune", "--older-than", "30", "--dead-messages", stdout=out)

    assert "Deleted 1 run(s), 1 attempt(s)" in out.getvalue()
    assert "Deleted 2 dead broker message(s)" in out.getvalue()
    assert not Run.objects.exists()
    assert _left(messages) == {"recent_dead", "old_ready", "old_taken"}


def test_a_dead_message_requeued_just_before_its_delete_is_kept(messages, monkeypatch):
    # Given an old dead message that an admin requeues just before prune deletes its batch
    requeued = messages["old_dead_1"]

    def requeue(model, ids):
        if model is QueuedMessage:
            QueuedMessage.objects.filter(pk=requeued.pk).update(state=READY)

    monkeypatch.setattr(events_command, "_locked", requeue)
    out = StringIO()

    # When prune deletes old dead messages
    call_command("events", "prune", "--older-than", "30", "--dead-messages", stdout=out)

    # Then the requeued message stays, ready; the other old dead one went
    assert "Deleted 1 dead broker message(s)" in out.getvalue()
    assert _left(messages) == {"old_dead_1", "recent_dead", "old_ready", "old_taken"}
    requeued.refresh_from_db()
    assert requeued.state == READY
