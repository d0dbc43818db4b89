"""App startup: autodiscovery of events.py, the broker setup, and loud misconfiguration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dramatiq
import pytest
from django.conf import settings

from django_events.middleware import EventsMiddleware
from django_events.registry import functions_for, get_function
from django_events.tasks import ACTOR_NAME

ROOT = Path(__file__).resolve().parents[2]


def _django_setup(settings_module: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_events_modules_of_installed_apps_are_discovered():
    assert get_function("tests.ok") is not None
    assert [f.id for f in functions_for("test/fanout")] == [
        "tests.fanout_a",
        "tests.fanout_b",
        "tests.fanout_c",
    ]
    assert functions_for("test/ok") == functions_for("test/also-ok")


def test_app_declares_actor_and_middleware_on_the_configured_broker():
    broker = dramatiq.get_broker()
    actor = broker.get_actor(ACTOR_NAME)
    assert actor.queue_name == settings.DJANGO_EVENTS["QUEUE_NAME"]
    assert sum(isinstance(m, EventsMiddleware) for m in broker.middleware) == 1


def test_correct_settings_start():
    result = _django_setup("tests.settings")
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


@pytest.mark.parametrize(
    ("settings_module", "message"),
    [
        ("tests.misconfigured.no_dramatiq", "add 'django_dramatiq' to INSTALLED_APPS"),
        ("tests.misconfigured.wrong_order", "'django_dramatiq' must come before 'django_events'"),
        ("tests.misconfigured.broken_events", "this events.py is broken on purpose"),
        ("tests.misconfigured.duplicate_ids", "Two functions are registered with the id 'tests.ok'"),
    ],
)
def test_misconfiguration_fails_at_startup_with_clear_message(settings_module, message):
    result = _django_setup(settings_module)
    assert result.returncode != 0
    assert message in result.stderr
