"""Django ``@task`` functions through django-events and a real Dramatiq worker (Redis, RabbitMQ)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "django.tasks", reason="django.tasks (Django's Tasks framework) exists from Django 6.0 on"
)

from django.db import transaction
from django.tasks import TaskResultStatus

from django_events import control
from tests.conftest import wait_for
from tests.testapp import task_functions as tasks


def _finished(task, result_id: str):
    def check():
        """the task's result is finished"""
        result = task.get_result(result_id)
        return result if result.is_finished else None

    return check


def test_a_task_enqueued_in_a_transaction_is_run_by_the_worker(worker):
    # Given a task enqueued in a committed transaction
    with transaction.atomic():
        result = tasks.send_email.enqueue("ada@example.com", subject="Hello")

    # When the worker runs it
    done = wait_for(_finished(tasks.send_email, result.id))

    # Then its result, read with Django's API, is the task's return value
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value == {"to": "ada@example.com", "subject": "Hello", "sent": True}
    assert done.attempts == 1
    assert done.started_at is not None
    assert done.finished_at is not None


def test_a_failing_task_is_retried_then_fails_and_runs_again_when_retried(worker, settings):
    # Given a task that always raises, with two retries
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "DEFAULT_RETRIES": 2}
    result = tasks.always_fails.enqueue("boom")

    # When the worker has tried it three times
    failed = wait_for(_finished(tasks.always_fails, result.id))

    # Then the task failed with one error, and traceback, per attempt
    assert failed.status == TaskResultStatus.FAILED
    assert failed.attempts == 3
    assert [error.exception_class_path for error in failed.errors] == ["builtins.ValueError"] * 3
    assert all("ValueError: boom" in error.traceback for error in failed.errors)

    # And retried from the control API (the admin's action), it runs again under the same id
    assert control.retry_runs([result.id]).done == 1
    again = wait_for(
        lambda: (r := tasks.always_fails.get_result(result.id)).is_finished and r.attempts == 6 and r
    )
    assert again.status == TaskResultStatus.FAILED
    assert len(again.errors) == 6


def test_an_async_task_and_a_task_with_context_run_in_the_worker(worker):
    added = tasks.async_add.enqueue(40, 2)
    flaky = tasks.flaky.enqueue(succeed_on=2)

    assert wait_for(_finished(tasks.async_add, added.id)).return_value == 42
    done = wait_for(_finished(tasks.flaky, flaky.id))
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value["attempt"] == 2
    assert done.return_value["errors"] == ["builtins.RuntimeError"]
    assert len(done.worker_ids) == 2
