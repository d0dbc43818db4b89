"""Events, the runs they cause, and each run's attempts: the ledger of what happened."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .ids import uuid7

__all__ = ["Attempt", "AttemptOutcome", "Event", "Run", "RunQuerySet", "RunStatus"]


class RunStatus(models.TextChoices):
    """Where a run stands. ``TRANSITIONS`` below says which moves are allowed."""

    PENDING = "pending", _("pending")
    """Waiting for its first attempt, or for a new one after a retry from the admin."""
    RUNNING = "running", _("running")
    """Held by a worker until ``lease_expires_at``; if the lease expires, recovery moves it back."""
    RETRYING = "retrying", _("retrying")
    """An attempt failed and another is due at ``due_at``."""
    SUCCEEDED = "succeeded", _("succeeded")
    """Final: the function returned; its value is in ``result``."""
    DEAD = "dead", _("dead")
    """Final: attempts ran out, or the function raised ``NonRetriableError``. Can be retried by hand."""
    CANCELLED = "cancelled", _("cancelled")
    """Final: cancelled before it ran; never executed, even if its message is still queued."""
    SCHEDULED = "scheduled", _("scheduled")
    """Waiting for its time (``due_at``): a delay, a cron tick, a debounce or batch window."""
    THROTTLED = "throttled", _("throttled")
    """Over its function's throttle: its turn is at ``due_at``, kept for it."""
    HELD = "held", _("held")
    """Over its function's concurrency limit: waits, using no attempt, until a slot frees."""
    SKIPPED = "skipped", _("skipped")
    """Final: never executed, by flow control (rate limit, debounce, batch); ``reason`` says why."""
    SLEEPING = "sleeping", _("sleeping")
    """Left the worker at a ``step.sleep``; due again at ``due_at``."""
    WAITING = "waiting", _("waiting")
    """Left the worker at a ``step.wait_for_event`` or ``step.invoke``; due at its timeout (``due_at``),
    or at once when what it waits for comes."""


#: What flow control may do with a run about to start: make it wait its turn or for a slot, skip it,
#: or end it (dead: not finished within its Timeouts.finish).
_HELD_BACK = frozenset(
    {RunStatus.THROTTLED, RunStatus.HELD, RunStatus.SKIPPED, RunStatus.SCHEDULED, RunStatus.DEAD}
)

#: The state machine: for each status, the statuses a run may move to from it.
#: Every conditional UPDATE that changes a run's status filters on this table.
TRANSITIONS: dict[str, frozenset[str]] = {
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, *_HELD_BACK}),
    # -> PENDING: a batch that filled up starts at once.
    RunStatus.SCHEDULED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.PENDING, *_HELD_BACK}),
    # -> THROTTLED: a run that came back after its turn, behind other late runs, gets the next one.
    RunStatus.THROTTLED: frozenset(
        {
            RunStatus.RUNNING,
            RunStatus.CANCELLED,
            RunStatus.HELD,
            RunStatus.SKIPPED,
            RunStatus.DEAD,
            RunStatus.THROTTLED,
        }
    ),
    # A held run is woken (pending, a slot kept for it) when one frees.
    RunStatus.HELD: frozenset({RunStatus.PENDING, RunStatus.CANCELLED, RunStatus.SKIPPED, RunStatus.DEAD}),
    # RUNNING -> RETRYING / DEAD also when the lease expired (the worker died): see recovery.py.
    # -> SLEEPING / WAITING: the function left the worker at a durable step (steps.py).
    RunStatus.RUNNING: frozenset(
        {RunStatus.SUCCEEDED, RunStatus.RETRYING, RunStatus.DEAD, RunStatus.SLEEPING, RunStatus.WAITING}
    ),
    # Woken at its time like a retry (flow control may hold it back again).
    RunStatus.SLEEPING: frozenset(
        {RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.THROTTLED, RunStatus.HELD, RunStatus.DEAD}
    ),
    # -> PENDING: what it waits for came (an event, the end of an invoked run): due at once.
    RunStatus.WAITING: frozenset(
        {
            RunStatus.RUNNING,
            RunStatus.PENDING,
            RunStatus.CANCELLED,
            RunStatus.THROTTLED,
            RunStatus.HELD,
            RunStatus.DEAD,
        }
    ),
    RunStatus.RETRYING: frozenset(
        {RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.THROTTLED, RunStatus.HELD, RunStatus.DEAD}
    ),
    RunStatus.SUCCEEDED: frozenset({RunStatus.PENDING}),
    RunStatus.DEAD: frozenset({RunStatus.PENDING}),
    RunStatus.CANCELLED: frozenset({RunStatus.PENDING}),
    RunStatus.SKIPPED: frozenset({RunStatus.PENDING}),
}

