"""Fill a PostgreSQL database with a fake but plausible history of events, runs and attempts.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fake_history.py --runs 1000000 --attempts-per-run 3 \\
        --database-url postgres://postgres@127.0.0.1:5432/django_events_bench

The database is created if it does not exist and migrated with the test settings
(``tests.settings``: the functions of ``tests.testapp`` and ``example_project.sources``
are registered, and their triggers and ids are what the history uses).

What it writes:

- about one event per three runs (the event names are the registered triggers, weighted
  towards the ones three functions subscribe to, plus a few nobody subscribes to), with
  JSON data (``user_id``, ``source_id``, ...) and an idempotency key on some;
- one run per subscribed function, spread over the last ``--days`` days, ``created_at``
  increasing, UUIDv7 ids built from ``created_at``, ``event_name`` copied from the event;
- statuses: mostly succeeded, some dead and cancelled; pending, running and retrying
  runs only near the end of the timeline (a backlog), as in a live system;
- attempts numbered 1..n per run, about ``--attempts-per-run`` on average, failed ones
  with an exception type, message and a multi-line traceback; ``last_error`` on every run
  that failed at least once (as the worker does: a later success keeps it), results on
  succeeded runs.

It is fast because it streams tab-separated rows with ``COPY ... FROM STDIN`` in batches,
with foreign-key triggers off (``session_replication_role = replica``, for a superuser)
and the secondary indexes dropped during the load and rebuilt afterwards; it ends with
``VACUUM ANALYZE`` (the state autovacuum reaches on a live database). The tables must be empty, or pass
``--reset`` to empty them first.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/django_events_bench"

EVENT_TABLE = "django_events_event"
RUN_TABLE = "django_events_run"
ATTEMPT_TABLE = "django_events_attempt"
#: The columns written, per table, in the order of ``History.batches``.
COLUMNS = {
    EVENT_TABLE: "id, name, data, idempotency_key, created_at",
    RUN_TABLE: "id, event_id, event_name, function, status, attempts, max_attempts, result, last_error, "
    "due_at, lease_expires_at, started_at, attempt_started_at, finished_at, created_at",
    ATTEMPT_TABLE: "run_id, number, started_at, finished_at, outcome, exc_type, message, traceback, "
    "worker_host, worker_pid",
}

#: How often each event name is sent (relative weights). The names three functions
#: subscribe to dominate, so that there is about one event per three runs.
EVENT_NAME_WEIGHTS = {
    "api/source.connected": 55,
    "test/fanout": 30,
    "test/ok": 3,
    "test/also-ok": 2,
    "test/flaky": 2,
    "test/always-fails": 1,
    "test/non-retriable": 1,
    "test/retry-after": 1,
    "test/bad-result": 1,
    "test/slow": 1,
    "api/user.logged_in": 2,  # nobody subscribes: events without runs
    "api/source.deleted": 1,
}

#: Status mix of runs older than the tail of the timeline: all final.
OLD_STATUS_WEIGHTS = {"succeeded": 92.5, "dead": 6.0, "cancelled": 1.5}
#: Status mix in the tail (the last ``TAIL`` of the timeline): a backlog being worked on.
TAIL_STATUS_WEIGHTS = {
    "succeeded": 55.0,
    "dead": 5.0,
    "cancelled": 2.0,
    "pending": 15.0,
    "running": 8.0,
    "retrying": 15.0,
}
#: The fraction of the timeline (at its end) where runs may still be in flight.
TAIL = 0.02
#: Of dead runs, the share that ran out of attempts (the others hit a non-retriable error).
EXHAUSTED = 0.75
#: Of cancelled runs, the share cancelled while retrying (the others before their first attempt).
CANCELLED_WHILE_RETRYING = 0.3

WORKERS = [(f"worker-{n}.internal", pid) for n in range(1, 5) for pid in (4101, 4102, 4187, 5230)]
SITE = "/srv/app/.venv/lib/python3.12/site-packages"
APP = "/srv/app"


# -- failures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One way an attempt fails: the exception, its message and the traceback above it."""

    exc_type: str
    message: str  # str.format()ed with the event's data and the attempt number
    frames: tuple[tuple[str, int, str, str], ...]  # file, line, function, source line
    retriable: bool = True
    outcome: str = "failed"

    def render(self, data: dict[str, Any], attempt: int) -> tuple[str, str]:
        """The message and the traceback of this failure on ``attempt`` for an event with ``data``."""
        message = self.message.format(attempt=attempt, **data)
        return message, self.head + f"{self.exc_type}: {message}\n"

    @cached_property
    def head(self) -> str:
        """The traceback above the exception's line."""
        return _traceback_head(self.frames)


