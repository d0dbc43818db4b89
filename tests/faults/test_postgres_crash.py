"""Scenario: PostgreSQL crashes while a run's first attempt is running, and its claim is lost.

A worker's claim commits without waiting for its own WAL flush (``ledger.claim``), so a
crash of PostgreSQL (not a clean restart) can lose it while the function runs on in its
worker. The run is then waiting again, as if never claimed. It must run again (at least
once), but never while the attempt the crash cut off is still running: recovery holds
its new message back for one lease after PostgreSQL starts.

The cluster is private to the test, with ``wal_writer_delay`` at 10 s and autovacuum off,
so that nothing writes the claim's WAL before the crash; the function writes nothing to
the database, and marks each execution's start and end in a file.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .harness import (
    ROOT,
    WORKER_SETTINGS,
    PostgresCluster,
    RedisServer,
    Workers,
    patience,
    private_postgres,
    wait_until,
    worker_env,
)

# Its own PostgreSQL cluster: the same whatever the env's database (tox runs it in the PostgreSQL envs).
pytestmark = pytest.mark.own_postgres

DATABASE = "django_events_crash"


@pytest.fixture
def crashing_postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster that writes its WAL at most every 10 s unless a commit waits."""
    with private_postgres("wal_writer_delay=10s", "autovacuum=off") as cluster:
        yield cluster


def _executions(marker: Path) -> list[tuple[float, float]]:
    """(start, end) of each execution that the marker file shows ended, by start time."""
    starts: dict[str, float] = {}
    spans = []
    for line in marker.read_text().splitlines():
        what, token, at = line.split()
        if what == "start":
            starts[token] = float(at)
        else:
            spans.append((starts[token], float(at)))
    return sorted(spans)


def test_a_claim_lost_in_a_postgres_crash_runs_again_never_beside_the_cut_off_attempt(
    crashing_postgres: PostgresCluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    url = crashing_postgres.url(DATABASE)
    settings = {**WORKER_SETTINGS, "RECOVERY_GRACE": 1.0}  # recovery would re-send within a second
    env = worker_env(
        DATABASE_URL=url,
        DJANGO_EVENTS_TEST_DATABASE_NAME=None,
        REDIS_URL=redis_server.url,
        DJANGO_EVENTS_TEST_SETTINGS=json.dumps(settings),
    )
    crashing_postgres.migrated_database(DATABASE, env)
    marker = tmp_path / "marker"
    marker.touch()

    def run_row() -> tuple[str, int] | None:
        """the run's status and attempts, or None while the database restarts"""
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                row = conn.execute("SELECT status, attempts FROM django_events_run").fetchone()
        except psycopg.OperationalError:
            return None
        return None if row is None else (str(row[0]), int(row[1]))

    # Given two workers, and a run whose function works 4 s (time limit 5 s, lease 6 s)
    workers = Workers(env, tmp_path)
    try:
        workers.start(2)
        sender = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.faults.driver",
                "faults/marked=1",
                "--data",
                json.dumps({"seconds": 4, "marker": str(marker)}),
            ],
            cwd=ROOT,
            env=env,
            timeout=patience(120),
            capture_output=True,
            text=True,
            check=False,
        )
        assert sender.returncode == 0, sender.stderr[-3000:]

        # When PostgreSQL crashes while the first attempt runs, before anything wrote its claim
        wait_until(
            lambda: "start" in marker.read_text(),
            timeout=patience(60),
            what="the first attempt started",
            describe=workers.tail,
        )
        crashing_postgres.crash()

        # Then the claim is lost: the run waits again, with no attempt counted
        assert run_row() == ("pending", 0)

        # And the run runs again and succeeds, by the same two workers
        wait_until(
            lambda: run_row() == ("succeeded", 1),
            timeout=patience(60),
            what="the run succeeded",
            describe=workers.tail,
        )
        workers.assert_alive()
    finally:
        workers.stop()
        print(workers.tail())

    # And no two executions of the function overlapped: the second began after the first ended
    executions = _executions(marker)
    assert len(executions) >= 2, executions
    for (_start, end), (next_start, _end) in itertools.pairwise(executions):
        assert next_start >= end, executions