#: Statuses a run never leaves by itself.
FINAL_STATUSES: frozenset[str] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.DEAD, RunStatus.CANCELLED, RunStatus.SKIPPED}
)
#: Statuses whose runs wait for a worker to take them at ``due_at``.
WAITING_STATUSES: frozenset[str] = frozenset(
    {
        RunStatus.PENDING,
        RunStatus.RETRYING,
        RunStatus.SCHEDULED,
        RunStatus.THROTTLED,
        RunStatus.SLEEPING,
        RunStatus.WAITING,
    }
)
#: Statuses of the runs that left the worker at a durable step (sleep, wait, invoke).
SUSPENDED_STATUSES: frozenset[str] = frozenset({RunStatus.SLEEPING, RunStatus.WAITING})
#: Statuses of the runs not started yet (or waiting for their next attempt): what a cancel can stop.
NOT_STARTED_STATUSES: frozenset[str] = WAITING_STATUSES | {RunStatus.HELD}


def sources_of(target: str) -> list[str]:
    """The statuses from which a run may move to ``target``."""
    return sorted(status for status, targets in TRANSITIONS.items() if target in targets)


class AttemptOutcome(models.TextChoices):
    """How one attempt ended."""

    SUCCEEDED = "succeeded", _("succeeded")
    """The function returned."""
    FAILED = "failed", _("failed")
    """The function raised; the run was retried or went dead."""
    TIMED_OUT = "timed_out", _("timed out")
    """The function ran past its time limit and was interrupted."""
    LOST = "lost", _("lost")
    """The worker stopped (killed, out of memory, host lost) before the attempt ended; its lease expired."""
    INTERRUPTED = "interrupted", _("interrupted")
    """The worker was shutting down and interrupted the attempt; it does not use up a retry."""
    SUSPENDED = "suspended", _("suspended")
    """The function left the worker at a sleep, a wait or an invoke; it does not use up a retry."""


