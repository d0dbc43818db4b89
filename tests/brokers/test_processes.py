"""Two real ``rundramatiq`` processes on the database broker share one queue without a duplicate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from django.db import connection

import django_events
from django_events.models import Attempt, QueuedMessage, Run, RunStatus
from tests.conftest import wait_for
from tests.testapp.models import Call

from . import delivery_log
from .kit import new_broker

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
EVENTS = 100  # "test/fanout" has three functions: 300 runs


@pytest.fixture
def database_broker(transactional_db: None) -> Iterator[dramatiq.Broker]:
    """The database broker, as the global broker of the test process (the sender)."""
    from django_events.apps import install_broker_middleware

    previous = dramatiq.get_broker()
    broker = new_broker("database")
    install_broker_middleware(broker)
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        broker.close()
        dramatiq.set_broker(previous)


@pytest.fixture
def workers(database_broker: dramatiq.Broker, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two ``manage.py rundramatiq`` processes on the database broker and the test database."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.brokers.settings_database",
        "DJANGO_EVENTS_TEST_DATABASE_NAME": str(connection.settings_dict["NAME"]),
        delivery_log.LOG_ENV: str(tmp_path / "deliveries.jsonl"),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "manage.py", "rundramatiq", "--processes", "1", "--threads", "2"]
    logs = [tmp_path / f"rundramatiq-{n}.log" for n in range(WORKERS)]
    processes = []
    for path in logs:
        with path.open("wb") as log:
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for path in logs:
            print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")


def _ready(logs: list[Path]) -> bool:
    """every worker process is ready"""
    return all(
        path.exists() and "Worker process is ready for action" in path.read_text(errors="replace")
        for path in logs
    )


def test_two_worker_processes_run_every_run_once(
    workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # Given two worker processes, both ready
    wait_for(lambda: _ready(sorted(tmp_path.glob("rundramatiq-*.log"))), timeout=60)

    # When many events are sent at once
    django_events.send_many([{"name": "test/fanout", "data": {"n": n}} for n in range(EVENTS)])

    def settled() -> bool:
        """every run is final"""
        return not Run.objects.not_final().exists()

    wait_for(settled, timeout=120)
    wait_for(lambda: not QueuedMessage.objects.exists(), timeout=30)

    # Then every run succeeded, on its first and only attempt, and each function ran once per event
    runs = Run.objects.count()
    assert runs == 3 * EVENTS
    assert Run.objects.filter(status=RunStatus.SUCCEEDED, attempts=1).count() == runs
    assert Attempt.objects.count() == runs
    assert Call.objects.count() == runs

    # ...both processes took part, and no message was delivered twice, let alone at once
    deliveries = delivery_log.read(tmp_path / "deliveries.jsonl")
    worker_pids = {d["pid"] for d in deliveries}
    assert len(worker_pids) == WORKERS
    assert os.getpid() not in worker_pids
    assert set(Attempt.objects.values_list("worker_pid", flat=True)) == worker_pids
    by_message: dict[str, list[dict[str, float]]] = defaultdict(list)
    for delivery in deliveries:
        by_message[delivery["message_id"]].append(delivery)
    assert len(by_message) == runs
    assert [m for m, ds in by_message.items() if len(ds) > 1] == []

    # And the workers stop cleanly
    for process in workers:
        process.send_signal(signal.SIGTERM)
    assert [process.wait(timeout=30) for process in workers] == [0] * WORKERS
    assert not QueuedMessage.objects.exists()
