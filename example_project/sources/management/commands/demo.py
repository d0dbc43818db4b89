"""``python manage.py demo``: the whole example in one command, on real processes.

With ``DRAMATIQ_BROKER_URL`` unset it needs no service: the queues are in the
database. It migrates the database, starts a Dramatiq worker (``rundramatiq``) and the
site, signs up two users and connects three sources over HTTP, waits until every run
those events caused has finished, and prints what happened: retries, a dead run, the
onboarding flows' steps (one user connects a source, the other gets a reminder), e-mails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default as default_email_policy
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import ProxyHandler, Request, build_opener

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.db import connections
from django.urls import reverse

from django_events.models import Attempt, AttemptOutcome, Event, Run, RunStatus, Step, StepKind, StepStatus
from django_events.registry import functions_for

from ...models import Source
from ...views import SOURCE_CONNECTED, USER_SIGNED_UP

#: The repository root: ``manage.py`` is there, and the worker runs from there.
REPO_DIR = Path(__file__).resolve().parents[4]

#: The sources the demo connects: (name, e-mail). "broken" makes the CRM sync fail for good.
DEMO_SOURCES = [
    ("Acme Shop", "ana@acme.example"),
    ("Globex Analytics", "bo@globex.example"),
    ("Broken Warehouse", "cy@warehouse.example"),
]
#: The users the demo signs up, before it connects the sources: the first connects "Acme Shop",
#: so its onboarding flow ends without a reminder; the second connects nothing and gets one.
DEMO_USERS = ["ana@acme.example", "dee@initech.example"]
#: Seconds the demo's worker gives a new user to connect a first source (a day by default).
DEMO_REMINDER_AFTER = 3.0
#: The admin user the demo creates, if there is none.
ADMIN_USERNAME = "admin"
#: Seconds the worker gets to stop after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT = 20.0
#: What Django's file-based e-mail backend writes after each message.
MAIL_SEPARATOR = b"\n" + b"-" * 79 + b"\n"
#: Seconds between two looks at the database while waiting for the runs.
POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class SignedUp:
    """A user the demo signed up through the API, and the event that sent."""

    user_id: int
    email: str
    event_id: str


@dataclass(frozen=True)
class Connected:
    """A source the demo connected through the API, and the event that sent."""

    source_id: int
    name: str
    event_id: str


class Command(BaseCommand):
    help = (
        "Run the django-events example end to end: migrate, start a worker and the site, sign up two "
        "users and connect three sources over HTTP, wait for their runs and print what happened."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="Seconds to wait for every run to finish before giving up (default: 60).",
        )
        parser.add_argument(
            "--keep-running",
            action="store_true",
            help="Keep the site and the worker running after the summary, until Ctrl-C.",
        )
        parser.add_argument(
            "--port",
            type=int,
            default=0,
            help="Port to serve the site on, on 127.0.0.1 (default: a free one).",
        )
        parser.add_argument(
            "--fresh",
            action="store_true",
            help="Delete the SQLite database first, to start from an empty one.",
        )
        parser.add_argument(
            "--worker-log",
            type=Path,
            default=None,
            help="File for the worker's output (default: demo-worker.log next to the database).",
        )
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help=(
                f"Give the admin user {ADMIN_USERNAME!r} a new password and print it (its password is "
                "printed only when the demo creates it)."
            ),
        )

    def handle(
        self,
        *args: Any,
        timeout: float,
        keep_running: bool,
        port: int,
        fresh: bool,
        worker_log: Path | None,
        reset_password: bool = False,
        **options: Any,
    ) -> None:
        if timeout <= 0:
            raise CommandError("--timeout must be a positive number of seconds.")
        if fresh:
            self._delete_sqlite_database()
        broker_url = settings.DRAMATIQ_BROKER_URL
        if broker_url:
            check_broker(broker_url)
            self._say(f"Broker:   {redact(broker_url)} (reachable)")
        else:
            self._say(
                "Broker:   the database (DatabaseBroker; set DRAMATIQ_BROKER_URL for Redis or RabbitMQ)"
            )
        self._say(f"Database: {describe_database()}")

        call_command("migrate", interactive=False, verbosity=0)
        self._say("Migrated the database.")
        self._say(admin_login(reset_password=reset_password))
        self._forget_demo_users()

        mail_dir = Path(settings.MAIL_DIR)
        mails_before = mail_sizes(mail_dir)
        log_path = (worker_log or default_log_dir() / "demo-worker.log").resolve()

        with _interrupt_on_signals(), contextlib.ExitStack() as stack:
            try:
                worker = stack.enter_context(running_worker(log_path))
                self._say(f"Started a worker (rundramatiq, pid {worker.pid}); its output goes to {log_path}")
                base_url = stack.enter_context(serving_site(port))
                self._say(f"Serving the site on {base_url}/")

                signed_up = [self._sign_up(base_url, address) for address in DEMO_USERS]
                connected = [self._connect(base_url, name, address) for name, address in DEMO_SOURCES]
                sent = {item.event_id: item.email for item in signed_up}
                sent |= {item.event_id: item.name for item in connected}
                self._wait_for_runs(list(sent), worker, log_path, timeout)
                self._summarise(sent, mail_dir, mails_before, base_url, keep_running)
                if keep_running:
                    self._say(
                        f"\nThe site and the worker keep running on {base_url}/. Press Ctrl-C to stop both."
                    )
                    code = worker.wait()
                    raise CommandError(
                        f"The worker stopped by itself (exit code {code}); see {log_path}.\n{tail(log_path)}"
                    )
            except KeyboardInterrupt:
                if not keep_running:
                    raise CommandError("Interrupted; stopping the worker and the site.") from None
                self._say("\nStopping the worker and the site...")
        self._say("Stopped the worker and the site.")

    # Steps -------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _delete_sqlite_database(self) -> None:
        database = settings.DATABASES["default"]
        if database["ENGINE"] != "django.db.backends.sqlite3":
            raise CommandError("--fresh only deletes SQLite databases; DATABASE_URL points to another one.")
        connections.close_all()
        path = Path(database["NAME"])
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            file.unlink(missing_ok=True)
        self._say(f"Deleted the database {path}.")

    def _forget_demo_users(self) -> None:
        """Delete the users an earlier demo signed up, so that they sign up (and are onboarded) again."""
        earlier = get_user_model()._default_manager.filter(username__in=DEMO_USERS)
        names = sorted(earlier.values_list("username", flat=True))
        if names:
            earlier.delete()
            self._say(
                f"Deleted the users an earlier demo signed up ({', '.join(names)}), to sign them up again."
            )

    def _sign_up(self, base_url: str, address: str) -> SignedUp:
        """Sign a user up as a client would: ``POST /api/users/`` over HTTP."""
        url = f"{base_url}{reverse('sources:sign_up')}"
        status, body = post_json(url, {"email": address})
        if status != 201:
            raise CommandError(f"POST {url} answered {status}: {body}")
        self._say(
            f"POST /api/users/   {address!r:22} -> {status} user_id={body['user_id']} "
            f"event_id={body['event_id']}"
        )
        return SignedUp(user_id=body["user_id"], email=address, event_id=body["event_id"])

    def _connect(self, base_url: str, name: str, email: str) -> Connected:
        """Connect a source as a client would: ``POST /api/sources/`` over HTTP."""
        url = f"{base_url}{reverse('sources:connect')}"
        status, body = post_json(url, {"name": name, "email": email})
        if status != 201:
            raise CommandError(f"POST {url} answered {status}: {body}")
        self._say(
            f"POST /api/sources/ {name!r:22} -> {status} source_id={body['source_id']} "
            f"event_id={body['event_id']}"
        )
        return Connected(source_id=body["source_id"], name=name, event_id=body["event_id"])

    def _wait_for_runs(
        self, event_ids: list[str], worker: subprocess.Popen[bytes], log_path: Path, timeout: float
    ) -> None:
        """Poll the database until every run of the demo's events is final, or fail after ``timeout``."""
        runs = Run.objects.filter(event_id__in=event_ids)
        total = runs.count()
        self._say(f"\nWaiting for the {total} runs these events caused (at most {timeout:g} s)...")
        started = time.monotonic()
        deadline = started + timeout
        reported = -1
        while True:
            done = runs.final().count()
            if done != reported:
                self._say(f"  {done}/{total} runs finished")
                reported = done
            if done == total:
                break
            if worker.poll() is not None:
                raise CommandError(
                    f"The worker exited (code {worker.returncode}) before the runs finished; "
                    f"see {log_path}.\n{tail(log_path)}"
                )
            if time.monotonic() >= deadline:
                waiting = Counter(runs.not_final().values_list("function", "status"))
                stuck = ", ".join(
                    f"{count} {status} ({function})" for (function, status), count in waiting.items()
                )
                raise CommandError(
                    f"Runs did not finish within {timeout:g} s ({done}/{total} did; still waiting: {stuck}). "
                    f"Is the worker consuming the queue? See {log_path}, or raise --timeout.\n"
                    + tail(log_path)
                )
            time.sleep(POLL_INTERVAL)
        self._say(f"All {total} runs finished in {time.monotonic() - started:.1f} s.")

    def _summarise(
        self,
        names: dict[str, str],
        mail_dir: Path,
        mails_before: dict[Path, int],
        base_url: str,
        keep_running: bool,
    ) -> None:
        """Print the runs of the events sent (``names``: each event's id and what it is about)."""
        runs = list(Run.objects.filter(event_id__in=list(names)).select_related("event"))
        width = max(len(name) for name in names.values())
        functions = [*functions_for(SOURCE_CONNECTED), *functions_for(USER_SIGNED_UP)]
        order = {spec.id: index for index, spec in reversed(list(enumerate(functions)))}
        by_event = {event_id: index for index, event_id in enumerate(names)}
        runs.sort(
            key=lambda run: (order.get(run.function, len(order)), run.function, by_event[str(run.event_id)])
        )

        # Attempts that left the worker at a step (a wait) and came back are not retries.
        suspended = Counter(
            Attempt.objects.filter(run__in=runs, outcome=AttemptOutcome.SUSPENDED).values_list(
                "run_id", flat=True
            )
        )
        retries = {run.pk: max(run.attempts - 1 - suspended[run.pk], 0) for run in runs}

        self._say("\nRuns, by function:")
        function = None
        for run in runs:
            if run.function != function:
                function = run.function
                self._say(f"  {function}")
            attempts = plural(run.attempts, "attempt")
            notes = (
                [f"{retries[run.pk]} {'retry' if retries[run.pk] == 1 else 'retries'}"]
                if retries[run.pk]
                else []
            )
            notes += [f"{suspended[run.pk]} suspended"] if suspended[run.pk] else []
            if notes:
                attempts += f" ({', '.join(notes)})"
            shown = json.dumps(run.result) if run.status == RunStatus.SUCCEEDED else run.last_error
            self._say(f"    {names[str(run.event_id)]:{width}}  {run.status:9}  {attempts:24}  {shown}")

        counts = Counter(run.status for run in runs)
        self._say(
            "\nRuns by status: "
            + ", ".join(f"{status} {counts[status]}" for status in RunStatus if counts[status])
        )
        retried_ok = [run for run in runs if run.status == RunStatus.SUCCEEDED and retries[run.pk]]
        if retried_ok:
            run = retried_ok[0]
            self._say(
                f"Retried and succeeded: {run.function} for {names[str(run.event_id)]!r}, "
                f"on attempt {run.attempts} of {run.max_attempts}."
            )
        dead = [run for run in runs if run.status == RunStatus.DEAD]
        if dead:
            run = dead[0]
            self._say(
                f"Dead: {run.function} for {names[str(run.event_id)]!r}, "
                f"after {plural(run.attempts, 'attempt')}; last error: {run.last_error}"
            )

        self._say_onboarding([run for run in runs if run.event.name == USER_SIGNED_UP], names)

        mails = new_mails(mail_dir, mails_before)
        self._say(f"E-mails: {plural(len(mails), 'e-mail')} written to {mail_dir}{os.sep}:")
        to_width = max((len(to) for to, _subject in mails), default=0)
        for to, subject in sorted(mails, key=lambda mail: mail[0]):
            self._say(f"  to {to:{to_width}}  {subject}")

        runs_url = admin_runs_path()
        if keep_running:
            self._say(
                f"Admin: {base_url}{runs_url} (log in as {ADMIN_USERNAME!r}): "
                "every run, attempt and traceback."
            )
        else:
            self._say(
                f"Admin: every run, attempt and traceback is at {runs_url} (log in as {ADMIN_USERNAME!r}). "
                "Browse it with `python manage.py demo --keep-running`, or with `python manage.py runserver` "
                f"and http://127.0.0.1:8000{runs_url}"
            )

    def _say_onboarding(self, runs: list[Run], names: dict[str, str]) -> None:
        """Print each onboarding run's steps: the welcome e-mail, the wait, and the reminder if any."""
        if not runs:
            return
        self._say(
            f"\nOnboarding, step by step (sources.onboarding; the demo's worker waits "
            f"{DEMO_REMINDER_AFTER:g} s for a first source, not a day):"
        )
        steps = Step.objects.filter(run__in=runs).order_by("position")
        by_run: dict[Any, list[Step]] = {}
        for step in steps:
            by_run.setdefault(step.run_id, []).append(step)
        for run in runs:
            outcome = ""
            if run.status == RunStatus.SUCCEEDED and isinstance(run.result, dict):
                outcome = ", reminded" if run.result.get("reminded") else ", no reminder"
            self._say(f"  {names[str(run.event_id)]}: {run.status}{outcome}")
            for step in by_run.get(run.pk, []):
                self._say(f"    {step.step_id:12}  {step.kind:4}  {step.status:9}  {describe_step(step)}")


