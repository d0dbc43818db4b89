"""Durable steps: ``ctx.step.run``, ``atomic``, ``sleep``, ``sleep_until``, ``wait_for_event``,
``send_event`` and ``invoke``.

A function with steps is re-executed from the top on every attempt, and after
every sleep or wait. Each step's outcome is kept (a ``Step`` row: its memo), so
a completed step returns its stored result at once instead of running again.
Steps are known by their id; an id repeated in one execution (a loop) gets a
suffix (``id``, ``id:1``, ...), and a replay that meets the steps in another
order than recorded fails with ``NonDeterminismError``.

A sleep, a wait or an invoke makes the run leave the worker: the function is
stopped by a ``Suspend`` exception (a ``BaseException``, so ``except Exception``
does not catch it), and the attempt is recorded as ``suspended`` with the run
moved to ``sleeping`` or ``waiting`` (``execution.record``), its attempt given
back and its concurrency slots released. It is woken by its message at its time,
like a retry, or at once when what it waits for comes (``waits.py``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import IntegrityError, connections, transaction

from . import clock, ledger, rawsql, waits
from .exceptions import (
    DjangoEventsError,
    FunctionNotFoundError,
    InvokeFailedError,
    InvokeTimeoutError,
    NonDeterminismError,
)
from .models import FINAL_STATUSES, Event, Run, RunStatus, Step, StepKind, StepStatus
from .names import validate_event_name
from .options import seconds
from .registry import get_function
from .sending import INVOKE_EVENT, send, store_invoke, validate_event
from .text import clip, short_repr, storable
from .values import exc_type_name, json_result, safe_str, traceback_text

__all__ = ["StaleAttemptError", "StepWriteError", "Steps", "Suspend", "Suspension", "store_suspension"]

logger = logging.getLogger("django_events")

#: The longest step id accepted (a suffix ``:N`` may come on top).
MAX_STEP_ID = 200

#: What a step's body returns when the step returns its result as stored.
_STORED = object()

#: The most characters of a failed step's traceback kept.
TRACEBACK_LENGTH = 20_000


class StepWriteError(DjangoEventsError):
    """Raised when a ``step.atomic``'s code writes to another database than the ledger's: its writes
    could not commit with the step's memo. Nothing of the step is kept."""


class StaleAttemptError(DjangoEventsError):
    """Raised at a step when another worker has taken the run over (this attempt's lease ended)."""


@dataclass(frozen=True)
class Suspension:
    """How a run leaves the worker at a step: to ``status`` (sleeping, waiting) until ``due_at``.

    ``step`` is the sleep's row, to insert with the move, or the stored wait or
    invoke, whose row the move locks and checks (``pokes`` as the run read it).
    """

    status: str
    due_at: dt.datetime | None
    step: Step
    pokes: int = 0

    @property
    def insert(self) -> bool:
        """Whether the step's row is new (a sleep), written with the run's move."""
        return self.step.pk is None

    def describe(self) -> str:
        """One line for the attempt and the log: what the run waits for, and until when."""
        until = "with no timeout" if self.due_at is None else f"until {self.due_at.isoformat()}"
        step = self.step
        if step.kind == StepKind.SLEEP:
            return f"sleeping at step {step.step_id!r} {until}"
        if step.kind == StepKind.INVOKE:
            return f"waiting at step {step.step_id!r} for run {step.invoked_run} {until}"
        return f"waiting at step {step.step_id!r} for event {step.event_name} {until}"


class Suspend(BaseException):
    """Raised by a sleep, a wait or an invoke to leave the function; the worker records the suspension.

    A ``BaseException``: ``except Exception`` in the function does not stop it.
    """

    def __init__(self, suspension: Suspension) -> None:
        super().__init__(suspension.describe())
        self.suspension = suspension


