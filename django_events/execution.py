"""Executing one run: claim it, call its function, record the outcome, schedule a retry.

The database is the source of truth. A claim is one conditional UPDATE that only
succeeds if the run is still in the state we read, so two workers never hold the
same run at once, and every later write is fenced on the attempt number, so a
worker that lost its lease cannot overwrite a newer attempt's outcome.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import math
import os
import random
import socket
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, router, transaction
from dramatiq.middleware.shutdown import Shutdown
from dramatiq.middleware.time_limit import TimeLimitExceeded

from . import clock, dispatch, flow, ledger, signals, waits
from .conf import get_settings
from .exceptions import (
    FunctionNotFoundError,
    NonRetriableError,
    ResultNotSerializableError,
    RetryAfterError,
    RunTimedOutError,
)
from .models import FINAL_STATUSES, WAITING_STATUSES, Attempt, AttemptOutcome, Run, RunStatus
from .registry import Context, controls_start, get_function, has_concurrency, lease_seconds
from .sending import send
from .steps import Steps, Suspend, Suspension, store_suspension
from .text import clip, short_repr, storable
from .values import exc_type_name, json_result, safe_str, traceback_text

__all__ = [
    "RUN_DEAD_EVENT",
    "Execution",
    "Failure",
    "backoff_delay",
    "classify",
    "execute",
    "execute_run",
    "record",
]

logger = logging.getLogger("django_events")

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
    #: Left the worker at a ``step.sleep``.
    SLEEPING = "sleeping"
    #: Left the worker at a ``step.wait_for_event`` or a ``step.invoke``.
    WAITING = "waiting"


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


def execute_run(
    run_id: Any,
    *,
    ignore_due: bool = False,
    enqueue: bool = True,
    lease: float | None = None,
    function_id: str | None = None,
) -> Execution:
    """Claim run ``run_id``, call its function and record how it ended: :func:`execute`'s first half."""
    return execute(run_id, ignore_due=ignore_due, enqueue=enqueue, lease=lease, function_id=function_id)[0]


def execute(
    run_id: Any,
    *,
    ignore_due: bool = False,
    enqueue: bool = True,
    lease: float | None = None,
    function_id: str | None = None,
) -> tuple[Execution, Any]:
    """Claim run ``run_id``, call its function and record how it ended; return that and the run's id.

    The run executed may be another than ``run_id`` under flow control: for a
    function with a priority, the message of a due run is a turn, taken by the
    function's run that goes first; and a message whose run finds no free
    concurrency slot takes the run a slot is kept for (``flow.claim``).

    Args:
        run_id: the run's primary key.
        ignore_due: run a pending or retrying run even if its ``due_at`` is in the
            future (the testing helpers use this to skip backoff delays).
        enqueue: send the Dramatiq message for a retry after commit (the testing
            helpers turn this off and run retries themselves).
        lease: seconds the worker holds the run, if known before reading it (the
            actor knows it from its message's time limit): then one statement claims
            the run and reads it with its event. Otherwise the run's function is
            read first and the lease comes from it.
        function_id: the run's function, if known before reading it (the actor knows it
            from its message): then a run of a function without flow control at claim
            time is claimed in one statement even where other functions have some.

    A run that cannot be claimed (unknown, final, held by a live lease) is
    skipped, so duplicate deliveries of a message are harmless.
    """
    try:
        run_id = uuid.UUID(str(run_id))
    except ValueError:
        logger.warning("Dropped a message for run %s: not a run id.", short_repr(run_id))
        return Execution.SKIPPED, run_id
    using = router.db_for_write(Run)
    now = clock.now()
    spec = None if function_id is None else get_function(function_id)
    if lease is None or (function_id is None and controls_start()):
        # The function decides the lease, and whether flow control must admit the run first.
        function_id = Run.objects.using(using).filter(pk=run_id).values_list("function", flat=True).first()
        if function_id is None:
            logger.warning("Dropped a message for run %s: no such run.", run_id)
            return Execution.SKIPPED, run_id
        lease = lease_seconds(function_id) if lease is None else lease
        spec = get_function(function_id)
    lease_until = now + dt.timedelta(seconds=lease)
    if spec is not None and spec.controls_start:
        ended: list[Run] = []
        claimed = flow.claim(
            run_id,
            spec,
            using=using,
            now=now,
            lease_until=lease_until,
            ignore_due=ignore_due,
            on_dead=lambda dead: _ended_at_claim(dead, ended),
        )
        for dead in ended:
            _dead_before_attempt(dead)
        if claimed is flow.HELD_BACK:
            return Execution.SKIPPED, run_id  # no attempt ran (a run ended here is logged above)
        run = claimed if isinstance(claimed, Run) else None
    else:
        run = ledger.claim(run_id, using=using, now=now, lease_until=lease_until, ignore_due=ignore_due)
    if run is None:
        _not_claimed(run_id, using=using, now=now, ignore_due=ignore_due, enqueue=enqueue)
        return Execution.SKIPPED, run_id
    attempt = run.attempts
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
    result, failure = _call(run, attempt, log)
    started = run.attempt_started_at or now  # flow control may have waited for its locks
    return record(run, attempt, started, result, failure, using=using, enqueue=enqueue), run.pk


