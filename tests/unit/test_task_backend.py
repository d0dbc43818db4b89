"""Django's Tasks framework on django-events (``django_events.task_backend``), without a broker.

Tasks are enqueued with Django's own API (``@task``, ``Task.enqueue``, ``Task.get_result``) and
executed by ``django_events.testing.run_all``, as a worker would.
"""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
import uuid

import pytest

pytest.importorskip(
    "django.tasks", reason="django.tasks (Django's Tasks framework) exists from Django 6.0 on"
)

from asgiref.sync import async_to_sync
from django.db import router, transaction
from django.tasks import TaskResultStatus
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone

import django_events
from django_events import control, ledger
from django_events.exceptions import EventValidationError
from django_events.models import Event, Run, RunStatus
from django_events.task_backend import (
    EVENT_PREFIX,
    FUNCTION_ID,
    RUNNING_WORKER,
    STATUS_MAP,
    EventsTaskBackend,
)
from django_events.testing import run_all, run_due
from tests.testapp import task_functions as tasks
from tests.testapp.models import Call


@pytest.fixture
def signals():
    """Every task signal sent during the test, as (signal name, status, result id)."""
    seen: list[tuple[str, str, str]] = []
    receivers = {}
    for name, signal in (("enqueued", task_enqueued), ("started", task_started), ("finished", task_finished)):

        def receiver(sender, task_result, _name=name, **kwargs):
            seen.append((_name, task_result.status, task_result.id))

        receivers[name] = receiver
        signal.connect(receiver)
    yield seen
    task_enqueued.disconnect(receivers["enqueued"])
    task_started.disconnect(receivers["started"])
    task_finished.disconnect(receivers["finished"])


def test_the_default_backend_is_ours_and_says_what_it_supports():
    backend = tasks.add.get_backend()
    assert isinstance(backend, EventsTaskBackend)
    assert backend.supports_defer
    assert backend.supports_async_task
    assert backend.supports_get_result
    assert backend.supports_priority


def test_enqueue_outside_a_transaction_stores_one_run_and_signals_enqueued(transactional_db, signals):
    # When a task is enqueued with no transaction open
    result = tasks.add.enqueue(2, 3)

    # Then it is a pending run of the task function, for an event naming the task
    run = Run.objects.select_related("event").get(pk=result.id)
    assert run.function == FUNCTION_ID
    assert run.status == RunStatus.PENDING
    assert run.event.name == EVENT_PREFIX + "tests.testapp.task_functions.add"
    assert run.event.data["args"] == [2, 3]
    assert result.status == TaskResultStatus.READY
    assert result.enqueued_at == run.created_at
    assert result.args == [2, 3]
    assert result.kwargs == {}
    assert result.attempts == 0
    assert result.errors == []
    # And task_enqueued was sent (on commit, which is now)
    assert signals == [("enqueued", TaskResultStatus.READY, result.id)]


def test_enqueue_in_a_rolled_back_transaction_stores_and_signals_nothing(transactional_db, signals):
    # Given a transaction that enqueues a task and then fails
    def view() -> None:
        with transaction.atomic():
            tasks.add.enqueue(1, 1)
            raise RuntimeError("the view failed")

    with pytest.raises(RuntimeError):
        view()

    # Then no event, no run, no signal
    assert not Event.objects.exists()
    assert not Run.objects.exists()
    assert signals == []


def test_enqueue_in_a_transaction_signals_enqueued_only_once_it_commits(transactional_db, signals):
    with transaction.atomic():
        result = tasks.add.enqueue(1, 1)
        assert signals == []  # not committed yet
    assert signals == [("enqueued", TaskResultStatus.READY, result.id)]
    assert Run.objects.filter(pk=result.id).exists()


def test_a_run_task_succeeds_and_get_result_reads_it_back(transactional_db, signals):
    # Given an enqueued task
    result = tasks.add.enqueue(2, 3)

    # When it runs
    run_all()

    # Then its result, read back through Django's API, is successful with its value
    fresh = tasks.add.get_result(result.id)
    assert fresh.status == TaskResultStatus.SUCCESSFUL
    assert fresh.return_value == 5
    assert fresh.attempts == 1
    assert fresh.errors == []
    run = Run.objects.get(pk=result.id)
    assert fresh.started_at == run.started_at
    assert fresh.finished_at == run.finished_at
    assert fresh.last_attempted_at == run.attempt_started_at
    assert fresh.enqueued_at <= fresh.started_at <= fresh.finished_at
    [worker_id] = fresh.worker_ids
    host, pid = worker_id.rsplit(":", 1)
    assert host
    assert int(pid) > 0
    # And refresh() on the enqueued result brings it up to date too
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    # And the signals came in Django's order
    assert [(name, status) for name, status, _ in signals] == [
        ("enqueued", TaskResultStatus.READY),
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
    ]


