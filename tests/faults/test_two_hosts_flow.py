"""Scenario: flow control across two worker hosts, and one host is cut off from the network.

Each host is a network namespace of its own (tests/faults/netns.py) with one ``rundramatiq``;
PostgreSQL and Redis are private servers that the hosts reach over their veth links. Cutting
host a's link leaves its workers running, holding what they held (runs, concurrency slots,
messages), unable to finish or give anything back, as a host lost from the network would.

* Concurrency: ``tests.flow_limited`` (``Concurrency(2, key="data.k")``, each attempt a ``Span``
  row around 0.2 s of sleep) over several keys; host a is cut while it holds slots. The limit
  holds over every span of both hosts, counting a span of host a that never ended as running
  until its attempt's lease ended (its slot counted until then: that is the promise), and host
  b runs every run to success, those host a held once their lease is over.
* Cron: both hosts run the every-second function of ``tests/cronapp``; host a is cut while it
  is in the middle of a tick. Each second still has one tick, with one run, which succeeds:
  host b fires every tick after the cut, and the one host a held once its lease is over.

Host a is never brought back: what it still holds stays with it (tests/faults/test_two_hosts.py
shows a host that comes back).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest

from django_events.cron import CRON_EVENT
from tests.cronapp import BLOCK_ENV, EVERY_SECOND, EVERY_SECOND_CALL

from .harness import ROOT, WORKER_SETTINGS, child_pids, patience, report, wait_until, worker_env
from .netns import WorkerHost, hosts_postgres, hosts_redis, worker_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.own_postgres]

#: ``tests.flow_limited``'s function id, the name of its ``Span`` rows, and its limit per key.
LIMITED, LIMITED_SPAN, LIMIT = "tests.flow_limited", "limited", 2
#: The concurrency scenario: keys, runs per key, and each attempt's sleep.
KEYS, PER_KEY, SLEEP = 4, 40, 0.2
#: The time limit of functions that set none, in the concurrency scenario's processes: it makes
#: ``tests.flow_limited``'s lease (and its slots') ``LIMITED_LEASE``, not Dramatiq's ten minutes.
DEFAULT_TIME_LIMIT = 2.0
LIMITED_LEASE = dt.timedelta(seconds=DEFAULT_TIME_LIMIT + WORKER_SETTINGS["LEASE_MARGIN"])

#: The lease of a tick of the every-second function: its time limit (5 s) plus LEASE_MARGIN.
TICK_LEASE = dt.timedelta(seconds=5 + WORKER_SETTINGS["LEASE_MARGIN"])
#: PostgreSQL gives up on a client whose unacknowledged data is 4 s old. Its keepalives (netns'
#: LOST_CLIENT_SETTINGS) do not probe a connection with data in flight: a host cut off just after
#: PostgreSQL sent it a statement's result kept its transaction, and the row locks of a flow key
#: or a cron memory in it, for the minutes of TCP's retransmissions, and host b waited on them.
LOST_CLIENT_TIMEOUT = "tcp_user_timeout=4000"
#: Every tick up to this long after the cut must have run, on host b, before the checks.
AFTER_CUT = dt.timedelta(seconds=12)


class Attempt(NamedTuple):
    """An attempt's row, as far as the checks need it."""

    number: int
    outcome: str
    host: str
    pid: int | None
    started_at: dt.datetime
    finished_at: dt.datetime


class Span(NamedTuple):
    """A ``Span`` row of ``tests.flow_limited``: one attempt's handler, from its start to its end."""

    run_id: uuid.UUID
    key: str
    pid: int
    started_at: dt.datetime
    ended_at: dt.datetime | None