class Event(models.Model):
    """A fact that happened, as sent by ``django_events.send()``. Immutable once stored."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    name = models.CharField(max_length=255)
    data = models.JSONField(default=dict, blank=True)
    # NULL, not "": no key. The partial unique constraint below covers only the events that have one.
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The id given to send(); a second send with the same id returns this event."),
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    skipped_by = models.JSONField(
        default=dict,
        blank=True,
        help_text=_("Functions subscribed to the event that gave it no run, and why (their if_ filter)."),
    )
    # The W3C trace context (``traceparent``, ``tracestate``) of the span that sent the event, when
    # OpenTelemetry is installed and a span was recording; each attempt's span links to it.
    trace_context = models.JSONField(
        null=True,
        blank=True,
        editable=False,
        help_text=_("The OpenTelemetry trace context of the send (W3C traceparent), if any."),
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["-created_at"], name="django_events_event_created"),
            models.Index(fields=["name", "-created_at"], name="django_events_event_name"),
        ]
        constraints = [
            # Partial: most events have no key, and a send writes no entry for them. (A unique
            # field would also get a second, LIKE-only index on PostgreSQL that nothing uses.)
            models.UniqueConstraint(
                fields=["idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="django_events_event_idempotency_key",
            ),
        ]
        permissions = [("replay_event", "Can replay events")]

    def __str__(self) -> str:
        return f"{self.name} ({self.pk})"


class RunQuerySet(models.QuerySet["Run"]):
    """Named filters for runs."""

    def final(self) -> RunQuerySet:
        """Runs that ended: succeeded, dead, cancelled or skipped."""
        return self.filter(status__in=FINAL_STATUSES)

    def not_final(self) -> RunQuerySet:
        """Runs still to be executed, or being executed."""
        return self.exclude(status__in=FINAL_STATUSES)

    def not_started(self) -> RunQuerySet:
        """Runs not started yet, or waiting for their next attempt: what a cancel can stop."""
        return self.filter(status__in=sorted(NOT_STARTED_STATUSES))

    def dead(self) -> RunQuerySet:
        """Runs in the dead-letter state."""
        return self.filter(status=RunStatus.DEAD)

    def waiting(self) -> RunQuerySet:
        """Runs waiting for a worker at ``due_at``: pending, scheduled, throttled, retrying, sleeping
        or waiting."""
        return self.filter(status__in=WAITING_STATUSES)

    def due(self, now: dt.datetime | None = None) -> RunQuerySet:
        """Waiting runs whose ``due_at`` has come."""
        return self.waiting().filter(due_at__lte=now or timezone.now())

    def claimable(self, now: dt.datetime, *, ignore_due: bool = False) -> RunQuerySet:
        """Runs a worker may take now: waiting runs that are due (held runs wait for a slot instead)."""
        waiting = self.waiting()
        return waiting if ignore_due else waiting.filter(due_at__lte=now)

    def lease_expired(self, now: dt.datetime) -> RunQuerySet:
        """Running runs whose lease is over: their worker died, or is far past its time limit."""
        return self.filter(status=RunStatus.RUNNING, lease_expires_at__lt=now)

    def move(self, to: str, **changes: Any) -> int:
        """Move the runs of this queryset that may go to ``to`` there, in one UPDATE.

        Returns the number of runs moved; runs in a status from which ``to`` is
        not allowed are left alone.
        """
        return self.filter(status__in=sources_of(to)).update(status=to, **changes)


class Run(models.Model):
    """One execution of one function for one event, with its attempts."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="runs")
    event_name = models.CharField(
        max_length=255, help_text=_("The event's name, kept on the run so that runs filter by it fast.")
    )
    function = models.CharField(max_length=255, help_text=_("The id of the function this run executes."))
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text=_("Attempts started so far."))
    max_attempts = models.PositiveIntegerField(help_text=_("Attempts allowed: the first one plus retries."))
    result = models.JSONField(null=True, blank=True, help_text=_("What the function returned."))
    last_error = models.TextField(blank=True, help_text=_("Type and message of the last failure."))
    due_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When a pending or retrying run is next due to be attempted.")
    )
    lease_expires_at = models.DateTimeField(
        null=True, blank=True, help_text=_("Until when the worker running this run holds it.")
    )
    started_at = models.DateTimeField(null=True, blank=True, help_text=_("When the first attempt started."))
    attempt_started_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the latest attempt started.")
    )
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the run reached a final status.")
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Flow control. Plain ids, not foreign keys: deleting events and runs (prune) never has to
    # look these up, and a run outlives the event that cancelled it.
    priority = models.IntegerField(
        null=True,
        blank=True,
        help_text=_("Higher runs first when runs wait; empty: the function has no priority."),
    )
    reason = models.CharField(
        max_length=255, blank=True, help_text=_("Why the run waits, or why it was skipped or cancelled.")
    )
    merged_into = models.UUIDField(
        null=True, blank=True, help_text=_("The run that handles this run's event (debounce, batch).")
    )
    cancelled_by = models.UUIDField(null=True, blank=True, help_text=_("The event that cancelled this run."))
    ready_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text=_(
            "When the run could first start: when it was sent, or its time (a delay, a cron tick, "
            "a debounce or batch window). Timeouts.start counts from it."
        ),
    )
    held_on = models.CharField(
        max_length=64, blank=True, help_text=_("The concurrency key a held run waits on (a FlowKey id).")
    )
    parent = models.UUIDField(
        null=True,
        blank=True,
        help_text=_("The run whose step.invoke started this run; it waits for its end."),
    )

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["-created_at"], name="django_events_run_created"),
            models.Index(fields=["status", "-created_at"], name="django_events_run_status"),
            models.Index(fields=["function", "-created_at"], name="django_events_run_function"),
            models.Index(fields=["event_name", "-created_at"], name="django_events_run_event_name"),
            models.Index(
                fields=["due_at"],
                condition=Q(status__in=sorted(WAITING_STATUSES)),
                name="django_events_run_due",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status=RunStatus.RUNNING),
                name="django_events_run_lease",
            ),
            # The next held run of a concurrency key, in priority then arrival order.
            models.Index(
                F("held_on"),
                F("priority").desc(),
                F("created_at"),
                condition=Q(status=RunStatus.HELD),
                name="django_events_run_held",
            ),
            # The next due run of a function with a priority (only those runs have one).
            models.Index(
                F("function"),
                F("priority").desc(),
                F("created_at"),
                condition=Q(status__in=sorted(WAITING_STATUSES), priority__isnull=False),
                name="django_events_run_priority",
            ),
            # A batch's events, a debounced run's successor.
            models.Index(
                fields=["merged_into"],
                condition=Q(merged_into__isnull=False),
                name="django_events_run_merged",
            ),
        ]
        permissions = [
            ("retry_run", "Can retry runs"),
            ("cancel_run", "Can cancel runs"),
        ]

    def __str__(self) -> str:
        return f"{self.function} [{self.status}]"

    @property
    def is_final(self) -> bool:
        """Whether the run has ended (succeeded, dead or cancelled)."""
        return self.status in FINAL_STATUSES


