"""The ledger: every write of a run's state, one function per transition.

Nothing else in django-events changes a run's ``status`` (or the columns that go
with it): callers decide *what* happens, this module writes it, each move as one
conditional statement whose status condition comes from ``models.TRANSITIONS``,
so that two writers racing for a run cannot both win.

========================  ===================================================
function                  move
========================  ===================================================
:func:`insert`            new events and their new runs (``pending``)
:func:`insert_keyed`      events with an idempotency key (a repeated key wins nothing)
:func:`claim`             ``pending`` / ``retrying`` and due -> ``running`` (lease, attempt + 1)
:func:`record`            ``running`` (this attempt) -> ``succeeded`` / ``retrying`` / ``dead``,
                          with the attempt's row
:func:`keep_stale_attempt`  the history of an attempt whose run was taken over
:func:`retry`             ``dead`` / ``cancelled`` / ``succeeded`` -> ``pending`` (by hand)
:func:`cancel`            not started (``pending`` / ``scheduled`` / ``throttled`` / ``held`` /
                          ``retrying``) -> ``cancelled``
:func:`take_overdue`      waiting runs whose message is overdue: due again now, for recovery
:func:`lock_claimable`    lock a due run (the best of its function, with a priority) for flow control
:func:`hold_back`         a due run -> ``throttled`` / ``held`` / ``skipped`` / ``cancelled`` / ``dead``
:func:`wake`              ``held`` -> ``pending`` (a slot kept for it)
:func:`merge`             waiting -> ``skipped``, handled by another run (debounce)
:func:`start_now`         ``scheduled`` -> ``pending`` (a full batch)
:func:`take_slots`,       a run's concurrency slots; :func:`lock_keys`, :func:`save_key`: the
:func:`release_slots`     state of a flow-control key
:func:`hold_for_step`     lock a ``running`` run for a ``step.atomic`` (fenced on the attempt)
:func:`resume`            ``waiting`` -> ``pending``, due now (what it waited for came)
========================  ===================================================

A run leaves the worker at a durable step through :func:`record` too: ``running``
-> ``sleeping`` / ``waiting``, the attempt given back.

Where a faster statement exists for a vendor (PostgreSQL, SQLite 3.35+ with
``RETURNING``), it sits beside the portable ORM form inside the same function,
with the same conditions; callers never ask which database they are on.
:func:`fast_statements` turns the vendor forms off, so that the tests run both
forms on every database.

Messages are not this module's business: callers send them with ``dispatch``
inside the same transaction as the write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any

from django.db import IntegrityError, connections, models, transaction
from django.db.models import DateTimeField, F, Value
from django.db.models.functions import Coalesce

from . import rawsql
from .models import (
    FINAL_STATUSES,
    TRANSITIONS,
    WAITING_STATUSES,
    Attempt,
    Event,
    FlowKey,
    Run,
    RunStatus,
    Slot,
    Step,
    StepStatus,
    sources_of,
)
from .registry import Function, functions_for, lease_seconds, max_attempts_for, registered_functions

__all__ = [
    "bound_lock_waits",
    "cancel",
    "claim",
    "fast_statements",
    "flow_key_id",
    "hold_back",
    "hold_for_step",
    "insert",
    "insert_keyed",
    "keep_stale_attempt",
    "live_slots",
    "lock_claimable",
    "lock_keys",
    "lock_keys_by_id",
    "lock_open",
    "lock_woken",
    "merge",
    "new_run",
    "new_runs",
    "record",
    "release_slots",
    "resume",
    "retry",
    "save_key",
    "slot_counts",
    "start_now",
    "take_overdue",
    "take_slots",
    "try_lock_keys",
    "wake",
]

_fast = True


@contextlib.contextmanager
def fast_statements(enabled: bool) -> Iterator[None]:
    """Use the vendor statements (``True``, the default) or only the portable ORM forms, for a while.

    For tests, which run every transition both ways; not thread-local.
    """
    global _fast
    previous, _fast = _fast, enabled
    try:
        yield
    finally:
        _fast = previous


def _use_fast(using: str) -> bool:
    return _fast and rawsql.supported(using)


def _locked(queryset: Any, using: str) -> Any:
    """Lock the rows for this transaction, skipping rows another transaction has locked (PostgreSQL).

    SQLite has one writer at a time anyway.
    """
    features = connections[using].features
    if not features.has_select_for_update_skip_locked:
        return queryset
    if features.has_select_for_update_of:
        return queryset.select_for_update(skip_locked=True, of=("self",))
    return queryset.select_for_update(skip_locked=True)


# -- flow-control keys ---------------------------------------------------------------------------


def flow_key_id(function_id: str, kind: str, key: str) -> str:
    """The id of the ``FlowKey`` of ``function_id``'s ``kind`` policy (``"throttle"``...) for ``key``."""
    digest = hashlib.sha256()
    for part in (function_id, kind, key):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def lock_keys(keys: Iterable[tuple[str, str, str]], *, using: str, now: dt.datetime) -> dict[str, FlowKey]:
    """Lock the ``FlowKey`` rows of ``(function id, kind, key)`` (made if missing); return them by id.

    Call it inside a transaction: the rows stay locked until it ends, so that the
    decisions of one key (a slot, a throttle's turn, a debounce window) never race,
    across processes and hosts. Rows are locked in id order, so two transactions
    locking the same keys cannot deadlock. On SQLite the first write takes the
    database's one write lock, which serialises every writer anyway.
    """
    wanted = {flow_key_id(*spec): spec for spec in keys}
    if not wanted:
        return {}
    if _use_fast(using):
        rows = [
            FlowKey(id=pk, function=function_id, kind=kind, key=key, updated_at=now)
            for pk, (function_id, kind, key) in sorted(wanted.items())
        ]
        sql, fields = _upsert_keys_sql(using, len(rows))
        params = [value for row in rows for value in rawsql.values(row, using, fields)]
        with rawsql.cursor(using) as cursor:
            cursor.execute(sql, params)
            locked = [rawsql.load(FlowKey, using, row) for row in cursor.fetchall()]
        return {flow_key.pk: flow_key for flow_key in locked}
    FlowKey.objects.using(using).bulk_create(
        [
            FlowKey(id=pk, function=function_id, kind=kind, key=key, updated_at=now)
            for pk, (function_id, kind, key) in sorted(wanted.items())
        ],
        ignore_conflicts=True,
    )
    for pk in sorted(wanted):
        FlowKey.objects.using(using).filter(pk=pk).update(updated_at=now)
    return FlowKey.objects.using(using).in_bulk(sorted(wanted))


