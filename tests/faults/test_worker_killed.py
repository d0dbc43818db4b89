"""Scenario 3: workers are SIGKILLed mid-run, one after another, while they work through the events."""

from __future__ import annotations

import time

from django.db import transaction

import django_events
from django_events.models import Attempt

from .harness import (
    Workers,
    check_ledger,
    child_pids,
    chunks,
    django_counts,
    django_ledger,
    patience,
    report,
    scaled,
    settle,
    wait_until,
)


def test_every_run_succeeds_while_workers_are_killed_one_after_another(
    workers: Workers, private_broker: object
) -> None:
    count = scaled(1000)
    kills = max(3, count // 20)
    step = count // (kills + 1)  # a kill after every `step` newly succeeded runs

    # Given events committed (ten per transaction), and two workers started once they are all sent
    # (so that the kills spread over the whole run)
    for batch in chunks(range(count), 10):
        with transaction.atomic():
            for i in batch:
                # 20 ms of work, so that a worker killed at any moment most likely has runs in flight
                django_events.send("faults/ok", {"i": i, "sleep": 0.02})
    workers.start(2)

    # When, after every `step` newly succeeded runs, the oldest worker is SIGKILLed (its whole process
    # group: no chance to finish or put anything back) and a new one started in its place
    def busy(pid: int) -> bool:
        """the worker to kill has recorded an attempt: it is up and taking runs"""
        return Attempt.objects.filter(worker_pid__in=child_pids(pid)).exists()

    succeeded_at_kills = []
    started = time.monotonic()
    for k in range(1, kills + 1):
        threshold = k * step
        victim = workers.processes[0]
        wait_until(
            lambda threshold=threshold: django_counts()["succeeded"] >= threshold,
            timeout=patience(120),
            what=f"{threshold} runs succeeded, for kill {k}",
            describe=lambda: (django_counts(), workers.tail()),
        )
        wait_until(
            lambda victim=victim: busy(victim.pid), timeout=60, what=busy.__doc__, describe=workers.tail
        )
        succeeded_at_kills.append(django_counts()["succeeded"])
        workers.kill_one()
        workers.start(1)
    kills_took = time.monotonic() - started

    # Then every run succeeds: runs held by a killed worker once their lease expires, runs it had
    # prefetched once recovery finds them pending
    settle(django_counts, total=count, timeout=patience(180), what="every run final")
    workers.assert_alive()
    figures = check_ledger(django_ledger(), ok_runs=count)
    figures.update(
        workers_killed=workers.killed,
        seconds_between_kills=round(kills_took / kills, 1),
        succeeded_at_kills=succeeded_at_kills,
    )
    report("workers_killed_mid_run", figures)
    assert workers.killed == kills
    assert figures["runs_succeeded"] == count
    # the kills did hit runs in flight (else this test would prove nothing)
    assert figures["attempts_lost"] > 0
