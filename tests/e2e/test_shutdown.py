"""Graceful shutdown of a real ``rundramatiq``: SIGTERM lets in-flight runs finish."""

from __future__ import annotations

import signal
import subprocess

import pytest

import django_events
from django_events.models import Attempt, Run, RunStatus
from tests.conftest import wait_for
from tests.testapp.models import Call

pytestmark = pytest.mark.e2e


def test_sigterm_lets_in_flight_runs_finish_and_leaves_none_running(
    rundramatiq: subprocess.Popen[bytes],
) -> None:
    # Given two runs in flight in a real worker (each works for 3 seconds)
    django_events.send("test/sleepy", {"seconds": 3})
    django_events.send("test/sleepy", {"seconds": 3})

    def both_started() -> bool:
        """both runs are running in the worker"""
        return Call.objects.filter(function="sleepy").count() == 2

    wait_for(both_started, timeout=60)
    assert Run.objects.filter(status=RunStatus.RUNNING).count() == 2

    # When the worker is told to stop
    rundramatiq.send_signal(signal.SIGTERM)

    # Then it waits for them, exits cleanly, and both finished: none is left running
    assert rundramatiq.wait(timeout=60) == 0
    assert list(Run.objects.values_list("status", flat=True)) == [RunStatus.SUCCEEDED] * 2
    assert list(Attempt.objects.values_list("outcome", flat=True)) == ["succeeded"] * 2
    assert Call.objects.count() == 2