@cache
def _upsert_keys_sql(using: str, rows: int) -> tuple[str, list[models.Field[Any, Any]]]:
    """Make or lock ``rows`` FlowKey rows in one statement, returning them (PostgreSQL, SQLite 3.35+).

    The rows go in id order, and each is locked as it is inserted or updated (the
    update of ``updated_at`` is what locks a row that exists), so two such
    statements on the same keys cannot deadlock. On SQLite the statement takes the
    database's write lock first, as the portable form's first write does.
    """
    insert, fields = rawsql.insert_sql(FlowKey, using, rows)
    quote = connections[using].ops.quote_name
    pk, updated = quote(rawsql.column(FlowKey._meta.pk)), quote("updated_at")
    sql = (
        f"{insert} ON CONFLICT ({pk}) DO UPDATE SET {updated} = EXCLUDED.{updated} "
        f"RETURNING {rawsql.columns(FlowKey, using)}"
    )
    return sql, fields


def lock_keys_by_id(flow_keys: Sequence[str], *, using: str, now: dt.datetime) -> dict[str, FlowKey]:
    """Lock the existing ``FlowKey`` rows ``flow_keys`` in id order (as :func:`lock_keys`); return them."""
    if not flow_keys:
        return {}
    connection = connections[using]
    if _use_fast(using):
        ids = sorted(set(flow_keys))
        quote = connection.ops.quote_name
        table, pk = quote(FlowKey._meta.db_table), quote(rawsql.column(FlowKey._meta.pk))
        marks = ", ".join(["%s"] * len(ids))
        if connection.vendor == "postgresql":
            sql = (
                f"SELECT {rawsql.columns(FlowKey, using)} FROM {table} "
                f"WHERE {pk} IN ({marks}) ORDER BY {pk} FOR UPDATE"
            )
            params: list[Any] = ids
        else:  # SQLite: a write takes the database's one write lock
            sql = (
                f"UPDATE {table} SET {quote('updated_at')} = %s WHERE {pk} IN ({marks}) "
                f"RETURNING {rawsql.columns(FlowKey, using)}"
            )
            params = [connection.ops.adapt_datetimefield_value(now), *ids]
        with rawsql.cursor(using) as cursor:
            cursor.execute(sql, params)
            locked = [rawsql.load(FlowKey, using, row) for row in cursor.fetchall()]
        return {flow_key.pk: flow_key for flow_key in locked}
    rows = list(FlowKey.objects.using(using).filter(pk__in=flow_keys).values_list("function", "kind", "key"))
    return lock_keys(rows, using=using, now=now)


def try_lock_keys(flow_keys: Sequence[str], *, using: str) -> dict[str, FlowKey]:
    """Lock those of the existing ``FlowKey`` rows ``flow_keys`` no other transaction holds; return them.

    Never waits (``SKIP LOCKED``; rows this transaction holds already are
    returned). On a database without it (SQLite, one writer) every row found.
    """
    if not flow_keys:
        return {}
    rows = FlowKey.objects.using(using).filter(pk__in=sorted(set(flow_keys))).order_by("pk")
    features = connections[using].features
    if features.has_select_for_update_skip_locked:
        rows = rows.select_for_update(skip_locked=True)
    return {flow_key.pk: flow_key for flow_key in rows}


#: The longest a worker waits for a lock of flow control, in seconds (PostgreSQL). Such locks are
#: held for milliseconds; a longer wait means a transaction whose client is gone (a host lost from
#: the network keeps its locks until the server notices), and a worker thread must not wait on it
#: for ever: the wait fails instead, and the message is retried later.
LOCK_WAIT = 10.0


def bound_lock_waits(using: str) -> None:
    """Make the current transaction's lock waits fail after :data:`LOCK_WAIT` (PostgreSQL; no-op elsewhere).

    For the workers' own transactions only: it holds until the transaction ends.
    """
    connection = connections[using]
    if connection.vendor == "postgresql" and connection.in_atomic_block:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(LOCK_WAIT * 1000)}ms"])


def save_key(flow_key: FlowKey, *, using: str, **changes: Any) -> None:
    """Store ``changes`` (``tat``, ``open_run``, ``opened_at``, ``size``) of a key locked by lock_keys."""
    for name, value in changes.items():
        setattr(flow_key, name, value)
    FlowKey.objects.using(using).filter(pk=flow_key.pk).update(**changes)


# -- insert --------------------------------------------------------------------------------------


def new_run(
    event: Event,
    spec: Function,
    now: dt.datetime,
    *,
    due: dt.datetime | None = None,
    priority: int | None = None,
) -> Run:
    """An unsaved run of ``spec`` for ``event``: ``pending`` due now, or ``scheduled`` at ``due`` if later."""
    start = due if due is not None and due > now else now
    return Run(
        event=event,
        event_name=event.name,
        function=spec.id,
        max_attempts=spec.max_attempts(),
        due_at=start,
        ready_at=start,
        created_at=now,
        status=RunStatus.SCHEDULED if start > now else RunStatus.PENDING,
        priority=priority,
    )


def new_runs(event: Event, now: dt.datetime) -> list[Run]:
    """Unsaved pending runs of ``event``, due now, one per function subscribed to its name now."""
    return [new_run(event, spec, now) for spec in functions_for(event.name)]


#: Rows per INSERT statement (SQLite allows 32,766 parameters per statement: 12 columns x 2,000).
_BATCH = 2000


def insert(events: Sequence[Event], runs: Sequence[Run], using: str) -> None:
    """Insert new ``events`` and their new ``runs`` (primary keys already set).

    Call it inside a transaction: the runs must commit with their events. On
    PostgreSQL it is one statement (an ``INSERT`` of the events whose ``WITH``
    clause inserts the runs; Django's foreign keys are deferred there), elsewhere
    one per table.
    """
    if not _use_fast(using):
        if events:
            Event.objects.using(using).bulk_create(events, batch_size=_BATCH)
        if runs:
            Run.objects.using(using).bulk_create(runs, batch_size=_BATCH)
        return
    connection = connections[using]
    parts: list[tuple[str, list[Any]]] = []
    for model, objs in ((Event, events), (Run, runs)):
        for start in range(0, len(objs), _BATCH):
            chunk = objs[start : start + _BATCH]
            sql, fields = rawsql.insert_sql(model, using, len(chunk))
            parts.append((sql, [value for obj in chunk for value in rawsql.values(obj, using, fields)]))
    # Prepared only for one event (a send): the statement's text depends on the number of rows,
    # and send_many's many sizes would each take a prepared statement of the connection.
    with rawsql.cursor(using) if len(events) <= 1 else connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(parts) == 2:
            (events_sql, events_params), (runs_sql, runs_params) = parts
            cursor.execute(f"WITH inserted AS ({events_sql}) {runs_sql}", events_params + runs_params)
        else:
            for sql, params in parts:
                cursor.execute(sql, params)
    for obj in (*events, *runs):
        obj._state.adding = False
        obj._state.db = using