def test_keyword_arguments_and_json_normalised_values(db):
    result = tasks.echo.enqueue((1, 2), b"bytes", flag=True, nested={"k": [None, 1.5]})
    assert result.args == [[1, 2], "bytes"]
    run_all()
    assert tasks.echo.get_result(result.id).return_value == {
        "args": [[1, 2], "bytes"],
        "kwargs": {"flag": True, "nested": {"k": [None, 1.5]}},
    }


def test_a_returned_tuple_is_stored_as_a_list(db):
    result = tasks.returns_tuple.enqueue()
    run_all()
    assert tasks.returns_tuple.get_result(result.id).return_value == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((object(),), TypeError),
        (({1, 2},), TypeError),
        ((math.nan,), EventValidationError),
        ((b"\xff",), ValueError),
    ],
    ids=["object", "set", "nan", "bad-bytes"],
)
def test_arguments_that_are_not_json_are_refused_and_nothing_is_stored(db, args, error):
    with pytest.raises(error):
        tasks.echo.enqueue(*args)
    assert not Event.objects.exists()
    assert not Run.objects.exists()


def test_priority_of_the_task_is_the_runs_and_higher_runs_first(db):
    # Given a low-priority task enqueued before a high-priority one
    low = tasks.add.using(priority=-5).enqueue(1, 1)
    high = tasks.send_email.enqueue("a@example.com")  # priority=10 in its @task

    # Then each run has its task's priority, and the high one runs first
    assert Run.objects.get(pk=low.id).priority == -5
    assert Run.objects.get(pk=high.id).priority == 10
    run_all()
    assert list(Call.objects.order_by("id").values_list("function", flat=True)) == ["send_email", "add"]
    assert tasks.add.get_result(low.id).task.priority == -5


def test_priority_out_of_djangos_range_is_refused():
    with pytest.raises(InvalidTask):
        tasks.add.using(priority=101)


def test_run_after_schedules_the_run_until_then(db):
    # Given a task deferred by an hour
    when = timezone.now() + dt.timedelta(hours=1)
    result = tasks.add.using(run_after=when).enqueue(1, 2)

    # Then its run is scheduled for then, and READY
    run = Run.objects.get(pk=result.id)
    assert run.status == RunStatus.SCHEDULED
    assert run.due_at == when
    assert tasks.add.get_result(result.id).task.run_after == when
    assert run_all() == []
    assert tasks.add.get_result(result.id).status == TaskResultStatus.READY

    # When the clock passes that time, it runs
    run_all(until=when + dt.timedelta(seconds=1))
    assert tasks.add.get_result(result.id).return_value == 3


def test_naive_run_after_is_refused_under_use_tz():
    with pytest.raises(InvalidTask, match="aware"):
        tasks.add.using(run_after=dt.datetime(2030, 1, 1))


def test_queue_name_must_be_one_of_the_backends_queues(db):
    # A queue of the backend's QUEUES is accepted and kept
    result = tasks.add.using(queue_name="emails").enqueue(1, 1)
    assert tasks.add.get_result(result.id).task.queue_name == "emails"
    assert tasks.send_email.queue_name == "emails"
    # Another is refused before anything is stored
    with pytest.raises(InvalidTask, match="Queue 'nope' is not valid"):
        tasks.add.using(queue_name="nope").enqueue(1, 1)
    assert Run.objects.count() == 1


def test_every_run_status_maps_to_a_task_status():
    assert set(STATUS_MAP) == set(RunStatus.values)


def test_a_failed_attempt_leaves_the_task_ready_with_its_error_then_a_success(transactional_db, signals):
    # Given a task that fails its first attempt
    result = tasks.flaky.enqueue(succeed_on=2)

    # When the first attempt runs
    run_due()

    # Then the task is READY again (retrying), with the attempt's error and traceback
    retrying = tasks.flaky.get_result(result.id)
    assert Run.objects.get(pk=result.id).status == RunStatus.RETRYING
    assert retrying.status == TaskResultStatus.READY
    assert retrying.attempts == 1
    [error] = retrying.errors
    assert error.exception_class_path == "builtins.RuntimeError"
    assert error.exception_class is RuntimeError
    assert "attempt 1 fails" in error.traceback
    assert "Traceback" in error.traceback
    assert retrying.finished_at is None

    # When it is retried and succeeds
    run_all()

    # Then the context it got said attempt 2, with the first error and both workers
    done = tasks.flaky.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.attempts == 2
    value = done.return_value
    assert value["attempt"] == 2
    assert value["id"] == result.id
    assert value["status"] == "RUNNING"
    assert value["errors"] == ["builtins.RuntimeError"]
    assert value["worker_ids"] == done.worker_ids
    assert [name for name, _, _ in signals] == ["enqueued", "started", "finished", "started", "finished"]
    assert [status for name, status, _ in signals if name == "finished"] == [
        TaskResultStatus.READY,
        TaskResultStatus.SUCCESSFUL,
    ]


