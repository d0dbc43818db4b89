"""The real ``manage.py rundramatiq`` runs sent events end to end."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from django.db import transaction

import django_events
from django_events.models import Attempt, Run, RunStatus
from tests.conftest import wait_for
from tests.testapp.models import Call

pytestmark = pytest.mark.e2e


def test_rundramatiq_executes_runs_of_committed_events(rundramatiq: subprocess.Popen[bytes]) -> None:
    # Given events committed while a real worker process is running
    with transaction.atomic():
        fanout = django_events.send("test/fanout", {"n": 1})
        flaky = django_events.send("test/flaky", {"succeed_on": 2})
        dead = django_events.send("test/always-fails")

    # When the worker has had time to run and retry them
    def settled() -> bool:
        """all five runs are final"""
        return Run.objects.count() == 5 and not Run.objects.not_final().exists()

    wait_for(settled, timeout=90)

    # Then each ended as its function decided, with history from the worker process
    assert set(Run.objects.filter(event=fanout).values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    flaky_run = Run.objects.get(event=flaky)
    assert (flaky_run.status, flaky_run.attempts) == (RunStatus.SUCCEEDED, 2)
    dead_run = Run.objects.get(event=dead)
    assert (dead_run.status, dead_run.attempts) == (RunStatus.DEAD, 3)
    pids = set(Attempt.objects.values_list("worker_pid", flat=True))
    assert os.getpid() not in pids
    assert Call.objects.filter(function="fanout_a").count() == 1

    # And the worker stops cleanly on SIGTERM to its main process (which passes it on once)
    rundramatiq.send_signal(signal.SIGTERM)
    assert rundramatiq.wait(timeout=30) == 0
