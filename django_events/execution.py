"""Executing one run: claim it, call its function, record the outcome, schedule a retry.

The database is the source of truth. A claim is one conditional UPDATE that only
succeeds if the run is still in the state we read, so two workers never hold the
same run at once, and every later write is fenced on the attempt number, so a
worker that lost its lease cannot overwrite a newer attempt's outcome.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import random
import socket
import traceback
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import IntegrityError, router, transaction
from django.utils import timezone
from dramatiq.middleware.shutdown import Shutdown
from dramatiq.middleware.time_limit import TimeLimitExceeded

from . import hotpath, signals
from .conf import get_settings
from .exceptions import (
    FunctionNotFoundError,
    NonRetriableError,
    ResultNotSerializableError,
    RetryAfterError,
)
from .models import WAITING_STATUSES, Attempt, AttemptOutcome, Run, RunStatus
from .registry import Context, Function, get_function
from .sending import enqueue_with_transaction

__all__ = ["RUN_DEAD_EVENT", "Execution", "Failure", "backoff_delay", "classify", "execute_run", "record"]

logger = logging.getLogger("django_events")

#: Dramatiq's own default time limit, used for the lease when nothing else is set.
DRAMATIQ_DEFAULT_TIME_LIMIT = 600.0
#: Longest ``last_error`` kept on a run, in characters (the full text is on the attempt).
LAST_ERROR_LENGTH = 1000

#: The event sent when a run goes dead, so that a function can alert someone.
RUN_DEAD_EVENT = "django_events/run.dead"


class Execution(enum.Enum):
    """What ``execute_run`` did with a run id."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD = "dead"
    #: Not executed: the run is unknown, final, held by another worker, or not due yet.
    SKIPPED = "skipped"
    #: Executed, but another worker took the run over meanwhile; its outcome was not recorded.
    STALE = "stale"


@dataclass(frozen=True)
class Failure:
    """How an attempt failed, and what follows: a retry in ``retry_in`` seconds, or death."""

    exc: BaseException
    outcome: str
    retry_in: float | None  # seconds; None: the run goes dead
    refund: bool = False  # give the attempt back (the worker interrupted it, not the function)


class _RunLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[{extra['function']} run={extra['run_id']} attempt={extra['attempt']}] {msg}", kwargs


@cache
def _hostname() -> str:
    return socket.gethostname()[:255]


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    Exponential: ``RETRY_BACKOFF_MIN * 2 ** (attempt - 1)``, with up to 50% of
    random jitter added so that failures do not retry in lockstep, and never
    outside ``[RETRY_BACKOFF_MIN, RETRY_BACKOFF_MAX]``.
    """
    conf = get_settings()
    base = min(conf.RETRY_BACKOFF_MAX, conf.RETRY_BACKOFF_MIN * 2 ** min(max(attempt - 1, 0), 62))
    return min(conf.RETRY_BACKOFF_MAX, random.uniform(base, base * 1.5))


def lease_seconds(spec: Function | None) -> float:
    """How long a worker holds a run: the function's time limit plus ``LEASE_MARGIN``."""
    limit_ms = spec.time_limit_ms() if spec is not None else get_settings().default_time_limit_ms
    return lease_for_time_limit(limit_ms)


def lease_for_time_limit(time_limit_ms: float | None) -> float:
    """The lease, in seconds, of an attempt under a time limit in ms (``None``: Dramatiq's default)."""
    limit = DRAMATIQ_DEFAULT_TIME_LIMIT if time_limit_ms is None else time_limit_ms / 1000
    return limit + get_settings().LEASE_MARGIN


