"""End to end: the example project's ``demo`` command, with a real worker, broker, site and database.

This is the README's first command. It runs in a subprocess with the example's
own settings (not ``tests.settings``), a fresh SQLite file and mail directory in
``tmp_path``, and a Dramatiq queue of its own, so that it never meets the
messages of another demo on the same Redis.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
#: What Django's file-based e-mail backend writes after each message.
MAIL_SEPARATOR = "\n" + "-" * 79 + "\n"


def _demo_env(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'example.sqlite3'}",
        "EMAIL_FILE_PATH": str(tmp_path / "mail"),
        "DJANGO_EVENTS_QUEUE": f"example_e2e_{uuid.uuid4().hex[:12]}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DJANGO_SUPERUSER_PASSWORD", None)
    return env


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _explain(result: subprocess.CompletedProcess[str], worker_log: Path) -> str:
    log = worker_log.read_text(errors="replace")[-4000:] if worker_log.exists() else "(no worker log)"
    return (
        f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        f"\n--- worker log (end) ---\n{log}"
    )


@pytest.mark.e2e
def test_demo_shows_successes_a_retried_run_and_a_dead_run(tmp_path: Path) -> None:
    # Given: a fresh database and mail directory, and the broker at DRAMATIQ_BROKER_URL (Redis by default)
    worker_log = tmp_path / "worker.log"
    command = [sys.executable, "manage.py", "demo", "--timeout", "90", "--worker-log", str(worker_log)]

    # When: the demo runs, as in the README
    try:
        result = subprocess.run(
            command, cwd=REPO_DIR, env=_demo_env(tmp_path), capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the demo did not finish in 120 s.\n--- stdout ---\n{_text(exc.stdout)}"
            f"\n--- stderr ---\n{_text(exc.stderr)}"
        )

    # Then: it succeeds and reports every outcome
    assert result.returncode == 0, _explain(result, worker_log)
    out = result.stdout
    assert "Created the admin user: admin / " in out
    assert "All 9 runs finished" in out
    assert "Runs by status: succeeded 8, dead 1" in out
    assert re.search(r"^ +Acme Shop +succeeded +1 attempt ", out, re.MULTILINE)
    # The CRM sync needed retries before it succeeded...
    assert re.search(r"^ +Acme Shop +succeeded +3 attempts \(2 retries\)", out, re.MULTILINE)
    assert "Retried and succeeded: sources.sync_to_crm for 'Acme Shop', on attempt 3 of 4." in out
    # ...and went dead, with its error, for the broken source.
    assert re.search(r"^ +Broken Warehouse +dead +4 attempts \(3 retries\)", out, re.MULTILINE)
    assert "Dead: sources.sync_to_crm for 'Broken Warehouse', after 4 attempts" in out
    assert "ConnectionError: CRM unavailable" in out
    # The welcome e-mails were written where the settings said.
    assert f"E-mails: 3 e-mails written to {tmp_path / 'mail'}" in out
    written = "".join(path.read_text() for path in (tmp_path / "mail").iterdir())
    assert written.count(MAIL_SEPARATOR) == 3
    assert "To: cy@warehouse.example" in written
    # And it says where to look in the admin, and stops what it started.
    assert re.search(r"^Admin: .*/admin/.*log in as 'admin'", out, re.MULTILINE)
    assert out.rstrip().endswith("Stopped the worker and the site.")
