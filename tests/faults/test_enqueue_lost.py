"""Scenario 2: the process dies between the commit and the enqueue."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import connection, transaction

import django_events
import django_events.dispatch
from django_events.conf import get_settings
from django_events.models import Run, RunStatus

from .harness import (
    OK_FUNCTION,
    ROOT,
    RedisServer,
    Workers,
    check_ledger,
    django_counts,
    django_ledger,
    patience,
    report,
    scaled,
    settle,
    worker_env,
)


def test_runs_whose_messages_were_never_sent_complete_through_recovery(
    workers: Workers,
    redis_server: RedisServer,
    private_broker: object,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = scaled(1000)
    killed_count, raised_count = count // 2, count - count // 2
    caplog.set_level(logging.ERROR, logger="django_events")

    # Given a process that commits half the events in one transaction and is killed (SIGKILL) in
    # its first enqueue, after the commit
    command = [sys.executable, "-m", "tests.faults.driver", f"faults/ok={killed_count}"]
    command += ["--per-transaction", str(killed_count), "--die-after-commit"]
    sender = subprocess.run(
        command,
        cwd=ROOT,
        env=worker_env(
            DJANGO_EVENTS_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]), REDIS_URL=redis_server.url
        ),
        capture_output=True,
        text=True,
        timeout=patience(120),
        check=False,
    )
    assert sender.returncode == -signal.SIGKILL, sender.stderr[-3000:]
    stored_by_killed = Run.objects.filter(function=OK_FUNCTION).count()

    # And, in this process, transactions that commit the other half while every enqueue raises,
    # as the process goes down
    def crash(*args: object, **kwargs: object) -> None:
        raise SystemError("the process is going down")

    monkeypatch.setattr(django_events.dispatch, "send_now", crash)
    monkeypatch.setattr(django_events.dispatch, "send_group", crash)
    for i in range(raised_count):
        with transaction.atomic():
            django_events.send("faults/ok", {"i": i})
    monkeypatch.undo()
    crashes_logged = sum("Could not enqueue run" in r.getMessage() for r in caplog.records)

    # So every run is committed, and pending, and the broker has not one message
    pending = Run.objects.filter(function=OK_FUNCTION, status=RunStatus.PENDING).count()
    client = redis_server.client()
    queue = f"{settings.REDIS_NAMESPACE}:{get_settings().QUEUE_NAME}"
    messages = client.llen(queue) + client.hlen(f"{queue}.msgs")
    client.close()

    # When workers start, Then their recovery loop finds the runs, and every run completes
    workers.start(2)
    settle(django_counts, total=count, timeout=patience(120), what="every run final")
    workers.assert_alive()
    figures = check_ledger(django_ledger(), ok_runs=count)
    figures.update(
        committed_by_killed_process=stored_by_killed,
        committed_with_crashing_enqueue=raised_count,
        enqueue_crashes_logged=crashes_logged,
        messages_in_broker_before_recovery=messages,
    )
    report("died_between_commit_and_enqueue", figures)
    assert stored_by_killed == killed_count
    assert crashes_logged == raised_count
    assert pending == count
    assert messages == 0
    assert figures["runs_succeeded"] == count