def most_at_once(intervals: Sequence[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most ``[start, end)`` intervals that overlap at any instant (one ending as another starts
    does not overlap it)."""
    moments = sorted([(end, -1) for _start, end in intervals] + [(start, 1) for start, _end in intervals])
    most = current = 0
    for _at, step in moments:  # at equal times, an end (-1) sorts before a start
        current += step
        most = max(most, current)
    return most


def worker_pids(host: WorkerHost) -> set[int]:
    """The pids of the host's ``rundramatiq`` processes and of their worker processes."""
    return {pid for process in host.workers.processes for pid in {process.pid, *child_pids(process.pid)}}


def ready(*hosts: WorkerHost) -> bool:
    """the worker process of every host is ready"""
    for host in hosts:
        host.workers.assert_alive()
        logs = host.workers.logs
        if not logs or not all(
            log.exists() and "Worker process is ready for action" in log.read_text(errors="replace")
            for log in logs
        ):
            return False
    return True


class Database:
    """The private cluster's database, read with psycopg from this (the root) namespace."""

    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def value(self, sql: str, *params: object) -> Any:
        return self.rows(sql, *params)[0][0]

    def now(self) -> dt.datetime:
        moment = self.value("SELECT now()")
        assert isinstance(moment, dt.datetime)
        return moment

    def statuses(self, function: str) -> Counter[str]:
        rows = self.rows(
            "SELECT status, COUNT(*) FROM django_events_run WHERE function = %s GROUP BY 1", function
        )
        return Counter(dict(rows))

    def attempts(self, function: str) -> dict[uuid.UUID, list[Attempt]]:
        """Every attempt of ``function``'s runs, by run, in order."""
        found: dict[uuid.UUID, list[Attempt]] = defaultdict(list)
        rows = self.rows(
            "SELECT a.run_id, a.number, a.outcome, a.worker_host, a.worker_pid, a.started_at, a.finished_at "
            "FROM django_events_attempt a JOIN django_events_run r ON r.id = a.run_id "
            "WHERE r.function = %s ORDER BY a.run_id, a.number",
            function,
        )
        for run_id, *attempt in rows:
            found[run_id].append(Attempt(*attempt))
        return found


# -- concurrency -------------------------------------------------------------------------------------


def test_concurrency_limit_holds_across_two_hosts_when_one_is_cut_off_holding_slots(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(KEYS)]
    total = KEYS * PER_KEY
    with (
        worker_hosts(2, log_dir=tmp_path) as (a, b),
        hosts_postgres((a, b), LOST_CLIENT_TIMEOUT) as postgres,
        hosts_redis((a, b), tmp_path) as redis_server,
    ):
        url = postgres.url("django_events_two_hosts_concurrency")
        env = worker_env(
            DATABASE_URL=url,
            DJANGO_EVENTS_TEST_DATABASE_NAME=None,
            REDIS_URL=redis_server.url,
            DJANGO_EVENTS_TEST_SETTINGS=json.dumps(
                {**WORKER_SETTINGS, "DEFAULT_TIME_LIMIT": DEFAULT_TIME_LIMIT}
            ),
        )
        postgres.migrated_database("django_events_two_hosts_concurrency", env)
        db = Database(url)
        peak_held = 0

        def state() -> object:
            return dict(db.statuses(LIMITED)), a.workers.tail(1500), b.workers.tail(1500)

        # Given a rundramatiq of four threads on each host (8 threads for 4 keys of 2 slots each)
        a.start(env)
        b.start(env)
        wait_until(lambda: ready(a, b), timeout=patience(60), what=ready.__doc__ or "", describe=state)
        pids_a, pids_b = worker_pids(a), worker_pids(b)
        assert pids_a
        assert pids_b
        assert not pids_a & pids_b

        # ...and 40 runs of each key committed at once from this machine, ten per transaction, by one
        # sender per key, so that both hosts meet many runs of each key at the same time
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "tests.faults.driver", f"flow/limited={PER_KEY}"),
                    *("--per-transaction", "10", "--data", json.dumps({"k": key, "sleep": SLEEP})),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for key in keys
        ]
        for sender in senders:
            _out, err = sender.communicate(timeout=patience(120))
            assert sender.returncode == 0, err[-3000:]

        # When host a is cut off from the network while both hosts are at work and host a holds slots:
        # a handler of its worker started less than half its sleep ago (so that it is still running
        # when the link goes down, a few milliseconds later)
        def holding() -> bool:
            """both hosts ran handlers, and host a has just started one"""
            nonlocal peak_held
            peak_held = max(peak_held, db.statuses(LIMITED)["held"])
            rows = db.rows(
                "SELECT pid, ended_at IS NULL, started_at > now() - %s, COUNT(*) FROM testapp_span "
                "WHERE function = %s GROUP BY 1, 2, 3",
                dt.timedelta(seconds=SLEEP / 2),
                LIMITED_SPAN,
            )
            ended: Counter[int] = Counter()
            for pid, is_open, _recent, n in rows:
                ended[pid] += 0 if is_open else n
            just_started_on_a = any(is_open and recent and pid in pids_a for pid, is_open, recent, _n in rows)
            ran = (sum(n for pid, n in ended.items() if pid in pids) for pids in (pids_a, pids_b))
            return all(n >= 10 for n in ran) and just_started_on_a

        wait_until(holding, timeout=patience(60), what=holding.__doc__ or "", describe=state, interval=0.02)
        a.cut()
        cut_at = db.now()
        succeeded_at_cut = db.statuses(LIMITED)["succeeded"]
        assert not a.reaches(postgres.port)
        assert not a.reaches(redis_server.port)
        assert b.reaches(postgres.port)

        # Then host b runs every run to the end
        def final() -> bool:
            """every run of tests.flow_limited is final"""
            nonlocal peak_held
            found = db.statuses(LIMITED)
            peak_held = max(peak_held, found["held"])
            return sum(found[s] for s in ("succeeded", "dead", "cancelled", "skipped")) >= total

        wait_until(final, timeout=patience(60), what=final.__doc__ or "", describe=state, interval=0.1)
        took = time.monotonic() - started
        b.workers.assert_alive()
        a.workers.assert_alive()  # cut off, not dead: its workers still hold what they held
        statuses = db.statuses(LIMITED)
        attempts = db.attempts(LIMITED)
        spans = [
            Span(*row)
            for row in db.rows(
                "SELECT run_id::uuid, key, pid, started_at, ended_at FROM testapp_span WHERE function = %s",
                LIMITED_SPAN,
            )
        ]
        runs_of = dict(
            db.rows(
                "SELECT id, (SELECT data->>'k' FROM django_events_event WHERE id = event_id) "
                "FROM django_events_run WHERE function = %s",
                LIMITED,
            )
        )
        slots_left = db.value("SELECT COUNT(*) FROM django_events_slot")
        a.kill()

    # Then every run succeeded, none lost: as many runs as sent, per key
    assert statuses == Counter({"succeeded": total}), statuses
    assert Counter(runs_of.values()) == dict.fromkeys(keys, PER_KEY)
    assert slots_left == 0, "a slot outlived its run"
    # ...each with one succeeded attempt, its last, after attempts lost with their worker only
    for run_id, history in attempts.items():
        outcomes = [attempt.outcome for attempt in history]
        assert [attempt.number for attempt in history] == list(range(1, len(history) + 1)), history
        assert outcomes[-1] == "succeeded", (run_id, history)
        assert set(outcomes[:-1]) <= {"lost"}, (run_id, history)
    assert set(attempts) == set(runs_of)

    # ...every span is attributed to a host by its process, and host b's all ended
    assert {span.pid for span in spans} <= pids_a | pids_b
    assert all(span.ended_at is not None for span in spans if span.pid in pids_b)
    # ...and every run had a handler that ran to its end
    assert {span.run_id for span in spans if span.ended_at is not None} == set(runs_of)

    def attempt_of(span: Span) -> Attempt:
        """the attempt a span belongs to: the last claimed at or before the handler started"""
        return [attempt for attempt in attempts[span.run_id] if attempt.started_at <= span.started_at][-1]

    # ...a span of host a that never ended held its slot until its attempt's lease ended: count it as
    # running until then. Its attempt was recorded lost, by host b's recovery, once the lease was over.
    intervals: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    open_on_a = []
    for span in spans:
        if span.ended_at is None:
            attempt = attempt_of(span)
            assert attempt.outcome == "lost", (span, attempts[span.run_id])
            intervals[span.key].append((span.started_at, attempt.started_at + LIMITED_LEASE))
            open_on_a.append(span)
        else:
            intervals[span.key].append((span.started_at, span.ended_at))
    at_once = {key: most_at_once(found) for key, found in intervals.items()}
    # ...and no key ever had more than 2 handlers running at once, across both hosts and the cut
    assert max(at_once.values()) <= LIMIT, f"keys over the limit of {LIMIT}: {at_once}"
    # (and the limit was reached, runs waited for a slot, and the cut caught host a holding slots)
    assert all(most == LIMIT for most in at_once.values()), at_once
    assert peak_held > 0
    assert open_on_a, "the cut caught no handler of host a running"
    assert succeeded_at_cut < total

    # And host a recorded nothing once cut off; every attempt begun after the cut ran on host b
    recorded = [attempt for history in attempts.values() for attempt in history]
    assert all(x.finished_at <= cut_at for x in recorded if x.host == a.hostname)
    assert all(x.host == b.hostname for x in recorded if x.started_at > cut_at)
    assert {x.pid for x in recorded if x.host == a.hostname and x.outcome == "succeeded"} <= pids_a
    # ...and the runs host a held when cut off came back once their lease was over, to host b
    taken_back = {run_id: history for run_id, history in attempts.items() if len(history) > 1}
    assert {span.run_id for span in open_on_a} <= set(taken_back)
    for run_id, history in taken_back.items():
        for lost, after in itertools.pairwise(history):
            assert after.started_at >= lost.started_at + LIMITED_LEASE, f"run {run_id} ran again in its lease"
        assert (history[-1].host, history[-1].started_at > cut_at) == (b.hostname, True), history

    succeeded_on = Counter(history[-1].host for history in attempts.values())
    report(
        "two_hosts_flow_concurrency",
        {
            "runs": total,
            "keys": KEYS,
            "seconds_from_send_to_all_final": round(took, 1),
            "succeeded_at_cut": succeeded_at_cut,
            "succeeded_on_a": succeeded_on[a.hostname],
            "succeeded_on_b": succeeded_on[b.hostname],
            "handlers_of_a_cut_mid_run": len(open_on_a),
            "runs_held_by_a_at_cut": len(taken_back),
            "runs_executed_twice": sum(
                1 for run_id in runs_of if sum(1 for span in spans if span.run_id == run_id) > 1
            ),
            "most_held_seen": peak_held,
            "most_running_per_key": at_once,
        },
    )


