"""Recovery: find runs whose message was lost or whose worker died, and put them back in line.

Three kinds of run are overdue:

* ``pending`` past the grace period (``RECOVERY_GRACE``): the broker was down at
  commit time, or the process died between commit and enqueue;
* ``retrying`` past its due time plus the grace period: the delayed message was lost;
* ``running`` with an expired lease: the worker was killed mid-run. The attempt is
  recorded as ``lost`` and the run goes to ``retrying`` (due now), or ``dead`` if
  that was its last attempt, exactly as if the function had failed.

**Lost, or only queued?** A waiting run whose message waits in the queue behind a
long backlog is overdue too, and in the ledger it looks exactly like one whose
message was lost. Sending it again would only add a duplicate to the backlog (a run
is claimed once, so it is harmless, but it slows the drain when it is most behind).
So once a pass finds overdue waiting runs, it asks the broker how many messages
wait in the run queue (:func:`dispatch.run_queue`; one call: Redis ``LLEN`` and
``HLEN`` of the queue, RabbitMQ's queue declaration, a ``COUNT`` with the database
broker) and uses what run messages always do: they go
through that one queue first in, first out, and a run's ``due_at`` is when its
message went in (a send sets it to the send time, a retry to the time its delayed
message becomes deliverable, a re-send of recovery to the time of the re-send). It
re-sends an overdue run only when, by the first rule that applies:

1. **the queue is empty**: the broker has no run message ready to deliver, so an
   overdue run's message is nowhere (or held by a worker that has not started it
   after a whole grace period, which a re-send lets another worker run). Every
   overdue run is sent again.
2. **it was overtaken**: a run whose message went in later has already started
   (the newest ``due_at`` of the running first attempts, each claimed from the only
   message it ever had). Messages leave the queue in order, so an overdue run due
   more than ``RECOVERY_GRACE`` before that one cannot still be queued. The grace
   absorbs what makes a ``due_at`` and a place in the queue disagree a little: a
   long transaction between the insert and the commit's enqueue, a delayed message
   moved to the queue a moment after its eta, clocks of different hosts. The rest
   of a fan-out is left out here: the worker that took the fan-out's message sent
   them messages at the back of the queue, later than their ``due_at`` says.
3. **it was counted missing**: no first attempt is running, so the count is all
   there is. Every message the broker counts in the queue (ready, or fetched by a
   consumer and not yet acknowledged, where the broker can say) could belong to an
   overdue run, so if there are more overdue runs than messages, at least the
   difference lost theirs; the oldest are the likeliest (the messages still queued
   are the most recently sent), and the oldest overdue runs, as many as the
   difference, are sent again. Delayed messages are not counted: they belong to
   retries not due yet, which are not overdue either.

A broker that cannot count its queue (one of another kind, or a failed call) gets
the behaviour of before: every overdue run is sent again; a warning says so once
per process and reason.

**Every lost run is sent again, in the end, and a queued one seldom.** The errors
go one way or the other, never both. A message in the count that is not an overdue
run's (a run sent within the grace period, a running run's, another actor's, a
duplicate) makes rule 3 find fewer lost runs: that only delays them, until the
queue is empty (rule 1) or a run sent after them starts (rule 2), which a queue
being worked through always comes to. Run messages the count misses make it find
too many, that is a few duplicates: a fan-out's message carries several runs, a
worker holds up to twice its threads' messages that RabbitMQ does not count, and
two passes counting at the same moment each send the difference. Rule 2 re-sends a
run still queued only where the queue's order and the ``due_at`` order disagree by
more than the grace period. Give run messages a queue of their own (``QUEUE_NAME``,
the default ``"django_events"``): a busy actor sharing it keeps the queue from ever
being empty, and then recovery relies on rule 2 alone.

A pass is safe in every worker at once: on PostgreSQL the overdue rows are locked
with ``SKIP LOCKED``, so two workers never take the same ones; everywhere, a
waiting run's ``due_at`` is moved forward by the pass that takes it, so the next
pass leaves it alone for another grace period, and a lost attempt is recorded with
the same fenced write as any attempt. Workers run :func:`recover` every
``RECOVERY_INTERVAL`` seconds in a thread started by ``EventsMiddleware``. A pass
with nothing overdue costs one indexed query; one with overdue runs adds the
broker call, the newest running first attempt (read through the index of running
runs) and, for rule 3 only, one count of the overdue runs (through the index of
waiting runs).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import dramatiq
from django.db import close_old_connections, connections, router, transaction
from django.db.models import Count, F, Max, Q
from django.utils import timezone

from . import clock, cron, dispatch, flow, ledger, waits
from .broker import DatabaseBroker
from .conf import get_settings
from .exceptions import WorkerLostError
from .execution import Execution, Failure, backoff_delay, record
from .models import AttemptOutcome, QueuedMessage, QueuedMessageState, Run, RunStatus

__all__ = [
    "COUNTED_MISSING",
    "NO_COUNT",
    "OVERTAKEN",
    "QUEUE_EMPTY",
    "RecoveryLoop",
    "RecoveryReport",
    "recover",
]

logger = logging.getLogger("django_events")

#: ``RecoveryReport.reason``: the broker cannot count its queue; every overdue run is sent again.
NO_COUNT = "the broker cannot count its queue"
#: ``RecoveryReport.reason``: rule 1, no run message is ready in the queue.
QUEUE_EMPTY = "the run queue is empty"
#: ``RecoveryReport.reason``: rule 2, runs sent later have started.
OVERTAKEN = "runs sent later have started"
#: ``RecoveryReport.reason``: rule 3, the queue holds fewer messages than runs wait for.
COUNTED_MISSING = "the run queue holds fewer messages than runs wait for"


@dataclass
class RecoveryReport:
    """What one recovery pass found and did."""

    #: Pending or retrying runs whose message was sent again: ``(run id, function, status)``.
    requeued: list[tuple[Any, str, str]] = field(default_factory=list)
    #: Running runs whose lease had expired: ``(run id, function, what became of it)``.
    lost: list[tuple[Any, str, str]] = field(default_factory=list)
    #: Held runs woken because their concurrency key had a free slot nobody handed over (a slot
    #: given back by a cancel, or whose lease ended): ``(run id, function)``.
    woken: list[tuple[Any, str]] = field(default_factory=list)
    #: Held runs cancelled because they waited past their ``Timeouts.start``.
    timed_out: list[Any] = field(default_factory=list)
    #: Waiting runs woken because an event they wait for was matched again here (its sender
    #: died between its commit and matching it): run ids.
    rematched: list[Any] = field(default_factory=list)
    #: How the pass told lost messages from queued ones, if it found overdue waiting runs:
    #: :data:`QUEUE_EMPTY`, :data:`OVERTAKEN`, :data:`COUNTED_MISSING` or :data:`NO_COUNT`
    #: (empty when none was overdue).
    reason: str = ""

    @property
    def total(self) -> int:
        """How many runs the pass touched."""
        return (
            len(self.requeued) + len(self.lost) + len(self.woken) + len(self.timed_out) + len(self.rematched)
        )


def recover(
    *, now: dt.datetime | None = None, dry_run: bool = False, limit: int | None = None
) -> RecoveryReport:
    """Run one recovery pass; return what it re-enqueued (or, with ``dry_run``, would have).

    Args:
        now: the time to judge overdue runs by (default: now).
        dry_run: only report; change and send nothing.
        limit: at most this many runs of each kind (default ``RECOVERY_BATCH``).
    """
    conf = get_settings()
    now = now or clock.now()
    limit = limit or conf.RECOVERY_BATCH
    using = router.db_for_write(Run)
    report = RecoveryReport()
    _requeue_waiting(report, dt.timedelta(seconds=conf.RECOVERY_GRACE), now, limit, using, dry_run)
    _recover_lost(report, now, limit, using, dry_run)
    if not dry_run:
        report.woken, report.timed_out = flow.sweep(now=now, limit=limit, using=using)
        report.rematched = _rematch(now - dt.timedelta(seconds=conf.RECOVERY_GRACE), limit, using)
    if report.total and not dry_run:
        logger.warning(
            "Recovery: re-enqueued %d overdue run(s)%s, took back %d run(s) whose worker died, woke %d "
            "held run(s), cancelled %d past their start timeout and woke %d waiting run(s) whose event "
            "was not matched by its sender.",
            len(report.requeued),
            f" ({report.reason})" if report.requeued else "",
            len(report.lost),
            len(report.woken),
            len(report.timed_out),
            len(report.rematched),
        )
    return report


#: Per database: the stamp up to which this process has matched sent events to waits again.
_rematched_to: dict[str, dt.datetime] = {}

#: How far back a process's first pass matches events again: a sender that died while no
#: worker ran is covered for this long (later, the wait's timeout still finds its event).
REMATCH_START = dt.timedelta(hours=1)


def _rematch(until: dt.datetime, limit: int, using: str) -> list[Any]:
    """Match to waits again the events sent up to ``until`` (the grace before now) since the last pass.

    A sender matches its events after its commit (``waits.deliver``); one that died in
    between left its waits for their timeout. ``until`` leaves senders the grace to do it.
    """
    since = _rematched_to.get(using, until - REMATCH_START)
    if since >= until:
        return []
    woken, more = waits.redeliver(since=since, until=until, limit=limit, using=using)
    _rematched_to[using] = more or until
    return woken


@dataclass(frozen=True)
class _Take:
    """Which overdue runs a pass sends again: due before ``cutoff``, oldest first, at most ``limit``."""

    cutoff: dt.datetime
    limit: int
    reason: str
    skip_fanout_rest: bool = False


def _requeue_waiting(
    report: RecoveryReport, grace: dt.timedelta, now: dt.datetime, limit: int, using: str, dry_run: bool
) -> None:
    cutoff = now - grace
    if not Run.objects.using(using).waiting().filter(due_at__lt=cutoff).exists():
        return  # nothing overdue: no need to ask the broker
    take = _judge(now, grace, limit, using)
    report.reason = take.reason
    if take.limit <= 0:
        return
    with transaction.atomic(using=using):
        rows = ledger.take_overdue(
            cutoff=take.cutoff, now=now, limit=take.limit, using=using, skip_fanout_rest=take.skip_fanout_rest
        )
        if dry_run:
            transaction.set_rollback(True, using=using)  # the same choice as a pass, undone
        else:
            dispatch.send_with_transaction([(pk, function) for pk, function, _status in rows], using)
    report.requeued.extend(rows)


def _judge(now: dt.datetime, grace: dt.timedelta, limit: int, using: str) -> _Take:
    """Which of the overdue runs lost their message, by the rules of the module's docstring."""
    cutoff = now - grace
    broker = dramatiq.get_broker()
    try:
        queue = _count_queue(broker)
    except Exception:
        _warn_once(
            f"error:{type(broker).__qualname__}",
            "Recovery could not count the messages of the run queue on %s; every overdue run is sent "
            "again, queued behind a backlog or not.",
            type(broker).__qualname__,
            exc_info=True,
        )
        return _Take(cutoff, limit, NO_COUNT)
    if queue is None:
        _warn_once(
            f"unknown:{type(broker).__qualname__}",
            "Recovery cannot count the messages of the run queue on %s (it can on Redis, RabbitMQ and "
            "the database broker); every overdue run is sent again, queued behind a backlog or not.",
            type(broker).__qualname__,
        )
        return _Take(cutoff, limit, NO_COUNT)
    if queue.ready == 0:
        return _Take(cutoff, limit, QUEUE_EMPTY)
    # Rule 2: the newest run started from the one message it ever had (first attempt, due_at still
    # its send time). Running runs are few, and read through their own index.
    started = (
        Run.objects.using(using)
        .filter(status=RunStatus.RUNNING, attempts=1, due_at=F("created_at"))
        .aggregate(newest=Max("due_at"))["newest"]
    )
    if started is not None:
        return _Take(min(cutoff, started - grace), limit, OVERTAKEN, skip_fanout_rest=True)
    overdue = Run.objects.using(using).waiting().filter(due_at__lt=cutoff).count()
    return _Take(cutoff, max(0, min(limit, overdue - queue.messages)), COUNTED_MISSING)


