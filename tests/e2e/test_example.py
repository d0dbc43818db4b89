"""End to end: the example project's ``demo`` command, with a real worker, broker, site and database.

``test_readme_first_command_runs_the_demo_with_no_service`` is the README's first
command, word for word, in a copy of the repository with a new virtualenv, its demo
run in a network namespace of its own where no Redis, RabbitMQ or PostgreSQL can be
reached: the database broker and an SQLite file are all it has.

The other tests run the demo with ``DRAMATIQ_BROKER_URL`` set (Redis in the SQLite
environments, RabbitMQ in the PostgreSQL ones, on a fresh PostgreSQL database) and,
in the PostgreSQL environments, the database broker on PostgreSQL (``LISTEN/NOTIFY``).
Each uses the example's own settings (not ``tests.settings``), a fresh database and
mail directory, and a Dramatiq queue of its own.

The example's onboarding flow (a welcome e-mail, a wait of up to a day for the user's
first source, else a reminder) is also tested in-process, through the sign-up and
sources API and ``django_events.testing.run_all`` on django-events' clock, so that its
day passes at once; those tests are not marked ``e2e``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client

from django_events import testing
from django_events.models import Event, Run, RunStatus, Step
from example_project.sources.management.commands import demo

REPO_DIR = Path(__file__).resolve().parents[2]
#: What Django's file-based e-mail backend writes after each message.
MAIL_SEPARATOR = "\n" + "-" * 79 + "\n"
#: Variables of the test run that must not reach the demo (a "fresh machine" has none of them).
FOREIGN_VARIABLES = ("DJANGO", "DRAMATIQ", "DATABASE_URL", "EMAIL_FILE_PATH", "TOX_", "VIRTUAL_ENV", "PYTHON")
IS_POSTGRESQL = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(FOREIGN_VARIABLES)}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _run(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{shlex.join(command)} did not finish in {timeout:.0f} s.\n--- stdout ---\n{_text(exc.stdout)}"
            f"\n--- stderr ---\n{_text(exc.stderr)}"
        )


def _explain(result: subprocess.CompletedProcess[str], worker_log: Path) -> str:
    log = worker_log.read_text(errors="replace")[-4000:] if worker_log.exists() else "(no worker log)"
    return (
        f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        f"\n--- worker log (end) ---\n{log}"
    )


def _check_summary(out: str, mail_dir: Path) -> None:
    """The demo's summary reports every outcome, the e-mails and the admin, and it stopped cleanly."""
    assert "Created the admin user: admin / " in out
    assert "All 11 runs finished" in out
    assert "Runs by status: succeeded 10, dead 1" in out
    assert re.search(r"^ +Acme Shop +succeeded +1 attempt ", out, re.MULTILINE)
    # The CRM sync needed retries before it succeeded...
    assert re.search(r"^ +Acme Shop +succeeded +3 attempts \(2 retries\)", out, re.MULTILINE)
    assert "Retried and succeeded: sources.sync_to_crm for 'Acme Shop', on attempt 3 of 4." in out
    # ...and went dead, with its error, for the broken source.
    assert re.search(r"^ +Broken Warehouse +dead +4 attempts \(3 retries\)", out, re.MULTILINE)
    assert "Dead: sources.sync_to_crm for 'Broken Warehouse', after 4 attempts" in out
    assert "ConnectionError: CRM unavailable" in out
    # The onboarding flows: the user who connected a source got no reminder; the other got one,
    # after the demo's few seconds, and each got one welcome e-mail (the replay did not resend it).
    assert re.search(r"^  ana@acme.example: succeeded, no reminder$", out, re.MULTILINE)
    assert re.search(r"^    first-source +wait +completed +after .*for 'Acme Shop'$", out, re.MULTILINE)
    assert re.search(r"^  dee@initech.example: succeeded, reminded$", out, re.MULTILINE)
    assert re.search(r"^    first-source +wait +completed +after .*: timed out", out, re.MULTILINE)
    # Its wait left the worker: that attempt is reported as suspended, not as a retry.
    assert re.search(r"^ +dee@initech.example +succeeded +\d+ attempts \(.*1 suspended\)", out, re.MULTILINE)
    # The e-mails were written where the settings said, and the summary lists them.
    assert f"E-mails: 6 e-mails written to {mail_dir}" in out
    written = "".join(path.read_text() for path in mail_dir.iterdir())
    assert written.count(MAIL_SEPARATOR) == 6
    assert "To: cy@warehouse.example" in written
    assert written.count("Subject: Welcome to Example Sources") == 2
    assert written.count("Subject: Connect your first source") == 1
    assert re.search(r"^  to dee@initech.example +Connect your first source$", out, re.MULTILINE)
    assert not re.search(r"^  to ana@acme.example +Connect your first source$", out, re.MULTILINE)
    # And it says where to look in the admin, and stops what it started.
    assert re.search(r"^Admin: .*/admin/.*log in as 'admin'", out, re.MULTILINE)
    assert out.rstrip().endswith("Stopped the worker and the site.")


