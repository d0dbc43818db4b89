"""A worker SIGKILLed while it holds concurrency slots: nothing lost, nothing doubled, the limit
held throughout, and each slot back once the killed attempt's lease has ended.

Two ``rundramatiq`` processes (four threads each) work through runs of
``tests.faults_limited`` (``tests/testapp/flow_events.py``): ``Concurrency(1, key="data.k")``,
a time limit of 2 s, so a lease of 3 s with the faults' ``LEASE_MARGIN`` of 1 s; each handler
writes a ``Span`` row (start, end, key, process) around a sleep of 1.5 s. One worker is killed
(its whole process group) while it runs handlers of several keys. A slot cannot come back
before the lease of the attempt that holds it ends (nothing tells a dead worker from a slow
one before then); it must come back at most :data:`RECOVERY` plus :data:`SLOT_SLACK` after
that: a recovery pass finds the lease over and records the attempt lost, and the run (or a
held run of its key) is sent, claimed with the slot, and started.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter, defaultdict

import pytest
from django.db import connection
from django.utils import timezone

import django_events
from django_events.models import Attempt, AttemptOutcome, Run, RunStatus, Slot
from tests.testapp.models import Span

from .harness import WORKER_SETTINGS, Workers, child_pids, patience, report, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.flow_workers]

FUNCTION, SPAN = "tests.faults_limited", "faults_limited"
#: Keys, runs of each key, and how long each handler sleeps. No more keys than a worker has threads:
#: after the kill the other worker has a thread free for each key, so the time a key waits is its
#: slot's, not a thread's.
KEYS, PER_KEY, SLEEP = 4, 5, 1.5
#: The lease of an attempt of ``tests.faults_limited``: its time limit plus the faults' LEASE_MARGIN.
LEASE = dt.timedelta(seconds=2 + WORKER_SETTINGS["LEASE_MARGIN"])
#: How often each worker's recovery pass runs (it jitters a little around this).
RECOVERY = dt.timedelta(seconds=WORKER_SETTINGS["RECOVERY_INTERVAL"])
#: After the recovery pass that finds a lease over and records the attempt lost: a message sent and
#: delivered (an idle Redis consumer backs off up to a second between fetches), the claim, the
#: handler's start. Measured on a 2-CPU machine shared with other test sessions: 0.36-0.66 s from
#: the lost attempt's record to the key's next start, 0.54-1.15 s after the lease's end, 3.4-4.1 s
#: after the kill (``pytest -s``: the report's figures).
SLOT_SLACK = dt.timedelta(seconds=1.5)
#: Kill only while the victim's running handlers all started less than this long ago, so that none
#: of them can end (and record its outcome) between the look and the kill.
YOUNG = dt.timedelta(seconds=SLEEP - 0.3)


@pytest.fixture
def fleet(workers: Workers, private_broker: object) -> Workers:
    """Two workers on the private Redis, ready, and ``send()`` in this process sending to it."""
    workers.start(2)

    def ready() -> bool:
        """both workers are ready"""
        workers.assert_alive()
        return all(
            log.exists() and "Worker process is ready for action" in log.read_text(errors="replace")
            for log in workers.logs
        )

    wait_until(ready, timeout=90, what=ready.__doc__ or "", describe=workers.tail)
    return workers


def test_a_worker_killed_holding_concurrency_slots_loses_no_run_doubles_none_and_its_slots_come_back(
    fleet: Workers,
) -> None:
    # Given two workers, and 5 runs for each of 4 keys of a function that allows one attempt at a
    # time per key (each handler sleeping 1.5 s)
    keys = [f"k{i}" for i in range(KEYS)]
    total = KEYS * PER_KEY
    django_events.send_many(
        [
            {"name": "faults/limited", "data": {"k": key, "n": n, "sleep": SLEEP}}
            for n, key in enumerate(keys * PER_KEY)
        ]
    )

    # When a worker runs handlers of at least two keys (so it holds two slots), all started recently,
    # and every handler of it that ended has its outcome recorded, it is SIGKILLed with its whole
    # process group. (Which worker gets to that depends on who takes the messages: a message that
    # finds its key full runs the run a slot was kept for, so one worker may run them all.)
    pids_of: dict[int, set[int]] = defaultdict(set)
    victim = -1

    def holding_slots() -> bool:
        """a worker runs two handlers or more, all young, none ended and unrecorded"""
        nonlocal victim
        for index, process in enumerate(fleet.processes):
            pids = pids_of[index]
            pids.update(child_pids(process.pid))
            spans = list(
                Span.objects.filter(function=SPAN, pid__in=pids).values_list("started_at", "ended_at")
            )
            running = [start for start, end in spans if end is None]
            ended = sum(1 for _start, end in spans if end is not None)
            recorded = Attempt.objects.filter(
                run__function=FUNCTION, worker_pid__in=pids, outcome=AttemptOutcome.SUCCEEDED
            ).count()
            young = all(timezone.now() - start < YOUNG for start in running)
            if len(running) >= 2 and young and ended == recorded:
                victim = index
                return True
        return False

    wait_until(holding_slots, timeout=patience(60), what=holding_slots.__doc__ or "", describe=fleet.tail)
    victim_pids = pids_of[victim]
    kill_sent = timezone.now()
    fleet.kill_one(victim)
    killed_at = timezone.now()  # the victim is dead by now: its spans end here at the latest

    # Then the other worker finishes every run
    def settled() -> bool:
        """every run is final"""
        fleet.assert_alive()
        return (
            not Run.objects.filter(function=FUNCTION)
            .exclude(status__in=[RunStatus.SUCCEEDED, RunStatus.DEAD, RunStatus.CANCELLED])
            .exists()
        )

    wait_until(
        settled,
        timeout=patience(120),
        what=settled.__doc__ or "",
        describe=lambda: (
            Counter(Run.objects.filter(function=FUNCTION).values_list("status", flat=True)),
            fleet.tail(),
        ),
    )

    # ...none lost: every run succeeded, and no slot is left taken
    runs = dict(Run.objects.filter(function=FUNCTION).values_list("pk", "status"))
    assert len(runs) == total
    assert Counter(runs.values()) == {RunStatus.SUCCEEDED: total}
    assert not Slot.objects.filter(run_id__in=runs).exists()

    # ...none doubled: each run's handler ended once, in the process that recorded its success;
    # every handler that did not end ran in the killed worker, and its attempt was recorded lost
    attempts = list(
        Attempt.objects.filter(run__function=FUNCTION).values_list(
            "run_id", "number", "outcome", "worker_pid", "started_at", "finished_at"
        )
    )
    spans = list(
        Span.objects.filter(function=SPAN).values_list("run_id", "key", "pid", "started_at", "ended_at")
    )
    succeeded = {
        str(run): pid for run, _n, outcome, pid, _s, _f in attempts if outcome == AttemptOutcome.SUCCEEDED
    }
    lost = {
        str(run): start for run, _n, outcome, _pid, start, _f in attempts if outcome == AttemptOutcome.LOST
    }
    lost_recorded = {
        str(run): at for run, _n, outcome, _p, _s, at in attempts if outcome == AttemptOutcome.LOST
    }
    assert len(succeeded) == total
    assert Counter(outcome for _r, _n, outcome, _p, _s, _f in attempts) == {
        AttemptOutcome.SUCCEEDED: total,
        AttemptOutcome.LOST: len(lost),
    }
    assert all(Run.objects.get(pk=run).attempts == 2 for run in lost)
    ended = Counter(run for run, _k, _p, _s, end in spans if end is not None)
    assert ended == dict.fromkeys(succeeded, 1), "a run's handler ended twice, or never"
    assert {(run, pid) for run, _k, pid, _s, end in spans if end is not None} == set(succeeded.items())
    killed = [(run, key, start) for run, key, pid, start, end in spans if end is None]
    assert {pid for _r, _k, pid, _s, end in spans if end is None} <= victim_pids
    assert len(killed) >= 2, "the kill hit fewer than two running handlers"
    assert {run for run, _k, _s in killed} <= set(lost), "a killed handler's attempt was not recorded lost"
    assert all(start < kill_sent for _r, _k, start in killed)

    # ...the limit held throughout: never two handlers of a key at once, a killed one counted as
    # running until the kill
    intervals: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for _run, key, _pid, start, end in spans:
        intervals[key].append((start, end or killed_at))
    overlapping = {key: pair for key, found in intervals.items() if (pair := _overlap(found))}
    assert overlapping == {}, f"two handlers of a key at once: {overlapping}"

    # ...and each killed key's slot came back after the killed attempt's lease ended, within a
    # recovery pass and SLOT_SLACK of it
    back_after_kill, back_after_lease, recorded_after_lease, started_after_recorded = {}, {}, {}, {}
    for run, key, _start in killed:
        lease_end = lost[run] + LEASE
        following = min(start for _r, k, _p, start, _e in spans if k == key and start > kill_sent)
        back_after_kill[key] = (following - kill_sent).total_seconds()
        back_after_lease[key] = (following - lease_end).total_seconds()
        recorded_after_lease[key] = (lost_recorded[run] - lease_end).total_seconds()
        started_after_recorded[key] = (following - lost_recorded[run]).total_seconds()
    report(
        f"flow_worker_killed_holding_slots_{connection.vendor}",
        {
            "runs": total,
            "keys": KEYS,
            "handlers_killed": len(killed),
            "attempts_lost": len(lost),
            "killed_before_their_handler_started": len(set(lost) - {run for run, _k, _s in killed}),
            "lease_s": LEASE.total_seconds(),
            "slot_back_after_kill_s": {k: round(v, 2) for k, v in sorted(back_after_kill.items())},
            "slot_back_after_lease_end_s": {k: round(v, 2) for k, v in sorted(back_after_lease.items())},
            "lost_recorded_after_lease_end_s": {
                k: round(v, 2) for k, v in sorted(recorded_after_lease.items())
            },
            "next_start_after_lost_recorded_s": {
                k: round(v, 2) for k, v in sorted(started_after_recorded.items())
            },
            "kill_took_s": round((killed_at - kill_sent).total_seconds(), 3),
        },
    )
    assert min(back_after_lease.values()) >= 0, f"a slot came back before its lease ended: {back_after_lease}"
    bound = (LEASE + RECOVERY + SLOT_SLACK).total_seconds()
    late = {key: after for key, after in back_after_kill.items() if after > bound}
    assert late == {}, f"slots back later than {bound} s after the kill: {late}"


def _overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> tuple[object, object] | None:
    """Two of ``[start, end)`` that overlap (one ending as the other starts does not), or ``None``."""
    for earlier, later in itertools.pairwise(sorted(intervals)):
        if later[0] < earlier[1]:
            return earlier, later
    return None