def _not_claimed(run_id: uuid.UUID, *, using: str, now: dt.datetime, ignore_due: bool, enqueue: bool) -> None:
    """Say why run ``run_id`` could not be claimed; send an early message of a waiting run again."""
    run = Run.objects.using(using).filter(pk=run_id).only("function", "status", "due_at").first()
    if run is None:
        logger.warning("Dropped a message for run %s: no such run.", run_id)
        return
    if run.status in WAITING_STATUSES and run.due_at and run.due_at > now and not ignore_due:
        # Early: a duplicate message, or a delayed one cut short by the broker's maximum delay.
        if enqueue:
            _send_again(run, delay=(run.due_at - now).total_seconds())
        return
    spec = get_function(run.function)
    if enqueue and not ignore_due and spec is not None and spec.priority is not None:
        # A turn of a function with a priority finds no run when every due one is locked by
        # another message's transaction (each taking its own). Should one of them be left waiting,
        # this turn must not be lost: sent again shortly while due runs of the function wait.
        waiting = (
            Run.objects.using(using)
            .filter(function=run.function, priority__isnull=False)
            .claimable(clock.now())
        )
        if waiting.exists():
            logger.debug("Turn of %s sent again: its due runs were all being taken.", run.function)
            _send_again(run, delay=TURN_AGAIN)
            return
    logger.debug("Skipped run %s (%s): not claimable.", run.pk, run.status)


#: Seconds after which a turn of a function with a priority that found every due run locked is
#: sent again (see :func:`_not_claimed`): long enough for the transactions holding them to end.
TURN_AGAIN = 0.2


def _send_again(run: Run, *, delay: float) -> None:
    try:
        dispatch.send_now([(run.pk, run.function)], delay=delay)
    except Exception:
        logger.exception(
            "Could not enqueue run %s of %s; it stays %s in the database.", run.pk, run.function, run.status
        )


def _call(run: Run, attempt: int, log: logging.LoggerAdapter[logging.Logger]) -> tuple[Any, Failure | None]:
    """Call the run's function; return its result (as JSON will store it) or how it failed."""
    spec = get_function(run.function)
    if spec is None:
        error = FunctionNotFoundError(
            f"No function is registered with the id {run.function!r}: was it removed or renamed? "
            "Retry this run once the function is deployed again."
        )
        return None, Failure(error, AttemptOutcome.FAILED, None)
    ctx = Context(
        event=run.event,
        run_id=run.pk,
        attempt=attempt,
        max_attempts=run.max_attempts,
        function_id=run.function,
        logger=log,
        events=flow.batch_events(run) if spec.batch is not None else [run.event],
        step=Steps(run, attempt, using=run._state.db or router.db_for_write(Run)),
    )
    try:
        value = spec.fn(ctx)
        if ctx.step.suspended is not None:
            # It caught the Suspend of a sleep, a wait or an invoke and returned: the run leaves
            # the worker all the same, and its replay goes on from that step.
            return ctx.step.suspended, None
        return json_result(value), None
    except Suspend as suspend:
        return suspend.suspension, None
    except Shutdown as exc:
        # The worker is stopping (ShutdownNotifications): put the run back, due at once.
        return None, Failure(exc, AttemptOutcome.INTERRUPTED, 0.0, refund=True)
    except BaseException as exc:
        # Exceptions, time limits, and any other BaseException: Dramatiq's worker thread catches
        # those and carries on, so the run must not be left running.
        return None, classify(exc, attempt, run.max_attempts)


