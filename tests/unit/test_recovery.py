"""Recovery passes, the operator commands, signals, the run.dead event and logging."""

from __future__ import annotations

import datetime as dt
import logging
from io import StringIO

import dramatiq
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware.shutdown import Shutdown

import django_events
from django_events import dispatch, recovery, signals
from django_events.execution import RUN_DEAD_EVENT, Execution, execute_run, record
from django_events.models import Attempt, AttemptOutcome, Event, Run, RunStatus
from django_events.recovery import NO_COUNT, QUEUE_EMPTY, recover
from django_events.registry import function, unregister
from django_events.testing import run_all, run_due
from tests.testapp.models import Call

# Every test here runs with the ledger's vendor statements and with its portable forms.
pytestmark = pytest.mark.usefixtures("ledger_form")


@pytest.fixture(autouse=True)
def _no_message_queued() -> None:
    """Recovery asks the broker what waits in the run queue: each test starts with nothing there.

    (In these tests no message is ever sent: on-commit callbacks do not run inside the test's
    transaction. The broker is the real Redis of the settings.)
    """
    broker = dramatiq.get_broker()
    broker.flush(dispatch.run_queue(broker))


@pytest.fixture
def global_broker():
    """Sets the global broker for one test: ``global_broker(broker)``."""
    previous = dramatiq.get_broker()
    yield dramatiq.set_broker
    dramatiq.set_broker(previous)


def _age(run: Run, **delta: float) -> None:
    Run.objects.filter(pk=run.pk).update(due_at=timezone.now() - dt.timedelta(**delta))


def _die_mid_run(run: Run, attempt: int = 1) -> None:
    """As if a worker claimed attempt ``attempt`` and was SIGKILLed; its lease is now over."""
    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING,
        attempts=attempt,
        attempt_started_at=now - dt.timedelta(minutes=11),
        lease_expires_at=now - dt.timedelta(seconds=1),
    )


def test_overdue_pending_run_is_requeued_once(db, django_capture_on_commit_callbacks):
    # Given a run whose message never reached the broker, older than the grace period
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, seconds=61)

    # When two recovery passes run
    with django_capture_on_commit_callbacks() as callbacks:
        first = recover()
        second = recover()

    # Then the first re-enqueues it (after commit) and moves its due time; the second leaves it
    assert first.requeued == [(run.pk, "tests.ok", "pending")]
    assert second.requeued == []
    assert len(callbacks) == 1
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING
    assert timezone.now() - run.due_at < dt.timedelta(seconds=5)


def test_overdue_run_with_no_message_queued_is_requeued_because_the_queue_is_empty(db):
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, seconds=61)
    report = recover()
    assert report.requeued == [(run.pk, "tests.ok", "pending")]
    assert report.reason == QUEUE_EMPTY


def test_a_broker_that_cannot_count_its_queue_gets_every_overdue_run_sent_again(
    db, caplog, monkeypatch, global_broker
):
    # Given a broker recovery cannot ask about its queue, and two overdue runs
    monkeypatch.setattr(recovery, "_warned", set())
    global_broker(StubBroker())
    runs = [Run.objects.get(event=django_events.send("test/ok", {"i": i})) for i in range(2)]
    for run in runs:
        _age(run, seconds=61)

    # When recovery passes, and again once another run is overdue
    first = recover()
    later = Run.objects.get(event=django_events.send("test/ok", {"i": 2}))
    _age(later, seconds=61)
    second = recover()

    # Then every overdue run is sent again, as before recovery could tell, with one warning
    assert sorted(pk for pk, _f, _s in first.requeued) == sorted(run.pk for run in runs)
    assert [pk for pk, _f, _s in second.requeued] == [later.pk]
    assert first.reason == second.reason == NO_COUNT
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Recovery cannot count")]
    assert len(warnings) == 1
    assert "cannot count the messages of the run queue on StubBroker" in warnings[0]


