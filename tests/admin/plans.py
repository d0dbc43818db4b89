"""Query plans for the admin's index tests (PostgreSQL)."""

from __future__ import annotations

from django.db import connection, transaction


def seq_scans(statements: list[str], table_prefix: str) -> list[str]:
    """The statements whose plan, with table scans discouraged, still reads a whole table whose name
    starts with ``table_prefix`` (each with its plan): those no index serves."""
    plans = []
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for sql in statements:
            cursor.execute("EXPLAIN " + sql)
            plans.append((sql, "\n".join(row[0] for row in cursor.fetchall())))
    return [f"{sql}\n{plan}" for sql, plan in plans if f"Seq Scan on {table_prefix}" in plan]