def classify(exc: BaseException, attempt: int, max_attempts: int) -> Failure:
    """What follows a failed attempt: a retry after backoff (or ``RetryAfterError``'s delay), or death."""
    timed_out = isinstance(exc, TimeLimitExceeded)
    outcome = AttemptOutcome.TIMED_OUT if timed_out else AttemptOutcome.FAILED
    if isinstance(exc, (NonRetriableError, ResultNotSerializableError)) or attempt >= max_attempts:
        return Failure(exc, outcome, None)
    if isinstance(exc, RetryAfterError):
        seconds = getattr(exc, "seconds", None)  # a subclass may have changed it after checking
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
            return Failure(exc, outcome, min(float(seconds), RetryAfterError.MAX_SECONDS))
    return Failure(exc, outcome, backoff_delay(attempt))


#: The most characters of an exception's message, and of its traceback, kept on an attempt
#: (the start and the end are kept, with a marker saying how much was cut).
MESSAGE_LENGTH = 10_000
TRACEBACK_LENGTH = 100_000


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
    """Store how attempt ``attempt`` of ``run`` ended, fenced on the attempt number (``ledger.record``).

    A success is one statement. A failure is one transaction: the run's new
    status, the ``Attempt`` row, the retry's message (sent on commit, or written
    in the transaction by ``DatabaseBroker``; not if ``enqueue`` is false), and for
    a dead run the ``django_events/run.dead`` event. After commit: the signals.

    The exception's type, message and traceback are stored as text any database
    accepts (NUL and lone surrogates replaced, over-long text cut with a marker).
    If the database still refuses the outcome, a reduced record is stored instead
    (the type, a short message, no traceback or result): the run never stays
    ``running`` because of what its function returned or raised.

    If another worker has taken the run over meanwhile, nothing of the run is
    changed (the attempt is still kept in the history if its number is free) and
    ``Execution.STALE`` is returned.
    """
    if isinstance(result, Suspension):
        return _suspend(run, attempt, started, result, using=using, enqueue=enqueue)
    finished = clock.now()
    attempt_row = _attempt_row(run, attempt, started, finished)
    outcome = _Outcome.of(failure, result, finished)
    deadline = flow.finish_deadline(run)
    if (
        outcome.to == RunStatus.RETRYING
        and deadline is not None
        and outcome.due_at
        and outcome.due_at > deadline
    ):
        # Timeouts.finish: no attempt starts after it, so the run ends now.
        outcome = dataclasses.replace(
            outcome,
            to=RunStatus.DEAD,
            due_at=None,
            message=clip(
                f"{outcome.message} [no retry: Timeouts.finish ends the run at {deadline:%H:%M:%S}]",
                MESSAGE_LENGTH,
            ),
        )
    try:
        moved = _store(run, attempt_row, outcome, using=using, enqueue=enqueue)
    except DatabaseError as error:
        logger.exception(
            "Run %s of %s: the database refused the outcome of attempt %d; storing a reduced record.",
            run.pk,
            run.function,
            attempt,
        )
        moved = _store(run, attempt_row, outcome.reduced(error), using=using, enqueue=enqueue)

    if not moved:
        ledger.keep_stale_attempt(attempt_row, using)
        logger.warning(
            "Run %s of %s: attempt %d finished after another worker took the run over; "
            "its outcome (%s) was not applied.",
            run.pk,
            run.function,
            attempt,
            attempt_row.outcome,
        )
        return Execution.STALE
    execution = _EXECUTIONS[outcome.to]
    _log_outcome(run, attempt_row, execution)
    _send_signals(run, attempt_row, execution, result, failure)
    return execution


def _attempt_row(
    run: Run, attempt: int, started: dt.datetime, finished: dt.datetime, **fields: Any
) -> Attempt:
    """The row of attempt ``attempt`` of ``run``, made in this worker (its host and pid)."""
    return Attempt(
        run_id=run.pk,
        number=attempt,
        started_at=started,
        finished_at=finished,
        worker_host=_hostname(),
        worker_pid=os.getpid(),
        **fields,
    )