# Helpers ---------------------------------------------------------------------------------------


def admin_login(*, reset_password: bool = False) -> str:
    """Make sure the demo's admin user exists, and say how to log in as it (one line or two).

    The first run creates it with a new password (``DJANGO_SUPERUSER_PASSWORD`` if
    set, else a random one) and prints it; that is the only time the password is
    shown, since only its hash is stored. A later run says who to log in as and how
    to get a password again; with ``reset_password`` it sets a new one and prints it,
    and makes the user an active superuser again, so that the login works.
    """
    users = get_user_model()
    manager = users._default_manager
    user = manager.filter(username=ADMIN_USERNAME).first()
    password = os.environ.get("DJANGO_SUPERUSER_PASSWORD") or secrets.token_urlsafe(9)
    if user is None:
        manager.db_manager().create_superuser(
            username=ADMIN_USERNAME, email="admin@example.com", password=password
        )
        return f"Created the admin user: {ADMIN_USERNAME} / {password}  (printed only this once)"
    if reset_password:
        user.set_password(password)
        user.is_active = user.is_staff = user.is_superuser = True
        user.save(update_fields=["password", "is_active", "is_staff", "is_superuser"])
        return f"Reset the admin user's password: {ADMIN_USERNAME} / {password}  (printed only this once)"
    return (
        f"The admin user {ADMIN_USERNAME!r} exists already; log in as {ADMIN_USERNAME!r} with the password "
        "printed when it was created.\n"
        "Forgot it? Run the demo with --reset-password to get a new one printed, "
        f"or set one with: python manage.py changepassword {ADMIN_USERNAME}"
    )


