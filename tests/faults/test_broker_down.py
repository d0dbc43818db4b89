"""Scenario 1: the broker is down when the transactions commit."""

from __future__ import annotations

import logging

import pytest
from django.db import transaction

import django_events
from django_events.models import Run, RunStatus

from .harness import (
    OK_FUNCTION,
    RedisServer,
    Workers,
    check_ledger,
    django_counts,
    django_ledger,
    patience,
    report,
    scaled,
    settle,
    wait_until,
)


def test_runs_committed_while_the_broker_is_down_all_complete_once_it_is_back(
    workers: Workers, redis_server: RedisServer, private_broker: object, caplog: pytest.LogCaptureFixture
) -> None:
    count = min(200, scaled(1000))
    caplog.set_level(logging.ERROR, logger="django_events")

    # Given two workers that have run an event, so they are up and consuming
    workers.start(2)
    django_events.send("faults/ok", {"warm-up": True})
    wait_until(
        lambda: django_counts()["succeeded"] == 1, timeout=60, what="the warm-up run", describe=workers.tail
    )

    # When the broker stops, and requests commit events meanwhile
    redis_server.stop()
    failed_requests = 0
    for i in range(count):
        try:
            with transaction.atomic():
                django_events.send("faults/ok", {"i": i})
        except Exception:  # a request that failed: counted, and asserted to be none below
            failed_requests += 1
    committed_pending = Run.objects.filter(function=OK_FUNCTION, status=RunStatus.PENDING).count()
    enqueue_errors = [r for r in caplog.records if "Could not enqueue run" in r.getMessage()]

    # And the broker starts again (empty: nothing was queued while it was down)
    redis_server.start()

    # Then every run completes, through the workers' recovery, without restarting any worker
    settle(django_counts, total=count + 1, timeout=patience(120), what="every run final")
    workers.assert_alive()
    figures = check_ledger(django_ledger(), ok_runs=count + 1)
    figures.update(
        requests=count,
        requests_failed=failed_requests,
        enqueue_errors_logged=len(enqueue_errors),
        pending_when_broker_restarted=committed_pending,
    )
    report("broker_down_at_commit", figures)
    assert failed_requests == 0
    assert committed_pending == count
    assert len(enqueue_errors) == count
    assert figures["runs_succeeded"] == count + 1