def insert_keyed(events: Sequence[Event], using: str) -> dict[str, tuple[Event, bool]]:
    """Insert events that carry an idempotency key; return ``key -> (stored event, inserted now)``.

    A key already stored, even by a concurrent transaction that commits while we
    insert, maps to the stored event (and ``False``). Of a key repeated in
    ``events``, the first wins. Their runs are the caller's to insert.
    """
    keyed: dict[str, Event] = {}
    for event in events:
        assert event.idempotency_key is not None
        keyed.setdefault(event.idempotency_key, event)
    found: dict[str, tuple[Event, bool]] = {}
    for tries_left in range(4, -1, -1):
        for stored in Event.objects.using(using).filter(idempotency_key__in=list(keyed)):
            assert stored.idempotency_key is not None
            found[stored.idempotency_key] = (stored, False)
            del keyed[stored.idempotency_key]
        if not keyed:
            break
        try:
            with transaction.atomic(using=using):
                Event.objects.using(using).bulk_create(list(keyed.values()))
        except IntegrityError:
            # Another transaction stored one of these keys meanwhile: look again.
            if not tries_left:
                raise
            for event in keyed.values():
                event._state.adding = True
            continue
        for key, event in keyed.items():
            found[key] = (event, True)
        break
    return found


# -- claim ---------------------------------------------------------------------------------------


def claim(
    run_id: Any, *, using: str, now: dt.datetime, lease_until: dt.datetime, ignore_due: bool = False
) -> Run | None:
    """Take run ``run_id`` for its next attempt if it may go to ``running`` and is due (or ``ignore_due``).

    One conditional UPDATE: of two workers racing for the run, one gets it. It
    sets ``running``, adds one to ``attempts``, and holds the run until
    ``lease_until``. Returns the run as it is now (``attempts`` is this attempt's
    number) with its event loaded, or ``None`` if the run is unknown, not waiting,
    or not due yet.
    """
    if not _use_fast(using):
        moved = (
            Run.objects.using(using)
            .filter(pk=run_id)
            .claimable(now, ignore_due=ignore_due)
            .move(
                RunStatus.RUNNING,
                attempts=F("attempts") + 1,
                lease_expires_at=lease_until,
                attempt_started_at=now,
                started_at=Coalesce(F("started_at"), Value(now, output_field=DateTimeField())),
            )
        )
        if not moved:
            return None
        return Run.objects.using(using).select_related("event").get(pk=run_id)
    connection = connections[using]
    ops = connection.ops
    # A claim on its own (autocommit) needs no WAL flush of its own: see _claim_sql.
    sql, select_event = _claim_sql(using, ignore_due, not connection.in_atomic_block)
    at = ops.adapt_datetimefield_value(now)
    params = [
        RunStatus.RUNNING.value,
        ops.adapt_datetimefield_value(lease_until),
        at,
        at,
        Run._meta.pk.get_db_prep_value(run_id, connection),
        *_claim_sources(),
    ]
    if not ignore_due:
        params.append(at)
    with rawsql.cursor(using) as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        width = len(Run._meta.concrete_fields)
        run: Run = rawsql.load(Run, using, row[:width])
        if select_event is None:
            event_row = row[width:]
        else:
            cursor.execute(select_event, [Event._meta.pk.get_db_prep_value(run.event_id, connection)])
            event_row = cursor.fetchone()
    run.event = rawsql.load(Event, using, event_row)
    return run


@cache
def _claim_sources() -> list[str]:
    """The statuses a claim takes a run from, in the order of the statement's placeholders."""
    return sorted(sources_of(RunStatus.RUNNING))


@cache
def _claim_sql(using: str, ignore_due: bool, own_transaction: bool = False) -> tuple[str, str | None]:
    """The claim's statement, and on SQLite the SELECT of the event (PostgreSQL returns both rows).

    On PostgreSQL, a claim that is its own transaction (``own_transaction``: autocommit)
    commits without waiting for its WAL to reach the disk (``synchronous_commit = off``
    for that transaction only, set inside the statement so that it costs no round
    trip): one WAL flush per run instead of two. The record that follows is durable,
    and WAL is written in order, so once the record is on disk the claim is too. A
    crash of PostgreSQL can lose only claims whose record has not been written yet:
    those runs are waiting again after the crash and run again (at least once, as
    after any crash), and :func:`take_overdue` holds back their new message until the
    attempts cut off by the crash are over, so that two attempts never overlap.
    """
    connection = connections[using]
    quote = connection.ops.quote_name
    run, event = quote(Run._meta.db_table), quote(Event._meta.db_table)
    c = {field.name: quote(rawsql.column(field)) for field in Run._meta.concrete_fields}
    sources = ", ".join(["%s"] * len(_claim_sources()))
    sets = (
        f"{c['status']} = %s, {c['attempts']} = {run}.{c['attempts']} + 1, {c['lease_expires_at']} = %s, "
        f"{c['attempt_started_at']} = %s, {c['started_at']} = COALESCE({run}.{c['started_at']}, %s)"
    )
    # Only the primary key may pick the row: written as "(…) IS TRUE", the other conditions
    # cannot use an index. Without that, on a table not yet analysed (a fresh backlog) PostgreSQL
    # chose the due-time index and read every waiting run to find this one: measured, 0.56 ms of a
    # 0.94 ms claim with 3,000 runs waiting, growing with the backlog.
    conditions = f"{run}.{c['id']} = %s AND ({run}.{c['status']} IN ({sources})) IS TRUE"
    if not ignore_due:
        conditions += f" AND ({run}.{c['due_at']} <= %s) IS TRUE"
    if connection.vendor == "postgresql":
        event_id = quote(rawsql.column(Event._meta.pk))
        # set_config is volatile, so the CTE is not inlined: it runs once, before the commit.
        no_flush = "WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true)) "
        sql = (
            f"{no_flush if own_transaction else ''}UPDATE {run} SET {sets} "
            f"FROM {event}{', no_flush' if own_transaction else ''} "
            f"WHERE {conditions} AND {event}.{event_id} = {run}.{c['event']} "
            f"RETURNING {rawsql.columns(Run, using, qualified=True)}, "
            f"{rawsql.columns(Event, using, qualified=True)}"
        )
        return sql, None
    sql = f"UPDATE {run} SET {sets} WHERE {conditions} RETURNING {rawsql.columns(Run, using)}"
    select_event = (
        f"SELECT {rawsql.columns(Event, using)} FROM {event} "
        f"WHERE {quote(rawsql.column(Event._meta.pk))} = %s"
    )
    return sql, select_event