def test_when_the_broker_cannot_be_reached_every_overdue_run_is_sent_again(
    db, caplog, monkeypatch, global_broker
):
    # Given a Redis broker that refuses connections, and an overdue run
    monkeypatch.setattr(recovery, "_warned", set())
    global_broker(RedisBroker(url="redis://127.0.0.1:1/0"))
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, seconds=61)

    # When recovery passes
    report = recover()

    # Then the run is sent again (on commit; that send fails and is logged) and the failure said
    assert report.requeued == [(run.pk, "tests.ok", "pending")]
    assert report.reason == NO_COUNT
    assert any("could not count the messages of the run queue" in r.getMessage() for r in caplog.records)


def test_a_pass_with_nothing_overdue_does_not_ask_the_broker(db, caplog, monkeypatch, global_broker):
    monkeypatch.setattr(recovery, "_warned", set())
    global_broker(RedisBroker(url="redis://127.0.0.1:1/0"))
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, seconds=30)
    report = recover()
    assert (report.total, report.reason) == (0, "")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_recent_pending_run_is_left_to_its_message(db):
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, seconds=30)
    assert recover().total == 0


def test_retrying_run_past_due_plus_grace_is_requeued(db, settings):
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "RECOVERY_GRACE": 10}
    event = django_events.send("test/flaky", {"succeed_on": 2})
    run_due()
    run = Run.objects.get(event=event)
    assert run.status == RunStatus.RETRYING
    _age(run, seconds=5)
    assert recover().total == 0  # within the grace period
    _age(run, seconds=11)
    assert recover().requeued == [(run.pk, "tests.flaky", "retrying")]


def test_run_whose_worker_died_gets_a_lost_attempt_and_runs_again(db):
    # Given a run whose worker was killed during attempt 1
    run = Run.objects.get(event=django_events.send("test/ok"))
    _die_mid_run(run)

    # When recovery runs
    report = recover()

    # Then the attempt is recorded as lost and the run is due again at once
    assert report.lost == [(run.pk, "tests.ok", "retrying")]
    run.refresh_from_db()
    assert run.status == RunStatus.RETRYING
    assert run.due_at <= timezone.now()
    lost = Attempt.objects.get(run=run)
    assert lost.outcome == AttemptOutcome.LOST
    assert lost.exc_type == "django_events.exceptions.WorkerLostError"
    assert "lease expired" in lost.message
    # and it then succeeds as attempt 2
    [run] = run_all()
    assert run.status == RunStatus.SUCCEEDED
    assert list(Attempt.objects.filter(run=run).values_list("outcome", flat=True)) == ["lost", "succeeded"]


def test_late_result_of_the_dead_worker_does_not_overwrite(db):
    run = Run.objects.select_related("event").get(event=django_events.send("test/ok"))
    _die_mid_run(run)
    recover()
    run_all()
    # the killed worker was only stalled, and reports attempt 1 now
    stale = record(run, 1, timezone.now(), {"late": True}, None, using="default")
    assert stale is Execution.STALE
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"echo": {}, "attempt": 2}
    assert Attempt.objects.filter(run=run).count() == 2


def test_lost_last_attempt_goes_dead_and_sends_run_dead_event(db):
    run = Run.objects.get(event=django_events.send("test/slow"))  # retries=0
    _die_mid_run(run)
    assert recover().lost == [(run.pk, "tests.slow", "dead")]
    run.refresh_from_db()
    assert run.status == RunStatus.DEAD
    dead_event = Event.objects.get(name=RUN_DEAD_EVENT)
    assert dead_event.data["run_id"] == str(run.pk)
    assert dead_event.data["function"] == "tests.slow"
    assert "WorkerLostError" in dead_event.data["error"]