def execute_run(
    run_id: Any, *, ignore_due: bool = False, enqueue: bool = True, lease: float | None = None
) -> Execution:
    """Claim run ``run_id``, call its function and record how it ended.

    Args:
        run_id: the run's primary key.
        ignore_due: run a pending or retrying run even if its ``due_at`` is in the
            future (the testing helpers use this to skip backoff delays).
        enqueue: send the Dramatiq message for a retry after commit (the testing
            helpers turn this off and run retries themselves).
        lease: seconds the worker holds the run, if known before reading it (the
            actor knows it from its message's time limit): then one statement claims
            the run and reads it with its event. Otherwise the run is read first and
            the lease comes from its function.

    A run that cannot be claimed (unknown, final, held by a live lease) is
    skipped, so duplicate deliveries of a message are harmless.
    """
    try:
        run_id = uuid.UUID(str(run_id))
    except ValueError:
        logger.warning("Dropped a message for run %r: not a run id.", run_id)
        return Execution.SKIPPED
    using = router.db_for_write(Run)
    now = timezone.now()
    run: Run | None = None
    if lease is not None and hotpath.supported(using):
        run = hotpath.claim(
            run_id, using=using, now=now, lease_until=now + dt.timedelta(seconds=lease), ignore_due=ignore_due
        )
    if run is not None:
        attempt = run.attempts
        spec = get_function(run.function)
    else:
        # Not claimed at once: find out why, or claim it the long way.
        run = Run.objects.using(using).select_related("event").filter(pk=run_id).first()
        if run is None:
            logger.warning("Dropped a message for run %s: no such run.", run_id)
            return Execution.SKIPPED
        if run.status in WAITING_STATUSES and run.due_at and run.due_at > now and not ignore_due:
            # Early: a duplicate message, or a delayed one cut short by the broker's maximum delay.
            if enqueue:
                _enqueue(run, delay=(run.due_at - now).total_seconds())
            return Execution.SKIPPED
        spec = get_function(run.function)
        attempt = run.attempts + 1
        if _claim(run, using=using, now=now, ignore_due=ignore_due, lease=lease_seconds(spec)) is None:
            logger.debug("Skipped run %s (%s): not claimable.", run.pk, run.status)
            return Execution.SKIPPED

    log = _RunLogger(
        logging.getLogger("django_events.functions"),
        {"run_id": str(run.pk), "function": run.function, "event": run.event.name, "attempt": attempt},
    )
    logger.info(
        "Run %s of %s for %s started (attempt %d of %d).",
        run.pk,
        run.function,
        run.event.name,
        attempt,
        run.max_attempts,
    )
    started = now
    failure: Failure | None = None
    stored_result: Any = None
    if spec is None:
        failure = Failure(
            FunctionNotFoundError(
                f"No function is registered with the id {run.function!r}: was it removed or renamed? "
                "Retry this run once the function is deployed again."
            ),
            AttemptOutcome.FAILED,
            None,
        )
    else:
        ctx = Context(
            event=run.event,
            run_id=run.pk,
            attempt=attempt,
            max_attempts=run.max_attempts,
            function_id=run.function,
            logger=log,
        )
        try:
            stored_result = _json_result(spec.fn(ctx))
        except (Exception, TimeLimitExceeded) as exc:
            failure = classify(exc, attempt, run.max_attempts)
        except Shutdown as exc:
            # The worker is stopping (ShutdownNotifications): put the run back, due at once.
            failure = Failure(exc, AttemptOutcome.INTERRUPTED, 0.0, refund=True)
        # Any other BaseException (KeyboardInterrupt, SystemExit) is a dying process: the
        # run stays running until its lease expires, then recovery takes it back.
    return record(run, attempt, started, stored_result, failure, using=using, enqueue=enqueue)


def _claim(run: Run, *, using: str, now: dt.datetime, ignore_due: bool, lease: float) -> dt.datetime | None:
    """Take ``run`` for one attempt if it is still as we read it (compare and swap on attempts).

    Returns when the attempt started, or ``None`` if another worker got there first.
    """
    changes: dict[str, Any] = {
        "attempts": run.attempts + 1,
        "lease_expires_at": now + dt.timedelta(seconds=lease),
        "attempt_started_at": now,
    }
    if run.started_at is None:
        changes["started_at"] = now
    moved = (
        Run.objects.using(using)
        .filter(pk=run.pk, attempts=run.attempts)
        .claimable(now, ignore_due=ignore_due)
        .move(RunStatus.RUNNING, **changes)
    )
    return now if moved == 1 else None