# -- record an attempt's outcome -----------------------------------------------------------------


def record(
    run: Run,
    attempt: Attempt,
    to: str,
    *,
    using: str,
    result: Any = None,
    last_error: str | None = None,
    due_at: dt.datetime | None = None,
    refund: bool = False,
) -> bool:
    """Store how attempt ``attempt.number`` of ``run`` ended: move the run to ``to`` and insert ``attempt``.

    Fenced: only if the run is still ``running`` with that attempt number, so a
    worker that lost its lease cannot overwrite a newer attempt. Returns whether
    it was; then ``attempt`` has its primary key and ``run`` is brought up to date.

    Args:
        to: ``succeeded``, ``retrying`` or ``dead`` (any move ``TRANSITIONS`` allows from ``running``).
        result: the function's return value (JSON), stored on a success.
        last_error: ``"Type: message"`` of a failure (kept as it was if ``None``).
        due_at: when a ``retrying`` run is due again.
        refund: give the attempt back (``max_attempts + 1``): the worker, not the
            function, cut it short.
    """
    if to not in TRANSITIONS[RunStatus.RUNNING]:
        raise ValueError(f"A run cannot go from {RunStatus.RUNNING.value} to {str(to)!r}.")
    finished_at = attempt.finished_at if to in _ENDINGS else None
    if _use_fast(using):
        moved = _record_fast(run, attempt, to, using, result, last_error, finished_at, due_at, refund)
    else:
        with transaction.atomic(using=using):
            moved = bool(
                Run.objects.using(using)
                .filter(pk=run.pk, attempts=attempt.number, status=RunStatus.RUNNING)
                .move(
                    to,
                    result=result,
                    last_error=F("last_error") if last_error is None else last_error,
                    finished_at=finished_at,
                    due_at=due_at,
                    lease_expires_at=None,
                    max_attempts=F("max_attempts") + int(refund),
                )
            )
            if moved:
                attempt.save(using=using, force_insert=True)
    if moved:
        run.status, run.attempts = to, attempt.number
        run.result, run.finished_at, run.due_at, run.lease_expires_at = result, finished_at, due_at, None
        if last_error is not None:
            run.last_error = last_error
        run.max_attempts += int(refund)
    return moved


#: The statuses whose runs are finished when they get there.
_ENDINGS = frozenset({RunStatus.SUCCEEDED, RunStatus.DEAD})


def _record_fast(
    run: Run,
    attempt: Attempt,
    to: str,
    using: str,
    result: Any,
    last_error: str | None,
    finished_at: dt.datetime | None,
    due_at: dt.datetime | None,
    refund: bool,
) -> bool:
    connection = connections[using]
    ops = connection.ops
    one, update, insert_attempt = _record_sql(using)
    update_params = [
        to,
        Run._meta.get_field("result").get_db_prep_save(result, connection),
        last_error,
        None if finished_at is None else ops.adapt_datetimefield_value(finished_at),
        None if due_at is None else ops.adapt_datetimefield_value(due_at),
        int(refund),
        Run._meta.pk.get_db_prep_value(run.pk, connection),
        attempt.number,
        RunStatus.RUNNING.value,
    ]
    attempt_params = rawsql.values(attempt, using, _attempt_fields())
    if connection.vendor == "postgresql":
        with rawsql.cursor(using) as cursor:
            cursor.execute(one, update_params + attempt_params)
            row = cursor.fetchone()
    else:
        with transaction.atomic(using=using), connection.cursor() as cursor:
            cursor.execute(update, update_params)
            row = None
            if cursor.rowcount == 1:
                cursor.execute(insert_attempt, attempt_params)
                row = cursor.fetchone()
    if row is None:
        return False
    attempt.pk = row[0]
    attempt._state.adding = False
    attempt._state.db = using
    return True


@cache
def _attempt_fields() -> list[models.Field[Any, Any]]:
    """The attempt's columns a record inserts (all but the primary key), in model order."""
    return [field for field in Attempt._meta.concrete_fields if not field.primary_key]


@cache
def _record_sql(using: str) -> tuple[str, str, str]:
    """(PostgreSQL's one statement, SQLite's UPDATE, SQLite's INSERT of the attempt)."""
    connection = connections[using]
    quote = connection.ops.quote_name
    run, attempt = quote(Run._meta.db_table), quote(Attempt._meta.db_table)
    r = {field.name: quote(rawsql.column(field)) for field in Run._meta.concrete_fields}
    fields = _attempt_fields()
    columns = ", ".join(quote(rawsql.column(field)) for field in fields)
    update = (
        f"UPDATE {run} SET {r['status']} = %s, {r['result']} = %s, "
        f"{r['last_error']} = COALESCE(%s, {r['last_error']}), {r['finished_at']} = %s, "
        f"{r['due_at']} = %s, {r['lease_expires_at']} = NULL, "
        f"{r['max_attempts']} = {r['max_attempts']} + %s "
        f"WHERE {r['id']} = %s AND {r['attempts']} = %s AND {r['status']} = %s"
    )
    placeholders = ", ".join(["%s"] * len(fields))
    pk = quote(rawsql.column(Attempt._meta.pk))
    one = (
        f"WITH moved AS ({update} RETURNING {r['id']}) "
        f"INSERT INTO {attempt} ({columns}) SELECT {placeholders} FROM moved RETURNING {pk}"
    )
    insert_attempt = f"INSERT INTO {attempt} ({columns}) VALUES ({placeholders}) RETURNING {pk}"
    return one, update, insert_attempt


def keep_stale_attempt(attempt: Attempt, using: str) -> bool:
    """Keep the history of an attempt whose run another worker took over, unless its number is taken.

    The run itself is not changed. Returns whether the attempt was stored.
    """
    try:
        with transaction.atomic(using=using):
            attempt.save(using=using, force_insert=True)
    except IntegrityError:
        return False
    return True


