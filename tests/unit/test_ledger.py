"""The ledger's transitions: each does the same in its vendor statement and its portable ORM form.

Behaviour tests take the ``ledger_form`` fixture and run both ways; the tests of what
only the vendor statements promise (one statement, prepared, the primary key's plan)
run with the default, fast form.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.db import connection, transaction
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_events
from django_events import ledger
from django_events.models import Attempt, AttemptOutcome, Event, Run, RunStatus

LEASE = dt.timedelta(seconds=90)


def _row(run: Run) -> dict[str, object]:
    """Every column of the run, as the ORM reads it."""
    return model_to_dict(Run.objects.get(pk=run.pk), fields=[f.name for f in Run._meta.concrete_fields])


def _claim(run_id: object, *, now: dt.datetime | None = None, ignore_due: bool = False) -> Run | None:
    now = now or timezone.now()
    return ledger.claim(run_id, using="default", now=now, lease_until=now + LEASE, ignore_due=ignore_due)


def _succeed(run: Run, attempt: Attempt, result: object) -> bool:
    return ledger.record(run, attempt, RunStatus.SUCCEEDED, using="default", result=result)


def test_claim_takes_a_due_run_and_reads_it_with_its_event(db, ledger_form):
    # Given a pending run of an event with data
    event = django_events.send("test/ok", {"x": [1, "two"], "y": None})
    pending = Run.objects.get(event=event)
    now = timezone.now()

    # When it is claimed
    with CaptureQueriesContext(connection) as queries:
        run = _claim(pending.pk, now=now)

    # Then it is running, attempt 1, leased, and what came back is what is stored
    assert run is not None
    assert (run.status, run.attempts) == (RunStatus.RUNNING, 1)
    assert run.lease_expires_at == now + LEASE
    assert run.attempt_started_at == run.started_at == now
    assert model_to_dict(run, fields=[f.name for f in Run._meta.concrete_fields]) == _row(run)
    assert run.event.pk == event.pk
    assert (run.event.name, run.event.data) == ("test/ok", {"x": [1, "two"], "y": None})
    assert run.event.created_at == Event.objects.get(pk=event.pk).created_at
    # The vendor form is one statement on PostgreSQL; SQLite reads the event separately
    if ledger_form == "fast":
        assert len(queries) == (1 if connection.vendor == "postgresql" else 2)


def test_claim_refuses_runs_that_are_not_waiting_or_not_due(db, ledger_form):
    event = django_events.send("test/fanout")
    early, running, done = Run.objects.filter(event=event).order_by("function")
    Run.objects.filter(pk=early.pk).update(due_at=timezone.now() + dt.timedelta(minutes=5))
    Run.objects.filter(pk=running.pk).update(status=RunStatus.RUNNING, attempts=1)
    Run.objects.filter(pk=done.pk).update(status=RunStatus.SUCCEEDED, attempts=1)
    before = {run.pk: _row(run) for run in (early, running, done)}

    for run in (early, running, done):
        assert _claim(run.pk) is None
    assert _claim(uuid.uuid4()) is None
    # Nothing was changed by the refusals
    assert {run.pk: _row(run) for run in (early, running, done)} == before

    # A run not yet due is taken when told to ignore due times (the testing helpers)
    taken = _claim(early.pk, ignore_due=True)
    assert taken is not None
    assert taken.status == RunStatus.RUNNING


def test_of_two_claims_of_one_run_only_the_first_wins(db, ledger_form):
    run = Run.objects.get(event=django_events.send("test/ok"))
    assert _claim(run.pk) is not None
    assert _claim(run.pk) is None
    assert Run.objects.get(pk=run.pk).attempts == 1


def test_claim_of_a_retry_keeps_the_first_start_and_counts_on(db, ledger_form):
    run = Run.objects.get(event=django_events.send("test/flaky"))
    first = _claim(run.pk)
    assert first is not None
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RETRYING, due_at=timezone.now())

    later = timezone.now() + dt.timedelta(seconds=1)
    second = _claim(run.pk, now=later)

    assert second is not None
    assert second.attempts == 2
    assert second.started_at == first.started_at
    assert second.attempt_started_at == later


def _attempt(run: Run, number: int) -> Attempt:
    now = timezone.now()
    return Attempt(
        run_id=run.pk,
        number=number,
        started_at=now,
        finished_at=now,
        outcome=AttemptOutcome.SUCCEEDED,
        worker_host="here",
        worker_pid=42,
    )


@pytest.mark.parametrize("result", [{"rows": 3, "names": ["a", "é"]}, None, [1, 2], "text"])
def test_record_success_moves_the_run_and_inserts_its_attempt(db, result, ledger_form):
    run = _claim(Run.objects.get(event=django_events.send("test/ok")).pk)
    assert run is not None
    attempt = _attempt(run, 1)

    with CaptureQueriesContext(connection) as queries:
        assert _succeed(run, attempt, result) is True

    # The vendor form is one statement on PostgreSQL; on SQLite an UPDATE and an INSERT
    statements = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].split()[0].upper() in ("WITH", "UPDATE", "INSERT")
    ]
    assert len(statements) == (1 if connection.vendor == "postgresql" and ledger_form == "fast" else 2)

    stored = Run.objects.get(pk=run.pk)
    assert (stored.status, stored.result, stored.attempts) == (RunStatus.SUCCEEDED, result, 1)
    assert stored.finished_at == attempt.finished_at
    assert stored.due_at is None
    assert stored.lease_expires_at is None
    [row] = Attempt.objects.filter(run=run)
    assert row.pk == attempt.pk
    assert (row.number, row.outcome, row.worker_host, row.worker_pid) == (1, "succeeded", "here", 42)
    if result is None:  # SQL NULL, as the ORM stores None, not JSON null
        assert Run.objects.filter(pk=run.pk, result__isnull=True).exists()


def test_record_success_is_fenced_on_the_attempt_and_the_status(db, ledger_form):
    run = _claim(Run.objects.get(event=django_events.send("test/ok")).pk)
    assert run is not None

    # Another attempt number (a stale worker) changes nothing
    assert _succeed(run, _attempt(run, 2), {"late": True}) is False
    # Nor does a run that is no longer running
    Run.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED)
    assert _succeed(run, _attempt(run, 1), {"late": True}) is False

    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
    assert Run.objects.get(pk=run.pk).result is None
    assert not Attempt.objects.exists()


@pytest.mark.parametrize(
    ("to", "due_in", "refund"),
    [(RunStatus.RETRYING, 30, False), (RunStatus.DEAD, None, False), (RunStatus.RETRYING, 0, True)],
)
def test_record_failure_moves_the_run_keeps_the_error_and_inserts_its_attempt(
    db, ledger_form, to, due_in, refund
):
    run = _claim(Run.objects.get(event=django_events.send("test/ok")).pk)
    assert run is not None
    attempt = _attempt(run, 1)
    attempt.outcome, attempt.exc_type, attempt.message = AttemptOutcome.FAILED, "ValueError", "bad"
    due_at = None if due_in is None else attempt.finished_at + dt.timedelta(seconds=due_in)

    moved = ledger.record(
        run, attempt, to, using="default", last_error="ValueError: bad", due_at=due_at, refund=refund
    )

    assert moved is True
    stored = Run.objects.get(pk=run.pk)
    assert (stored.status, stored.last_error, stored.due_at) == (to, "ValueError: bad", due_at)
    assert stored.max_attempts == run.max_attempts == 5 + int(refund)
    assert stored.finished_at == (attempt.finished_at if to == RunStatus.DEAD else None)
    assert stored.lease_expires_at is None
    assert stored.result is None
    assert Attempt.objects.get(run=run).message == "bad"
    # The run object was brought up to date with what was stored
    assert model_to_dict(run, fields=[f.name for f in Run._meta.concrete_fields]) == _row(run)


def test_record_keeps_the_last_error_of_a_success_after_failures(db, ledger_form):
    run = _claim(Run.objects.get(event=django_events.send("test/ok")).pk)
    assert run is not None
    Run.objects.filter(pk=run.pk).update(last_error="ValueError: earlier")

    assert _succeed(run, _attempt(run, 1), {"ok": True}) is True

    assert Run.objects.get(pk=run.pk).last_error == "ValueError: earlier"


def test_record_refuses_a_move_the_state_machine_does_not_allow(db, ledger_form):
    run = _claim(Run.objects.get(event=django_events.send("test/ok")).pk)
    assert run is not None
    with pytest.raises(ValueError, match="cannot go from running to 'pending'"):
        ledger.record(run, _attempt(run, 1), RunStatus.PENDING, using="default")
    assert Run.objects.get(pk=run.pk).status == RunStatus.RUNNING
    assert not Attempt.objects.exists()


def test_send_many_stores_what_the_orm_would(db, ledger_form):
    # More events and runs than one statement takes (2,000 rows), with and without functions
    items = [{"name": "test/fanout", "data": {"i": i}} for i in range(700)]
    items += [{"name": "test/nobody-listens", "data": {"i": i}} for i in range(5)]
    events = django_events.send_many(items)

    assert Event.objects.count() == 705
    assert Run.objects.count() == 2100
    stored = Event.objects.in_bulk([event.pk for event in events])
    for event in events:
        assert (stored[event.pk].name, stored[event.pk].data, stored[event.pk].created_at) == (
            event.name,
            event.data,
            event.created_at,
        )
    run = Run.objects.filter(event=events[0]).order_by("function").first()
    assert run is not None
    assert (run.status, run.event_name, run.attempts) == (RunStatus.PENDING, "test/fanout", 0)
    assert run.max_attempts == 5
    assert run.due_at == run.created_at == events[0].created_at
    assert run.result is None
    assert run.last_error == ""
    # The instances returned are saved ones
    assert not events[0]._state.adding


def test_send_inside_a_transaction_uses_no_savepoint(transactional_db, ledger_form):
    from django.db import transaction

    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        django_events.send("test/fanout", {"n": 1})
    statements = [q["sql"].upper() for q in queries.captured_queries]
    assert not [sql for sql in statements if "SAVEPOINT" in sql], statements
    inserts = [sql for sql in statements if sql.startswith(("INSERT", "WITH"))]
    assert len(inserts) == (1 if connection.vendor == "postgresql" and ledger_form == "fast" else 2), inserts


def test_claim_finds_its_run_by_primary_key_even_in_a_big_unanalysed_backlog(db):
    # Given many waiting runs in a table the planner has no statistics for yet
    django_events.send_many([{"name": "test/ok"} for _ in range(500)])
    run = Run.objects.order_by("created_at").last()
    assert run is not None
    sql, _select_event = ledger._claim_sql("default", False)
    now = timezone.now()
    params = [RunStatus.RUNNING, now, now, now, run.pk, *ledger._claim_sources(), now]
    adapt = connection.ops.adapt_datetimefield_value
    params = [adapt(p) if isinstance(p, dt.datetime) else p for p in params]
    params[4] = Run._meta.pk.get_db_prep_value(run.pk, connection)

    # When the claim's plan is asked for
    explain = "EXPLAIN " if connection.vendor == "postgresql" else "EXPLAIN QUERY PLAN "
    with connection.cursor() as cursor:
        cursor.execute(explain + sql, params)
        plan = "\n".join(str(row) for row in cursor.fetchall())

    # Then the run is looked up by its primary key, not by scanning the due-time or status index
    if connection.vendor == "postgresql":
        assert "django_events_run_pkey" in plan, plan
    else:
        assert "sqlite_autoindex_django_events_run_1" in plan or "PRIMARY KEY" in plan, plan
    assert "django_events_run_due" not in plan, plan
    assert "django_events_run_status" not in plan, plan


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
def test_on_postgresql_the_hot_path_statements_are_prepared(transactional_db, settings):
    # Given a fresh connection, and queries not logged (as in production)
    connection.close()
    run_id = Run.objects.get(event=django_events.send("test/ok")).pk

    # When a run is claimed and its success recorded
    run = _claim(run_id)
    assert run is not None
    assert _succeed(run, _attempt(run, 1), {"ok": True}) is True

    # Then PostgreSQL holds them as prepared statements of this connection, and they did their work
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert any(sql.startswith("WITH no_flush AS") and "UPDATE" in sql for sql in prepared), prepared
    assert any(sql.startswith("WITH moved AS") for sql in prepared), prepared
    assert any(sql.startswith("WITH inserted AS") for sql in prepared), prepared  # the send
    assert Run.objects.get(pk=run_id).result == {"ok": True}

    # And with PREPARED_STATEMENTS off, a new connection prepares nothing
    settings.DJANGO_EVENTS = {"PREPARED_STATEMENTS": False}
    connection.close()
    run_id = Run.objects.get(event=django_events.send("test/ok")).pk
    assert _claim(run_id) is not None
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0


def test_a_claim_on_its_own_commits_without_a_flush_and_leaves_the_session_durable(transactional_db):
    # Given a pending run, and a connection in autocommit (as a worker's is)
    run_id = Run.objects.get(event=django_events.send("test/ok")).pk

    # When it is claimed, in its own transaction
    with CaptureQueriesContext(connection) as queries:
        run = _claim(run_id)
    assert run is not None
    assert Run.objects.get(pk=run_id).status == RunStatus.RUNNING
    claim = queries.captured_queries[0]["sql"]
    if connection.vendor != "postgresql":
        assert "set_config" not in claim  # SQLite commits as it is configured
        return

    # Then on PostgreSQL that one transaction was told not to wait for its WAL flush, in the statement
    assert claim.startswith("WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true))")
    # And it stopped there: the session, and whatever the function writes next, is durable
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


def test_a_claim_inside_a_transaction_leaves_the_transaction_durable(transactional_db):
    run_id = Run.objects.get(event=django_events.send("test/ok")).pk
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        assert _claim(run_id) is not None
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SHOW synchronous_commit")
                assert cursor.fetchone()[0] == "on"
    assert "set_config" not in queries.captured_queries[0]["sql"]