def _json_result(value: Any) -> Any:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ResultNotSerializableError(
            f"The function returned a value that JSON cannot hold ({type(value).__name__}): {exc}. "
            "Return JSON-serialisable data (dicts, lists, strings, numbers, booleans, None)."
        ) from exc
    return json.loads(text)


def classify(exc: BaseException, attempt: int, max_attempts: int) -> Failure:
    """What follows a failed attempt: a retry after backoff (or ``RetryAfterError``'s delay), or death."""
    timed_out = isinstance(exc, TimeLimitExceeded)
    outcome = AttemptOutcome.TIMED_OUT if timed_out else AttemptOutcome.FAILED
    if isinstance(exc, (NonRetriableError, ResultNotSerializableError)) or attempt >= max_attempts:
        return Failure(exc, outcome, None)
    if isinstance(exc, RetryAfterError):
        return Failure(exc, outcome, exc.seconds)
    return Failure(exc, outcome, backoff_delay(attempt))


def _exc_type(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def record(
    run: Run,
    attempt: int,
    started: dt.datetime,
    result: Any,
    failure: Failure | None,
    *,
    using: str,
    enqueue: bool = True,
) -> Execution:
    """Store how attempt ``attempt`` of ``run`` ended, fenced on the attempt number.

    One transaction: the run's new status, the ``Attempt`` row, and for a dead
    run the ``django_events/run.dead`` event. After commit: the retry's message
    (if ``enqueue``) and the signals. If another worker has taken the run over
    meanwhile, nothing of the run is changed (the attempt is still kept in the
    history if its number is free) and ``Execution.STALE`` is returned.
    """
    finished = timezone.now()
    attempt_row = Attempt(
        run_id=run.pk,
        number=attempt,
        started_at=started,
        finished_at=finished,
        worker_host=_hostname(),
        worker_pid=os.getpid(),
    )
    changes: dict[str, Any] = {"lease_expires_at": None}
    if failure is None:
        to, execution = RunStatus.SUCCEEDED, Execution.SUCCEEDED
        attempt_row.outcome = AttemptOutcome.SUCCEEDED
        changes.update(result=result, finished_at=finished, due_at=None)
    else:
        exc = failure.exc
        attempt_row.outcome = failure.outcome
        attempt_row.exc_type = _exc_type(exc)[:255]
        attempt_row.message = str(exc) or _DEFAULT_MESSAGES.get(failure.outcome, "")
        attempt_row.traceback = "".join(traceback.format_exception(exc))
        changes["last_error"] = f"{attempt_row.exc_type}: {attempt_row.message}"[:LAST_ERROR_LENGTH]
        if failure.refund:
            changes["max_attempts"] = run.max_attempts + 1
        if failure.retry_in is None:
            to, execution = RunStatus.DEAD, Execution.DEAD
            changes.update(finished_at=finished, due_at=None)
        else:
            to, execution = RunStatus.RETRYING, Execution.RETRYING
            changes["due_at"] = finished + dt.timedelta(seconds=failure.retry_in)

    if failure is None and hotpath.supported(using):
        # The common case, in one statement: nothing else goes in its transaction.
        moved = int(hotpath.record_success(run, attempt_row, result, using))
        if moved:
            _apply(run, to, attempt, changes)
    else:
        with transaction.atomic(using=using):
            moved = (
                Run.objects.using(using)
                .filter(pk=run.pk, attempts=attempt, status=RunStatus.RUNNING)
                .move(to, **changes)
            )
            if moved:
                attempt_row.save(using=using, force_insert=True)
                _apply(run, to, attempt, changes)
                if to == RunStatus.RETRYING and enqueue:
                    delay = (changes["due_at"] - finished).total_seconds()
                    enqueue_with_transaction([(run.pk, run.function)], using, delay=delay)
                if to == RunStatus.DEAD and run.event_name != RUN_DEAD_EVENT:
                    _send_dead_event(run, attempt)

    if not moved:
        _keep_stale_attempt(attempt_row, using)
        logger.warning(
            "Run %s of %s: attempt %d finished after another worker took the run over; "
            "its outcome (%s) was not applied.",
            run.pk,
            run.function,
            attempt,
            attempt_row.outcome,
        )
        return Execution.STALE
    _log_outcome(run, attempt, execution, failure, changes)
    _send_signals(run, attempt_row, execution, result, failure)
    return execution


_DEFAULT_MESSAGES: dict[str, str] = {
    AttemptOutcome.TIMED_OUT: "time limit exceeded",
    AttemptOutcome.INTERRUPTED: "the worker was shutting down",
}


def _send_dead_event(run: Run, attempt: int) -> None:
    from .sending import send

    send(
        RUN_DEAD_EVENT,
        {
            "run_id": str(run.pk),
            "function": run.function,
            "event_id": str(run.event_id),
            "event_name": run.event_name,
            "attempts": attempt,
            "error": run.last_error,
        },
    )


def _send_signals(
    run: Run, attempt_row: Attempt, execution: Execution, result: Any, failure: Failure | None
) -> None:
    sent: list[tuple[Any, list[tuple[Any, Any]]]] = []
    if failure is None:
        sent.append(
            (
                signals.run_succeeded,
                signals.run_succeeded.send_robust(sender=Run, run=run, attempt=attempt_row, result=result),
            )
        )
    else:
        sent.append(
            (
                signals.run_failed,
                signals.run_failed.send_robust(
                    sender=Run,
                    run=run,
                    attempt=attempt_row,
                    exception=failure.exc,
                    will_retry=execution is Execution.RETRYING,
                ),
            )
        )
        if execution is Execution.DEAD:
            sent.append(
                (
                    signals.run_dead,
                    signals.run_dead.send_robust(
                        sender=Run, run=run, attempt=attempt_row, exception=failure.exc
                    ),
                )
            )
    for _signal, responses in sent:
        for receiver, response in responses:
            if isinstance(response, Exception):
                logger.error(
                    "A signal receiver %r failed for run %s.",
                    receiver,
                    run.pk,
                    exc_info=(type(response), response, response.__traceback__),
                )


def _apply(run: Run, to: str, attempt: int, changes: dict[str, Any]) -> None:
    """Bring the ``run`` object up to date with the move just stored."""
    for field, value in changes.items():
        setattr(run, field, value)
    run.status, run.attempts = to, attempt


def _keep_stale_attempt(attempt_row: Attempt, using: str) -> None:
    """Keep a late attempt's history unless its number is already recorded."""
    try:
        with transaction.atomic(using=using):
            attempt_row.save(using=using, force_insert=True)
    except IntegrityError:
        pass


def _log_outcome(
    run: Run, attempt: int, execution: Execution, failure: Failure | None, changes: dict[str, Any]
) -> None:
    args = (run.pk, run.function, run.event.name, attempt)
    if failure is None:
        logger.info("Run %s of %s for %s succeeded (attempt %d).", *args)
        return
    exc_info = (type(failure.exc), failure.exc, failure.exc.__traceback__)
    if execution is Execution.RETRYING:
        logger.warning(
            "Run %s of %s for %s failed (attempt %d); retrying at %s.",
            *args,
            changes["due_at"].isoformat(),
            exc_info=exc_info,
        )
    else:
        logger.error("Run %s of %s for %s is dead after attempt %d.", *args, exc_info=exc_info)


def _enqueue(run: Run, *, delay: float) -> None:
    from .tasks import enqueue_run

    try:
        enqueue_run(run.pk, run.function, delay=delay)
    except Exception:
        logger.exception(
            "Could not enqueue run %s of %s; it stays %s in the database.", run.pk, run.function, run.status
        )
