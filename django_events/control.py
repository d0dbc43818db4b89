"""Operator actions on runs and events (retry, cancel, replay) and on the database broker's dead
messages (requeue, delete). The admin calls these; so can you.

Each changes only the rows whose status allows it (``models.TRANSITIONS``),
says how many it changed and skipped, and enqueues what must run after the
transaction commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dramatiq
from django.db import connections, router, transaction

from . import clock, dispatch, ledger, waits
from .broker import DatabaseBroker
from .models import Event, QueuedMessage, QueuedMessageState, Run

__all__ = [
    "Outcome",
    "cancel_runs",
    "delete_dead_messages",
    "replay_event",
    "requeue_dead_messages",
    "retry_runs",
]


@dataclass(frozen=True)
class Outcome:
    """How many of the runs asked for were changed, and how many were left alone."""

    done: int
    skipped: int


def retry_runs(run_ids: Iterable[Any]) -> Outcome:
    """Send dead, cancelled or succeeded runs back to ``pending``, with a fresh allowance of attempts.

    Earlier attempts stay in the run's history; the next attempt continues their
    numbering. The runs are enqueued after commit. Runs in any other status are
    skipped.
    """
    ids = list(dict.fromkeys(run_ids))
    using = router.db_for_write(Run)
    with transaction.atomic(using=using):
        moved = ledger.retry(ids, using=using, now=clock.now())
        dispatch.send_with_transaction(moved, using)
    return Outcome(done=len(moved), skipped=len(ids) - len(moved))


def cancel_runs(run_ids: Iterable[Any]) -> Outcome:
    """Cancel runs not started yet or between attempts (pending, scheduled, throttled, held, retrying,
    sleeping, waiting): they are never executed again, even if a message is still queued.

    Running and final runs are skipped.
    """
    ids = list(dict.fromkeys(run_ids))
    using, now = router.db_for_write(Run), clock.now()
    with transaction.atomic(using=using):
        done = ledger.cancel(ids, using=using, now=now)
        if done:
            waits.invoked_ended_ids(ids, using=using, now=now)  # callers of a cancelled invoke go on
    return Outcome(done=done, skipped=len(ids) - done)


def replay_event(event: Event) -> list[Run]:
    """Run every function subscribed to ``event``'s name now again, as new runs of the same event.

    The event's earlier runs and their history are kept. Returns the new runs
    (none if no function subscribes to the name any more).
    """
    using = router.db_for_write(Run)
    runs = ledger.new_runs(event, clock.now())
    if runs:
        with transaction.atomic(using=using):
            ledger.insert([], runs, using)
            dispatch.send_with_transaction([(run.pk, run.function) for run in runs], using, group=True)
    return runs


#: Message ids per statement of the message actions (far below SQLite's limit on parameters).
MESSAGE_ACTION_CHUNK = 500


def _announce_requeued(queues: list[str], using: str) -> None:
    """Wake the database broker's consumers of ``queues`` when the current transaction commits.

    On PostgreSQL with ``notify`` that is ``pg_notify(channel, queue)`` in the
    transaction. If the global broker is not a ``DatabaseBroker`` on ``using``,
    nothing: consumers find the messages at their next poll.
    """
    broker = dramatiq.get_broker()
    if isinstance(broker, DatabaseBroker) and broker.database == using:
        for queue in queues:
            broker._announce(connections[using], queue)


def requeue_dead_messages(message_ids: Iterable[int], using: str | None = None) -> Outcome:
    """Make dead messages of the database broker ready again, deliverable now; other messages are skipped.

    ``available_at`` becomes now and ``taken_by`` empty; the body is unchanged, so
    Dramatiq's middleware sees the message as it was (its ``retries`` count, its
    age). The database broker's consumers are woken when the transaction commits.
    """
    ids = list(dict.fromkeys(message_ids))
    using = using or router.db_for_write(QueuedMessage)
    now = clock.now()
    done = 0
    queues: set[str] = set()
    with transaction.atomic(using=using):
        for start in range(0, len(ids), MESSAGE_ACTION_CHUNK):
            dead = (
                QueuedMessage.objects.using(using)
                .dead()
                .filter(pk__in=ids[start : start + MESSAGE_ACTION_CHUNK])
            )
            queues.update(dead.select_for_update().values_list("queue_name", flat=True))
            done += dead.update(state=QueuedMessageState.READY, available_at=now, taken_by="")
        if done:
            _announce_requeued(sorted(queues), using)
    return Outcome(done=done, skipped=len(ids) - done)


def delete_dead_messages(message_ids: Iterable[int], using: str | None = None) -> Outcome:
    """Delete dead messages of the database broker; other messages are skipped."""
    ids = list(dict.fromkeys(message_ids))
    using = using or router.db_for_write(QueuedMessage)
    done = 0
    with transaction.atomic(using=using):
        for start in range(0, len(ids), MESSAGE_ACTION_CHUNK):
            chunk = ids[start : start + MESSAGE_ACTION_CHUNK]
            done += QueuedMessage.objects.using(using).dead().filter(pk__in=chunk).delete()[0]
    return Outcome(done=done, skipped=len(ids) - done)