def test_dry_run_changes_nothing(db):
    lost = Run.objects.get(event=django_events.send("test/ok"))
    _die_mid_run(lost)
    waiting = Run.objects.get(event=django_events.send("test/also-ok"))
    _age(waiting, minutes=5)
    report = recover(dry_run=True)
    assert report.requeued == [(waiting.pk, "tests.ok", "pending")]
    assert report.lost == [(lost.pk, "tests.ok", "lost")]
    lost.refresh_from_db()
    assert lost.status == RunStatus.RUNNING
    assert not Attempt.objects.exists()


def test_events_recover_command(db):
    run = Run.objects.get(event=django_events.send("test/ok"))
    _age(run, minutes=5)
    out = StringIO()
    call_command("events", "recover", "--dry-run", stdout=out)
    assert f"Would re-enqueue pending run {run.pk} (tests.ok)" in out.getvalue()
    call_command("events", "recover", stdout=out)
    assert f"Re-enqueued pending run {run.pk} (tests.ok)" in out.getvalue()
    assert (
        "1 overdue run(s), 0 run(s) with an expired lease "
        f"(lost messages told from queued ones by: {QUEUE_EMPTY})." in out.getvalue()
    )


def test_events_prune_deletes_old_finished_history_in_batches(db):
    old = timezone.now() - dt.timedelta(days=40)
    django_events.send("test/always-fails")  # dead, with 3 attempts
    django_events.send("test/fanout")  # 3 succeeded
    run_all()
    django_events.send("test/ok")  # pending: never pruned
    django_events.send("nobody/listens")  # an event without runs
    Run.objects.update(created_at=old)
    Event.objects.update(created_at=old)
    recent = django_events.send("test/also-ok")  # recent: never pruned

    out = StringIO()
    call_command("events", "prune", "--older-than", "30", "--dry-run", stdout=out)
    assert "would delete 4 run(s)" in out.getvalue()
    assert Run.objects.count() == 6

    call_command("events", "prune", "--older-than", "30", "--batch-size", "2", stdout=out)
    # the dead run's and the fan-out's events go with their runs, and so do the old events
    # that never had any (nobody/listens, and the run.dead event nothing subscribes to)
    assert "Deleted 4 run(s), 6 attempt(s) and 4 event(s)" in out.getvalue()
    assert sorted(Run.objects.values_list("function", "status")) == [
        ("tests.ok", "pending"),
        ("tests.ok", "pending"),
    ]
    assert set(Event.objects.values_list("name", flat=True)) == {"test/ok", "test/also-ok"}
    assert Event.objects.filter(pk=recent.pk).exists()


def test_events_prune_by_status(db):
    django_events.send("test/always-fails")
    django_events.send("test/ok")
    run_all()
    Run.objects.update(created_at=timezone.now() - dt.timedelta(days=2))
    call_command("events", "prune", "--older-than", "1", "--status", "succeeded", stdout=StringIO())
    assert list(Run.objects.values_list("status", flat=True)) == ["dead"]


@pytest.mark.parametrize(
    "args",
    [
        ["prune"],
        ["prune", "--older-than", "-1"],
        ["prune", "--older-than", "1", "--status", "pending"],
        ["prune", "--older-than", "1", "--batch-size", "0"],
        ["vacuum"],
    ],
)
def test_events_command_rejects_bad_arguments(db, args):
    with pytest.raises(CommandError):
        call_command("events", *args, stdout=StringIO(), stderr=StringIO())


# -- signals, the run.dead event, logging ------------------------------------------------------


