"""Plumbing for the statements ``ledger.py`` writes by hand: cursors, column lists, values, rows.

Nothing here knows about run states: it turns models into column lists and
values the way the ORM does (``get_db_prep_save`` on the way in, the fields'
converters on the way out), and gives a cursor that prepares its statements on
PostgreSQL. ``ledger.py`` builds its vendor statements from these.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import connections, models

from .conf import get_settings

__all__ = ["column", "columns", "cursor", "insert_sql", "load", "supported", "values"]


def supported(using: str) -> bool:
    """Whether database ``using`` runs the vendor statements (PostgreSQL, SQLite 3.35+ for RETURNING)."""
    return _supported(connections[using].vendor)


@cache
def _supported(vendor: str) -> bool:
    if vendor == "postgresql":
        return True
    return vendor == "sqlite" and sqlite3.sqlite_version_info >= (3, 35)


# -- Prepared statements -------------------------------------------------------------------------


def cursor(using: str) -> Any:
    """A cursor for the ledger's statements: on PostgreSQL with psycopg 3, a preparing one.

    PostgreSQL plans every statement it is sent as text again (0.3 ms of a 0.7 ms claim,
    measured); a prepared statement is planned once per connection. Django's own queries
    are unchanged: only this cursor, server-side binding, prepares. Goes through
    Django's cursor wrapper, so errors are Django's; while queries are logged (``DEBUG``)
    the ordinary cursor is used, so that the log shows the SQL.
    ``DJANGO_EVENTS["PREPARED_STATEMENTS"] = False`` turns it off (for poolers that
    cannot keep prepared statements, such as pgbouncer before 1.21 in transaction mode).
    """
    connection = connections[using]
    if (
        connection.vendor != "postgresql"
        or not get_settings().PREPARED_STATEMENTS
        or connection.queries_logged  # DEBUG, or a test capturing queries: show the SQL
        or _preparing_cursor_class() is None
    ):
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
def _preparing_cursor_class() -> Any:
    """psycopg 3's cursor with every statement prepared, or ``None`` without psycopg 3."""
    try:
        import psycopg
    except ImportError:  # psycopg2, or no PostgreSQL driver: plain cursors
        return None

    class PreparingCursor(psycopg.Cursor[Any]):
        """Server-side binding, and every statement prepared."""

        def execute(
            self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
        ) -> Any:
            return super().execute(query, params, prepare=True, binary=binary)

    return PreparingCursor


# -- Columns and values --------------------------------------------------------------------------


def column(field: models.Field[Any, Any]) -> str:
    """The column of a concrete field."""
    assert field.column is not None  # concrete fields have a column
    return field.column


def columns(model: type[models.Model], using: str, *, qualified: bool = False) -> str:
    """The model's concrete columns, quoted, in field order (``table.column`` if ``qualified``)."""
    quote = connections[using].ops.quote_name
    table = quote(model._meta.db_table)
    names = [quote(column(field)) for field in model._meta.concrete_fields]
    return ", ".join(f"{table}.{name}" for name in names) if qualified else ", ".join(names)


def values(obj: models.Model, using: str, fields: Sequence[models.Field[Any, Any]]) -> list[Any]:
    """The values of ``obj``'s ``fields`` as the ORM would send them to database ``using``."""
    connection = connections[using]
    return [field.get_db_prep_save(getattr(obj, field.attname), connection) for field in fields]


@cache
def insert_sql(model: type[models.Model], using: str, rows: int) -> tuple[str, list[models.Field[Any, Any]]]:
    """``INSERT INTO table (every concrete column) VALUES (...) x rows``, and the fields in order."""
    connection = connections[using]
    fields = list(model._meta.concrete_fields)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (
        f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns(model, using)}) "
        f"VALUES {', '.join([row] * rows)}"
    )
    return sql, fields


# -- Reading rows back into models ------------------------------------------------------------


@dataclass(frozen=True)
class _Loader:
    """Turns a row of a model's concrete columns, in field order, into an instance."""

    model: type[models.Model]
    using: str
    attnames: list[str]
    converters: list[tuple[int, list[Callable[..., Any]], Any]]

    def load(self, row_values: Sequence[Any]) -> Any:
        row = list(row_values)
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
        col = field.get_col(model._meta.db_table)
        functions = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
        if functions:
            converters.append((index, functions, col))
    return _Loader(model, using, [field.attname for field in fields], converters)


def load(model: type[models.Model], using: str, row: Sequence[Any]) -> Any:
    """An instance of ``model`` from a row of its concrete columns in field order, as the ORM reads it."""
    return _loader(model, using).load(row)