# -- operator moves ------------------------------------------------------------------------------


def retry(run_ids: Iterable[Any], *, using: str, now: dt.datetime) -> list[tuple[Any, str]]:
    """Move the final runs (dead, cancelled, skipped, succeeded) back to ``pending``, due now.

    Only final runs: a held or scheduled run is not jumped ahead of its limit or its time.

    Each gets a fresh allowance of attempts (its function's, or the default); its
    earlier attempts stay, and numbering goes on. Returns ``(run id, function id)``
    of the runs moved; the others are left alone. Call it inside a transaction
    that also sends their messages.
    """
    ids = list(dict.fromkeys(run_ids))
    by_function: dict[str, list[Any]] = defaultdict(list)
    with transaction.atomic(using=using):
        eligible = (
            Run.objects.using(using)
            .select_for_update()
            .filter(pk__in=ids, status__in=_RETRY_SOURCES)
            .values_list("pk", "function")
        )
        for pk, function_id in eligible:
            by_function[function_id].append(pk)
        for function_id, pks in by_function.items():
            Run.objects.using(using).filter(pk__in=pks).move(
                RunStatus.PENDING,
                max_attempts=F("attempts") + max_attempts_for(function_id),
                due_at=now,
                finished_at=None,
                lease_expires_at=None,
                result=None,
                reason="",
                merged_into=None,
                cancelled_by=None,
                held_on="",
            )
        if by_function:
            # The waits a cancel stopped wait again: the run's replay looks for their event anew.
            Step.objects.using(using).filter(
                run_id__in=[pk for pks in by_function.values() for pk in pks], status=StepStatus.CANCELLED
            ).update(status=StepStatus.WAITING)
    return [(pk, function_id) for function_id, pks in by_function.items() for pk in pks]


#: What a retry by hand starts again: final runs (the moves to ``pending`` from other statuses are
#: flow control's: a woken held run, a full batch).
_RETRY_SOURCES = sorted(set(sources_of(RunStatus.PENDING)) & FINAL_STATUSES)


def cancel(
    run_ids: Iterable[Any],
    *,
    using: str,
    now: dt.datetime,
    reason: str = "",
    cancelled_by: Any = None,
) -> int:
    """Cancel the runs not started yet, or between attempts (pending, scheduled, throttled, held,
    retrying, sleeping, waiting); return how many moved.

    ``reason`` (one line) and ``cancelled_by`` (the cancelling event's id) are kept on
    the runs. A slot kept for a woken run is given back; the waits of a waiting run
    stop (``cancelled``: no event resolves them).
    """
    ids = list(dict.fromkeys(run_ids))
    with transaction.atomic(using=using):
        moved = (
            Run.objects.using(using)
            .filter(pk__in=ids)
            .move(
                RunStatus.CANCELLED,
                finished_at=now,
                due_at=None,
                lease_expires_at=None,
                reason=reason[:255],
                cancelled_by=cancelled_by,
                held_on="",
            )
        )
        if moved:
            Slot.objects.using(using).filter(run_id__in=ids).delete()
            Step.objects.using(using).filter(
                run_id__in=ids, run__status=RunStatus.CANCELLED, status=StepStatus.WAITING
            ).update(status=StepStatus.CANCELLED)
    return moved


# -- durable steps -------------------------------------------------------------------------------


def hold_for_step(run_id: Any, attempt: int, *, using: str) -> bool:
    """Lock run ``run_id`` for a ``step.atomic`` if it is still ``running`` its attempt ``attempt``.

    Call it inside the step's transaction: the lock (a row lock on PostgreSQL, the
    database's write lock on SQLite) lasts until it ends, so no other worker takes
    the run meanwhile, and a worker whose lease another took over gets ``False``
    and must not run the step.
    """
    held = Run.objects.using(using).filter(pk=run_id, status=RunStatus.RUNNING, attempts=attempt)
    if connections[using].vendor == "sqlite":
        # A write takes SQLite's lock at once, whatever the transaction mode: no other writer
        # commits between this check and the step's own writes.
        return bool(held.update(lease_expires_at=F("lease_expires_at")))
    # Waits for a lock another transaction holds (a recovery pass taking back an expired lease):
    # then the conditions are checked again on the row as that transaction left it.
    return held.select_for_update().values_list("pk", flat=True).first() is not None


def resume(run_ids: Iterable[Any], *, using: str, now: dt.datetime) -> list[tuple[Any, str]]:
    """Move the ``waiting`` runs among ``run_ids`` to ``pending``, due now; return ``(run id, function id)``.

    What they waited for came: the event of a ``step.wait_for_event``, the end of a
    ``step.invoke``'s run. Call it inside the transaction that records that, and
    send the runs' messages in it. Runs in other statuses are left alone (a run
    still in its attempt sees what came when it leaves the worker).
    """
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        return []
    rows = list(
        Run.objects.using(using).filter(pk__in=ids, status=RunStatus.WAITING).values_list("pk", "function")
    )
    if rows:
        Run.objects.using(using).filter(pk__in=[pk for pk, _function in rows], status=RunStatus.WAITING).move(
            RunStatus.PENDING, due_at=now
        )
    return rows


# -- flow control: holding a run back, slots, waking -------------------------------------------