def describe_step(step: Step) -> str:
    """What a step of the onboarding flow did: the e-mail it sent, the source it waited for, or its error."""
    if step.status != StepStatus.COMPLETED:
        return step.error or f"{step.status} since {step.started_at:%H:%M:%S}"
    if step.kind == StepKind.WAIT:
        took = f"after {step.duration.total_seconds():.1f} s" if step.duration is not None else ""
        if step.resolved_event is None:
            return f"{took}: timed out, no {step.event_name}"
        data = Event.objects.filter(pk=step.resolved_event).values_list("data", flat=True).first() or {}
        source = Source.objects.filter(pk=data.get("source_id", 0)).values_list("name", flat=True).first()
        return f"{took}: {step.event_name} for {source!r}" if source else f"{took}: {step.event_name}"
    if isinstance(step.result, dict) and "subject" in step.result:
        return f"e-mail {step.result['subject']!r} to {step.result.get('sent_to')}"
    return json.dumps(step.result)


def check_broker(url: str, *, timeout: float = 5.0) -> None:
    """Connect to the broker at ``url`` once, or raise ``CommandError`` saying how to start one."""
    scheme = urlsplit(url).scheme.lower()
    try:
        if scheme.startswith("redis"):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
        else:
            import pika  # type: ignore[import-untyped]

            parameters = pika.URLParameters(url)
            parameters.socket_timeout = timeout
            parameters.connection_attempts = 1
            pika.BlockingConnection(parameters).close()
    except Exception as exc:
        how = (
            "start Redis with `redis-server` (or `docker run --rm -p 6379:6379 redis:7`)"
            if scheme.startswith("redis")
            else "start RabbitMQ (for instance `docker run --rm -p 5672:5672 rabbitmq:3`)"
        )
        raise CommandError(
            f"Cannot reach the Dramatiq broker at {redact(url)} ({describe_error(exc)}).\n"
            f"The demo needs it: {how}, or set DRAMATIQ_BROKER_URL to a reachable redis:// or amqp:// URL."
        ) from exc