def _readme_first_command() -> str:
    """The command under "# 1." in the README's first ``bash`` block."""
    readme = (REPO_DIR / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# 1."):
            return lines[index + 1]
    raise AssertionError(f"no '# 1.' line in the README's first bash block:\n{block}")


def _skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine that cannot isolate the demo; in CI (``CI`` set), fail: it can."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _isolated_network_prefix() -> list[str]:
    """A command prefix running its command in a network namespace of its own, loopback only."""
    prefix = ["unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        _skip_or_fail("needs util-linux's unshare and iproute2's ip to cut the demo off the services")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        _skip_or_fail(f"cannot create a network namespace here: {probe.stderr.strip()}")
    return prefix


@pytest.mark.e2e
def test_readme_first_command_runs_the_demo_with_no_service(tmp_path: Path) -> None:
    # Given: the README's first command, a copy of the repository with no virtualenv and no
    # local state, and a network namespace where 127.0.0.1 has no Redis, RabbitMQ or PostgreSQL
    command = _readme_first_command()
    *install, demo = command.split(" && ")
    assert demo == ".venv/bin/python manage.py demo", command
    isolated = _isolated_network_prefix()
    cut_off = subprocess.run(
        [*isolated, sys.executable, "-c", _PROBE_SERVICES], capture_output=True, text=True, check=False
    )
    assert cut_off.stdout.split() == ["refused"] * 3, cut_off.stdout + cut_off.stderr
    repo = tmp_path / "repo"
    shutil.copytree(
        REPO_DIR,
        repo,
        ignore=shutil.ignore_patterns(".git", ".tox", ".venv", "var", "__pycache__", "*.egg-info", "build"),
    )
    env = _clean_env()

    # When: it runs; its install step with the package registry in reach, the demo without any network
    installed = _run(["bash", "-c", " && ".join(install)], cwd=repo, env=env, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    result = _run([*isolated, *shlex.split(demo)], cwd=repo, env=env, timeout=180)

    # Then: it used the database broker on an SQLite file, succeeded and reported every outcome
    worker_log = repo / "var" / "demo-worker.log"
    assert result.returncode == 0, _explain(result, worker_log)
    assert "Broker:   the database (DatabaseBroker" in result.stdout
    assert f"Database: {repo / 'var' / 'example.sqlite3'} (SQLite)" in result.stdout
    _check_summary(result.stdout, repo / "var" / "mail")


#: Prints, for PostgreSQL, Redis and RabbitMQ on 127.0.0.1, "refused" or what else happened.
_PROBE_SERVICES = """
import socket
for port in (5432, 6379, 5672):
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            print("reachable")
        except ConnectionRefusedError:
            print("refused")
"""


@contextlib.contextmanager
def _fresh_postgresql_database() -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server, dropped afterwards; yields its URL."""
    import psycopg

    db = settings.DATABASES["default"]
    host, port, user = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432, db.get("USER") or "postgres"
    name = f"example_e2e_{uuid.uuid4().hex[:12]}"
    server = {"host": host, "port": port, "user": user, "dbname": "postgres", "autocommit": True}
    with psycopg.connect(**server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(**server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: (broker, database) combinations of the demo besides the README's: each environment runs the demo
#: on the database it tests, with a broker URL, and the PostgreSQL ones also on the database broker.
DEMOS = (
    [("amqp://guest:guest@127.0.0.1:5672/%2F", "postgresql"), ("", "postgresql")]
    if IS_POSTGRESQL
    else [("redis://127.0.0.1:6379/0", "sqlite")]
)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("broker_url", "database"), DEMOS, ids=[f"{url.split(':')[0] or 'database'}-{db}" for url, db in DEMOS]
)
def test_demo_runs_on_each_broker(tmp_path: Path, broker_url: str, database: str) -> None:
    # Given: a fresh database and mail directory, the broker given by DRAMATIQ_BROKER_URL (the
    # database broker if empty) and a queue of the test's own
    worker_log = tmp_path / "worker.log"
    with contextlib.ExitStack() as stack:
        if database == "postgresql":
            database_url = stack.enter_context(_fresh_postgresql_database())
        else:
            database_url = f"sqlite:///{tmp_path / 'example.sqlite3'}"
        env = _clean_env(
            DATABASE_URL=database_url,
            DRAMATIQ_BROKER_URL=broker_url,
            EMAIL_FILE_PATH=str(tmp_path / "mail"),
            DJANGO_EVENTS_QUEUE=f"example_e2e_{uuid.uuid4().hex[:12]}",
        )
        command = [sys.executable, "manage.py", "demo", "--timeout", "90", "--worker-log", str(worker_log)]

        # When: the demo runs
        result = _run(command, cwd=REPO_DIR, env=env, timeout=150)

    # Then: it used that broker, succeeded and reported every outcome
    assert result.returncode == 0, _explain(result, worker_log)
    if broker_url:
        assert f"Broker:   {broker_url.replace('guest:guest', 'guest:***')} (reachable)" in result.stdout
    else:
        assert "Broker:   the database (DatabaseBroker" in result.stdout
    _check_summary(result.stdout, tmp_path / "mail")


# The onboarding flow, in-process ----------------------------------------------------------------

#: The subjects of the onboarding flow's two e-mails.
WELCOME = "Welcome to Example Sources"
REMINDER = "Connect your first source"


def _post(client: Client, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post(url, payload, content_type="application/json")
    assert response.status_code == 201, response.content
    body: dict[str, Any] = response.json()
    return body


def _onboarding(email: str) -> Run:
    return Run.objects.get(function="sources.onboarding", event__data__email=email)


def _mails_to(email: str) -> list[str]:
    return [str(message.subject) for message in mail.outbox if message.to == [email]]


@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("example_project.urls")
def test_onboarding_sends_no_reminder_to_a_user_who_connects_a_source(
    client: Client, mailoutbox: Any
) -> None:
    # Given: a user who signed up (the welcome e-mail is sent, the flow waits for a first source)
    _post(client, "/api/users/", {"email": "ana@acme.example"})
    testing.run_all()
    assert _onboarding("ana@acme.example").status == RunStatus.WAITING
    assert _mails_to("ana@acme.example") == [WELCOME]

    # When: they connect a source, and then the day passes
    connected = _post(client, "/api/sources/", {"name": "Acme Shop", "email": "ana@acme.example"})
    testing.run_all()
    testing.run_all(until=testing.now() + timedelta(days=2))

    # Then: the wait ended with that source's event; no reminder; one welcome e-mail
    run = _onboarding("ana@acme.example")
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == {
        "email": "ana@acme.example",
        "first_source_id": connected["source_id"],
        "reminded": False,
    }
    wait = Step.objects.get(run=run, step_id="first-source")
    assert str(wait.resolved_event) == connected["event_id"]
    assert not Step.objects.filter(run=run, step_id="reminder").exists()
    assert sorted(_mails_to("ana@acme.example")) == sorted([WELCOME, "Acme Shop is connected"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("example_project.urls")
def test_onboarding_reminds_a_user_who_connects_no_source_within_a_day(
    client: Client, mailoutbox: Any
) -> None:
    # Given: a user who signed up, and another user's source connected meanwhile
    _post(client, "/api/users/", {"email": "dee@initech.example"})
    testing.run_all()
    _post(client, "/api/sources/", {"name": "Acme Shop", "email": "ana@acme.example"})
    testing.run_all()

    # When: almost a day passes, then the rest of it
    testing.advance(timedelta(hours=23))
    testing.run_due()
    waiting = _onboarding("dee@initech.example")
    reminded_early = _mails_to("dee@initech.example")
    testing.run_all(until=testing.now() + timedelta(hours=1, seconds=1))

    # Then: no reminder before the day was over; then one, and the welcome e-mail was not sent again
    assert waiting.status == RunStatus.WAITING
    assert reminded_early == [WELCOME]
    run = _onboarding("dee@initech.example")
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == {"email": "dee@initech.example", "first_source_id": None, "reminded": True}
    assert Step.objects.get(run=run, step_id="first-source").resolved_event is None
    assert _mails_to("dee@initech.example") == [WELCOME, REMINDER]


@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("example_project.urls")
def test_onboarding_waits_as_long_as_the_setting_says(client: Client, mailoutbox: Any, settings: Any) -> None:
    # Given: ONBOARDING_REMINDER_AFTER set to 3 seconds (the demo's worker's)
    settings.ONBOARDING_REMINDER_AFTER = 3.0
    _post(client, "/api/users/", {"email": "dee@initech.example"})
    testing.run_all()

    # When: 3 seconds pass on django-events' clock
    testing.run_all(until=testing.now() + timedelta(seconds=3))

    # Then: the reminder went out
    assert _onboarding("dee@initech.example").status == RunStatus.SUCCEEDED
    assert _mails_to("dee@initech.example") == [WELCOME, REMINDER]


@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("example_project.urls")
def test_sign_up_stores_the_user_and_sends_its_event_and_refuses_bad_input(client: Client) -> None:
    # When: a user signs up, then the same e-mail again, then bad input
    body = _post(client, "/api/users/", {"email": "ana@acme.example"})
    again = client.post("/api/users/", {"email": "ana@acme.example"}, content_type="application/json")
    invalid = client.post("/api/users/", {"email": "not an e-mail"}, content_type="application/json")
    not_text = client.post("/api/users/", {"email": 7}, content_type="application/json")
    not_object = client.post("/api/users/", [1], content_type="application/json")

    # Then: one user (no usable password) and one signed-up event holding its id and e-mail
    user = get_user_model()._default_manager.get()
    assert (user.get_username(), user.email, user.has_usable_password()) == (
        "ana@acme.example",
        "ana@acme.example",
        False,
    )
    event = Event.objects.get(name="api/user.signed_up")
    assert str(event.pk) == body["event_id"]
    assert event.data == {"user_id": user.pk, "email": "ana@acme.example"}
    assert again.status_code == 400
    assert again.json()["fields"]["email"][0]["code"] == "unique"
    assert invalid.status_code == 400
    assert not_text.status_code == 400
    assert not_object.status_code == 400
    assert Event.objects.filter(name="api/user.signed_up").count() == 1


# The demo's admin user, in-process ---------------------------------------------------------------


def _demo_admin() -> Any:
    return get_user_model()._default_manager.get(username=demo.ADMIN_USERNAME)


@pytest.mark.django_db
def test_first_demo_run_creates_the_admin_user_and_prints_its_password(monkeypatch: Any) -> None:
    # Given: no admin user yet, no password chosen in the environment
    monkeypatch.delenv("DJANGO_SUPERUSER_PASSWORD", raising=False)

    # When: the demo sets up its admin user
    said = demo.admin_login()

    # Then: it printed a password that logs in as a superuser
    match = re.fullmatch(r"Created the admin user: admin / (\S+)  \(printed only this once\)", said)
    assert match, said
    user = _demo_admin()
    assert user.check_password(match.group(1))
    assert (user.is_superuser, user.is_staff, user.is_active) == (True, True, True)


@pytest.mark.django_db
def test_second_demo_run_says_how_to_log_in_and_keeps_the_password(monkeypatch: Any) -> None:
    # Given: the admin user an earlier demo created
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "first password")
    demo.admin_login()

    # When: the demo runs again without --reset-password
    said = demo.admin_login()

    # Then: it names the user and both ways to get a password, and changed nothing
    assert "log in as 'admin'" in said
    assert "--reset-password" in said
    assert "python manage.py changepassword admin" in said
    assert "first password" not in said
    assert _demo_admin().check_password("first password")


@pytest.mark.django_db
def test_reset_password_prints_a_new_password_that_logs_in(monkeypatch: Any) -> None:
    # Given: the admin user an earlier demo created, since demoted and deactivated by hand
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "first password")
    demo.admin_login()
    get_user_model()._default_manager.filter(username="admin").update(
        is_active=False, is_staff=False, is_superuser=False
    )
    monkeypatch.delenv("DJANGO_SUPERUSER_PASSWORD")

    # When: the demo runs with --reset-password (twice: each prints a new password)
    first = demo.admin_login(reset_password=True)
    second = demo.admin_login(reset_password=True)

    # Then: each printed a new random password; the last one logs the superuser in, the old one not
    passwords = [
        re.fullmatch(r"Reset the admin user's password: admin / (\S+)  \(printed only this once\)", said)
        for said in (first, second)
    ]
    assert all(passwords), (first, second)
    new = [match.group(1) for match in passwords if match]
    assert new[0] != new[1]
    user = _demo_admin()
    assert user.check_password(new[1])
    assert not user.check_password("first password")
    assert (user.is_superuser, user.is_staff, user.is_active) == (True, True, True)
    assert get_user_model()._default_manager.filter(username="admin").count() == 1


def test_demo_command_takes_reset_password() -> None:
    # When: the command line has --reset-password, or not
    parser = demo.Command().create_parser("manage.py", "demo")

    # Then: it reaches handle() as reset_password
    assert parser.parse_args(["--reset-password", "--keep-running"]).reset_password is True
    assert parser.parse_args([]).reset_password is False
    assert "--reset-password" in parser.format_help()
