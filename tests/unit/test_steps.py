"""Durable steps through the testing helpers (the same claim, call and record code as a worker)."""

from __future__ import annotations

import datetime as dt

import pytest

from django_events import send
from django_events.models import Attempt, AttemptOutcome, Event, Run, RunStatus, Step, StepStatus
from django_events.testing import advance, reset_clock, run_all
from tests.testapp.models import Call, Effect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _clock():
    yield
    reset_clock()


def _run(function: str) -> Run:
    return Run.objects.get(function=function)


def test_the_order_flow_goes_through_every_step_kind():
    send("steps/order", {"order_id": 7})
    run_all()
    run = _run("tests.steps_order")
    assert run.status == RunStatus.WAITING  # slept (fast-forwarded), now waits for the invoice
    assert Call.objects.filter(function="charge").count() == 1
    assert Effect.objects.count() == 1
    send("steps/invoice.paid", {"order_id": 8})  # another order's: not this one
    run_all()
    assert _run("tests.steps_order").status == RunStatus.WAITING
    send("steps/invoice.paid", {"order_id": 7, "amount": 5})
    run_all()
    run = _run("tests.steps_order")
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result == {
        "charge": {"charged": 7},
        "paid": {"order_id": 7, "amount": 5},
        "shipped": {"shipped": 7},
    }
    assert Call.objects.filter(function="charge").count() == 1
    assert Call.objects.filter(function="fulfilled").count() == 1
    assert Call.objects.filter(function="ship").count() == 1
    assert Effect.objects.count() == 1
    steps = list(Step.objects.filter(run=run).order_by("position").values_list("step_id", "kind", "status"))
    assert steps == [
        ("charge", "run", "completed"),
        ("reserve", "atomic", "completed"),
        ("cool-off", "sleep", "completed"),
        ("paid", "wait", "completed"),
        ("notify", "send", "completed"),
        ("ship", "invoke", "completed"),
    ]
    suspended = Attempt.objects.filter(run=run, outcome=AttemptOutcome.SUSPENDED).count()
    assert suspended == 3  # the sleep, the wait, the invoke
    assert run.attempts == run.max_attempts - 3  # suspensions do not use up retries


def test_a_wait_times_out_when_the_clock_passes_it():
    send("steps/order", {"order_id": 1})
    run_all()
    run_all(until=dt.datetime.now(dt.UTC) + dt.timedelta(days=4))
    run = _run("tests.steps_order")
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result["paid"] is None


def test_an_event_sent_before_the_wait_began_is_found():
    event = send("steps/order", {"order_id": 3})
    send("steps/invoice.paid", {"order_id": 3})  # sent after the trigger, before the run waits
    run_all()
    run = Run.objects.get(event=event)
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.result["paid"] == {"order_id": 3}


def test_repeated_step_ids_get_suffixes():
    send("steps/loop")
    run_all()
    run = _run("tests.steps_loop")
    assert run.result == [0, 10, 20]
    assert sorted(Step.objects.filter(run=run).values_list("step_id", flat=True)) == [
        "item",
        "item:1",
        "item:2",
    ]


def test_a_failed_step_does_not_run_the_steps_before_it_again():
    send("steps/flaky")
    run_all()
    run = _run("tests.steps_flaky")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == ["one", "two"]
    assert Call.objects.filter(function="first").count() == 1
    assert Call.objects.filter(function="second").count() == 2
    second = Step.objects.get(run=run, step_id="second")
    assert second.attempts == 2
    assert second.status == StepStatus.COMPLETED


def test_a_replay_in_another_order_fails_naming_both_steps():
    send("steps/nondeterministic")
    run_all()
    run = _run("tests.steps_nondeterministic")
    assert run.status == RunStatus.DEAD
    assert "NonDeterminismError" in run.last_error
    assert "'a'" in run.last_error
    assert "'b'" in run.last_error


def test_an_invoked_run_that_dies_raises_at_the_step():
    send("steps/invoke-failing", {"catch": True})
    run_all()
    run = _run("tests.steps_invoke_failing")
    child = _run("tests.steps_ship")
    assert child.status == RunStatus.DEAD
    assert child.parent == run.pk
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == f"caught: {child.pk}"


def test_if_callable_waits_for_the_event_it_accepts():
    send("steps/wait-if")
    run_all()
    send("steps/amount", {"amount": 50})
    run_all()
    assert _run("tests.steps_wait_if").status == RunStatus.WAITING
    send("steps/amount", {"amount": 500})
    run_all()
    run = _run("tests.steps_wait_if")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"amount": 500}


def test_two_waits_for_one_name_take_an_event_each():
    send("steps/wait-twice", {"key": "k"})
    send("steps/tick", {"key": "k", "n": 1})
    send("steps/tick", {"key": "k", "n": 2})
    run_all()
    run = _run("tests.steps_wait_twice")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == [1, 2]