def _traceback_head(frames: tuple[tuple[str, int, str, str], ...]) -> str:
    lines = ["Traceback (most recent call last):\n"]
    lines.append(
        f'  File "{SITE}/django_events/execution.py", line 174, in _attempt\n'
        "    stored_result = _json_result(spec.fn(ctx))\n"
        "                                 ^^^^^^^^^^^\n"
    )
    for file, line, function, source in frames:
        lines.append(f'  File "{file}", line {line}, in {function}\n    {source}\n')
    return "".join(lines)


_SOURCE_FRAME = (
    f"{APP}/example_project/sources/events.py",
    31,
    "_source",
    "return Source.objects.get(pk=source_id)",
)
_ORM_GET = (
    f"{SITE}/django/db/models/query.py",
    633,
    "get",
    "raise self.model.DoesNotExist(",
)
_HTTP_FRAMES = (
    (
        f"{APP}/example_project/sources/crm.py",
        41,
        "upsert_contact",
        "response = self.session.post(url, json=payload, timeout=10)",
    ),
    (
        f"{SITE}/requests/sessions.py",
        637,
        "post",
        'return self.request("POST", url, data=data, json=json, **kwargs)',
    ),
    (f"{SITE}/requests/sessions.py", 589, "request", "resp = self.send(prep, **send_kwargs)"),
    (f"{SITE}/requests/sessions.py", 703, "send", "r = adapter.send(request, **kwargs)"),
    (f"{SITE}/requests/adapters.py", 713, "send", "raise ReadTimeout(e, request=request)"),
)
_SMTP_FRAMES = (
    (f"{SITE}/django/core/mail/__init__.py", 88, "send_mail", "return mail.send()"),
    (
        f"{SITE}/django/core/mail/message.py",
        301,
        "send",
        "return self.get_connection(fail_silently).send_messages([self])",
    ),
    (f"{SITE}/django/core/mail/backends/smtp.py", 136, "send_messages", "sent = self._send(message)"),
    (f"{SITE}/django/core/mail/backends/smtp.py", 155, "_send", "self.connection.sendmail("),
    ("/usr/lib/python3.12/smtplib.py", 892, "sendmail", "raise SMTPDataError(code, resp)"),
)
_DB_FRAMES = (
    (
        f"{SITE}/django/db/models/query.py",
        1253,
        "update",
        "rows = query.get_compiler(self.db).execute_sql(CURSOR)",
    ),
    (f"{SITE}/django/db/backends/utils.py", 105, "_execute", "return self.cursor.execute(sql, params)"),
    (f"{SITE}/psycopg/cursor.py", 97, "execute", "raise ex.with_traceback(None)"),
)