@dataclass(frozen=True)
class _Outcome:
    """What an attempt's record writes: the run's new status and the attempt's texts, storable."""

    to: str
    outcome: str
    result: Any = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    due_at: dt.datetime | None = None
    refund: bool = False

    @classmethod
    def of(cls, failure: Failure | None, result: Any, finished: dt.datetime) -> _Outcome:
        if failure is None:
            return cls(RunStatus.SUCCEEDED, AttemptOutcome.SUCCEEDED, result=result)
        exc = failure.exc
        message = safe_str(exc) or _DEFAULT_MESSAGES.get(failure.outcome, "")
        return cls(
            RunStatus.DEAD if failure.retry_in is None else RunStatus.RETRYING,
            failure.outcome,
            exc_type=exc_type_name(exc),
            message=clip(storable(message), MESSAGE_LENGTH),
            traceback=clip(storable(traceback_text(exc)), TRACEBACK_LENGTH),
            due_at=None if failure.retry_in is None else finished + dt.timedelta(seconds=failure.retry_in),
            refund=failure.refund,
        )

    def reduced(self, error: DatabaseError) -> _Outcome:
        """The same move with the least text: what to store when the database refused the whole."""
        what = "result" if self.to == RunStatus.SUCCEEDED else "traceback"
        note = f"[the database refused this attempt's {what}: {type(error).__name__}]"
        message = f"{self.message[:200]} {note}" if self.message else note
        return dataclasses.replace(
            self, result=None, exc_type=storable(self.exc_type), message=storable(message), traceback=""
        )

    @property
    def last_error(self) -> str | None:
        if self.to == RunStatus.SUCCEEDED:
            return None
        return f"{self.exc_type}: {self.message}"[:LAST_ERROR_LENGTH]


#: What ``execute_run`` reports for each status a record moves a run to.
_EXECUTIONS: dict[str, Execution] = {
    RunStatus.SUCCEEDED: Execution.SUCCEEDED,
    RunStatus.RETRYING: Execution.RETRYING,
    RunStatus.DEAD: Execution.DEAD,
}


def _store(run: Run, attempt_row: Attempt, outcome: _Outcome, *, using: str, enqueue: bool) -> bool:
    """Write ``outcome`` (with the retry's message or the run.dead event); whether the fence held."""
    attempt_row.outcome = outcome.outcome
    attempt_row.exc_type, attempt_row.message, attempt_row.traceback = (
        outcome.exc_type,
        outcome.message,
        outcome.traceback,
    )
    limited = has_concurrency(run.function)
    if (
        outcome.to == RunStatus.SUCCEEDED
        and not limited
        and run.parent is None
        and not connections[using].in_atomic_block
    ):
        # The common case: one statement in autocommit, nothing else to write with it.
        return ledger.record(run, attempt_row, outcome.to, using=using, result=outcome.result)
    with transaction.atomic(using=using):  # a savepoint, inside a caller's transaction
        moved = ledger.record(
            run,
            attempt_row,
            outcome.to,
            using=using,
            result=outcome.result,
            last_error=outcome.last_error,
            due_at=outcome.due_at,
            refund=outcome.refund,
        )
        if moved and outcome.due_at is not None and enqueue:
            delay = (outcome.due_at - attempt_row.finished_at).total_seconds()
            dispatch.send_with_transaction([(run.pk, run.function)], using, delay=delay)
        if moved and outcome.to == RunStatus.DEAD and run.event_name != RUN_DEAD_EVENT:
            _send_dead_event(run, attempt_row.number)
        if moved and limited:
            # Its concurrency slots go to the runs held on them, in this transaction.
            woken = flow.release(run, using=using, now=attempt_row.finished_at)
            dispatch.send_with_transaction(woken, using)
        if moved and run.parent is not None and outcome.to in FINAL_STATUSES:
            waits.invoked_ended([run], using=using, now=attempt_row.finished_at)
    return moved


