"""The statements of the hot path, written out once instead of built by the ORM for every run.

Three things happen for nearly every event and run, and each is one statement here:

* **send** stores an event and its runs: on PostgreSQL one ``INSERT`` of the events
  whose ``WITH`` clause also inserts the runs; elsewhere two ``INSERT``\\ s.
* **claim** takes a run and reads it with its event: on PostgreSQL one
  ``UPDATE … FROM event … RETURNING`` of both rows; on SQLite an ``UPDATE … RETURNING``
  and a ``SELECT`` of the event.
* **record a success** moves the run to ``succeeded`` and inserts its attempt: on
  PostgreSQL one ``WITH moved AS (UPDATE …) INSERT … SELECT FROM moved``, fenced on the
  run being ``running`` with this attempt number; on SQLite both in one transaction.

Each is the same write the ORM path does, with the same conditions; only the number
of round trips and the Python around them differ. Values go through the fields'
``get_db_prep_save`` and rows come back through the fields' converters, as with the
ORM. Other databases (and SQLite older than 3.35, which has no ``RETURNING``) use
the ORM path: :func:`supported` says which.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from django.db import connections, models, transaction

from .conf import get_settings
from .models import Attempt, Event, Run, RunStatus, sources_of

__all__ = ["claim", "insert", "record_success", "supported"]

_M = TypeVar("_M", bound=models.Model)


def supported(using: str) -> bool:
    """Whether database ``using`` runs the hot path's statements (PostgreSQL, SQLite 3.35+)."""
    return _supported(connections[using].vendor, using)


@cache
def _supported(vendor: str, using: str) -> bool:
    if vendor == "postgresql":
        return True
    if vendor == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version_info >= (3, 35)
    return False


# -- Prepared statements -------------------------------------------------------------------------


def _cursor(using: str) -> Any:
    """A cursor for the hot path's statements: on PostgreSQL with psycopg 3, prepared ones.

    PostgreSQL plans every statement it is sent as text again (0.3 ms of a 0.7 ms claim,
    measured); a prepared statement is planned once per connection. Django's own queries
    are unchanged: only this cursor, server-side binding, prepares. Goes through
    Django's cursor wrapper, so errors are Django's; while queries are logged (``DEBUG``)
    the ordinary cursor is used, so that the log shows the SQL.
    ``DJANGO_EVENTS["PREPARED_STATEMENTS"] = False`` turns it off (for poolers that
    cannot keep prepared statements, such as pgbouncer before 1.21 in transaction mode).
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not get_settings().PREPARED_STATEMENTS:
        return connection.cursor()
    if connection.queries_logged:
        # DEBUG, or a test capturing queries: Django could not show a prepared statement's SQL.
        return connection.cursor()
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        return connection.cursor()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        if connection.connection.prepare_threshold is None:
            # Django turns preparing off for the connection (None), which psycopg also applies to
            # prepare=True. A threshold no query reaches prepares only what asks, as ours do.
            connection.connection.prepare_threshold = _NEVER
        raw = _preparing_cursor_class()(connection.connection)
    connection.validate_thread_sharing()
    return connection.make_cursor(raw)


#: A prepare threshold no statement reaches: only statements executed with prepare=True are prepared.
_NEVER = 2**31 - 1


@cache
def _preparing_cursor_class() -> type[Any]:
    import psycopg

    class PreparingCursor(psycopg.Cursor[Any]):
        """Server-side binding, and every statement prepared."""

        def execute(
            self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
        ) -> Any:
            return super().execute(query, params, prepare=True, binary=binary)

    return PreparingCursor


# -- Reading rows back into models ------------------------------------------------------------


@dataclass(frozen=True)
class _Loader:
    """Turns a row of a model's concrete columns, in field order, into an instance."""

    model: type[models.Model]
    using: str
    attnames: list[str]
    converters: list[tuple[int, list[Callable[..., Any]], Any]]

    def load(self, values: Sequence[Any]) -> Any:
        row = list(values)
        connection = connections[self.using]
        for index, functions, expression in self.converters:
            value = row[index]
            for function in functions:
                value = function(value, expression, connection)
            row[index] = value
        return self.model.from_db(self.using, self.attnames, row)


@cache
def _loader(model: type[models.Model], using: str) -> _Loader:
    connection = connections[using]
    fields = model._meta.concrete_fields
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        functions = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if functions:
            converters.append((index, functions, column))
    return _Loader(model, using, [field.attname for field in fields], converters)


def _column(field: models.Field[Any, Any]) -> str:
    assert field.column is not None  # concrete fields have a column
    return field.column