def _failures() -> dict[str, tuple[list[Failure], list[Failure]]]:
    """For each function id: the transient failures (retried) and the permanent ones."""
    crm = (f"{APP}/example_project/sources/events.py", 77, "sync_to_crm", "crm.upsert_contact(source)")
    email = (f"{APP}/example_project/sources/events.py", 54, "send_welcome_email", "send_mail(")
    backfill = (
        f"{APP}/example_project/sources/events.py",
        45,
        "backfill_source",
        "Source.objects.filter(pk=source.pk).update(backfilled_rows=rows)",
    )
    gone = Failure(
        "django_events.exceptions.NonRetriableError",
        "Source {source_id} no longer exists.",
        (_SOURCE_FRAME, _ORM_GET),
        retriable=False,
    )
    timeout = Failure(
        "dramatiq.middleware.time_limit.TimeLimitExceeded",
        "time limit exceeded",
        (),
        outcome="timed_out",
    )
    deadlock = Failure(
        "django.db.utils.OperationalError",
        "deadlock detected\nDETAIL:  Process {source_id} waits for ShareLock on transaction "
        "8{user_id}; blocked by process 4{source_id}.\nHINT:  See server log for query details.",
        (backfill, *_DB_FRAMES),
    )
    tests = f"{APP}/tests/testapp/events.py"
    # A failure listed n times is n times as likely.
    return {
        "sources.backfill": ([deadlock, deadlock, deadlock, deadlock, timeout], [gone]),
        "sources.welcome_email": (
            [
                Failure(
                    "smtplib.SMTPDataError",
                    "(451, b'4.7.0 Temporary server error. Please try again later')",
                    (email, *_SMTP_FRAMES),
                ),
                Failure(
                    "smtplib.SMTPServerDisconnected",
                    "Connection unexpectedly closed: [Errno 104] Connection reset by peer",
                    (email, *_SMTP_FRAMES[:4]),
                ),
            ],
            [
                gone,
                Failure(
                    "KeyError",
                    "'email'",
                    ((email[0], 53, "send_welcome_email", 'email = ctx.event.data["email"]'),),
                ),
            ],
        ),
        "sources.sync_to_crm": (
            [
                Failure(
                    "requests.exceptions.ReadTimeout",
                    "HTTPSConnectionPool(host='crm.example.com', port=443): "
                    "Read timed out. (read timeout=10)",
                    (crm, *_HTTP_FRAMES),
                ),
                Failure(
                    "ConnectionError",
                    "CRM unavailable: timed out (attempt {attempt}, will be retried).",
                    (crm,),
                ),
                Failure(
                    "requests.exceptions.HTTPError",
                    "503 Server Error: Service Unavailable for url: https://crm.example.com/v2/contacts/{source_id}",
                    (crm, *_HTTP_FRAMES[:4]),
                ),
            ],
            [gone],
        ),
        "tests.ok": (
            [
                Failure(
                    "ConnectionResetError",
                    "[Errno 104] Connection reset by peer",
                    ((tests, 21, "ok", '_record(ctx, "ok")'), *_DB_FRAMES),
                )
            ],
            [],
        ),
        "tests.fanout_a": (
            [
                Failure(
                    "TimeoutError",
                    "timed out waiting for the lock on user {user_id}",
                    ((tests, 27, "fanout_a", '_record(ctx, "fanout_a")'),),
                )
            ],
            [],
        ),
        "tests.fanout_b": (
            [
                Failure(
                    "ConnectionError",
                    "fanout_b: upstream refused user {user_id}",
                    ((tests, 33, "fanout_b", '_record(ctx, "fanout_b")'),),
                )
            ],
            [],
        ),
        "tests.fanout_c": (
            [
                Failure(
                    "django.db.utils.OperationalError",
                    "server closed the connection unexpectedly\n\tThis probably means the server terminated "
                    "abnormally\n\tbefore or while processing the request.",
                    ((tests, 39, "fanout_c", '_record(ctx, "fanout_c")'), *_DB_FRAMES),
                ),
                timeout,
            ],
            [],
        ),
        "tests.flaky": (
            [
                Failure(
                    "ConnectionError",
                    "flaky failure on attempt {attempt}",
                    (
                        (
                            tests,
                            44,
                            "flaky",
                            'raise ConnectionError(f"flaky failure on attempt {ctx.attempt}")',
                        ),
                    ),
                )
            ],
            [],
        ),
        "tests.always_fails": (
            [
                Failure(
                    "ValueError",
                    "<b>broken</b> on attempt {attempt}",
                    (
                        (
                            tests,
                            51,
                            "always_fails",
                            'raise ValueError(f"<b>broken</b> on attempt {ctx.attempt}")',
                        ),
                    ),
                )
            ],
            [],
        ),
        "tests.non_retriable": (
            [],
            [
                Failure(
                    "django_events.exceptions.NonRetriableError",
                    "the source was deleted",
                    ((tests, 57, "non_retriable", 'raise NonRetriableError("the source was deleted")'),),
                    retriable=False,
                )
            ],
        ),
        "tests.retry_after": (
            [
                Failure(
                    "django_events.exceptions.RetryAfterError",
                    "rate limited",
                    (
                        (
                            tests,
                            64,
                            "retry_after",
                            'raise RetryAfterError(ctx.event.data["seconds"], "rate limited")',
                        ),
                    ),
                )
            ],
            [],
        ),
        "tests.bad_result": (
            [],
            [
                Failure(
                    "django_events.exceptions.ResultNotSerializableError",
                    "The function returned a value that JSON cannot hold (object): Object of type object "
                    "is not JSON serializable. Return JSON-serialisable data (dicts, lists, strings, "
                    "numbers, booleans, None).",
                    (
                        (
                            f"{SITE}/django_events/execution.py",
                            202,
                            "_json_result",
                            "raise ResultNotSerializableError(",
                        ),
                    ),
                    retriable=False,
                )
            ],
        ),
        "tests.slow": ([timeout], []),
    }