class Steps:
    """``ctx.step``: the durable steps of one attempt of a run."""

    def __init__(self, run: Run, attempt: int, *, using: str) -> None:
        self._run = run
        self._attempt = attempt
        self._using = using
        self._memo: dict[str, Step] | None = None
        self._at: dict[int, Step] = {}
        self._counts: dict[str, int] = {}
        self._position = 0
        self._inside: str | None = None
        #: Set once a sleep, a wait or an invoke made the function leave (``Suspend``).
        self.suspended: Suspension | None = None

    # -- the steps -------------------------------------------------------------------------------

    def run(self, step_id: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once and keep its result (JSON): replays return it without running.

        At least once: if the worker dies before the result is stored, the run's
        next attempt runs it again. If it raises, the attempt fails and the run is
        retried by its function's policy; the steps before it do not run again.
        Returns the result as stored (what JSON makes of it: tuples become lists).
        """
        full, position, memo = self._next(step_id, StepKind.RUN)
        if memo is not None and memo.status == StepStatus.COMPLETED:
            return memo.result
        _check_callable(fn, "step.run")

        def body() -> tuple[Any, Any]:
            return json_result(fn(*args, **kwargs), f"Step {full!r}"), _STORED

        return self._execute(full, position, StepKind.RUN, memo, body, hold=False)

    def atomic(self, step_id: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in ``transaction.atomic()`` with the step's memo: exactly once.

        The callable's ORM writes and the step's memo commit in one transaction on
        the ledger's database, while the run is locked for this attempt: if the
        process dies at any point, both are committed or both are absent, and no
        other worker runs the step meanwhile. Its writes must go to the ledger's
        database; a write to another one raises ``StepWriteError`` (and nothing of
        the step is kept). Returns the callable's result as stored (JSON).
        """
        full, position, memo = self._next(step_id, StepKind.ATOMIC)
        if memo is not None and memo.status == StepStatus.COMPLETED:
            return memo.result
        _check_callable(fn, "step.atomic")

        def body() -> tuple[Any, Any]:
            with _writes_only_on(self._using, full):
                return json_result(fn(*args, **kwargs), f"Step {full!r}"), _STORED

        return self._execute(full, position, StepKind.ATOMIC, memo, body, hold=True)

    def send_event(
        self,
        step_id: str,
        name: str,
        data: dict[str, Any] | None = None,
        *,
        delay: float | dt.timedelta | None = None,
        run_at: dt.datetime | None = None,
    ) -> Event:
        """Send event ``name`` once: it is stored with the step's memo, so a retry never sends it twice.

        Arguments as ``django_events.send`` (``delay``, ``run_at``). Returns the event.
        """
        full, position, memo = self._next(step_id, StepKind.SEND)
        if memo is not None and memo.status == StepStatus.COMPLETED:
            event_id = str((memo.result or {}).get("event_id", ""))
            stored = Event.objects.using(self._using).filter(pk=event_id).first() if event_id else None
            return stored or Event(name=name, data=data or {})  # pruned since: what was sent
        validate_event(name, data, None, delay, run_at)  # bad input fails before anything is stored

        def body() -> tuple[Any, Any]:
            event = send(name, data, delay=delay, run_at=run_at)
            return {"event_id": str(event.pk)}, event

        result: Event = self._execute(full, position, StepKind.SEND, memo, body, hold=True)
        return result

    def sleep(self, step_id: str, duration: float | dt.timedelta) -> None:
        """Leave the worker for ``duration`` (seconds or a ``timedelta``); the run goes on after it.

        No thread and no concurrency slot is held meanwhile: the run is
        ``sleeping``, woken at its time by its message, like a retry.
        """
        try:
            length = seconds(duration, "step.sleep's duration", minimum=0.0)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        self._sleep(step_id, clock.now() + dt.timedelta(seconds=length))

    def sleep_until(self, step_id: str, until: dt.datetime) -> None:
        """Leave the worker until the aware datetime ``until`` (at once if it has passed)."""
        if not isinstance(until, dt.datetime) or until.tzinfo is None or until.utcoffset() is None:
            raise ValueError(f"step.sleep_until needs an aware datetime, not {short_repr(until)}.")
        self._sleep(step_id, until)

    def wait_for_event(
        self,
        step_id: str,
        *,
        event: str,
        timeout: float | dt.timedelta,
        match: str | None = None,
        if_: Callable[[Event], Any] | None = None,
    ) -> Event | None:
        """Wait for event ``event``; return it, or ``None`` if ``timeout`` passes first.

        Args:
            event: the name of the event to wait for.
            timeout: seconds or a ``timedelta``.
            match: a dotted path (``"data.order_id"``): the awaited event must have
                there the value the run's trigger event has.
            if_: a callable that takes a candidate event and says whether it is
                the one (with ``match``, of the events that match).

        Events sent since the run's trigger event count, even those sent before
        the wait began, whatever the interleaving: none is missed, and each wait
        ends once. The run leaves the worker while it waits (``waiting``).
        """
        validate_event_name(event)
        if match is not None and (not isinstance(match, str) or not match or len(match) > 255):
            raise ValueError(f"match must be a dotted path such as 'data.order_id', not {short_repr(match)}.")
        if if_ is not None and not callable(if_):
            raise TypeError(f"if_ must be a callable taking an Event, not {short_repr(if_)}.")
        try:
            length = seconds(timeout, "wait_for_event's timeout", minimum=0.0)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        full, position, memo = self._next(step_id, StepKind.WAIT)
        if memo is not None and memo.status == StepStatus.COMPLETED:
            return self._event(memo.resolved_event)
        path = match or ""
        if memo is None:
            value = None
            if path:
                value = waits.value_at(self._run.event, path)
                if value is waits._MISSING:
                    raise ValueError(
                        f"The run's trigger event has no value at {path!r}, so step {full!r} has nothing to "
                        "match: paths start at the event, as in 'data.order_id'."
                    )
            now = clock.now()
            memo = waits.create(
                Step(
                    run_id=self._run.pk,
                    step_id=full,
                    position=position,
                    kind=StepKind.WAIT,
                    status=StepStatus.WAITING,
                    started_at=now,
                    wake_at=now + dt.timedelta(seconds=length),
                    event_name=event,
                    match=clip(f"{path} == {short_repr(value, 200)}" if path else "", 1000),
                    match_key=waits.match_key(path, value),
                    checks=if_ is not None,
                ),
                path,
                using=self._using,
            )
            self._remember(memo)
            if memo.status == StepStatus.COMPLETED:
                return self._event(memo.resolved_event)
        pokes = memo.pokes
        found = waits.look(self._run, memo, path, if_, using=self._using)
        now = clock.now()
        if found is not None:
            if waits.resolve(memo, found.pk, using=self._using, now=now):
                return found
            return self._event(self._reload(memo).resolved_event)
        if memo.wake_at is not None and memo.wake_at <= now:
            if waits.finish(memo, using=self._using, now=now):
                return None
            return self._event(self._reload(memo).resolved_event)
        raise self._leave(Suspension(RunStatus.WAITING, memo.wake_at, memo, pokes))

    def invoke(
        self,
        step_id: str,
        *,
        function: str,
        data: dict[str, Any] | None = None,
        timeout: float | dt.timedelta | None = None,
    ) -> Any:
        """Start a run of function ``function`` with ``data`` and wait for its end; return its result.

        The run leaves the worker meanwhile (``waiting``). The invoked run's event is
        a ``django_events/function.invoked`` event holding ``data``, that no other
        function receives. If the invoked run goes dead (or is cancelled or
        skipped), ``InvokeFailedError`` is raised here; if it has not ended within
        ``timeout`` (none by default), ``InvokeTimeoutError``.
        """
        if timeout is not None:
            try:
                length: float | None = seconds(timeout, "invoke's timeout", minimum=0.0)
            except TypeError as exc:
                raise ValueError(str(exc)) from None
        else:
            length = None
        full, position, memo = self._next(step_id, StepKind.INVOKE)
        if memo is None:
            spec = get_function(function) if isinstance(function, str) else None
            if spec is None:
                raise FunctionNotFoundError(
                    f"step.invoke: no function is registered with the id {short_repr(function)}."
                )
            outgoing = validate_event(INVOKE_EVENT, data, None)
            now = clock.now()
            try:
                with transaction.atomic(using=self._using):
                    self._hold()
                    child = store_invoke(spec, outgoing, parent=self._run.pk, using=self._using)
                    memo = Step(
                        run_id=self._run.pk,
                        step_id=full,
                        position=position,
                        kind=StepKind.INVOKE,
                        status=StepStatus.WAITING,
                        started_at=now,
                        attempts=1,
                        wake_at=None if length is None else now + dt.timedelta(seconds=length),
                        invoked_run=child.pk,
                    )
                    memo.save(using=self._using, force_insert=True)
            except IntegrityError:  # a racing attempt invoked first: wait for its run
                memo = Step.objects.using(self._using).get(run_id=self._run.pk, step_id=full)
            self._remember(memo)
        if memo.status != StepStatus.COMPLETED:
            pokes = memo.pokes
            child_row = (
                Run.objects.using(self._using)
                .filter(pk=str(memo.invoked_run))
                .values_list("status", "result", "last_error")
                .first()
            )
            now = clock.now()
            if child_row is None or child_row[0] in FINAL_STATUSES:
                status, result, last_error = child_row or (RunStatus.DEAD, None, "the run was deleted")
                if status == RunStatus.SUCCEEDED:
                    waits.finish(memo, using=self._using, now=now, result=result)
                else:
                    waits.finish(
                        memo,
                        using=self._using,
                        now=now,
                        result={"failed": status},
                        error=storable(f"run {memo.invoked_run} ended {status}: {last_error}")[:1000],
                    )
            elif memo.wake_at is not None and memo.wake_at <= now:
                waits.finish(
                    memo,
                    using=self._using,
                    now=now,
                    result={"failed": "timeout"},
                    error=f"run {memo.invoked_run} did not end within the step's timeout",
                )
            else:
                raise self._leave(Suspension(RunStatus.WAITING, memo.wake_at, memo, pokes))
            memo = self._reload(memo)
        if memo.error:  # the invoked run did not succeed: its result holds how it ended
            error_class = InvokeTimeoutError if memo.result == {"failed": "timeout"} else InvokeFailedError
            raise error_class(f"step {full!r}: {memo.error}", str(memo.invoked_run))
        return memo.result

    # -- bookkeeping -----------------------------------------------------------------------------

    def _execute(
        self,
        full: str,
        position: int,
        kind: str,
        memo: Step | None,
        body: Callable[[], tuple[Any, Any]],
        *,
        hold: bool,
    ) -> Any:
        """Run a step's ``body`` (which returns what to store and what to return, or ``_STORED``: the
        stored result) and keep its memo; keep its failure if it raises.

        ``hold``: in one transaction with the memo, the run locked for this attempt (atomic steps).
        """
        started = clock.now()
        attempts = (memo.attempts if memo else 0) + 1
        try:
            with self._running(full), transaction.atomic(using=self._using) if hold else nullcontext():
                if hold:
                    self._hold()
                stored, returned = body()
                result = self._completed(full, position, kind, memo, stored, started, attempts)
        except BaseException as exc:
            self._failed(full, position, kind, memo, exc, started, attempts)
            raise
        return result if returned is _STORED else returned

    def _sleep(self, step_id: str, until: dt.datetime) -> None:
        full, position, memo = self._next(step_id, StepKind.SLEEP)
        now = clock.now()
        if memo is not None:
            if memo.status == StepStatus.WAITING:  # woken: the sleep is over
                _sleep_over(memo, now, self._using)
            return
        row = Step(
            run_id=self._run.pk,
            step_id=full,
            position=position,
            kind=StepKind.SLEEP,
            status=StepStatus.WAITING,
            started_at=now,
            wake_at=until,
        )
        if until <= now:  # nothing to wait for: just remember the step
            row.status, row.finished_at = StepStatus.COMPLETED, now
            self._save_new(row)
            return
        raise self._leave(Suspension(RunStatus.SLEEPING, until, row))

    def _leave(self, suspension: Suspension) -> Suspend:
        """The exception that makes the function leave; remembered, should the function swallow it."""
        self.suspended = suspension
        return Suspend(suspension)

    def _next(self, step_id: str, kind: str) -> tuple[str, int, Step | None]:
        """The step's full id and position in this execution, and its memo; check the replay's order."""
        if self.suspended is not None:
            # The function caught the Suspend (a bare except) and went on: it still leaves here.
            raise Suspend(self.suspended)
        if self._inside is not None:
            raise DjangoEventsError(
                f"Step {step_id!r} was called inside the code of step {self._inside!r}: steps cannot nest. "
                "Call them from the function itself."
            )
        if (
            not isinstance(step_id, str)
            or not step_id
            or len(step_id) > MAX_STEP_ID
            or not step_id.isprintable()
        ):
            raise ValueError(
                f"A step id must be a non-empty str of at most {MAX_STEP_ID} printable characters, "
                f"not {short_repr(step_id)}."
            )
        count = self._counts.get(step_id, 0)
        self._counts[step_id] = count + 1
        full = step_id if count == 0 else f"{step_id}:{count}"
        position = self._position
        self._position += 1
        memo = self._load().get(full)
        recorded = self._at.get(position)
        if recorded is not None and recorded.step_id != full:
            raise NonDeterminismError(
                f"This run recorded step {recorded.step_id!r} ({recorded.kind}) as step {position + 1}, but "
                f"its replay met step {full!r} ({kind}) there: the function's steps must come in the same "
                "order on every execution (deploy code that keeps the recorded order, then retry the run)."
            )
        if memo is not None and (memo.position != position or memo.kind != kind):
            raise NonDeterminismError(
                f"This run recorded step {full!r} ({memo.kind}) as step {memo.position + 1}, but its replay "
                f"met step {full!r} ({kind}) as step {position + 1}: the function's steps must come in the "
                "same order on every execution."
            )
        return full, position, memo

    def _load(self) -> dict[str, Step]:
        if self._memo is None:
            rows = list(Step.objects.using(self._using).filter(run_id=self._run.pk))
            self._memo = {row.step_id: row for row in rows}
            self._at = {row.position: row for row in rows}
        return self._memo

    def _remember(self, row: Step) -> None:
        self._load()[row.step_id] = row
        self._at[row.position] = row

    def _reload(self, row: Step) -> Step:
        fresh = Step.objects.using(self._using).get(pk=row.pk)
        self._remember(fresh)
        return fresh

    def _event(self, event_id: Any) -> Event | None:
        if event_id is None:
            return None
        return Event.objects.using(self._using).filter(pk=event_id).first()

    @contextmanager
    def _running(self, step_id: str) -> Iterator[None]:
        self._inside = step_id
        try:
            yield
        finally:
            self._inside = None

    def _hold(self) -> None:
        if not ledger.hold_for_step(self._run.pk, self._attempt, using=self._using):
            raise StaleAttemptError(
                f"Run {self._run.pk}: attempt {self._attempt} no longer holds the run (another worker "
                "took it over); the step was not run."
            )

    def _save_new(self, row: Step) -> Step:
        try:
            with transaction.atomic(using=self._using):
                row.save(using=self._using, force_insert=True)
        except IntegrityError:
            row = Step.objects.using(self._using).get(run_id=row.run_id, step_id=row.step_id)
        self._remember(row)
        return row

    def _completed(
        self,
        full: str,
        position: int,
        kind: str,
        memo: Step | None,
        result: Any,
        started: dt.datetime,
        attempts: int,
    ) -> Any:
        """Store the step's memo (completed); return the result a replay will get."""
        now = clock.now()
        fields = {
            "status": StepStatus.COMPLETED,
            "result": result,
            "error": "",
            "traceback": "",
            "attempts": attempts,
            "started_at": started,
            "finished_at": now,
        }
        if memo is not None:
            updated = (
                Step.objects.using(self._using)
                .filter(pk=memo.pk)
                .exclude(status=StepStatus.COMPLETED)
                .update(**fields)
            )
            if not updated:  # another attempt completed it first: its result stands
                return self._reload(memo).result
            for name, value in fields.items():
                setattr(memo, name, value)
            return result
        row = Step(run_id=self._run.pk, step_id=full, position=position, kind=kind, **fields)
        if kind == StepKind.RUN and _insert_without_flush(row, self._using):
            self._remember(row)
            return row.result
        if kind != StepKind.RUN:
            # In the step's own transaction, with the run locked for this attempt (``_hold``): no
            # other attempt inserts this memo meanwhile, so no savepoint is needed to catch one.
            row.save(using=self._using, force_insert=True)
            self._remember(row)
            return row.result
        return self._save_new(row).result

    def _failed(
        self,
        full: str,
        position: int,
        kind: str,
        memo: Step | None,
        exc: BaseException,
        started: dt.datetime,
        attempts: int,
    ) -> None:
        """Keep a failed try of the step (its error, for the run's timeline); never raises."""
        if isinstance(exc, (Suspend, StaleAttemptError)):
            return
        fields = {
            "status": StepStatus.FAILED,
            "error": storable(f"{exc_type_name(exc)}: {safe_str(exc)}")[:1000],
            "traceback": clip(storable(traceback_text(exc)), TRACEBACK_LENGTH),
            "attempts": attempts,
            "started_at": started,
            "finished_at": clock.now(),
        }
        try:
            with transaction.atomic(using=self._using):
                if memo is not None:
                    Step.objects.using(self._using).filter(pk=memo.pk).exclude(
                        status=StepStatus.COMPLETED
                    ).update(**fields)
                else:
                    self._remember(
                        Step.objects.using(self._using).create(
                            run_id=self._run.pk, step_id=full, position=position, kind=kind, **fields
                        )
                    )
        except Exception:
            logger.exception("Run %s: could not keep the failure of step %r.", self._run.pk, full)


def _insert_without_flush(row: Step, using: str) -> bool:
    """On PostgreSQL in autocommit, insert a ``step.run``'s memo without waiting for its WAL flush.

    ``step.run`` is at least once: a memo lost to a crash of PostgreSQL (only the last
    moments' commits can be, and only until any later durable commit, which flushes
    the WAL up to it, since WAL is written in order) means the step runs again on the
    run's next attempt, which at-least-once allows. Every other step's memo (an
    atomic step, a sent event, a wait, an invoke) and every run outcome is durable.
    Saves one WAL flush per step (see benchmarks/steps.py). Returns whether the row was
    inserted here (``False``: not on PostgreSQL, inside a transaction, or the memo
    exists already; then the portable path takes over).
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return False
    sql, fields = _memo_insert_sql(using)
    with rawsql.cursor(using) as cursor:
        cursor.execute(sql, rawsql.values(row, using, fields))
        inserted = cursor.fetchone()
    if inserted is None:
        return False
    row.pk = inserted[0]
    row._state.adding, row._state.db = False, using
    return True


@cache
def _memo_insert_sql(using: str) -> tuple[str, list[Any]]:
    connection = connections[using]
    quote = connection.ops.quote_name
    fields = [field for field in Step._meta.concrete_fields if not field.primary_key]
    names = ", ".join(quote(rawsql.column(field)) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = (
        "WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true)) "
        f"INSERT INTO {quote(Step._meta.db_table)} ({names}) SELECT {placeholders} FROM no_flush "
        f"ON CONFLICT DO NOTHING RETURNING {quote(rawsql.column(Step._meta.pk))}"
    )
    return sql, fields


def _sleep_over(step: Step, now: dt.datetime, using: str) -> None:
    """Mark a sleep completed once its run is woken: for the run's timeline only.

    Replays tell a sleep is over from its row existing, whatever its status, so on
    PostgreSQL (in autocommit) this write does not wait for its WAL flush: a crash may
    undo it, and the next wake-up writes it again. One flushed commit fewer per sleep.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        Step.objects.using(using).filter(pk=step.pk, status=StepStatus.WAITING).update(
            status=StepStatus.COMPLETED, finished_at=now
        )
        return
    quote = connection.ops.quote_name
    f = {field.name: quote(rawsql.column(field)) for field in Step._meta.concrete_fields}
    with rawsql.cursor(using) as cursor:
        cursor.execute(
            "WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true)) "
            f"UPDATE {quote(Step._meta.db_table)} SET {f['status']} = %s, {f['finished_at']} = %s "
            f"FROM no_flush WHERE {f['id']} = %s AND {f['status']} = %s",
            [StepStatus.COMPLETED.value, now, step.pk, StepStatus.WAITING.value],
        )


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{what} takes a step id and a callable, not {short_repr(fn)}.")


@contextmanager
def _writes_only_on(using: str, step_id: str) -> Iterator[None]:
    """Refuse, while a ``step.atomic`` runs, any write to a database other than ``using``."""

    def refuse(alias: str) -> Callable[..., Any]:
        def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
            verb = sql.lstrip().split(None, 1)[:1]
            if verb and verb[0].upper() in _WRITES:
                raise StepWriteError(
                    f"Step {step_id!r} wrote to database {alias!r}, but step.atomic commits a step's writes "
                    f"with its memo only on the ledger's database ({using!r}): nothing of the step is kept."
                )
            return execute(sql, params, many, context)

        return wrapper

    with ExitStack() as stack:
        for alias in connections:
            if alias != using:
                stack.enter_context(connections[alias].execute_wrapper(refuse(alias)))
        yield


_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "TRUNCATE"})


def store_suspension(run: Run, suspension: Suspension, *, using: str, now: dt.datetime) -> dt.datetime | None:
    """In the transaction that moves the run to ``sleeping`` / ``waiting``: write the sleep's row, or
    lock the wait's row and check it. Returns the run's due time: the suspension's, or ``now`` if
    the wait was resolved or poked since the run looked (it runs again at once)."""
    if suspension.insert:
        suspension.step.save(using=using, force_insert=True)
        return suspension.due_at
    if waits.still_waiting(suspension.step, suspension.pokes, using=using):
        return suspension.due_at
    return now