def _columns(model: type[models.Model], using: str, *, qualified: bool = False) -> str:
    quote = connections[using].ops.quote_name
    table = quote(model._meta.db_table)
    names = [quote(_column(field)) for field in model._meta.concrete_fields]
    return ", ".join(f"{table}.{name}" for name in names) if qualified else ", ".join(names)


def _values(obj: models.Model, using: str, fields: Sequence[models.Field[Any, Any]]) -> list[Any]:
    connection = connections[using]
    return [field.get_db_prep_save(getattr(obj, field.attname), connection) for field in fields]


# -- send ----------------------------------------------------------------------------------------


@cache
def _insert_sql(model: type[models.Model], using: str, rows: int) -> tuple[str, list[models.Field[Any, Any]]]:
    connection = connections[using]
    fields = [field for field in model._meta.concrete_fields]
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (
        f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({_columns(model, using)}) "
        f"VALUES {', '.join([row] * rows)}"
    )
    return sql, fields


def insert(events: Sequence[Event], runs: Sequence[Run], using: str) -> None:
    """Insert new ``events`` and their new ``runs`` (primary keys already set), in few statements.

    Call it inside a transaction: on PostgreSQL it is one statement, elsewhere two,
    and the runs must commit with their events.
    """
    connection = connections[using]
    parts: list[tuple[str, list[Any]]] = []
    for model, objs in ((Event, events), (Run, runs)):
        for start in range(0, len(objs), _BATCH):
            chunk = objs[start : start + _BATCH]
            sql, fields = _insert_sql(model, using, len(chunk))
            parts.append((sql, [value for obj in chunk for value in _values(obj, using, fields)]))
    # Prepared only for one event (a send): the statement's text depends on the number of rows,
    # and send_many's many sizes would each take a prepared statement of the connection.
    with _cursor(using) if len(events) <= 1 else connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(parts) == 2:
            # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED on PostgreSQL, so the runs
            # may go in beside their events in one statement.
            (events_sql, events_params), (runs_sql, runs_params) = parts
            cursor.execute(f"WITH inserted AS ({events_sql}) {runs_sql}", events_params + runs_params)
        else:
            for sql, params in parts:
                cursor.execute(sql, params)
    for obj in (*events, *runs):
        obj._state.adding = False
        obj._state.db = using


#: Rows per INSERT statement (SQLite allows 32,766 parameters per statement: 12 columns x 2,000).
_BATCH = 2000


@cache
def _waiting_statuses() -> list[str]:
    """The statuses a claim takes a run from, in the order of the statement's placeholders."""
    return sorted(sources_of(RunStatus.RUNNING))


@cache
def _attempt_fields() -> list[models.Field[Any, Any]]:
    """The attempt's columns the record inserts (all but the primary key), in model order."""
    return [field for field in Attempt._meta.concrete_fields if not field.primary_key]


# -- claim ---------------------------------------------------------------------------------------


@cache
def _claim_sql(using: str, ignore_due: bool) -> tuple[str, str | None]:
    connection = connections[using]
    quote = connection.ops.quote_name
    run, event = quote(Run._meta.db_table), quote(Event._meta.db_table)
    c = {field.name: quote(_column(field)) for field in Run._meta.concrete_fields}
    waiting = ", ".join(["%s"] * len(sources_of(RunStatus.RUNNING)))
    sets = (
        f"{c['status']} = %s, {c['attempts']} = {run}.{c['attempts']} + 1, {c['lease_expires_at']} = %s, "
        f"{c['attempt_started_at']} = %s, {c['started_at']} = COALESCE({run}.{c['started_at']}, %s)"
    )
    # Only the primary key may pick the row: written as "(…) IS TRUE", the other conditions
    # cannot use an index. Without that, on a table not yet analysed (a fresh backlog) PostgreSQL
    # chose the due-time index and read every waiting run to find this one: measured, 0.56 ms of a
    # 0.94 ms claim with 3,000 runs waiting, growing with the backlog.
    conditions = f"{run}.{c['id']} = %s AND ({run}.{c['status']} IN ({waiting})) IS TRUE"
    if not ignore_due:
        conditions += f" AND ({run}.{c['due_at']} <= %s) IS TRUE"
    if connection.vendor == "postgresql":
        event_id = quote(_column(Event._meta.pk))
        sql = (
            f"UPDATE {run} SET {sets} FROM {event} "
            f"WHERE {conditions} AND {event}.{event_id} = {run}.{c['event']} "
            f"RETURNING {_columns(Run, using, qualified=True)}, {_columns(Event, using, qualified=True)}"
        )
        return sql, None
    sql = f"UPDATE {run} SET {sets} WHERE {conditions} RETURNING {_columns(Run, using)}"
    select_event = f"SELECT {_columns(Event, using)} FROM {event} WHERE {quote(_column(Event._meta.pk))} = %s"
    return sql, select_event


