"""Real processes: ``manage.py rundramatiq`` against the test database and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rundramatiq(transactional_db: None, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``manage.py rundramatiq`` process on the test settings and test database; stopped with SIGTERM."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_TEST_DATABASE_NAME": str(connection.settings_dict["NAME"]),
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "rundramatiq.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "rundramatiq",
            "--processes",
            "1",
            "--threads",
            "2",
            "--worker-shutdown-timeout",
            "10000",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the main process passes it on to its workers
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
        output = (tmp_path / "rundramatiq.log").read_text(errors="replace")
        print(f"--- rundramatiq output ---\n{output[-5000:]}")
