"""The floors: plain Dramatiq plus only the SQL that keeping the history takes, and nothing else.

A floor side runs django-events' own hot-path statements, prepared as django-events
prepares them, with values built beforehand or by hand, and none of the Python
around them (no validation, no models, no registry, no logging, no signals). What
it costs above plain Dramatiq is what the database work alone costs: the part of the
gap no Python could remove while the same rows are written.

- :func:`store_event`: the statement that stores one event and its one run, inside the
  caller's transaction (``send``'s floor).
- :func:`run_history`: the statements that claim one run and record its success and
  its attempt (the floor of the drain's per-run work).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from typing import Any

from django.utils import timezone

import django_events
from django_events import ledger, rawsql
from django_events.models import Attempt, Event, Run, RunStatus

USING = "default"
LEASE = dt.timedelta(seconds=660)


class _EventRows:
    """The values of one event and its run, built once; new primary keys for each statement."""

    def __init__(self) -> None:
        now = timezone.now()
        event = Event(name="bench/noop", data={"n": 0}, created_at=now)
        [run] = ledger.new_runs(event, now)
        events_sql, event_fields = rawsql.insert_sql(Event, USING, 1)
        runs_sql, run_fields = rawsql.insert_sql(Run, USING, 1)
        self.sql = f"WITH inserted AS ({events_sql}) {runs_sql}"
        self.event_values = rawsql.values(event, USING, event_fields)
        self.run_values = rawsql.values(run, USING, run_fields)
        self.event_id = [field.attname for field in event_fields].index("id")
        run_names = [field.attname for field in run_fields]
        self.run_id, self.run_event_id = run_names.index("id"), run_names.index("event_id")


_event_rows: _EventRows | None = None


def store_event() -> None:
    """Store an event and its run as ``send`` does (one prepared statement), with values made beforehand."""
    global _event_rows
    rows = _event_rows = _event_rows or _EventRows()
    event_values, run_values = list(rows.event_values), list(rows.run_values)
    event_values[rows.event_id] = run_values[rows.run_event_id] = uuid.uuid4()
    run_values[rows.run_id] = uuid.uuid4()
    with rawsql.cursor(USING) as cursor:
        cursor.execute(rows.sql, event_values + run_values)


_HOST = socket.gethostname()
_ATTEMPT_FIELDS = [field.attname for field in Attempt._meta.concrete_fields if not field.primary_key]


def run_history(run_id: str) -> None:
    """Claim run ``run_id`` and record its success with its attempt: the hot path's two statements."""
    claim_sql, _select_event = ledger._claim_sql(USING, False, True)
    record_sql, _update, _insert = ledger._record_sql(USING)
    key = uuid.UUID(run_id)
    now = timezone.now()
    claim = [RunStatus.RUNNING.value, now + LEASE, now, now, key, RunStatus.PENDING.value]
    claim += [RunStatus.RETRYING.value, now]
    with rawsql.cursor(USING) as cursor:
        cursor.execute(claim_sql, claim)
        if cursor.fetchone() is None:
            return
        finished = timezone.now()
        attempt: dict[str, Any] = {
            "run_id": key,
            "number": 1,
            "started_at": now,
            "finished_at": finished,
            "outcome": "succeeded",
            "exc_type": "",
            "message": "",
            "traceback": "",
            "worker_host": _HOST,
            "worker_pid": os.getpid(),
        }
        # status, result, last_error, finished_at, due_at, refund; the run's id, attempt, status
        moved = [RunStatus.SUCCEEDED.value, None, None, finished, None, 0, key, 1, RunStatus.RUNNING.value]
        cursor.execute(record_sql, moved + [attempt[name] for name in _ATTEMPT_FIELDS])


def pending_run_ids(jobs: int) -> list[str]:
    """Send ``jobs`` no-op events; the ids of their runs. The caller drops the runs' own messages."""
    for start in range(0, jobs, 1000):
        django_events.send_many([{"name": "bench/noop"} for _ in range(min(1000, jobs - start))])
    return [str(pk) for pk in Run.objects.values_list("pk", flat=True)]