def _suspend(
    run: Run, attempt: int, started: dt.datetime, suspension: Suspension, *, using: str, enqueue: bool
) -> Execution:
    """Record that attempt ``attempt`` left the worker at a sleep, a wait or an invoke.

    One transaction: the sleep's step row (or the wait's, locked and checked), the
    run's move to ``sleeping`` / ``waiting`` with its attempt given back, the
    message that wakes it at its time, and its concurrency slots' release.
    """
    finished = clock.now()
    attempt_row = _attempt_row(
        run,
        attempt,
        started,
        finished,
        outcome=AttemptOutcome.SUSPENDED,
        message=clip(storable(suspension.describe()), MESSAGE_LENGTH),
    )
    try:
        with transaction.atomic(using=using):
            due_at = store_suspension(run, suspension, using=using, now=finished)
            moved = ledger.record(
                run, attempt_row, suspension.status, using=using, due_at=due_at, refund=True
            )
            if not moved:
                transaction.set_rollback(True, using=using)  # the sleep's row goes too
            else:
                if due_at is not None and enqueue:
                    delay = max(0.0, (due_at - finished).total_seconds())
                    dispatch.send_with_transaction([(run.pk, run.function)], using, delay=delay or None)
                if has_concurrency(run.function):
                    dispatch.send_with_transaction(flow.release(run, using=using, now=finished), using)
    except (DatabaseError, IntegrityError) as error:
        logger.exception("Run %s of %s: could not record that it left the worker.", run.pk, run.function)
        failure = classify(error, attempt, run.max_attempts)
        return record(run, attempt, started, None, failure, using=using, enqueue=enqueue)
    if not moved:
        ledger.keep_stale_attempt(attempt_row, using)
        logger.warning(
            "Run %s of %s: attempt %d left the worker after another worker took the run over.",
            run.pk,
            run.function,
            attempt,
        )
        return Execution.STALE
    logger.info("Run %s of %s for %s is %s.", run.pk, run.function, run.event_name, suspension.describe())
    return Execution.SLEEPING if suspension.status == RunStatus.SLEEPING else Execution.WAITING


_DEFAULT_MESSAGES: dict[str, str] = {
    AttemptOutcome.TIMED_OUT: "time limit exceeded",
    AttemptOutcome.INTERRUPTED: "the worker was shutting down",
}


def _ended_at_claim(run: Run, ended: list[Run]) -> None:
    """In the claim's transaction: the run.dead event of a run its finish timeout ended."""
    ended.append(run)
    if run.event_name != RUN_DEAD_EVENT:
        _send_dead_event(run, run.attempts)


def _dead_before_attempt(run: Run) -> None:
    """Log and signal a run that flow control ended before its next attempt (its ``Timeouts.finish``)."""
    logger.error("Run %s of %s for %s is dead: %s.", run.pk, run.function, run.event_name, run.reason)
    last = Attempt.objects.filter(run_id=run.pk).order_by("-number").first()
    _log_failed_receivers(
        run,
        signals.run_dead.send_robust(
            sender=Run, run=run, attempt=last, exception=RunTimedOutError(run.reason)
        ),
    )


def _log_failed_receivers(run: Run, responses: list[tuple[Any, Any]]) -> None:
    """Log each signal receiver that raised (``send_robust`` returns what it raised)."""
    for receiver, response in responses:
        if isinstance(response, Exception):
            logger.error(
                "A signal receiver %r failed for run %s.",
                receiver,
                run.pk,
                exc_info=(type(response), response, response.__traceback__),
            )


def _send_dead_event(run: Run, attempt: int) -> None:
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
        _log_failed_receivers(run, responses)


def _log_outcome(run: Run, attempt_row: Attempt, execution: Execution) -> None:
    """One line per outcome; a failure's with its traceback as stored (storable, and cut if huge)."""
    args = (run.pk, run.function, run.event.name, attempt_row.number)
    if execution is Execution.SUCCEEDED:
        logger.info("Run %s of %s for %s succeeded (attempt %d).", *args)
    elif execution is Execution.RETRYING:
        logger.warning(
            "Run %s of %s for %s failed (attempt %d); retrying at %s.\n%s",
            *args,
            run.due_at.isoformat() if run.due_at else "-",
            attempt_row.traceback.rstrip() or attempt_row.message,
        )
    else:
        logger.error(
            "Run %s of %s for %s is dead after attempt %d.\n%s",
            *args,
            attempt_row.traceback.rstrip() or attempt_row.message,
        )