def describe_error(exc: BaseException) -> str:
    """``"Type: message"``, or just the type for exceptions without a message."""
    message = str(exc).strip().rstrip(".")
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def describe_database() -> str:
    """A one-line description of the default database."""
    database = settings.DATABASES["default"]
    engine = str(database["ENGINE"]).rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"{database['NAME']} (SQLite)"
    return f"{database.get('NAME')} on {database.get('HOST') or 'localhost'} ({engine})"


def default_log_dir() -> Path:
    """Where the worker's log goes by default: next to an SQLite database, else the repo's ``var/``."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        return Path(database["NAME"]).resolve().parent
    path = REPO_DIR / "var"
    path.mkdir(exist_ok=True)
    return path


def mail_sizes(directory: Path) -> dict[Path, int]:
    """The size of each file in the e-mail directory."""
    if not directory.is_dir():
        return {}
    return {path: path.stat().st_size for path in directory.iterdir() if path.is_file()}


def new_mails(directory: Path, before: dict[Path, int]) -> list[tuple[str, str]]:
    """The e-mails written to ``directory`` since ``before`` was taken: (recipients, subject) each.

    Django's file-based backend appends each message to its connection's file,
    followed by a line of 79 dashes; several connections may share a file.
    """
    mails = []
    for path, size in sorted(mail_sizes(directory).items()):
        if size > before.get(path, 0):
            with path.open("rb") as file:
                file.seek(before.get(path, 0))
                mails += [_to_and_subject(chunk) for chunk in _messages(file.read())]
    return mails


def _messages(written: bytes) -> Iterable[bytes]:
    *messages, _rest = written.split(MAIL_SEPARATOR)
    return messages


def _to_and_subject(message: bytes) -> tuple[str, str]:
    parsed = message_from_bytes(message, policy=default_email_policy)
    return str(parsed.get("To", "")), str(parsed.get("Subject", ""))


def plural(count: int, noun: str) -> str:
    """``"1 attempt"``, ``"3 attempts"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def admin_runs_path() -> str:
    """The admin's list of runs, or the admin's index if django-events' admin is not registered."""
    if admin.site.is_registered(Run):
        return reverse("admin:django_events_run_changelist")
    return reverse("admin:index")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path``, to show with an error."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    last = text.splitlines()[-lines:]
    return f"Last lines of {path}:\n" + "\n".join(f"  | {line}" for line in last)


