"""Real processes and private servers for the fault-injection tests, and the ledger checks.

Everything the tests stop, kill or restart is private to the test: a ``redis-server``
on a free port, a PostgreSQL cluster initialised in a temporary directory, and
``manage.py rundramatiq`` processes, each in a process group of its own. Of the
machine's shared services only the database server is used, for the pytest test
database as in the other tests; nothing shared is ever stopped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]

#: Multiplies the issue's 1,000-event figure: 0.2 (the default, for CI) sends 200 events in the
#: scenarios that kill workers or restart servers; 1 sends the full 1,000.
SCALE = float(os.environ.get("DJANGO_EVENTS_FAULT_SCALE") or "0.2")

#: DJANGO_EVENTS for the worker processes (merged through DJANGO_EVENTS_TEST_SETTINGS): a recovery
#: pass every half second; a run pending for 5 s sent again; a lease of the function's time limit
#: (2 s for the faults/* functions) plus 1 s.
WORKER_SETTINGS: dict[str, Any] = {"RECOVERY_INTERVAL": 0.5, "RECOVERY_GRACE": 5.0, "LEASE_MARGIN": 1.0}

#: The test functions (tests/testapp/events.py): their ids, and the names they write in ``Call`` rows.
OK_FUNCTION, OK_CALL = "tests.faults_ok", "faults_ok"
FAIL_FUNCTION, FAIL_CALL = "tests.faults_fail", "faults_fail"


def patience(seconds: float) -> float:
    """A deadline of ``seconds`` at the default scale, longer in proportion at larger scales."""
    return seconds * max(1.0, SCALE / 0.2)


def scaled(full: int, minimum: int = 10) -> int:
    """``full`` times ``SCALE``, at least ``minimum``."""
    return max(minimum, round(full * SCALE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], object] | None = None,
    interval: float = 0.1,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    The failure says what was awaited and, with ``describe``, what the state was then.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f"; state: {describe()}" if describe is not None else ""
            raise AssertionError(f"not within {timeout:.0f}s: {what}{state}")
        time.sleep(interval)


class RedisServer:
    """A ``redis-server`` of the test's own on a free port, without persistence: a restart empties it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> None:
        """Start the server; the first time on a free port (another if that one was taken meanwhile),
        later on the same port, so that clients reconnect to it."""
        assert self.process is None, "already running"
        for _ in range(3):
            if self._launch():
                self.starts += 1
                return
            if self.starts:
                break  # a restart must keep its port
            self.port = free_port()
        raise AssertionError(f"redis-server did not start:\n{self._log()}")

    def _launch(self) -> bool:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is not on PATH (apt-get install redis-server)"
        self.process = process = subprocess.Popen(
            [
                *(executable, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = self.client()

        def up() -> bool:
            if process.poll() is not None:
                return True  # exited (the port was taken, say): stop waiting
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(up, timeout=20, what=f"redis-server accepts connections on port {self.port}")
        finally:
            client.close()
        if process.poll() is None:
            return True
        self.process = None
        return False

    def _log(self) -> str:
        log = self.directory / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL if it has not exited in 10 s) and wait until it has exited."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def _postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: $PG_BINDIR, the PATH, or Debian's newest version."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    assert versions, "PostgreSQL server binaries not found: set PG_BINDIR (the directory of pg_ctl)"
    return Path(versions[-1]).parent


class PostgresCluster:
    """A PostgreSQL cluster of the test's own: ``initdb`` into a temporary directory, on a free port.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user and
    every server command runs through ``runuser``.
    """

    def __init__(self, *options: str) -> None:
        """``options``: more ``-c name=value`` settings for the server (``"wal_writer_delay=10s"``)."""
        self.options = "".join(f" -c {option}" for option in options)
        self.bindir = _postgres_bindir()
        self.port = free_port()
        # Not under pytest's tmp_path: as root that is a 0700 directory the postgres user cannot enter.
        self.directory = Path(tempfile.mkdtemp(prefix="django-events-faults-pg-"))
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "sock"
        self.log = self.directory / "postgres.log"
        self.prefix: list[str] = []
        self.running = False
        self.restarts = 0
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            self.prefix = ["runuser", "-u", "postgres", "--"]
            for path in (self.directory, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, timeout: float = 120) -> None:
        command = [*self.prefix, str(self.bindir / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}\n"
                f"--- server log ---\n{log}"
            )

    def start(self) -> None:
        """``initdb`` if need be, then start the server on a free port (another if that one was taken)."""
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
        for tries_left in range(2, -1, -1):
            options = (
                f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                f"-c fsync=off -c full_page_writes=off -c max_connections=100{self.options}"
            )
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
            except AssertionError:
                if not tries_left:
                    raise
                self.port = free_port()
            else:
                self.running = True
                return

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, open transactions roll back."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart"
        )
        self.restarts += 1

    def crash(self) -> None:
        """Stop the server as a crash would (``-m immediate``: no checkpoint, WAL not yet written is
        lost), then start it again: it recovers from its WAL."""
        self.stop()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        except (AssertionError, subprocess.TimeoutExpired):
            # The postmaster's pid is the first line of postmaster.pid; its children exit with it.
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            raise

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def migrated_database(self, name: str, env: dict[str, str]) -> None:
        """Create database ``name`` and run ``manage.py migrate`` on it, with ``env`` (which names it)."""
        self.create_database(name)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=180,
        )

    def remove(self) -> None:
        """Stop the server if it runs, and delete the cluster's directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(*options: str) -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster of the test's own (``options``: as for ``PostgresCluster``),
    removed after it."""
    cluster = PostgresCluster(*options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def worker_env(**extra: str | None) -> dict[str, str]:
    """The environment of a process started by the tests: test settings, fast recovery, ``extra``.

    A value of ``None`` in ``extra`` removes the variable.
    """
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_TEST_SETTINGS": json.dumps(WORKER_SETTINGS),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Workers:
    """``manage.py rundramatiq`` processes, each the leader of a process group of its own."""

    COMMAND: Sequence[str] = (
        "manage.py",
        "rundramatiq",
        "--processes",
        "1",
        "--threads",
        "4",
        "--worker-shutdown-timeout",
        "5000",
    )

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.killed = 0

    def start(self, count: int = 1) -> None:
        for _ in range(count):
            log = self.log_dir / f"rundramatiq-{len(self.logs) + 1}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, *self.COMMAND],
                        cwd=ROOT,
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def assert_alive(self) -> None:
        dead = {p.pid: p.returncode for p in self.processes if p.poll() is not None}
        assert not dead, f"rundramatiq exited: {dead}\n{self.tail()}"

    def kill_one(self, index: int = 0) -> None:
        """SIGKILL a worker (the oldest by default): its main process and its worker process at once,
        like a lost host."""
        process = self.processes.pop(index)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group leader is not reaped yet: its id is ours
        process.wait()
        self.killed += 1

    def stop(self) -> None:
        """SIGTERM every worker (the main process passes it on); SIGKILL the group after 30 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def tail(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}"
            for log in self.logs
            if log.exists()
        )


# --- the ledger ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """The rows the checks read: runs, attempts and calls of the faults/* functions."""

    runs: list[tuple[uuid.UUID, str, str, int, int]]  # id, function, status, attempts, max_attempts
    attempts: list[tuple[uuid.UUID, int, str, str]]  # run id, number, outcome, traceback
    calls: list[tuple[uuid.UUID, int, str]]  # run id, attempt, function name
    events: int
    statuses: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.statuses = Counter(status for _id, _f, status, _a, _m in self.runs)


_FUNCTIONS = f"('{OK_FUNCTION}', '{FAIL_FUNCTION}')"
_CALLS = f"('{OK_CALL}', '{FAIL_CALL}')"


def status_counts(cursor: Any) -> Counter[str]:
    """``status -> runs`` of the faults/* functions."""
    cursor.execute(
        f"SELECT status, COUNT(*) FROM django_events_run WHERE function IN {_FUNCTIONS} GROUP BY status"
    )
    return Counter({status: count for status, count in cursor.fetchall()})


def read_ledger(cursor: Any) -> Ledger:
    """Read the ledger with a DB-API cursor (Django's or psycopg's): plain SQL for SQLite and PostgreSQL."""

    def as_uuid(value: Any) -> uuid.UUID:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))

    cursor.execute(
        "SELECT id, function, status, attempts, max_attempts FROM django_events_run "
        f"WHERE function IN {_FUNCTIONS}"
    )
    runs = [(as_uuid(pk), f, s, a, m) for pk, f, s, a, m in cursor.fetchall()]
    cursor.execute(
        "SELECT a.run_id, a.number, a.outcome, a.traceback FROM django_events_attempt a "
        f"JOIN django_events_run r ON r.id = a.run_id WHERE r.function IN {_FUNCTIONS}"
    )
    attempts = [(as_uuid(run), n, o, t) for run, n, o, t in cursor.fetchall()]
    cursor.execute(f"SELECT run_id, attempt, function FROM testapp_call WHERE function IN {_CALLS}")
    calls = [(as_uuid(run), a, f) for run, a, f in cursor.fetchall()]
    cursor.execute("SELECT COUNT(*) FROM django_events_event WHERE name IN ('faults/ok', 'faults/fail')")
    events = cursor.fetchone()[0]
    return Ledger(runs=runs, attempts=attempts, calls=calls, events=events)


def check_ledger(ledger: Ledger, *, ok_runs: int, fail_runs: int = 0) -> dict[str, int]:
    """Assert what the guarantees promise of a settled ledger; return the figures.

    * every faults/ok run succeeded and every faults/fail run is dead after all its attempts
      (none lost: the number of runs is as sent, none is pending, running or retrying);
    * every attempt a run started is recorded, once (numbers 1..attempts), with one
      ``succeeded`` attempt, the last, for a succeeded run, and a traceback for every other;
    * the function was called at least once per succeeded run and at most once per attempt
      (two workers never held one attempt of a run).

    Duplicates, the runs executed more than once, are counted, not forbidden: a worker
    killed after the function ran but before it recorded the outcome means a second execution.
    """
    by_run: dict[uuid.UUID, list[tuple[int, str, str]]] = defaultdict(list)
    for run_id, number, outcome, tb in ledger.attempts:
        by_run[run_id].append((number, outcome, tb))
    calls: Counter[uuid.UUID] = Counter(run_id for run_id, _a, _f in ledger.calls)
    calls_per_attempt = Counter((run_id, attempt) for run_id, attempt, _f in ledger.calls)
    problems: list[str] = []

    functions = Counter(function for _id, function, _s, _a, _m in ledger.runs)
    if functions[OK_FUNCTION] != ok_runs or functions[FAIL_FUNCTION] != fail_runs:
        problems.append(f"expected {ok_runs} ok and {fail_runs} failing runs, found {dict(functions)}")
    for run_id, function, status, attempts, max_attempts in ledger.runs:
        history = sorted(by_run[run_id])
        numbers = [number for number, _o, _t in history]
        outcomes = [outcome for _n, outcome, _t in history]
        expected = "succeeded" if function == OK_FUNCTION else "dead"
        if status != expected:
            problems.append(f"run {run_id} of {function} is {status}, not {expected}: {outcomes}")
            continue
        if numbers != list(range(1, attempts + 1)):
            problems.append(f"run {run_id}: attempts {attempts}, recorded {numbers}")
        if function == OK_FUNCTION and (outcomes.count("succeeded") != 1 or outcomes[-1] != "succeeded"):
            problems.append(f"run {run_id}: outcomes {outcomes}")
        if function == FAIL_FUNCTION and (attempts != max_attempts or "succeeded" in outcomes):
            problems.append(f"run {run_id}: dead after {attempts} of {max_attempts} attempts: {outcomes}")
        if any(outcome != "succeeded" and not tb for _n, outcome, tb in history):
            problems.append(f"run {run_id}: a failed attempt without a traceback: {outcomes}")
        if function == OK_FUNCTION and not calls[run_id]:
            problems.append(f"run {run_id} succeeded without calling the function")
    twice = [key for key, count in calls_per_attempt.items() if count > 1]
    if twice:
        problems.append(f"{len(twice)} attempt(s) called the function twice, e.g. {twice[:3]}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])

    ok_ids = {run_id for run_id, function, *_ in ledger.runs if function == OK_FUNCTION}
    return {
        "events_sent": ledger.events,
        "runs": len(ledger.runs),
        "runs_succeeded": ledger.statuses["succeeded"],
        "runs_dead": ledger.statuses["dead"],
        "runs_lost": ok_runs + fail_runs - ledger.statuses["succeeded"] - ledger.statuses["dead"],
        "runs_executed_more_than_once": sum(1 for run_id in ok_ids if calls[run_id] > 1),
        "extra_executions": sum(calls[run_id] - 1 for run_id in ok_ids if calls[run_id] > 1),
        "attempts_lost": sum(1 for *_r, outcome, _t in ledger.attempts if outcome == "lost"),
        "attempts": len(ledger.attempts),
    }


def django_counts() -> Counter[str]:
    """``status -> runs`` of the faults/* functions, in the test database."""
    from django.db import connection

    with connection.cursor() as cursor:
        return status_counts(cursor)


def django_ledger() -> Ledger:
    """The ledger of the faults/* functions, in the test database."""
    from django.db import connection

    with connection.cursor() as cursor:
        return read_ledger(cursor)


def report(scenario: str, figures: dict[str, Any]) -> None:
    """Print the figures (shown with ``pytest -s``) and keep them in ``var/faults/<scenario>.json``."""
    from django.conf import settings

    record = {
        "scenario": scenario,
        "scale": SCALE,
        "env": settings.DJANGO_EVENTS_TEST_SUFFIX,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **figures,
    }
    print(f"\n[faults] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    out = ROOT / "var" / "faults"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{scenario}.json").write_text(json.dumps(record, indent=2) + "\n")


def settle(
    counts: Callable[[], Counter[str] | None], *, total: int, timeout: float, what: str
) -> Counter[str]:
    """Wait until ``total`` runs are in final statuses; ``counts`` may return ``None`` (database down)."""
    final = ("succeeded", "dead", "cancelled")
    latest: list[Counter[str] | None] = [None]

    def settled() -> bool:
        latest[0] = counts()
        return latest[0] is not None and sum(latest[0][s] for s in final) >= total

    wait_until(settled, timeout=timeout, what=what, describe=lambda: dict(latest[0] or {}), interval=0.2)
    assert latest[0] is not None
    return latest[0]


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def child_pids(pid: int) -> set[int]:
    """The ids of the processes whose parent is ``pid`` (Linux /proc)."""
    children: set[int] = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ")".
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.add(int(text.split(" ", 1)[0]))
    return children