@dataclass(frozen=True)
class _QueueCount:
    """What a broker says of the run queue (its delay queue aside)."""

    #: Messages a consumer may take now.
    ready: int
    #: Messages not yet acknowledged: ``ready``, and those consumers hold where the broker counts them.
    messages: int


def _count_queue(broker: dramatiq.Broker) -> _QueueCount | None:
    """What ``broker`` says of the run queue, or ``None`` for a broker this cannot ask."""
    queue = dispatch.run_queue(broker)
    if isinstance(broker, DatabaseBroker):
        # The run actor's messages only (the table knows each message's actor); a ready one not due
        # yet is a delayed one.
        now = timezone.now()
        counts = (
            QueuedMessage.objects.using(broker.database)
            .in_queue(queue)
            .pending()
            .filter(actor_name=dispatch.ACTOR_NAME)
            .aggregate(
                ready=Count("pk", filter=Q(available_at__lte=now)),
                delayed=Count("pk", filter=Q(state=QueuedMessageState.READY, available_at__gt=now)),
                pending=Count("pk"),
            )
        )
        return _QueueCount(ready=counts["ready"], messages=counts["pending"] - counts["delayed"])
    if _is_a(broker, "dramatiq.brokers.redis", "RedisBroker"):
        # Dramatiq's layout (dramatiq/brokers/redis/dispatch.lua): "<ns>:<queue>" lists the ids of
        # the ready messages; "<ns>:<queue>.msgs" holds every message not yet acknowledged (ready, or
        # fetched by a consumer, a dead one's too until they are put back).
        redis = cast(Any, broker)
        key = f"{redis.namespace}:{queue}"
        with redis.client.pipeline(transaction=True) as pipe:
            pipe.llen(key)
            pipe.hlen(f"{key}.msgs")
            ready, messages = pipe.execute()
        return _QueueCount(ready=int(ready), messages=int(messages))
    if _is_a(broker, "dramatiq.brokers.rabbitmq", "RabbitmqBroker"):
        # The messages ready in the queue; RabbitMQ does not count those its consumers hold.
        ready = int(cast(Any, broker).get_queue_message_counts(queue)[0])
        return _QueueCount(ready=ready, messages=ready)
    return None