def lock_claimable(
    run_id: Any,
    *,
    using: str,
    now: dt.datetime,
    ignore_due: bool = False,
    best_of: str | None = None,
    bound_waits: bool = False,
) -> Run | None:
    """Lock run ``run_id`` if it is waiting and due (or ``ignore_due``), with its event; else ``None``.

    ``best_of``: the id of a function with a priority. A message is then a turn
    to run the function, and the database decides which run takes it: the
    function's due run that goes first (highest priority, then oldest), skipping
    runs another transaction has locked, since each of those is being taken by
    a message of its own. The message's own run is not locked first: a run
    locked and then passed over would be skipped by every other message in that
    moment, and a message that found only such runs would be lost to them. The
    run passed over keeps its place; the message of the run taken is the turn it
    gets. So a message whose own run is no longer waiting (another message's
    turn took it, or it was held) still takes the best due run; one whose own
    run waits but is not due yet takes nothing (``None``: its caller sends it
    again for later).

    ``bound_waits``: also bound the transaction's lock waits (:func:`bound_lock_waits`)
    before the first lock is waited for; on PostgreSQL inside the statement that
    locks the run, which saves a round trip.

    Call it inside a transaction; then move the run with :func:`claim` or hold it
    back with :func:`hold_back`.
    """
    claimable = Run.objects.using(using).claimable(now, ignore_due=ignore_due)
    if best_of is not None and not ignore_due:
        early = Run.objects.using(using).filter(pk=run_id, status__in=WAITING_STATUSES, due_at__gt=now)
        if early.exists():
            return None  # its message is sent again for its time
        if bound_waits:
            bound_lock_waits(using)
        best = _locked_waiting(
            claimable.filter(function=best_of, priority__isnull=False).order_by(
                "-priority", "created_at", "id"
            ),
            using,
            skip=True,
        )
        # A run with no priority (sent before the function had one) is only taken by its own message.
        return best or _locked_waiting(claimable.filter(pk=run_id), using, skip=True)
    if _use_fast(using):
        own, bounded = _lock_own_fast(
            run_id, using=using, now=now, ignore_due=ignore_due, bound_waits=bound_waits
        )
        if own is not None and bound_waits and not bounded:
            bound_lock_waits(using)
        return own
    if bound_waits:
        bound_lock_waits(using)
    return _locked_waiting(claimable.filter(pk=run_id), using, skip=False)


def _lock_own_fast(
    run_id: Any, *, using: str, now: dt.datetime, ignore_due: bool, bound_waits: bool
) -> tuple[Run | None, bool]:
    """Lock waiting run ``run_id`` with its event in one statement; and whether lock waits are now bounded."""
    connection = connections[using]
    bound = bound_waits and connection.vendor == "postgresql"
    params: list[Any] = [Run._meta.pk.get_db_prep_value(run_id, connection)]
    if not ignore_due:
        params.append(connection.ops.adapt_datetimefield_value(now))
    if bound:
        params.append(f"{int(LOCK_WAIT * 1000)}ms")
    with rawsql.cursor(using) as cursor:
        cursor.execute(_lock_own_sql(using, ignore_due, bound), params)
        row = cursor.fetchone()
    if row is None:
        return None, False
    width = len(Run._meta.concrete_fields)
    run: Run = rawsql.load(Run, using, row[:width])
    run.event = rawsql.load(Event, using, row[width:])
    return run, bound


@cache
def _lock_own_sql(using: str, ignore_due: bool, bound_waits: bool) -> str:
    """``SELECT`` a waiting run and its event, locking the run (PostgreSQL; SQLite has one writer).

    With ``bound_waits`` the statement also sets the transaction's ``lock_timeout``:
    the condition is evaluated on the row before the row's lock is waited for.
    The statuses are written in, and the other conditions are written "(…) IS
    TRUE" so that only the primary key picks the row (see :func:`_claim_sql`).
    """
    connection = connections[using]
    quote = connection.ops.quote_name
    run, event = quote(Run._meta.db_table), quote(Event._meta.db_table)
    c = {field.name: quote(rawsql.column(field)) for field in Run._meta.concrete_fields}
    statuses = ", ".join(f"'{status}'" for status in sorted(WAITING_STATUSES))
    conditions = f"{run}.{c['id']} = %s AND ({run}.{c['status']} IN ({statuses})) IS TRUE"
    if not ignore_due:
        conditions += f" AND ({run}.{c['due_at']} <= %s) IS TRUE"
    if bound_waits:
        conditions += " AND set_config('lock_timeout', %s, true) IS NOT NULL"
    event_id = quote(rawsql.column(Event._meta.pk))
    sql = (
        f"SELECT {rawsql.columns(Run, using, qualified=True)}, "
        f"{rawsql.columns(Event, using, qualified=True)} "
        f"FROM {run} INNER JOIN {event} ON {event}.{event_id} = {run}.{c['event']} "
        f"WHERE {conditions}"
    )
    if connection.features.has_select_for_update:
        sql += f" FOR UPDATE OF {run}"
    return sql


def _locked_waiting(queryset: Any, using: str, *, skip: bool) -> Run | None:
    features = connections[using].features
    queryset = queryset.select_related("event")
    if features.has_select_for_update:
        of = ("self",) if features.has_select_for_update_of else ()
        queryset = queryset.select_for_update(
            skip_locked=skip and features.has_select_for_update_skip_locked, of=of
        )
    run: Run | None = queryset.first()
    return run


def hold_back(
    run: Run,
    to: str,
    *,
    using: str,
    now: dt.datetime,
    reason: str,
    due_at: dt.datetime | None = None,
    held_on: str = "",
) -> bool:
    """Move a waiting run (locked by :func:`lock_claimable`) to ``to`` instead of running it.

    ``throttled`` (its turn at ``due_at``), ``held`` (waiting for a slot of the
    concurrency key ``held_on``), ``skipped`` (final: a rate limit), ``cancelled``
    (final: its start timeout) or ``dead`` (final: its finish timeout), with
    ``reason`` as its one line. Returns whether it moved (from the status read).
    """
    final = to in (RunStatus.SKIPPED, RunStatus.CANCELLED, RunStatus.DEAD)
    if to == RunStatus.DEAD and reason:
        extra: dict[str, Any] = {"last_error": reason[:1000]}
    else:
        extra = {}
    moved = (
        Run.objects.using(using)
        .filter(pk=run.pk, status=run.status)
        .move(
            to,
            reason=reason[:255],
            due_at=due_at,
            held_on=held_on,
            finished_at=now if final else None,
            lease_expires_at=None,
            **extra,
        )
    )
    if moved:
        run.status, run.reason, run.due_at, run.held_on = to, reason[:255], due_at, held_on
        if "last_error" in extra:
            run.last_error = extra["last_error"]
    return bool(moved)


def live_slots(flow_key: str, *, using: str, now: dt.datetime, besides: Any = None) -> int:
    """How many slots of the concurrency key ``flow_key`` are held now (leases not over), but ``besides``'."""
    return slot_counts(flow_key, using=using, now=now, run_id=besides)[0]