class Attempt(models.Model):
    """One try of a run: when, where, and how it ended."""

    # No index of its own: the unique constraint on (run, number) serves every lookup by run.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempt_set", db_index=False)
    number = models.PositiveIntegerField(help_text=_("1 for the first attempt."))
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices)
    exc_type = models.CharField(
        max_length=255, blank=True, help_text=_("Dotted name of the exception raised.")
    )
    message = models.TextField(blank=True, help_text=_("The exception's message."))
    traceback = models.TextField(blank=True)
    worker_host = models.CharField(max_length=255, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["run", "number"]
        constraints = [
            models.UniqueConstraint(fields=["run", "number"], name="django_events_attempt_unique_number"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.run_id}: {self.outcome}"

    @property
    def duration(self) -> dt.timedelta:
        """How long the attempt took."""
        return self.finished_at - self.started_at


class FlowKey(models.Model):
    """The state of one flow-control key of one function: its lock, and what its policy remembers.

    Writers of a key lock its row first (claims under a concurrency limit or a
    throttle, releases of a slot, sends joining a debounce window or a batch), so
    that its decisions never race, on any database and across hosts.
    """

    #: sha256 of (function, kind, key), in hex: a fixed-size key for any function id and key.
    id = models.CharField(max_length=64, primary_key=True)
    function = models.CharField(max_length=255)
    kind = models.CharField(
        max_length=16, help_text=_("concurrency, throttle, rate_limit, debounce or batch.")
    )
    key = models.TextField(blank=True, help_text=_("The key's value ('' for the function as a whole)."))
    tat = models.DateTimeField(
        null=True, blank=True, help_text=_("Throttle and rate limit: when the allowance is next free.")
    )
    open_run = models.UUIDField(
        null=True, blank=True, help_text=_("Debounce and batch: the run new events join.")
    )
    opened_at = models.DateTimeField(
        null=True, blank=True, help_text=_("Debounce and batch: when the open run's first event came.")
    )
    size = models.PositiveIntegerField(default=0, help_text=_("Batch: events in the open run."))
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["function", "kind"], name="django_events_flowkey_fn")]
        verbose_name = _("flow-control key")

    def __str__(self) -> str:
        return f"{self.function} {self.kind} {self.key!r}"


class Slot(models.Model):
    """A concurrency slot held by a run: while it is running, or kept for it when it was woken.

    A slot counts until ``lease_expires_at``: a slot held by a killed worker comes
    back when its lease ends.
    """

    id = models.BigAutoField(primary_key=True)
    flow_key = models.CharField(max_length=64, help_text=_("The FlowKey id."))
    run_id = models.UUIDField()
    lease_expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["flow_key", "lease_expires_at"], name="django_events_slot_key"),
            models.Index(fields=["run_id"], name="django_events_slot_run"),
        ]

    def __str__(self) -> str:
        return f"slot of {self.run_id} on {self.flow_key}"


class StepKind(models.TextChoices):
    """What a durable step does (``ctx.step.<kind>``)."""

    RUN = "run", _("run")
    ATOMIC = "atomic", _("atomic")
    SLEEP = "sleep", _("sleep")
    WAIT = "wait", _("wait for event")
    SEND = "send", _("send event")
    INVOKE = "invoke", _("invoke")