@pytest.fixture
def received():
    calls: list[tuple[str, dict]] = []

    def receiver_for(name):
        def receiver(sender, **kwargs):
            calls.append((name, kwargs))

        return receiver

    receivers = {
        signals.run_succeeded: receiver_for("succeeded"),
        signals.run_failed: receiver_for("failed"),
        signals.run_dead: receiver_for("dead"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    yield calls
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


def test_signals_for_success_failure_and_death(db, received):
    django_events.send("test/ok")
    run_all()
    assert [name for name, _ in received] == ["succeeded"]
    assert received[0][1]["result"] == {"echo": {}, "attempt": 1}
    assert received[0][1]["run"].status == RunStatus.SUCCEEDED

    received.clear()
    django_events.send("test/always-fails")  # 3 attempts
    run_all()
    assert [name for name, _ in received] == ["failed", "failed", "failed", "dead"]
    assert [kwargs["will_retry"] for name, kwargs in received if name == "failed"] == [True, True, False]
    assert isinstance(received[-1][1]["exception"], ValueError)
    assert received[-1][1]["attempt"].number == 3


def test_a_failing_signal_receiver_does_not_break_the_run(db, caplog):
    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    signals.run_succeeded.connect(broken)
    try:
        django_events.send("test/ok")
        [run] = run_all()
    finally:
        signals.run_succeeded.disconnect(broken)
    assert run.status == RunStatus.SUCCEEDED
    assert any("signal receiver" in r.getMessage() for r in caplog.records)


def test_dead_run_sends_run_dead_event_that_functions_can_subscribe_to(db):
    alerts = []

    @function(RUN_DEAD_EVENT, id="tests.alert", retries=0)
    def alert(ctx):
        alerts.append(ctx.event.data)
        raise RuntimeError("the pager is down too")  # dies: must not emit another run.dead

    try:
        event = django_events.send("test/non-retriable")
        run_all()
    finally:
        unregister("tests.alert")
    run = Run.objects.get(event=event)
    assert alerts == [
        {
            "run_id": str(run.pk),
            "function": "tests.non_retriable",
            "event_id": str(event.pk),
            "event_name": "test/non-retriable",
            "attempts": 1,
            "error": "django_events.exceptions.NonRetriableError: the source was deleted",
        }
    ]
    assert Event.objects.filter(name=RUN_DEAD_EVENT).count() == 1
    assert Run.objects.get(function="tests.alert").status == RunStatus.DEAD


def test_shutdown_interrupt_puts_the_run_back_without_using_a_retry(db):
    @function("test/interrupted", id="tests.interrupted", retries=0)
    def interrupted(ctx):
        if ctx.attempt == 1:
            raise Shutdown("worker stopping")
        return "finished"

    try:
        event = django_events.send("test/interrupted")
        run = Run.objects.get(event=event)
        assert execute_run(run.pk, enqueue=False) is Execution.RETRYING
        run.refresh_from_db()
        assert (run.status, run.attempts, run.max_attempts) == (RunStatus.RETRYING, 1, 2)
        assert run.due_at <= timezone.now()
        assert Attempt.objects.get(run=run).outcome == AttemptOutcome.INTERRUPTED
        [run] = run_due()
        assert (run.status, run.result) == (RunStatus.SUCCEEDED, "finished")
    finally:
        unregister("tests.interrupted")


def test_log_lines_for_start_success_retry_and_death(db, caplog):
    caplog.set_level(logging.INFO, logger="django_events")
    ok = Run.objects.get(event=django_events.send("test/ok"))
    dead = Run.objects.get(event=django_events.send("test/always-fails"))
    run_all()
    # (the first line of each: a failure's goes on with its traceback as stored)
    lines = [
        (r.levelname, r.getMessage().split("\n")[0]) for r in caplog.records if r.name == "django_events"
    ]
    assert ("INFO", f"Run {ok.pk} of tests.ok for test/ok started (attempt 1 of 5).") in lines
    assert ("INFO", f"Run {ok.pk} of tests.ok for test/ok succeeded (attempt 1).") in lines
    retry = [m for level, m in lines if level == "WARNING" and str(dead.pk) in m]
    assert len(retry) == 2
    assert all("failed (attempt" in m and "retrying at" in m for m in retry)
    assert (
        "ERROR",
        f"Run {dead.pk} of tests.always_fails for test/always-fails is dead after attempt 3.",
    ) in lines
    assert Call.objects.count() == 4
    [dead_line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert dead_line.endswith("ValueError: <b>broken</b> on attempt 3")  # with the traceback
