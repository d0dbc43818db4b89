"""A backend for Django's Tasks framework (``django.tasks``, Django 6.0+) that runs tasks as runs.

::

    TASKS = {"default": {"BACKEND": "django_events.task_backend.EventsTaskBackend"}}

``Task.enqueue(*args, **kwargs)`` sends the event ``django.tasks/<task path>`` with
the task's path, arguments and options as its data, in the caller's transaction
(``send``: a rolled-back transaction enqueues nothing). One internal function,
:data:`FUNCTION_ID`, subscribed to ``django.tasks/*``, imports the task and calls
it in a ``rundramatiq`` worker, so every task is a run with its attempts,
tracebacks, retries, dead state and admin actions. A task's result id is its
run's id; :meth:`EventsTaskBackend.get_result` reads the run and its attempts
back as a ``TaskResult``.

Importing this module on a Django without ``django.tasks`` (5.2) raises
``ConfigurationError`` saying so.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any, ParamSpec, TypeVar, cast

import django
from django.conf import settings
from django.core import checks
from django.db import router, transaction
from django.dispatch import receiver
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from .exceptions import ConfigurationError

try:
    from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import TaskError
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError as exc:  # Django 5.2
    raise ConfigurationError(
        "django_events.task_backend is a backend for Django's Tasks framework (django.tasks), which "
        f"Django 6.0 added; this is Django {django.get_version()}. Upgrade Django, or send events with "
        "django_events.send() and @django_events.function instead of @task."
    ) from exc

from .models import Attempt, AttemptOutcome, Run, RunStatus
from .names import MAX_NAME_LENGTH
from .registry import Context, function
from .sending import send
from .signals import run_failed, run_succeeded

__all__ = [
    "BACKEND_PATH",
    "EVENT_PREFIX",
    "FUNCTION_ID",
    "RUNNING_WORKER",
    "STATUS_MAP",
    "EventsTaskBackend",
    "run_task",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The dotted path of the backend, as ``TASKS`` names it.
BACKEND_PATH = "django_events.task_backend.EventsTaskBackend"
#: A task's event is named this followed by the task's module path.
EVENT_PREFIX = "django.tasks/"
#: The id of the internal function that runs every task (shown as each task run's function).
FUNCTION_ID = "django.tasks"
#: The worker id of an attempt still running, seen from outside the worker that runs it.
RUNNING_WORKER = "(running)"

#: The ``TaskResultStatus`` each run status maps to. Runs waiting to start or to be tried again
#: are ``READY``; a cancelled or skipped run, like a dead one, ``FAILED``.
STATUS_MAP: dict[str, TaskResultStatus] = {
    RunStatus.PENDING: TaskResultStatus.READY,
    RunStatus.SCHEDULED: TaskResultStatus.READY,
    RunStatus.THROTTLED: TaskResultStatus.READY,
    RunStatus.HELD: TaskResultStatus.READY,
    RunStatus.RETRYING: TaskResultStatus.READY,
    RunStatus.SLEEPING: TaskResultStatus.READY,
    RunStatus.WAITING: TaskResultStatus.READY,
    RunStatus.RUNNING: TaskResultStatus.RUNNING,
    RunStatus.SUCCEEDED: TaskResultStatus.SUCCESSFUL,
    RunStatus.DEAD: TaskResultStatus.FAILED,
    RunStatus.CANCELLED: TaskResultStatus.FAILED,
    RunStatus.SKIPPED: TaskResultStatus.FAILED,
}

#: The attempt outcomes listed in a result's ``errors`` (an interrupted attempt was the worker's
#: shutdown, not the task's error; a suspended one a durable step's pause).
_ERROR_OUTCOMES = frozenset({AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT, AttemptOutcome.LOST})


class EventsTaskBackend(BaseTaskBackend):
    """Runs Django ``@task`` functions as django-events runs, in ``rundramatiq`` workers.

    ``TASKS`` options: ``QUEUES`` (the queue names tasks may use; default
    ``["default"]``, as for Django's backends). Every queue's tasks are carried by
    ``DJANGO_EVENTS["QUEUE_NAME"]``: ``queue_name`` is checked and kept on the
    run's event, not a Dramatiq queue of its own.

    Retries follow ``DJANGO_EVENTS["DEFAULT_RETRIES"]``; raise
    ``django_events.NonRetriableError`` in a task to fail it at once.
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def validate_task(self, task: Task[..., Any]) -> None:
        """Django's checks, and a module path short enough for an event name."""
        super().validate_task(task)
        if len(EVENT_PREFIX) + len(task.module_path) > MAX_NAME_LENGTH:
            raise InvalidTask(
                f"The task's module path {task.module_path!r} is longer than "
                f"{MAX_NAME_LENGTH - len(EVENT_PREFIX)} characters, the most an event name leaves it."
            )

    def enqueue(self, task: Task[_P, _R], args: list[Any], kwargs: dict[str, Any]) -> TaskResult[_P, _R]:
        """Store the task as an event and a run, in the current transaction; enqueue it on commit.

        Raises:
            InvalidTask: the task does not suit this backend (``validate_task``).
            TypeError, ValueError: an argument is not JSON (nothing is stored).
            EventValidationError: the arguments are too large or not storable (nothing is stored).
        """
        self.validate_task(task)
        try:
            json_args, json_kwargs = normalize_json(list(args)), normalize_json(kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"The arguments of task {task.module_path} must be JSON values (dicts, lists, str, "
                f"int, float, bool, None): {exc}"
            ) from exc
        run_after = task.run_after
        if run_after is not None and timezone.is_naive(run_after):  # USE_TZ = False
            run_after = timezone.make_aware(run_after)
        data = {
            "task": task.module_path,
            "args": json_args,
            "kwargs": json_kwargs,
            "backend": self.alias,
            "queue_name": task.queue_name,
            "priority": task.priority,
            "run_after": None if run_after is None else run_after.isoformat(),
        }
        using = router.db_for_write(Run)
        # send() validates before it writes: bad data raises here with nothing stored, and the
        # caller's transaction intact.
        event = send(EVENT_PREFIX + task.module_path, data, run_at=run_after)
        run = (
            Run.objects.using(using)
            .filter(event_id=event.pk, function=FUNCTION_ID)
            .only("id", "status", "created_at", "event_id")
            .first()
        )
        if run is None:
            raise ConfigurationError(
                f"No run of {FUNCTION_ID!r} was made for task {task.module_path}: the function is "
                "not registered (was it unregistered?)."
            )
        result = cast("TaskResult[_P, _R]", _task_result(task, run, event.data, []))
        transaction.on_commit(
            lambda: task_enqueued.send(type(self), task_result=result), using=using, robust=True
        )
        return result

    def get_result(self, result_id: str) -> TaskResult[..., Any]:
        """The result of the task run ``result_id``, read from the ledger.

        Raises:
            TaskResultDoesNotExist: no task run has this id.
            ValueError: the run's task can no longer be imported.
        """
        try:
            pk = uuid.UUID(str(result_id))
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        using = router.db_for_read(Run)
        run = Run.objects.using(using).select_related("event").filter(pk=pk, function=FUNCTION_ID).first()
        if run is None:
            raise TaskResultDoesNotExist(result_id)
        return _task_result(_task_of(run.event.data), run, run.event.data, _attempts(pk, using))

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        """``django_events.E040`` unless django_events is installed (its workers run the tasks)."""
        if "django_events" in settings.INSTALLED_APPS or any(
            app.startswith("django_events.") for app in settings.INSTALLED_APPS
        ):
            return []
        return [
            checks.Error(
                f"The task backend {self.alias!r} is django-events', but django_events is not installed.",
                hint="Add 'django_dramatiq' and 'django_events' to INSTALLED_APPS.",
                id="django_events.E040",
            )
        ]


def _task_of(data: dict[str, Any]) -> Task[..., Any]:
    """The ``Task`` that ``data`` (a task event's) names, with the options it was enqueued with."""
    path = data.get("task")
    try:
        task = import_string(str(path))
    except ImportError as exc:
        raise ValueError(f"The task {path!r} cannot be imported: {exc}") from exc
    if not isinstance(task, Task):
        raise ValueError(f"{path!r} is not a Task (decorate the function with @task).")
    run_after = parse_datetime(data["run_after"]) if data.get("run_after") else None
    return task.using(
        priority=data.get("priority"),
        queue_name=data.get("queue_name"),
        run_after=run_after,
        backend=data.get("backend"),
    )


def _attempts(run_id: Any, using: str) -> list[Attempt]:
    return list(
        Attempt.objects.using(using)
        .filter(run_id=run_id)
        .exclude(outcome=AttemptOutcome.SUSPENDED)
        .order_by("number")
        .only("number", "started_at", "outcome", "exc_type", "traceback", "worker_host", "worker_pid")
    )


def _worker_id(host: str, pid: int | None) -> str:
    return f"{host}:{pid}" if pid is not None else host


def _error(attempt: Attempt) -> TaskError:
    path = attempt.exc_type or "django_events.exceptions.DjangoEventsError"
    return TaskError(
        exception_class_path=path if "." in path else f"builtins.{path}",
        traceback=attempt.traceback or f"{path}: (no traceback was stored)",
    )


def _task_result(
    task: Task[..., Any],
    run: Run,
    data: dict[str, Any],
    attempts: Sequence[Attempt],
    *,
    status: TaskResultStatus | None = None,
    current_worker: str | None = None,
    attempt_started_at: dt.datetime | None = None,
) -> TaskResult[..., Any]:
    """A ``TaskResult`` of ``run``: its status mapped, its failed attempts as ``errors``."""
    status = status or STATUS_MAP.get(run.status, TaskResultStatus.FAILED)
    worker_ids = [_worker_id(a.worker_host, a.worker_pid) for a in attempts]
    if current_worker is not None:
        worker_ids.append(current_worker)
    elif status == TaskResultStatus.RUNNING:
        worker_ids += [RUNNING_WORKER] * max(1, run.attempts - len(worker_ids))
    started_at = run.started_at if current_worker is None else (attempts[0].started_at if attempts else None)
    result: TaskResult[..., Any] = TaskResult(
        task=task,
        id=str(run.pk),
        status=status,
        enqueued_at=run.created_at,
        started_at=started_at or attempt_started_at,
        finished_at=run.finished_at
        if status in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED)
        else None,
        last_attempted_at=attempt_started_at or (run.attempt_started_at if run.attempts else None),
        args=data.get("args", []),
        kwargs=data.get("kwargs", {}),
        backend=data.get("backend", task.backend),
        errors=[_error(a) for a in attempts if a.outcome in _ERROR_OUTCOMES],
        worker_ids=worker_ids,
    )
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", run.result)
    return result