class StepStatus(models.TextChoices):
    """Where a durable step stands."""

    COMPLETED = "completed", _("completed")
    """Done: replays return its ``result`` (or raise its ``error``, for an invoke whose run failed)."""
    FAILED = "failed", _("failed")
    """Raised on its last try; the run's next attempt runs it again."""
    WAITING = "waiting", _("waiting")
    """A wait or an invoke not resolved yet."""
    CANCELLED = "cancelled", _("cancelled")
    """A wait whose run was cancelled while it waited."""


class Step(models.Model):
    """One durable step of a run: its memo (what a replay returns) and its history.

    A wait's row is also what a sent event is matched against: ``event_name`` and
    ``match_key`` (a digest of the match path and the value the trigger event had
    there), found by an index lookup while the step is ``waiting``.
    """

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique constraint on (run, step_id) serves every lookup by run.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="step_set", db_index=False)
    step_id = models.CharField(
        max_length=255, help_text=_("The id given in the code, with :N when repeated.")
    )
    position = models.PositiveIntegerField(help_text=_("0 for the function's first step, and so on."))
    kind = models.CharField(max_length=16, choices=StepKind.choices)
    status = models.CharField(max_length=16, choices=StepStatus.choices)
    result = models.JSONField(null=True, blank=True, help_text=_("What the step returned (JSON)."))
    error = models.TextField(blank=True, help_text=_("Type and message of its last failure."))
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text=_("Times the step's code ran."))
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    wake_at = models.DateTimeField(
        null=True, blank=True, help_text=_("A sleep's end; a wait's or an invoke's timeout.")
    )
    # Waits.
    event_name = models.CharField(max_length=255, blank=True, help_text=_("The event a wait waits for."))
    match = models.TextField(blank=True, help_text=_("The wait's match path, and the value it must have."))
    match_key = models.CharField(
        max_length=64, blank=True, help_text=_("sha256 of the match path and value: how sent events find it.")
    )
    checks = models.BooleanField(
        default=False,
        help_text=_("The wait has an if_ callable: the run itself checks each candidate event."),
    )
    pokes = models.PositiveIntegerField(
        default=0, help_text=_("Events that may match, sent while it waits (the run checks them).")
    )
    resolved_event = models.UUIDField(null=True, blank=True, help_text=_("The event that ended the wait."))
    invoked_run = models.UUIDField(null=True, blank=True, help_text=_("The run an invoke started."))

    class Meta:
        ordering = ["run", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step_id"], name="django_events_step_unique_id"),
        ]
        indexes = [
            # A sent event finds the waits it ends: an index lookup, not a scan.
            models.Index(
                fields=["event_name", "match_key"],
                condition=Q(status=StepStatus.WAITING),
                name="django_events_step_waiting",
            ),
        ]

    def __str__(self) -> str:
        return f"step {self.step_id} ({self.kind}) of {self.run_id}: {self.status}"

    @property
    def duration(self) -> dt.timedelta | None:
        """How long the step took, once finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class WaitPath(models.Model):
    """A match path some wait used for an event name: what a send looks up before matching waits."""

    id = models.BigAutoField(primary_key=True)
    event_name = models.CharField(max_length=255)
    path = models.CharField(max_length=255, help_text=_("The match path ('' for a wait with only if_)."))

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["event_name", "path"], name="django_events_waitpath_unique"),
        ]
        verbose_name = _("wait path")

    def __str__(self) -> str:
        return f"{self.event_name} {self.path}"


class QueuedMessageState(models.TextChoices):
    """Where a message of ``broker.DatabaseBroker`` stands."""

    READY = "ready", _("ready")
    """Waiting for a consumer; deliverable once ``available_at`` has come (later for a delayed message)."""
    TAKEN = "taken", _("taken")
    """Delivered to a consumer, whose hold ends at ``available_at`` unless its worker keeps extending it.

    Once the hold has ended (the worker died), any consumer may take the message again.
    """
    DEAD = "dead", _("dead")
    """Rejected by a worker (Dramatiq's dead letter): kept for inspection, never delivered again."""


#: States of the messages that are still to be delivered or acknowledged.
PENDING_MESSAGE_STATES: frozenset[str] = frozenset({QueuedMessageState.READY, QueuedMessageState.TAKEN})


class QueuedMessageQuerySet(models.QuerySet["QueuedMessage"]):
    """Named filters for the database broker's messages."""

    def in_queue(self, queue_name: str) -> QueuedMessageQuerySet:
        """Messages of one Dramatiq queue."""
        return self.filter(queue_name=queue_name)

    def pending(self) -> QueuedMessageQuerySet:
        """Messages not yet acknowledged nor dead: ready (delayed ones too) or taken."""
        return self.filter(state__in=sorted(PENDING_MESSAGE_STATES))  # sorted: as in the index

    def deliverable(self, now: dt.datetime | None = None) -> QueuedMessageQuerySet:
        """Messages a consumer may take now: ready and due, or taken by a consumer whose hold ended."""
        return self.pending().filter(available_at__lte=now or timezone.now())

    def dead(self) -> QueuedMessageQuerySet:
        """Dead-lettered messages."""
        return self.filter(state=QueuedMessageState.DEAD)


class QueuedMessage(models.Model):
    """One Dramatiq message in the queues of ``django_events.broker.DatabaseBroker``.

    A row is inserted by ``enqueue()`` (in the caller's transaction, if any),
    taken by a consumer (``ready`` -> ``taken``), and deleted when the worker
    acknowledges it, or kept as ``dead`` when the worker rejects it.

    ``available_at`` is when the message may next be delivered: its ``eta``
    while it is ready, and while it is taken the end of the consumer's hold
    (its visibility timeout, which a live worker keeps pushing back). So "may
    a consumer take it now?" is one range condition on one column, served by
    one partial index, for new, delayed and abandoned messages alike. For a
    dead message it is when the message was rejected.
    """

    id = models.BigAutoField(primary_key=True)
    queue_name = models.CharField(max_length=255, help_text=_("The Dramatiq queue."))
    actor_name = models.CharField(max_length=255, blank=True, help_text=_("The Dramatiq actor."))
    message_id = models.CharField(max_length=255, help_text=_("The Dramatiq message id."))
    body = models.BinaryField(help_text=_("The message, encoded with Dramatiq's encoder."))
    state = models.CharField(
        max_length=8, choices=QueuedMessageState.choices, default=QueuedMessageState.READY
    )
    available_at = models.DateTimeField(
        default=timezone.now,
        help_text=_(
            "When the message may next be delivered: its eta while ready, the end of the "
            "consumer's hold while taken, when it was rejected if dead."
        ),
    )
    delivery_count = models.PositiveIntegerField(default=0, help_text=_("Times a consumer took it."))
    taken_by = models.CharField(
        max_length=255, blank=True, help_text=_("The broker (host:pid:id) that took it last.")
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = QueuedMessageQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [
            # The take, the wake-up schedule and join(): deliverable messages of a queue, soonest first.
            models.Index(
                fields=["queue_name", "available_at"],
                condition=Q(state__in=sorted(PENDING_MESSAGE_STATES)),
                name="django_events_qmsg_due",
            ),
            # A worker's heartbeat: the messages its broker holds.
            models.Index(
                fields=["taken_by"],
                condition=Q(state=QueuedMessageState.TAKEN),
                name="django_events_qmsg_taken",
            ),
            # The admin's dead messages, newest first, and prune's walk through them. Partial:
            # the hot path (insert, take, delete) never writes to these two.
            models.Index(
                fields=["id"], condition=Q(state=QueuedMessageState.DEAD), name="django_events_qmsg_dead"
            ),
            # The admin's search for a dead message by its Dramatiq id.
            models.Index(
                fields=["message_id"],
                condition=Q(state=QueuedMessageState.DEAD),
                name="django_events_qmsg_dead_msgid",
            ),
        ]
        verbose_name = _("broker message")
        verbose_name_plural = _("broker messages")

    def __str__(self) -> str:
        return f"{self.actor_name or self.message_id} on {self.queue_name} [{self.state}]"


__all__ += [
    "NOT_STARTED_STATUSES",
    "PENDING_MESSAGE_STATES",
    "SUSPENDED_STATUSES",
    "FlowKey",
    "QueuedMessage",
    "QueuedMessageQuerySet",
    "QueuedMessageState",
    "Slot",
    "Step",
    "StepKind",
    "StepStatus",
    "WaitPath",
]