# -- cron --------------------------------------------------------------------------------------------


class Tick(NamedTuple):
    """A tick event of the every-second function and its runs."""

    at: dt.datetime
    runs: list[tuple[uuid.UUID, str, int]]  # run id, status, attempts


def test_each_cron_tick_fires_once_when_one_of_two_hosts_is_cut_off_mid_tick(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    with (
        worker_hosts(2, log_dir=tmp_path) as (a, b),
        hosts_postgres((a, b), LOST_CLIENT_TIMEOUT) as postgres,
        hosts_redis((a, b), tmp_path) as redis_server,
    ):
        url = postgres.url("django_events_two_hosts_cron")
        env = worker_env(
            DJANGO_SETTINGS_MODULE="tests.cronapp.settings",
            DATABASE_URL=url,
            DJANGO_EVENTS_TEST_DATABASE_NAME=None,
            REDIS_URL=redis_server.url,
        )
        postgres.migrated_database("django_events_two_hosts_cron", env)
        db = Database(url)

        def ticks() -> list[Tick]:
            """the tick events of the every-second function, oldest first, with their runs"""
            found: dict[uuid.UUID, Tick] = {}
            for event_id, at, run_id, status, attempts in db.rows(
                "SELECT e.id, e.data->>'scheduled_at', r.id, r.status, r.attempts FROM django_events_event e "
                "LEFT JOIN django_events_run r ON r.event_id = e.id "
                "WHERE e.name = %s AND e.data->>'function' = %s",
                CRON_EVENT,
                EVERY_SECOND,
            ):
                tick = found.setdefault(event_id, Tick(dt.datetime.fromisoformat(at), []))
                if run_id is not None:
                    tick.runs.append((run_id, status, attempts))
            return sorted(found.values())

        def succeeded_on(host: WorkerHost) -> int:
            return int(
                db.value(
                    "SELECT COUNT(*) FROM django_events_attempt a "
                    "JOIN django_events_run r ON r.id = a.run_id "
                    "WHERE r.function = %s AND a.worker_host = %s AND a.outcome = 'succeeded'",
                    EVERY_SECOND,
                    host.hostname,
                )
            )

        def state() -> object:
            return dict(db.statuses(EVERY_SECOND)), a.workers.tail(1500), b.workers.tail(1500)

        # Given both hosts running the every-second function (catch_up="all"), each with a rundramatiq
        # of two threads; in host a, the first tick run once the test deletes the file `blocked` blocks
        blocked.write_text("disarmed")
        a.start({**env, BLOCK_ENV: str(blocked)}, threads=2)
        b.start(env, threads=2)

        def both_ran() -> bool:
            """both hosts ran ticks"""
            return succeeded_on(a) >= 2 and succeeded_on(b) >= 2

        wait_until(both_ran, timeout=patience(60), what=both_ran.__doc__ or "", describe=state, interval=0.2)
        pids_a = worker_pids(a)

        # When host a is cut off from the network in the middle of a tick: its function has recorded its
        # call and blocks
        blocked.unlink()

        def blocking() -> list[str]:
            """a tick's function blocks in host a"""
            words = blocked.read_text().split() if blocked.exists() else []
            return words if len(words) == 2 else []

        pid, run_id = wait_until(blocking, timeout=patience(30), what=blocking.__doc__ or "", interval=0.02)
        a.cut()
        cut_at = db.now()
        assert int(pid) in pids_a
        assert not a.reaches(postgres.port)
        assert not a.reaches(redis_server.port)
        assert b.reaches(postgres.port)

        # Then host b fires every tick: wait until every one up to 12 s after the cut has succeeded
        cutoff = cut_at + AFTER_CUT

        def caught_up() -> bool:
            """every tick up to 12 s after the cut succeeded"""
            found = ticks()
            due = [tick for tick in found if tick.at <= cutoff]
            return (
                bool(found)
                and found[-1].at > cutoff
                and all([status for _r, status, _n in tick.runs] == ["succeeded"] for tick in due)
            )

        wait_until(
            caught_up, timeout=patience(60), what=caught_up.__doc__ or "", describe=state, interval=0.2
        )
        b.workers.assert_alive()
        a.workers.assert_alive()
        found = ticks()
        attempts = db.attempts(EVERY_SECOND)
        calls = Counter(
            (uuid.UUID(run), attempt)
            for run, attempt in db.rows(
                "SELECT run_id, attempt FROM testapp_call WHERE function = %s", EVERY_SECOND_CALL
            )
        )
        a.kill()
        b.stop()

    # Then each second from the first tick on has one tick event, with one run: none missing (catch_up
    # "all" would fire a missed one late, but none was missed), none doubled
    times = [tick.at for tick in found]
    assert all(later - earlier == dt.timedelta(seconds=1) for earlier, later in itertools.pairwise(times)), (
        times
    )
    assert all(len(tick.runs) == 1 for tick in found), [tick for tick in found if len(tick.runs) != 1]
    # ...every tick up to 12 s after the cut succeeded, its function called once per attempt, once by
    # its succeeded attempt, the last, after attempts lost with their worker only
    due = [tick for tick in found if tick.at <= cutoff]
    assert due[0].at < cut_at < due[-1].at
    assert set(calls.values()) == {1}
    for tick in due:
        ((tick_run, _status, count),) = tick.runs
        history = attempts[tick_run]
        assert [x.number for x in history] == list(range(1, count + 1))
        assert history[-1].outcome == "succeeded", history
        assert {x.outcome for x in history[:-1]} <= {"lost"}, history
        assert calls[(tick_run, count)] == 1
    # ...host a recorded nothing once cut off, and host b ran every tick begun after the cut
    recorded = [x for history in attempts.values() for x in history]
    assert all(x.finished_at <= cut_at for x in recorded if x.host == a.hostname)
    after_cut = [attempts[tick.runs[0][0]][-1] for tick in due if tick.at > cut_at]
    assert after_cut
    assert all(x.host == b.hostname for x in after_cut), after_cut
    assert all(x.host == b.hostname for x in recorded if x.started_at > cut_at)
    # ...and the tick host a was running when cut off ran again on host b once its lease was over
    blocked_tick = attempts[uuid.UUID(run_id)]
    assert [x.outcome for x in blocked_tick] == ["lost", "succeeded"], blocked_tick
    assert blocked_tick[1].host == b.hostname
    assert blocked_tick[1].started_at >= blocked_tick[0].started_at + TICK_LEASE
    assert calls[(uuid.UUID(run_id), 1)] == 1  # host a called the function before it blocked

    late = [
        (attempts[tick.runs[0][0]][0].started_at - tick.at).total_seconds()
        for tick in due
        if tick.at > cut_at
    ]
    report(
        "two_hosts_flow_cron",
        {
            "ticks": len(found),
            "ticks_checked": len(due),
            "ticks_after_cut_checked": len(after_cut),
            "ticks_succeeded_on_a": sum(1 for h in attempts.values() if h[-1].host == a.hostname),
            "ticks_succeeded_on_b": sum(
                1 for h in attempts.values() if h[-1].host == b.hostname and h[-1].outcome == "succeeded"
            ),
            "ticks_run_twice": sum(1 for tick in due if tick.runs[0][2] > 1),
            "lost_attempt_recorded_by": blocked_tick[0].host,
            "seconds_from_cut_to_held_tick_done": round(
                (blocked_tick[1].finished_at - cut_at).total_seconds(), 1
            ),
            "most_late_first_start_after_cut_s": round(max(late), 2),
        },
    )