def _result(function: str, data: dict[str, Any], attempt: int) -> Any:
    """What a function returned (stored on succeeded runs)."""
    if function == "sources.backfill":
        return {"rows": 100 + data.get("source_id", 0) % 900}
    if function == "sources.welcome_email":
        return {"sent_to": data.get("email", "")}
    if function == "sources.sync_to_crm":
        return {"crm_id": f"crm-{data.get('source_id', 0)}", "attempt": attempt}
    if function == "tests.ok":
        return {"echo": data, "attempt": attempt}
    if function in ("tests.fanout_a", "tests.fanout_b"):
        return function[-1]
    if function in ("tests.flaky", "tests.retry_after"):
        return {"attempt": attempt}
    return None


# -- COPY text format --------------------------------------------------------------------------

_NULL = "\\N"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _esc(text: str) -> str:
    """``text`` escaped for COPY's text format."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\n" in text or "\t" in text or "\r" in text:
        text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return text


_DAYS: dict[int, str] = {}
_CLOCK = [f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)]


def _ts(micros: int) -> str:
    """A timestamp with time zone (UTC), from microseconds since the epoch."""
    seconds, fraction = divmod(micros, 1_000_000)
    day, second = divmod(seconds, 86_400)
    date = _DAYS.get(day)
    if date is None:
        date = _DAYS[day] = (_EPOCH + dt.timedelta(days=day)).strftime("%Y-%m-%d")
    return f"{date} {_CLOCK[second]}.{fraction:06d}+00"


def _uuid7(micros: int, rand: random.Random) -> str:
    """A version 7 UUID for the millisecond of ``micros`` (as ``django_events.ids.uuid7`` makes)."""
    value = ((micros // 1000) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= rand.getrandbits(12) << 64
    value |= 0b10 << 62
    value |= rand.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- the history -------------------------------------------------------------------------------


def _truncated_geometric(q: float, low: int, high: int) -> list[float]:
    """Cumulative weights of n in low..high with P(n) proportional to q ** (n - low)."""
    cumulative, total = [], 0.0
    for n in range(low, high + 1):
        total += q ** (n - low)
        cumulative.append(total)
    return cumulative


def _mean(cumulative: list[float], low: int) -> float:
    previous, weighted = 0.0, 0.0
    for index, value in enumerate(cumulative):
        weighted += (value - previous) * (low + index)
        previous = value
    return weighted / cumulative[-1] if cumulative else 0.0


class History:
    """Generates events with their runs and attempts, as COPY lines, in time order."""

    def __init__(self, runs: int, attempts_per_run: float, days: float, seed: int) -> None:
        from django_events.registry import registered_functions

        self.rand = random.Random(seed)
        self.target_runs = runs
        self.now_us = int(time.time() * 1_000_000)
        self.start_us = self.now_us - int(days * 86_400 * 1_000_000)
        functions = registered_functions()
        self.subscribers: dict[str, list[tuple[str, int]]] = {name: [] for name in EVENT_NAME_WEIGHTS}
        for function in functions:
            for trigger in function.triggers:
                if trigger in self.subscribers:
                    self.subscribers[trigger].append((function.id, function.max_attempts()))
        self.names = list(EVENT_NAME_WEIGHTS)
        self.name_cumulative = _cumulative(EVENT_NAME_WEIGHTS.values())
        self.failures = _failures()
        self.old_statuses = list(OLD_STATUS_WEIGHTS)
        self.old_cumulative = _cumulative(OLD_STATUS_WEIGHTS.values())
        self.tail_statuses = list(TAIL_STATUS_WEIGHTS)
        self.tail_cumulative = _cumulative(TAIL_STATUS_WEIGHTS.values())
        self.q = self._solve_q(attempts_per_run)
        self.attempt_weights: dict[tuple[int, int], list[float]] = {}
        self.events = self.runs_made = self.attempts_made = 0

    # How many attempts a run has: n in low..high with weights q ** (n - low), q solved so
    # that the mean over all runs is ``attempts_per_run``.

    def _failures_of(self, function: str) -> tuple[list[Failure], list[Failure]]:
        """How ``function`` fails; a function this script does not know fails like the flaky test one."""
        return self.failures.get(function) or self.failures["tests.flaky"]

    def _expected_attempt_rows(self, q: float) -> float:
        total_weight = sum(EVENT_NAME_WEIGHTS[name] * len(subs) for name, subs in self.subscribers.items())
        mix = {
            status: (1 - TAIL) * OLD_STATUS_WEIGHTS.get(status, 0) / sum(OLD_STATUS_WEIGHTS.values())
            + TAIL * TAIL_STATUS_WEIGHTS.get(status, 0) / sum(TAIL_STATUS_WEIGHTS.values())
            for status in TAIL_STATUS_WEIGHTS
        }
        expected = 0.0
        for name, subs in self.subscribers.items():
            for function, most in subs:
                transient, permanent = self._failures_of(function)
                share = EVENT_NAME_WEIGHTS[name] / total_weight
                rows = {
                    "succeeded": _mean(_truncated_geometric(q, 1, most), 1) if transient else 1,
                    "dead": (most if transient else 1)
                    if not permanent
                    else EXHAUSTED * (most if transient else 1)
                    + (1 - EXHAUSTED) * (_mean(_truncated_geometric(q, 1, most), 1) if transient else 1),
                    "retrying": _mean(_truncated_geometric(q, 1, most - 1), 1) if most > 1 else most,
                    "running": _mean(_truncated_geometric(q, 1, most), 1) - 1,
                    "pending": 0,
                    "cancelled": CANCELLED_WHILE_RETRYING * _mean(_truncated_geometric(q, 1, most - 1), 1)
                    if most > 1
                    else 0,
                }
                expected += share * sum(mix[status] * rows[status] for status in mix)
        return expected

    def _solve_q(self, target: float) -> float:
        low, high = math.log(1e-6), math.log(1e3)
        for _ in range(80):
            middle = (low + high) / 2
            if self._expected_attempt_rows(math.exp(middle)) < target:
                low = middle
            else:
                high = middle
        q = math.exp((low + high) / 2)
        reached = self._expected_attempt_rows(q)
        if abs(reached - target) > 0.05:
            print(f"note: {target} attempts per run is out of reach; about {reached:.2f} instead")
        return q

    def _attempts(self, low: int, high: int) -> int:
        if high <= low:
            return max(low, high)
        key = (low, high)
        cumulative = self.attempt_weights.get(key)
        if cumulative is None:
            cumulative = self.attempt_weights[key] = _truncated_geometric(self.q, low, high)
        return low + bisect.bisect(cumulative, self.rand.random() * cumulative[-1])

    # -- rows ------------------------------------------------------------------------------

    def _event_data(self, name: str, number: int) -> dict[str, Any]:
        rand = self.rand
        user_id: int | str = rand.randint(1, 5000)
        if rand.random() < 0.1:
            user_id = str(user_id)  # some senders send ids as text
        if name.startswith("api/source."):
            source_id = number  # one source per event
            return {"source_id": source_id, "user_id": user_id, "email": f"user{user_id}@example.com"}
        data: dict[str, Any] = {"user_id": user_id, "source_id": rand.randint(1, 200_000)}
        if name == "test/flaky":
            data["succeed_on"] = rand.randint(1, 4)
        elif name == "test/retry-after":
            data["seconds"] = 30
        elif name == "test/ok" and rand.random() < 0.2:
            data["note"] = "first order of the day"
        return data

    def batches(self, events_per_batch: int) -> Iterator[tuple[list[str], list[str], list[str]]]:
        """Lists of COPY lines (events, runs, attempts), a batch of events at a time."""
        events: list[str] = []
        runs: list[str] = []
        attempts: list[str] = []
        span = self.now_us - self.start_us
        tail_from = self.now_us - int(span * TAIL)
        rand = self.rand
        while self.runs_made < self.target_runs:
            name = self.names[bisect.bisect(self.name_cumulative, rand.random() * self.name_cumulative[-1])]
            # the event's time follows the runs made so far, so that the timeline ends now
            created = self.start_us + span * self.runs_made // self.target_runs + rand.randint(0, 999)
            self.events += 1
            data = self._event_data(name, self.events)
            event_id = _uuid7(created, rand)
            key = f"{name.rpartition('/')[2]}-{self.events}" if rand.random() < 0.3 else None
            events.append(f"{event_id}\t{name}\t{_esc(json.dumps(data))}\t{key or _NULL}\t{_ts(created)}\n")
            for offset, (function, most) in enumerate(self.subscribers[name]):
                if self.runs_made >= self.target_runs:
                    break
                self._run(
                    runs, attempts, event_id, name, data, function, most, created + offset + 1, tail_from
                )
            if len(events) >= events_per_batch:
                yield events, runs, attempts
                events, runs, attempts = [], [], []
        if events:
            yield events, runs, attempts

    def _run(
        self,
        runs: list[str],
        attempts: list[str],
        event_id: str,
        event_name: str,
        data: dict[str, Any],
        function: str,
        most: int,
        created: int,
        tail_from: int,
    ) -> None:
        rand = self.rand
        self.runs_made += 1
        run_id = _uuid7(created, rand)
        transient, permanent = self._failures_of(function)
        if created >= tail_from:
            status = self.tail_statuses[
                bisect.bisect(self.tail_cumulative, rand.random() * self.tail_cumulative[-1])
            ]
        else:
            status = self.old_statuses[
                bisect.bisect(self.old_cumulative, rand.random() * self.old_cumulative[-1])
            ]
        if status == "retrying" and (most < 2 or not transient):
            status = "dead"
        if status == "succeeded" and not transient and permanent and function == "tests.non_retriable":
            status = "dead"

        # how many attempts, and how the last recorded one ended
        final_failure: Failure | None = None
        if status == "succeeded":
            used = self._attempts(1, most) if transient else 1
            recorded = used
        elif status == "dead":
            if permanent and (not transient or rand.random() >= EXHAUSTED):
                used = self._attempts(1, most) if transient else 1
                final_failure = rand.choice(permanent)
            else:
                used = most
            recorded = used
        elif status == "retrying":
            used = recorded = self._attempts(1, most - 1)
        elif status == "running":
            used = self._attempts(1, most) if transient else 1
            recorded = used - 1  # the current attempt is recorded when it ends
        elif status == "cancelled" and most > 1 and transient and rand.random() < CANCELLED_WHILE_RETRYING:
            used = recorded = self._attempts(1, most - 1)
        else:  # pending, or cancelled before its first attempt
            used = recorded = 0

        t = end = created + rand.randint(20_000, 2_000_000)  # waiting in the queue
        started_at = t if used else None
        attempt_started_at = None
        last_error = ""
        finished_at = due_at = lease = None
        for number in range(1, recorded + 1):
            attempt_started_at = t
            host, pid = WORKERS[rand.randrange(len(WORKERS))]
            failure = None
            if number < recorded or status != "succeeded":
                failure = final_failure if number == recorded and final_failure else rand.choice(transient)
            if failure is not None and failure.outcome == "timed_out":
                duration = 600_000_000 if function != "tests.slow" else 500_000
            else:
                duration = int(math.exp(rand.uniform(math.log(3_000), math.log(4_000_000))))
            end = t + duration
            if failure is None:
                attempts.append(f"{run_id}\t{number}\t{_ts(t)}\t{_ts(end)}\tsucceeded\t\t\t\t{host}\t{pid}\n")
            else:
                message, traceback = failure.render(data, number)
                exc_type = failure.exc_type
                last_error = f"{exc_type}: {message}"[:1000]
                attempts.append(
                    f"{run_id}\t{number}\t{_ts(t)}\t{_ts(end)}\t{failure.outcome}\t{exc_type}\t"
                    f"{_esc(message)}\t{_esc(traceback)}\t{host}\t{pid}\n"
                )
            self.attempts_made += 1
            base = min(3600, 10 * 2 ** (number - 1))
            t = end + int(rand.uniform(base, base * 1.5) * 1_000_000)  # back-off before the next one
        if status in ("succeeded", "dead"):
            finished_at = min(end, self.now_us)
        elif status == "retrying":
            due_at = t
        elif status == "running":
            attempt_started_at = t  # the attempt in progress
            lease = t + 660_000_000  # its time limit plus the lease margin
        elif status == "pending":
            due_at = created
        elif status == "cancelled":
            finished_at = min(t, self.now_us)
        result = _NULL
        if status == "succeeded":
            value = _result(function, data, used)
            if value is not None:
                result = _esc(json.dumps(value))
        runs.append(
            f"{run_id}\t{event_id}\t{event_name}\t{function}\t{status}\t{used}\t{most}\t{result}\t"
            f"{_esc(last_error)}\t{_opt_ts(due_at)}\t{_opt_ts(lease)}\t{_opt_ts(started_at)}\t"
            f"{_opt_ts(attempt_started_at)}\t{_opt_ts(finished_at)}\t{_ts(created)}\n"
        )


def _opt_ts(micros: int | None) -> str:
    return _NULL if micros is None else _ts(micros)


def _cumulative(weights: Any) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


# -- the database ------------------------------------------------------------------------------


def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    server = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(server, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def secondary_indexes(conn: Any) -> list[tuple[str, str]]:
    """(name, definition) of the indexes on the three tables that back no constraint."""
    return conn.execute(
        """
        SELECT ci.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        JOIN pg_class ci ON ci.oid = i.indexrelid
        JOIN pg_class ct ON ct.oid = i.indrelid
        WHERE ct.relname = ANY(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        ORDER BY ct.relname, ci.relname
        """,
        [list(COLUMNS)],
    ).fetchall()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs to create (default 1,000,000)")
    parser.add_argument(
        "--attempts-per-run", type=float, default=3.0, help="average attempts per run (default 3)"
    )
    parser.add_argument("--days", type=float, default=60.0, help="the history spans the last DAYS days")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--batch", type=int, default=20_000, help="events per COPY batch")
    parser.add_argument("--reset", action="store_true", help="empty the tables first if they have rows")
    args = parser.parse_args(argv)

    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    sys.path.insert(0, str(ROOT))
    clock = time.perf_counter()
    ensure_database(args.database_url)

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    print(f"migrated in {time.perf_counter() - clock:.1f} s")

    import psycopg
    from psycopg.copy import QueuedLibpqWriter

    history = History(args.runs, args.attempts_per_run, args.days, args.seed)
    tables = ", ".join(COLUMNS)
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {EVENT_TABLE})").fetchone()[0]:  # type: ignore[index]
            if not args.reset:
                sys.exit("The tables already have rows: pass --reset to empty them first.")
            conn.execute(f"TRUNCATE {tables}")
            print("emptied the tables")
        indexes = secondary_indexes(conn)
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        print(f"dropped {len(indexes)} secondary indexes for the load")
        try:
            clock = time.perf_counter()
            load(args.database_url, history, args.batch, QueuedLibpqWriter)
            loading = time.perf_counter() - clock
        finally:
            clock = time.perf_counter()
            conn.execute("SET maintenance_work_mem = '1GB'")
            conn.execute("SET max_parallel_maintenance_workers = 2")
            for name, definition in indexes:
                started = time.perf_counter()
                conn.execute(definition)
                print(f"  rebuilt {name} in {time.perf_counter() - started:.1f} s")
            indexing = time.perf_counter() - clock
        clock = time.perf_counter()
        conn.execute(f"VACUUM (ANALYZE) {tables}")
        vacuum = time.perf_counter() - clock
        sizes = conn.execute(
            "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
            "WHERE relname = ANY(%s) ORDER BY relname",
            [list(COLUMNS)],
        ).fetchall()
        database = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
    print(
        f"{history.events:,} events, {history.runs_made:,} runs, {history.attempts_made:,} attempts: "
        f"load {loading:.1f} s, indexes {indexing:.1f} s, VACUUM ANALYZE {vacuum:.1f} s"
    )
    print("sizes: " + ", ".join(f"{name} {size}" for name, size in sizes) + f"; database {database[0]}")  # type: ignore[index]


def load(url: str, history: History, events_per_batch: int, writer: Any) -> None:
    """Stream the history into the three tables: one connection and one COPY per table.

    Each COPY is written to by a thread of its own (psycopg's ``QueuedLibpqWriter``), so
    the server parses rows while this process makes the next ones; each table is loaded
    in one transaction, committed at the end.
    """
    import psycopg

    with ExitStack() as stack:
        connections = {table: stack.enter_context(psycopg.connect(url)) for table in COLUMNS}
        with ExitStack() as copying:
            copies = {}
            for table, conn in connections.items():
                conn.execute("SET synchronous_commit = off")
                try:  # no FK triggers: the rows are consistent by construction
                    conn.execute("SET session_replication_role = replica")
                except psycopg.errors.InsufficientPrivilege:
                    conn.rollback()  # not a superuser: the foreign keys are checked at commit
                cursor = copying.enter_context(conn.cursor())
                copies[table] = copying.enter_context(
                    cursor.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN", writer=writer(cursor))
                )
            clock = time.perf_counter()
            for batch in history.batches(events_per_batch):
                for table, lines in zip(COLUMNS, batch, strict=True):
                    copies[table].write("".join(lines))
                print(
                    f"\r{history.runs_made:>10,} runs  {history.attempts_made:>10,} attempts  "
                    f"{history.events:>9,} events  {time.perf_counter() - clock:6.1f} s",
                    end="",
                    flush=True,
                )
        print(f"  (all sent and parsed in {time.perf_counter() - clock:.1f} s)")
        for conn in connections.values():  # events first: runs refer to them, attempts to runs
            conn.commit()


if __name__ == "__main__":
    main()
