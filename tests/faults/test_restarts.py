"""Scenario 4: Redis, then PostgreSQL, restarted while the workers work through the events.

Both servers are private to the test: a ``redis-server`` on a free port and a PostgreSQL
cluster initialised in a temporary directory (in every tox env, SQLite ones too: restarting
the shared server would break the other test runs). The test process reads the cluster with
psycopg; the events are sent by ``tests.faults.driver`` in a process of its own.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .harness import (
    FAIL_CALL,
    FAIL_FUNCTION,
    ROOT,
    PostgresCluster,
    RedisServer,
    Workers,
    check_ledger,
    patience,
    private_postgres,
    read_ledger,
    report,
    scaled,
    settle,
    status_counts,
    wait_until,
    worker_env,
)

# Its own PostgreSQL cluster: the same whatever the env's database (tox runs it in the PostgreSQL envs).
pytestmark = pytest.mark.own_postgres

DATABASE = "django_events_faults"


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster of this test's own, removed after it."""
    with private_postgres() as cluster:
        yield cluster


def test_every_run_ends_as_its_function_decides_across_redis_and_postgres_restarts(
    postgres: PostgresCluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    ok_count = scaled(1000)
    fail_count = max(5, ok_count // 10)
    total = ok_count + fail_count
    url = postgres.url(DATABASE)
    env = worker_env(DATABASE_URL=url, DJANGO_EVENTS_TEST_DATABASE_NAME=None, REDIS_URL=redis_server.url)
    postgres.migrated_database(DATABASE, env)

    def counts() -> Counter[str] | None:
        """status -> runs, or None while the database is restarting"""
        try:
            with psycopg.connect(url, connect_timeout=3) as conn, conn.cursor() as cursor:
                return status_counts(cursor)
        except psycopg.OperationalError:
            return None

    def succeeded_at_least(n: int) -> bool:
        found = counts()
        return found is not None and found["succeeded"] >= n

    # Given events committed, ten per transaction, by another process: most to succeed, some
    # (one in eleven) to fail twice and end dead
    command = [
        sys.executable,
        "-m",
        "tests.faults.driver",
        f"faults/ok={ok_count}",
        f"faults/fail={fail_count}",
    ]
    command += ["--per-transaction", "10", "--data", '{"sleep": 0.02}']
    sender = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        timeout=patience(300),
        capture_output=True,
        text=True,
        check=False,
    )
    assert sender.returncode == 0, sender.stderr[-3000:]
    workers = Workers(env, tmp_path)
    try:
        # When two workers work through them
        workers.start(2)
        first = workers.processes[:]

        # And Redis restarts (empty: every queued message is lost) when a quarter have succeeded
        wait_until(
            lambda: succeeded_at_least(ok_count // 4),
            timeout=patience(120),
            what="a quarter succeeded",
            describe=workers.tail,
        )
        at_redis_restart = counts()
        redis_server.restart()

        # And PostgreSQL restarts (pg_ctl restart -m fast: every connection is cut) at one half
        wait_until(
            lambda: succeeded_at_least(ok_count // 2),
            timeout=patience(120),
            what="half succeeded",
            describe=workers.tail,
        )
        at_postgres_restart = counts()
        postgres.restart()

        # Then every run ends, processed by the same two workers, which reconnected by themselves
        settle(counts, total=total, timeout=patience(180), what="every run final")
        workers.assert_alive()
        assert workers.processes == first
        with psycopg.connect(url) as conn, conn.cursor() as cursor:
            ledger = read_ledger(cursor)
            cursor.execute("SELECT COUNT(*) FROM testapp_call WHERE function = %s", [FAIL_CALL])
            failing_calls = cursor.fetchone()[0]
            cursor.execute(
                "SELECT COUNT(*) FROM django_events_run WHERE function = %s AND last_error = ''",
                [FAIL_FUNCTION],
            )
            dead_without_error = cursor.fetchone()[0]
    finally:
        workers.stop()
        print(workers.tail())

    figures = check_ledger(ledger, ok_runs=ok_count, fail_runs=fail_count)
    assert at_redis_restart is not None
    assert at_postgres_restart is not None
    final = ("succeeded", "dead")
    figures.update(
        in_flight_at_redis_restart=total - sum(at_redis_restart[s] for s in final),
        in_flight_at_postgres_restart=total - sum(at_postgres_restart[s] for s in final),
        failing_function_calls=failing_calls,
    )
    report("redis_and_postgres_restarted", figures)
    # every ok run succeeded and every failing one is dead after its two attempts (check_ledger)
    assert (figures["runs_succeeded"], figures["runs_dead"]) == (ok_count, fail_count)
    assert dead_without_error == 0
    # and both restarts happened with runs still to do
    assert figures["in_flight_at_redis_restart"] > 0
    assert figures["in_flight_at_postgres_restart"] > 0