def test_a_sleeping_run_wakes_at_its_time():
    send("steps/sleepy", {"seconds": 30})
    from django_events.testing import run_due

    run_due()
    run = _run("tests.steps_sleepy")
    assert run.status == RunStatus.SLEEPING
    assert run_due() == []
    advance(31)
    run_due()
    assert _run("tests.steps_sleepy").status == RunStatus.SUCCEEDED
    assert Call.objects.filter(function="before").count() == 1


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("empty-id", "ValueError: A step id must be"),
        ("id-not-str", "ValueError: A step id must be"),
        ("not-callable", "TypeError: step.run takes a step id and a callable"),
        ("negative-sleep", "ValueError: step.sleep's duration must be"),
        ("naive-sleep-until", "ValueError: step.sleep_until needs an aware datetime"),
        ("bad-event-name", "EventValidationError"),
        ("missing-match", "ValueError: The run's trigger event has no value at 'data.absent'"),
        ("no-timeout", "ValueError: wait_for_event's timeout must be"),
        ("unknown-function", "FunctionNotFoundError: step.invoke: no function is registered"),
        ("bad-invoke-data", "EventValidationError: Event data must be a dict"),
        ("bad-send", "EventValidationError: Event data for 'steps/fulfilled' is not JSON-serialisable"),
        ("not-json", "ResultNotSerializableError: Step 'x' returned a value that JSON cannot hold"),
        ("nested", "steps cannot nest"),
    ],
)
def test_bad_input_fails_the_attempt_clearly_and_stores_nothing_half(case, error):
    send("steps/bad-input", {"case": case})
    run_all()
    run = _run("tests.steps_bad_input")
    assert run.status == RunStatus.DEAD
    assert error in run.last_error, run.last_error
    # Nothing half-stored: no wait, no invoked run, no sent event's run.
    assert not Step.objects.filter(run=run, status=StepStatus.WAITING).exists()
    assert not Run.objects.exclude(pk=run.pk).exists()


def test_a_wait_with_neither_match_nor_if_takes_any_event_of_the_name():
    send("steps/any")
    run_all()
    send("steps/ping", {"n": 1})
    run_all()
    run = _run("tests.steps_any")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"n": 1}


def test_cancelling_a_waiting_run_stops_its_wait_and_a_retry_waits_again():
    from django_events.control import cancel_runs, retry_runs

    send("steps/wait", {"key": "c"})
    run_all()
    run = _run("tests.steps_wait")
    assert run.status == RunStatus.WAITING
    assert cancel_runs([run.pk]).done == 1
    assert Step.objects.get(run=run).status == StepStatus.CANCELLED
    send("steps/answer", {"key": "c", "n": 1})  # no waiting step matches it any more
    run_all()
    assert _run("tests.steps_wait").status == RunStatus.CANCELLED
    assert retry_runs([run.pk]).done == 1
    run_all()  # the replay looks again and finds the answer sent meanwhile
    run = _run("tests.steps_wait")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"key": "c", "n": 1}


def test_cancelling_an_invoked_run_fails_the_invoke_at_once():
    from django_events.control import cancel_runs

    send("steps/invoke-failing", {"catch": True})
    # Run the parent only: it invokes and waits; the child is pending.
    from django_events.testing import run_due

    run_due()
    child = _run("tests.steps_ship")
    assert child.status == RunStatus.PENDING
    assert cancel_runs([child.pk]).done == 1
    assert _run("tests.steps_invoke_failing").status == RunStatus.PENDING  # woken by the cancel
    run_all()
    run = _run("tests.steps_invoke_failing")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == f"caught: {child.pk}"


def test_writes_to_another_database_inside_an_atomic_step_are_refused():
    from django_events.steps import StepWriteError, _writes_only_on

    # As if the ledger were on database "ledger": a write to "default" is refused, a read is not.
    with _writes_only_on("ledger", "reserve"):
        assert Call.objects.count() == 0
        with pytest.raises(StepWriteError, match="Step 'reserve' wrote to database 'default'"):
            Call.objects.create(function="x", run_id="r", attempt=1, event_name="e")
    assert Call.objects.count() == 0
    Call.objects.create(function="x", run_id="r", attempt=1, event_name="e")  # outside: allowed


def test_an_atomic_step_of_an_attempt_that_lost_its_run_does_not_run():
    from django_events.steps import StaleAttemptError, Steps

    send("steps/loop")
    run = _run("tests.steps_loop")
    # Another worker took the run over: it is running its attempt 2; this worker still has attempt 1.
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING, attempts=2)
    run.refresh_from_db()
    steps = Steps(run, 1, using="default")
    with pytest.raises(StaleAttemptError, match="no longer holds the run"):
        steps.atomic("reserve", lambda: Effect.objects.create(run_id=str(run.pk), step="x"))
    assert not Effect.objects.exists()
    assert not Step.objects.filter(run=run).exists()
    # The attempt that holds the run does run it, once.
    assert Steps(run, 2, using="default").atomic("reserve", lambda: 5) == 5
    assert Steps(run, 2, using="default").atomic("reserve", lambda: 6) == 5  # replay: the memo


