"""Django ``@task`` functions run by ``django_events.task_backend`` in the tests (Django 6.0+ only).

Not named ``tasks.py``: django-dramatiq imports every installed app's ``tasks`` module in
workers, and this one needs ``django.tasks``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.tasks import TaskContext, task

from django_events import NonRetriableError

from .models import Call


def _record(name: str, attempt: int = 0) -> None:
    Call.objects.create(function=name, run_id="", attempt=attempt, event_name="django.tasks")


@task
def add(a: int, b: int) -> int:
    _record("add")
    return a + b


@task(queue_name="emails", priority=10)
def send_email(to: str, *, subject: str = "") -> dict[str, Any]:
    _record("send_email")
    return {"to": to, "subject": subject, "sent": True}


@task
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@task
def always_fails(message: str) -> None:
    _record("always_fails")
    raise ValueError(message)


@task
def refuses(message: str) -> None:
    raise NonRetriableError(message)


@task(takes_context=True)
def flaky(context: TaskContext, succeed_on: int) -> dict[str, Any]:
    """Fails until its ``succeed_on``-th attempt; returns what its context said."""
    _record("flaky", context.attempt)
    if context.attempt < succeed_on:
        raise RuntimeError(f"attempt {context.attempt} fails")
    return {
        "attempt": context.attempt,
        "id": context.task_result.id,
        "status": str(context.task_result.status),
        "worker_ids": context.task_result.worker_ids,
        "errors": [error.exception_class_path for error in context.task_result.errors],
    }


@task
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@task
def returns_tuple() -> tuple[int, ...]:
    return (1, 2, 3)