def test_exhausted_attempts_fail_the_task_with_every_error(transactional_db, settings, signals):
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "DEFAULT_RETRIES": 2}
    result = tasks.always_fails.enqueue("boom")
    run_all()
    failed = tasks.always_fails.get_result(result.id)
    assert Run.objects.get(pk=result.id).status == RunStatus.DEAD
    assert failed.status == TaskResultStatus.FAILED
    assert failed.attempts == 3
    assert [e.exception_class_path for e in failed.errors] == ["builtins.ValueError"] * 3
    assert failed.finished_at is not None
    with pytest.raises(ValueError, match="Task failed"):
        failed.return_value  # noqa: B018
    assert signals[-1] == ("finished", TaskResultStatus.FAILED, result.id)


def test_non_retriable_error_fails_the_task_at_once(db):
    result = tasks.refuses.enqueue("no")
    run_all()
    failed = tasks.refuses.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert failed.attempts == 1
    assert failed.errors[0].exception_class_path == "django_events.exceptions.NonRetriableError"


def test_a_dead_task_retried_from_the_control_api_runs_again_and_keeps_its_history(db, settings):
    # Given a task that went dead
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "DEFAULT_RETRIES": 1}
    result = tasks.always_fails.enqueue("boom")
    run_all()
    assert tasks.always_fails.get_result(result.id).status == TaskResultStatus.FAILED

    # When an operator retries it (the admin's "retry" action calls this)
    outcome = control.retry_runs([result.id])

    # Then it is READY again with its earlier errors, and runs again under the same result id
    assert outcome.done == 1
    again = tasks.always_fails.get_result(result.id)
    assert again.status == TaskResultStatus.READY
    assert again.attempts == 2
    assert len(again.errors) == 2
    run_all()
    final = tasks.always_fails.get_result(result.id)
    assert final.status == TaskResultStatus.FAILED
    assert final.attempts == 4
    assert len(final.errors) == 4
    assert Call.objects.filter(function="always_fails").count() == 4


def test_a_cancelled_task_is_failed_and_never_runs(db):
    when = timezone.now() + dt.timedelta(minutes=5)
    result = tasks.add.using(run_after=when).enqueue(1, 1)
    assert control.cancel_runs([result.id]).done == 1
    cancelled = tasks.add.get_result(result.id)
    assert cancelled.status == TaskResultStatus.FAILED
    assert cancelled.errors == []
    assert cancelled.attempts == 0
    run_all(until=when + dt.timedelta(seconds=1))
    assert not Call.objects.exists()


def test_a_claimed_task_is_running(db):
    # Given a task whose run a worker has claimed
    result = tasks.add.enqueue(1, 1)
    using = router.db_for_write(Run)
    now = timezone.now()
    assert ledger.claim(uuid.UUID(result.id), using=using, now=now, lease_until=now + dt.timedelta(minutes=1))

    # Then the task is RUNNING, its attempt counted, by a worker not known from here
    running = tasks.add.get_result(result.id)
    assert running.status == TaskResultStatus.RUNNING
    assert running.worker_ids == [RUNNING_WORKER]
    assert running.started_at is not None
    assert running.finished_at is None
    with pytest.raises(ValueError, match="not finished"):
        running.return_value  # noqa: B018


def test_an_async_task_runs_in_the_worker(db):
    result = tasks.async_add.enqueue(20, 22)
    run_all()
    assert tasks.async_add.get_result(result.id).return_value == 42


def test_aenqueue_and_aget_result(transactional_db):
    result = async_to_sync(tasks.add.aenqueue)(4, 4)
    run_all()
    fresh = async_to_sync(tasks.add.aget_result)(result.id)
    assert fresh.return_value == 8


def test_get_result_of_an_unknown_id_raises_does_not_exist(db):
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result(str(uuid.uuid4()))
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result("not-a-uuid")
    # A run that is not a task's is not a task result
    event = django_events.send("test/ok", {})
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result(str(Run.objects.get(event=event).pk))


def test_get_result_through_another_task_raises_mismatch(db):
    result = tasks.add.enqueue(1, 1)
    with pytest.raises(TaskResultMismatch):
        tasks.echo.get_result(result.id)


def test_on_django_without_tasks_the_import_fails_with_a_clear_message():
    # Given a Python where django.tasks cannot be imported (as on Django 5.2)
    code = (
        "import sys; sys.modules['django.tasks'] = None\n"
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.settings'\n"
        "from django.conf import settings\n"
        "try:\n"
        "    import django_events.task_backend\n"
        "except Exception as exc:\n"
        "    from django.core.exceptions import ImproperlyConfigured\n"
        "    assert isinstance(exc, ImproperlyConfigured), type(exc)\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "Django 6.0" in out.stdout
    assert "django_events.send()" in out.stdout