def claim(
    run_id: Any, *, using: str, now: dt.datetime, lease_until: dt.datetime, ignore_due: bool = False
) -> Run | None:
    """Take run ``run_id`` for its next attempt if it is pending or retrying and due (or ``ignore_due``).

    One conditional UPDATE, as ``RunQuerySet.claimable(now, ignore_due=…).move(RUNNING, …)`` does:
    of two workers racing for the run, one gets it. Returns the run as it is now
    (``attempts`` is this attempt's number) with its event loaded, or ``None`` if
    the run is unknown, not waiting, or not due yet.
    """
    connection = connections[using]
    ops = connection.ops
    sql, select_event = _claim_sql(using, ignore_due)
    waiting = _waiting_statuses()
    at = ops.adapt_datetimefield_value(now)
    params = [
        RunStatus.RUNNING.value,
        ops.adapt_datetimefield_value(lease_until),
        at,
        at,
        Run._meta.pk.get_db_prep_value(run_id, connection),
        *waiting,
    ]
    if not ignore_due:
        params.append(at)
    with _cursor(using) as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        width = len(Run._meta.concrete_fields)
        run: Run = _loader(Run, using).load(row[:width])
        if select_event is None:
            event_row = row[width:]
        else:
            cursor.execute(select_event, [Event._meta.pk.get_db_prep_value(run.event_id, connection)])
            event_row = cursor.fetchone()
    run.event = _loader(Event, using).load(event_row)
    return run


# -- record a success ----------------------------------------------------------------------------


@cache
def _success_sql(using: str) -> tuple[str, str, str]:
    """(PostgreSQL's one statement, SQLite's UPDATE, SQLite's INSERT)."""
    connection = connections[using]
    quote = connection.ops.quote_name
    run, attempt = quote(Run._meta.db_table), quote(Attempt._meta.db_table)
    r = {field.name: quote(_column(field)) for field in Run._meta.concrete_fields}
    fields = _attempt_fields()
    columns = ", ".join(quote(_column(field)) for field in fields)
    update = (
        f"UPDATE {run} SET {r['status']} = %s, {r['result']} = %s, {r['finished_at']} = %s, "
        f"{r['due_at']} = NULL, {r['lease_expires_at']} = NULL "
        f"WHERE {r['id']} = %s AND {r['attempts']} = %s AND {r['status']} = %s"
    )
    placeholders = ", ".join(["%s"] * len(fields))
    pk = quote(_column(Attempt._meta.pk))
    one = (
        f"WITH moved AS ({update} RETURNING {r['id']}) "
        f"INSERT INTO {attempt} ({columns}) SELECT {placeholders} FROM moved RETURNING {pk}"
    )
    insert = f"INSERT INTO {attempt} ({columns}) VALUES ({placeholders}) RETURNING {pk}"
    return one, update, insert


def record_success(run: Run, attempt: Attempt, result: Any, using: str) -> bool:
    """Move ``run`` from running to succeeded with ``result`` and insert ``attempt``; or nothing.

    Fenced as the ORM path is: only if the run is still ``running`` with attempt
    number ``attempt.number``. Returns whether it was (the attempt row then has its
    primary key).
    """
    connection = connections[using]
    one, update, insert_sql = _success_sql(using)
    update_params = [
        RunStatus.SUCCEEDED.value,
        Run._meta.get_field("result").get_db_prep_save(result, connection),
        connection.ops.adapt_datetimefield_value(attempt.finished_at),
        Run._meta.pk.get_db_prep_value(run.pk, connection),
        attempt.number,
        RunStatus.RUNNING.value,
    ]
    attempt_params = _values(attempt, using, _attempt_fields())
    if connection.vendor == "postgresql":
        with _cursor(using) as cursor:
            cursor.execute(one, update_params + attempt_params)
            row = cursor.fetchone()
    else:
        with transaction.atomic(using=using), connection.cursor() as cursor:
            cursor.execute(update, update_params)
            row = None
            if cursor.rowcount == 1:
                cursor.execute(insert_sql, attempt_params)
                row = cursor.fetchone()
    if row is None:
        return False
    attempt.pk = row[0]
    attempt._state.adding = False
    attempt._state.db = using
    return True