def slot_counts(flow_key: str, *, using: str, now: dt.datetime, run_id: Any = None) -> tuple[int, bool]:
    """The live slots of ``flow_key`` held by runs other than ``run_id``, and whether ``run_id`` holds one.

    One statement; a run holds a slot before it starts when it was woken (the slot kept for it).
    """
    connection = connections[using]
    if _use_fast(using):
        quote = connection.ops.quote_name
        table = quote(Slot._meta.db_table)
        run_col = quote("run_id")
        sql = (
            f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN {run_col} = %s THEN 1 ELSE 0 END), 0) FROM {table} "
            f"WHERE {quote('flow_key')} = %s AND {quote('lease_expires_at')} > %s"
        )
        run_value = (
            None if run_id is None else Slot._meta.get_field("run_id").get_db_prep_value(run_id, connection)
        )
        with rawsql.cursor(using) as cursor:
            cursor.execute(sql, [run_value, flow_key, connection.ops.adapt_datetimefield_value(now)])
            total, own = cursor.fetchone()
        return int(total) - int(own), bool(own)
    slots = Slot.objects.using(using).filter(flow_key=flow_key, lease_expires_at__gt=now)
    if run_id is None:
        return slots.count(), False
    own = slots.filter(run_id=run_id).count()
    return slots.count() - own, bool(own)


def lock_woken(flow_key: str, *, using: str, now: dt.datetime, besides: Any = None) -> Run | None:
    """Lock a run woken on ``flow_key`` that has not started (a live slot is kept for it), with its event.

    Highest priority, then oldest; runs another transaction has locked are
    skipped (PostgreSQL). ``None`` if there is none but ``besides``.
    """
    kept = Slot.objects.using(using).filter(flow_key=flow_key, lease_expires_at__gt=now).values("run_id")
    woken = (
        Run.objects.using(using)
        .filter(pk__in=kept, status=RunStatus.PENDING)
        .exclude(pk=besides)
        .order_by("-priority", "created_at", "id")
    )
    return _locked_waiting(woken, using, skip=True)


def take_slots(
    run_id: Any,
    flow_keys: Sequence[str],
    *,
    using: str,
    until: dt.datetime,
    kept: Iterable[str] | None = None,
) -> None:
    """Give run ``run_id`` a slot of each concurrency key in ``flow_keys``, held until ``until``.

    A slot already kept for it (it was woken) is extended instead of doubled;
    ``kept``, if given, names those keys (else they are read).
    """
    if kept is None:
        kept = (
            Slot.objects.using(using)
            .filter(run_id=run_id, flow_key__in=flow_keys)
            .values_list("flow_key", flat=True)
        )
    kept = set(kept)
    if kept:
        Slot.objects.using(using).filter(run_id=run_id, flow_key__in=kept).update(lease_expires_at=until)
    new = [key for key in flow_keys if key not in kept]
    if not new:
        return
    if _use_fast(using):
        connection = connections[using]
        quote = connection.ops.quote_name
        sql = (
            f"INSERT INTO {quote(Slot._meta.db_table)} ({quote('flow_key')}, {quote('run_id')}, "
            f"{quote('lease_expires_at')}) VALUES {', '.join(['(%s, %s, %s)'] * len(new))}"
        )
        run_value = Slot._meta.get_field("run_id").get_db_prep_value(run_id, connection)
        lease = connection.ops.adapt_datetimefield_value(until)
        with rawsql.cursor(using) as cursor:
            cursor.execute(sql, [value for key in new for value in (key, run_value, lease)])
        return
    Slot.objects.using(using).bulk_create(
        [Slot(flow_key=key, run_id=run_id, lease_expires_at=until) for key in new]
    )


def release_slots(run_id: Any, *, using: str, bound_waits: bool = False) -> list[str]:
    """Give back every slot run ``run_id`` holds; return their concurrency keys (FlowKey ids).

    ``bound_waits``: if it held any, also bound the transaction's lock waits
    (:func:`bound_lock_waits`) for the keys' locks that follow; on PostgreSQL in
    the same statement.
    """
    if _use_fast(using):
        connection = connections[using]
        quote = connection.ops.quote_name
        table, run_col, key_col = quote(Slot._meta.db_table), quote("run_id"), quote("flow_key")
        params = [Slot._meta.get_field("run_id").get_db_prep_value(run_id, connection)]
        bound = ""
        if bound_waits and connection.vendor == "postgresql":
            bound = " AND set_config('lock_timeout', %s, true) IS NOT NULL"
            params.append(f"{int(LOCK_WAIT * 1000)}ms")
        sql = f"DELETE FROM {table} WHERE {run_col} = %s{bound} RETURNING {key_col}"
        with rawsql.cursor(using) as cursor:
            cursor.execute(sql, params)
            return sorted({row[0] for row in cursor.fetchall()})
    slots = Slot.objects.using(using).filter(run_id=run_id)
    keys = sorted(set(slots.values_list("flow_key", flat=True)))
    if keys:
        slots.delete()
        if bound_waits:
            bound_lock_waits(using)
    return keys


def wake(
    flow_key: str, *, limit: int, using: str, now: dt.datetime, slot_until: dt.datetime
) -> list[tuple[Any, str]]:
    """Wake as many runs held on ``flow_key`` as it has free slots of ``limit``: ``pending``, due now.

    Highest priority first, then oldest. Each keeps a slot of the key until
    ``slot_until``, so that a run arriving meanwhile does not take it. Call it
    inside a transaction that holds the key's lock (:func:`lock_keys`) and sends
    the returned runs' messages. When no run is held, one statement (its live
    slots counted in it): the usual case of a limit that does not bind.
    """
    if _use_fast(using):
        rows = _free_held_fast(flow_key, limit=limit, using=using, now=now)
    else:
        free = limit - live_slots(flow_key, using=using, now=now)
        if free <= 0:
            return []
        held = (
            Run.objects.using(using)
            .filter(status=RunStatus.HELD, held_on=flow_key)
            .order_by("-priority", "created_at", "id")
        )
        rows = list(_locked(held, using).values_list("pk", "function")[:free])
    if not rows:
        return []
    ids = [pk for pk, _function in rows]
    Run.objects.using(using).filter(pk__in=ids, status=RunStatus.HELD).move(
        RunStatus.PENDING, due_at=now, held_on="", reason=""
    )
    Slot.objects.using(using).bulk_create(
        [Slot(flow_key=flow_key, run_id=pk, lease_expires_at=slot_until) for pk in ids]
    )
    return rows


def _free_held_fast(flow_key: str, *, limit: int, using: str, now: dt.datetime) -> list[tuple[Any, str]]:
    """The held runs of ``flow_key`` that its free slots go to, locked: one statement."""
    connection = connections[using]
    with rawsql.cursor(using) as cursor:
        cursor.execute(
            _free_held_sql(using),
            [flow_key, limit, flow_key, connection.ops.adapt_datetimefield_value(now)],
        )
        rows = cursor.fetchall()
    pk = Run._meta.pk
    return [(pk.to_python(run_id), function) for run_id, function in rows]