def _is_a(broker: dramatiq.Broker, module: str, name: str) -> bool:
    """Whether ``broker`` is an instance of ``module.name``, without importing it (an optional extra)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(broker, cls)


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any, exc_info: bool = False) -> None:
    """Log ``message`` as a warning the first time for ``key`` in this process, then at debug level."""
    if key in _warned:
        logger.debug(message, *args, exc_info=exc_info)
        return
    _warned.add(key)
    logger.warning(message, *args, exc_info=exc_info)


def _recover_lost(report: RecoveryReport, now: dt.datetime, limit: int, using: str, dry_run: bool) -> None:
    if dry_run:
        expired = Run.objects.using(using).lease_expired(now).order_by("lease_expires_at")
        report.lost.extend(
            (pk, function, "lost") for pk, function in expired.values_list("pk", "function")[:limit]
        )
        return
    with transaction.atomic(using=using):
        for run in ledger.lease_expired(now=now, limit=limit, using=using):
            attempt = run.attempts
            error = WorkerLostError(
                f"The worker running attempt {attempt} stopped before it finished (killed, out of memory, "
                f"or its host was lost): its lease expired at {run.lease_expires_at:%Y-%m-%d %H:%M:%S%z}."
            )
            # Counted like any failure: a run that kills its worker every time goes dead in the end.
            retry_in = (
                None if attempt >= run.max_attempts else (0.0 if attempt == 1 else backoff_delay(attempt - 1))
            )
            started = run.attempt_started_at or run.lease_expires_at or now
            outcome = record(
                run,
                attempt,
                started,
                None,
                Failure(error, AttemptOutcome.LOST, retry_in),
                using=using,
            )
            if outcome is not Execution.STALE:
                report.lost.append((run.pk, run.function, outcome.value))


class RecoveryLoop:
    """A daemon thread that runs :func:`recover` every ``RECOVERY_INTERVAL`` seconds (with jitter)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, unless ``RECOVERY_INTERVAL`` is ``None`` or it runs already."""
        if get_settings().RECOVERY_INTERVAL is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="django-events-recovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait for the pass in progress, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        interval = get_settings().RECOVERY_INTERVAL or 0
        # Recovery starts at a random point of the interval, so that workers started together spread
        # out. Cron ticks are made at once (a worker that boots makes the next ticks), then right
        # after the earliest next tick is due (to make the one after it), at least every interval.
        recover_at = time.monotonic() + random.uniform(0.5, 1.0) * interval
        cron_at = time.monotonic()
        while not self._stop.wait(max(0.0, min(recover_at, cron_at) - time.monotonic())):
            try:
                close_old_connections()
                if time.monotonic() >= cron_at:
                    cron_at = time.monotonic() + interval
                    try:
                        due = cron.schedule_pass().next_due
                    except Exception:
                        logger.exception("Cron pass failed; trying again in %s s.", interval)
                    else:
                        if due is not None:
                            wait = (due - clock.now()).total_seconds() + 0.05
                            cron_at = time.monotonic() + min(interval, max(0.05, wait))
                if time.monotonic() >= recover_at:
                    recover_at = time.monotonic() + random.uniform(0.5, 1.0) * interval
                    recover()
            except Exception:
                logger.exception("Recovery pass failed; trying again in %s s.", interval)
            finally:
                connections.close_all()