def post_json(url: str, payload: dict[str, Any], *, timeout: float = 10.0) -> tuple[int, Any]:
    """POST ``payload`` as JSON to ``url``; return the status and the decoded JSON answer."""
    request = Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    # No proxy: the site is on 127.0.0.1, whatever http_proxy says.
    opener = build_opener(ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body
    except URLError as exc:
        raise CommandError(f"Could not reach the demo site at {url}: {exc.reason}") from exc


@contextlib.contextmanager
def running_worker(log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``manage.py rundramatiq`` (one process, four threads) with these settings; stop it on exit.

    The worker gets the same environment, so the same settings module,
    database and broker. It runs in a session of its own, so that Ctrl-C in
    the terminal reaches only the demo, which then stops it gracefully; on
    Linux it is also sent SIGTERM if the demo dies without stopping it.
    """
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
        "PYTHONUNBUFFERED": "1",
        # A reminder after a few seconds instead of a day, to see the onboarding flow's timeout.
        "ONBOARDING_REMINDER_AFTER": str(DEMO_REMINDER_AFTER),
    }
    command = [
        sys.executable,
        str(REPO_DIR / "manage.py"),
        "rundramatiq",
        "--processes",
        "1",
        "--threads",
        "4",
        "--worker-shutdown-timeout",
        str(int(WORKER_STOP_TIMEOUT * 1000 / 2)),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
        )
    try:
        yield process
    finally:
        stop_worker(process)


def _stop_with_parent() -> None:
    """In the worker, before it starts: ask Linux to send it SIGTERM when the demo process dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker (it finishes what it is running); kill its process group if it lingers.

    A second Ctrl-C while it stops kills it at once.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(WORKER_STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        # Too slow, or Ctrl-C again. The worker runs in its own session: its process group
        # is its pid, and holds its worker processes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def serving_site(port: int) -> Iterator[str]:
    """Serve the site (and the admin's static files) on 127.0.0.1 in a thread; yield its base URL."""
    try:
        server = ThreadedWSGIServer(("127.0.0.1", port), WSGIRequestHandler, allow_reuse_address=True)
    except OSError as exc:
        raise CommandError(
            f"Cannot serve the site on 127.0.0.1:{port}: {exc}. Choose another --port."
        ) from exc
    server.set_app(StaticFilesHandler(WSGIHandler()))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` on SIGINT and SIGTERM while the demo runs, so the worker is stopped.

    SIGINT is set explicitly too: a shell starting the demo in the background
    ignores it, and Python then never raises ``KeyboardInterrupt``.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