def test_a_step_run_memo_on_postgresql_is_one_statement_that_keeps_the_first_result():
    from django.db import connection

    from django_events.steps import Steps, _insert_without_flush

    if connection.vendor != "postgresql":
        pytest.skip("the statement without a WAL flush is PostgreSQL's")
    send("steps/loop")
    run = _run("tests.steps_loop")
    first = Step(run=run, step_id="x", position=0, kind="run", status=StepStatus.COMPLETED, result=1)
    assert _insert_without_flush(first, "default")
    again = Step(run=run, step_id="x", position=0, kind="run", status=StepStatus.COMPLETED, result=2)
    assert not _insert_without_flush(again, "default")  # the memo exists: the first result stands
    assert Step.objects.get(run=run, step_id="x").result == 1
    assert Steps(run, 1, using="default").run("x", lambda: 3) == 1


def test_an_event_stamped_before_the_trigger_but_committed_after_it_ends_the_wait(settings):
    # The answer's sender stamped it before the trigger (its transaction was open, or its clock
    # behind), and committed it before the wait existed: only the wait's look can find it.
    trigger = send("steps/wait", {"key": "early"})
    answer = send("steps/answer", {"key": "early", "n": 1})
    Event.objects.filter(pk=answer.pk).update(created_at=trigger.created_at - dt.timedelta(seconds=10))
    run_all()
    run = _run("tests.steps_wait")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"key": "early", "n": 1}


def test_events_stamped_more_than_wait_lookback_before_the_trigger_do_not_count(settings):
    settings.DJANGO_EVENTS = {"WAIT_LOOKBACK": 5}
    trigger = send("steps/wait", {"key": "old"})
    answer = send("steps/answer", {"key": "old", "n": 1})
    Event.objects.filter(pk=answer.pk).update(created_at=trigger.created_at - dt.timedelta(seconds=10))
    run_all()
    assert _run("tests.steps_wait").status == RunStatus.WAITING


def test_recovery_matches_an_event_whose_sender_died_before_matching_it(monkeypatch):
    from django_events import recovery, sending
    from django_events.conf import get_settings

    send("steps/wait", {"key": "lost"})
    run_all()
    assert _run("tests.steps_wait").status == RunStatus.WAITING
    monkeypatch.setattr(recovery, "_rematched_to", {})
    with monkeypatch.context() as patched:
        patched.setattr(sending, "_deliver", lambda events, using: None)  # the sender dies after commit
        send("steps/answer", {"key": "lost", "n": 2})
    assert _run("tests.steps_wait").status == RunStatus.WAITING
    assert recovery.recover().rematched == []  # within the grace: its sender may still match it
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=get_settings().RECOVERY_GRACE + 1)
    report = recovery.recover(now=later)
    run = _run("tests.steps_wait")
    assert report.rematched == [run.pk]
    assert run.status == RunStatus.PENDING
    run_all()
    run = _run("tests.steps_wait")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == {"key": "lost", "n": 2}


def test_a_function_that_swallows_its_sleep_still_leaves_the_worker_and_goes_on_after_it():
    from django_events.testing import run_due

    send("steps/swallow")
    run_due()
    run = _run("tests.steps_swallow")
    assert run.status == RunStatus.SLEEPING  # not succeeded with "returned"
    assert not Call.objects.filter(function="after-swallow").exists()  # no step ran after the sleep
    advance(61)
    run_due()
    run = _run("tests.steps_swallow")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result == "returned"
    assert Call.objects.filter(function="after-swallow").count() == 1


def test_an_invoked_run_cancelled_by_its_start_timeout_ends_the_invoke():
    from django_events.testing import run_due

    send("steps/invoke-start")
    run_due()  # the caller invokes and waits; the child is pending
    assert _run("tests.steps_invoke_start").status == RunStatus.WAITING
    advance(61)  # the child's Timeouts.start passes before any worker takes it
    run_all()
    child = _run("tests.steps_start_child")
    assert child.status == RunStatus.CANCELLED
    run = _run("tests.steps_invoke_start")
    assert run.status == RunStatus.SUCCEEDED
    assert run.result.startswith("failed: step 'child': run ")
    assert "ended cancelled" in run.result


def test_matching_an_event_again_never_ends_a_second_wait_of_the_same_run(monkeypatch):
    from django_events import waits

    send("steps/wait-twice", {"key": "k"})
    first = send("steps/tick", {"key": "k", "n": 1})
    run_all()
    run = _run("tests.steps_wait_twice")
    assert run.status == RunStatus.WAITING  # the first wait took the tick; the second waits
    assert waits.deliver([first]) == []  # recovery matching the first tick again: nothing ends
    assert Step.objects.get(run=run, step_id="tick:1").status == StepStatus.WAITING
    send("steps/tick", {"key": "k", "n": 2})
    run_all()
    run = _run("tests.steps_wait_twice")
    assert run.result == [1, 2]