def _priority(event: Any) -> int:
    """A task run's priority: the task's (Django's -100 to 100; higher runs first)."""
    value = event.data.get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _this_worker() -> str:
    return _worker_id(socket.gethostname()[:255], os.getpid())


@function(EVENT_PREFIX + "*", id=FUNCTION_ID, priority=_priority)
def run_task(ctx: Context) -> Any:
    """Run the Django task that ``ctx.event`` carries: ``task_started``, then the task's function.

    An ``async def`` task runs in an event loop of its own (Django's ``Task.call``). The
    return value is stored as JSON (Django's ``normalize_json``: tuples become lists).
    """
    data = ctx.event.data
    task = _task_of(data)
    using = router.db_for_read(Run)
    earlier = _attempts(ctx.run_id, using) if ctx.attempt > 1 else []
    now = timezone.now()
    run = Run(
        pk=ctx.run_id,
        status=RunStatus.RUNNING,
        attempts=ctx.attempt,
        created_at=ctx.event.created_at,
    )
    result = _task_result(task, run, data, earlier, current_worker=_this_worker(), attempt_started_at=now)
    task_started.send(EventsTaskBackend, task_result=result)
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if task.takes_context:
        value = task.call(TaskContext(task_result=result), *args, **kwargs)
    else:
        value = task.call(*args, **kwargs)
    return normalize_json(value)


@receiver(run_succeeded, dispatch_uid="django_events.task_backend.finished_ok")
@receiver(run_failed, dispatch_uid="django_events.task_backend.finished_failed")
def _send_task_finished(sender: Any, run: Run, **kwargs: Any) -> None:
    """After each attempt of a task run is recorded: Django's ``task_finished``, with the result as stored."""
    if run.function != FUNCTION_ID:
        return
    using = run._state.db or router.db_for_read(Run)
    result = _task_result(_task_of(run.event.data), run, run.event.data, _attempts(run.pk, using))
    task_finished.send(EventsTaskBackend, task_result=result)