@cache
def _free_held_sql(using: str) -> str:
    """``SELECT`` the next held runs of a key, as many as it has free slots, locked (skipping locked ones).

    The status is written into the statement, not a parameter, so that a prepared
    statement's generic plan can still use the partial index of held runs. The
    slots are counted inside it: the caller already holds the key's lock, so the
    statement's snapshot sees every slot taken or given back before.
    """
    connection = connections[using]
    quote = connection.ops.quote_name
    run, slot = quote(Run._meta.db_table), quote(Slot._meta.db_table)
    c = {field.name: quote(rawsql.column(field)) for field in Run._meta.concrete_fields}
    live = (
        f"%s - (SELECT COUNT(*) FROM {slot} WHERE {quote('flow_key')} = %s "
        f"AND {quote('lease_expires_at')} > %s)"
    )
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    sql = (
        f"SELECT {c['id']}, {c['function']} FROM {run} "
        f"WHERE {c['status']} = '{RunStatus.HELD.value}' AND {c['held_on']} = %s "
        f"ORDER BY {c['priority']} DESC, {c['created_at']} ASC, {c['id']} ASC "
        f"LIMIT {greatest}({live}, 0)"
    )
    if connection.features.has_select_for_update_skip_locked:
        sql += " FOR UPDATE SKIP LOCKED"
    return sql


def merge(run_id: Any, *, into: Any, reason: str, using: str, now: dt.datetime) -> bool:
    """Skip waiting run ``run_id``: run ``into`` handles its event (debounce). Whether it moved."""
    return bool(
        Run.objects.using(using)
        .filter(pk=run_id, status__in=WAITING_STATUSES, attempts=0)
        .move(RunStatus.SKIPPED, merged_into=into, reason=reason[:255], finished_at=now, due_at=None)
    )


def lock_open(run_id: Any, *, using: str) -> Run | None:
    """Lock run ``run_id`` if it has not started (a batch's open run), else ``None``."""
    return _locked_waiting(
        Run.objects.using(using).filter(pk=run_id, status=RunStatus.SCHEDULED, attempts=0), using, skip=False
    )


def start_now(run_id: Any, *, using: str, now: dt.datetime) -> bool:
    """Make a scheduled run due now (a batch that filled up). Whether it moved."""
    return bool(
        Run.objects.using(using)
        .filter(pk=run_id, status=RunStatus.SCHEDULED)
        .move(RunStatus.PENDING, due_at=now)
    )


# -- recovery ------------------------------------------------------------------------------------


def take_overdue(
    *, cutoff: dt.datetime, now: dt.datetime, limit: int, using: str, skip_fanout_rest: bool = False
) -> list[tuple[Any, str, str]]:
    """Take up to ``limit`` waiting runs due before ``cutoff``, oldest first: due again at ``now``.

    Moving ``due_at`` is what makes them this caller's: another pass, racing or
    later, leaves them alone until ``now`` is overdue in its turn. Returns
    ``(run id, function id, status)`` of the runs taken. Call it inside a
    transaction that also sends their messages.

    Runs whose attempt may still be running are not taken: see :func:`_maybe_still_running`.

    ``skip_fanout_rest``: leave out the runs never attempted whose event has a run
    that was (the rest of a fan-out: the worker that took the fan-out's message sent
    them messages of their own, at the back of the queue, so their place in it is
    later than their due time says).
    """
    overdue = Run.objects.using(using).waiting().filter(due_at__lt=cutoff).order_by("due_at")
    cut_off = _maybe_still_running(using, now)
    if cut_off is not None:
        overdue = overdue.exclude(cut_off)
    if skip_fanout_rest:
        started = Run.objects.using(using).filter(event_id=models.OuterRef("event_id"), attempts__gt=0)
        overdue = overdue.exclude(models.Q(attempts=0) & models.Exists(started))
    with transaction.atomic(using=using):
        rows = list(_locked(overdue, using).values_list("pk", "function", "status")[:limit])
        if not rows:
            return []
        ids = [pk for pk, _function, _status in rows]
        # The `due_at__lt` condition makes sure that of two racing passes only one gets a row.
        Run.objects.using(using).filter(pk__in=ids, due_at__lt=cutoff, status__in=WAITING_STATUSES).update(
            due_at=now
        )
        mine = set(
            Run.objects.using(using)
            .filter(pk__in=ids, due_at=now, status__in=WAITING_STATUSES)
            .values_list("pk", flat=True)
        )
    return [row for row in rows if row[0] in mine]


def _maybe_still_running(using: str, now: dt.datetime) -> models.Q | None:
    """The waiting runs whose claim a crash of PostgreSQL may have lost while their attempt runs on.

    A claim commits without its own WAL flush (:func:`claim`), so a crash of the
    server (not a clean restart) can lose the claims of its last moments: their
    runs look waiting again, as if never claimed, while the attempt goes on in a
    worker that outlived the crash. Such a run was due before the server started,
    and its attempt ends within its lease (the function's time limit, which Dramatiq
    enforces, plus ``LEASE_MARGIN``) of the claim. So until a lease has passed since
    the server started after a crash, those runs get no new message: two attempts of a
    run never overlap. A crash is what PostgreSQL's WAL statistics say: they are
    discarded by the recovery from a crash (``pg_stat_wal.stats_reset`` at or after the
    server's start), and kept across a clean restart, which flushes every claim and so
    holds nothing back. Runs of a function no longer registered are not held: they fail
    at once, running nothing. ``None`` on other databases, after a clean start, and
    once every lease has passed.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_postmaster_start_time(), stats_reset >= pg_postmaster_start_time() FROM pg_stat_wal"
        )
        started, crashed = cursor.fetchone()
    if not crashed:
        return None
    held = [
        spec.id
        for spec in registered_functions()
        if started + dt.timedelta(seconds=lease_seconds(spec.id)) > now
    ]
    return models.Q(due_at__lt=started, function__in=held) if held else None


def lease_expired(*, now: dt.datetime, limit: int, using: str) -> list[Run]:
    """Lock and return up to ``limit`` running runs whose lease ended before ``now``, with their events.

    Call it inside a transaction; record each run's lost attempt with :func:`record`
    in it. On PostgreSQL rows locked by another pass are skipped.
    """
    expired = Run.objects.using(using).lease_expired(now).order_by("lease_expires_at")
    return list(_locked(expired.select_related("event"), using)[:limit])
