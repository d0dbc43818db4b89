"""The run inspector: run history, attempts and tracebacks, retry / cancel / replay, an overview.

History is read-only here: nobody edits a run by hand. The actions go through
``django_events.control``, are POST with CSRF, and need the permissions
``django_events.retry_run``, ``django_events.cancel_run`` and
``django_events.replay_event``. The database broker's messages are listed too
("Broker messages"), read-only, with two actions on dead ones: requeue (needs
``change_queuedmessage``) and delete (needs ``delete_queuedmessage``). Lists
never count a whole table (a capped count); on runs and events every filter and
the default ordering have an index, the date hierarchy probes an index instead
of listing the distinct dates of every row, and error searches use ``ILIKE``,
which the trigram index serves: those helpers are in ``django_events.changelists``.

Flow control shows on three pages. A run's page says in one line why it waits or
why it was skipped or cancelled (``Run.reason``), with the concurrency key a held
run waits on, the run a debounced or batched run was merged into, the event that
cancelled it, and, on a batch run, the runs merged into it. An event's page says
which functions filtered it out (``Event.skipped_by``), or that none subscribed.
The overview counts the waiting work per function and per key, from the partial
indexes of the waiting states only, and shows each cron function's next tick
(``cron.next_ticks``).

Durable steps show on a run's page: its steps as a timeline (the first
``STEPS_SHOWN`` in position order, one query however many it has), and, for a
sleeping or waiting run, what it waits for and until when; an invoked run links
to the run that invoked it. The run list filters and shows sleeping and waiting
runs like the other waiting states.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import dramatiq
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import Count, F, Min, OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext_lazy
from dramatiq.errors import DecodeError

from . import clock, control, cron
from .broker import read_message
from .changelists import (
    CappedCountPaginator,
    ContainsText,
    EventChangeList,
    EventNameFilter,
    FunctionFilter,
    HasMember,
    IndexedDateHierarchyChangeList,
    QueueNameFilter,
    search_values,
)
from .dispatch import ACTOR_NAME
from .execution import RUN_DEAD_EVENT
from .models import (
    FINAL_STATUSES,
    NOT_STARTED_STATUSES,
    Attempt,
    AttemptOutcome,
    Event,
    FlowKey,
    QueuedMessage,
    QueuedMessageState,
    Run,
    RunStatus,
    Slot,
    Step,
    StepKind,
    StepStatus,
    sources_of,
)
from .registry import get_function
from .text import has_unstorable

__all__ = ["CappedCountPaginator", "EventAdmin", "QueuedMessageAdmin", "RunAdmin"]

StrOrPromise = str | Promise

#: Statuses a run can be retried from: the final ones the state machine lets go back to pending
#: (a held run goes to pending too, but only when flow control wakes it with a slot kept for it).
RETRYABLE = frozenset(sources_of(RunStatus.PENDING)) & FINAL_STATUSES
#: Statuses a run can be cancelled from (derived from the state machine): every not-started one.
CANCELLABLE = frozenset(sources_of(RunStatus.CANCELLED))
#: Statuses in which a run's ``reason`` says why it is where it is (waits, was skipped or cancelled).
EXPLAINED = NOT_STARTED_STATUSES | {RunStatus.SKIPPED, RunStatus.CANCELLED}
#: Statuses whose ``due_at`` the run list shows: when the run is next due to start.
SHOWS_DUE = frozenset(
    {RunStatus.RETRYING, RunStatus.SCHEDULED, RunStatus.THROTTLED, RunStatus.SLEEPING, RunStatus.WAITING}
)
#: Runs merged into a batch (or debounced) run listed on its page; a link lists the rest.
MERGED_SHOWN = 100
#: Steps listed on a run's page, in position order; a note says when the run has more.
STEPS_SHOWN = 200
#: The most characters of a step's result (as JSON) shown in its row.
STEP_RESULT_CHARS = 200
#: Rows of each "per key" table of the overview (the keys with the most runs or slots).
TOP_KEYS = 50
#: Rows of each "per function" table of the overview.
TOP_FUNCTIONS = 1000

#: The colour a broker message's state borrows from a run status (``admin.css`` styles run
#: statuses and attempt outcomes by their own names).
MESSAGE_BADGES: dict[str, str] = {
    QueuedMessageState.READY: RunStatus.PENDING,
    QueuedMessageState.TAKEN: RunStatus.RUNNING,
    QueuedMessageState.DEAD: RunStatus.DEAD,
}
#: The label of each value a badge shows, by its choices.
_LABELS: dict[type[models.TextChoices], dict[str, StrOrPromise]] = {
    choices: dict(choices.choices)
    for choices in (RunStatus, AttemptOutcome, QueuedMessageState, StepStatus, StepKind)
}


@dataclass(frozen=True)
class Report:
    """How the report of an action on many rows names what it did, and why it skipped the rest."""

    #: "%(n)d run retried" and its plural, chosen by ``n`` (an ``ngettext_lazy`` with number "n").
    done: Any
    #: Why a row was skipped: "not dead".
    why: StrOrPromise


#: The report's second half, after the rows done.
SKIPPED = ngettext_lazy("%(n)d skipped (%(why)s)", "%(n)d skipped (%(why)s)", "n")
#: The report of a replay.
CREATED = ngettext_lazy("%(n)d new run created.", "%(n)d new runs created.", "n")

#: The run actions: what does the work, and how the report says what was done and skipped.
RUN_ACTIONS: dict[str, tuple[Callable[[Iterable[Any]], control.Outcome], Report]] = {
    "retry": (
        control.retry_runs,
        Report(
            ngettext_lazy("%(n)d run retried", "%(n)d runs retried", "n"),
            _("not dead, cancelled, skipped or succeeded"),
        ),
    ),
    "cancel": (
        control.cancel_runs,
        Report(ngettext_lazy("%(n)d run cancelled", "%(n)d runs cancelled", "n"), _("running or ended")),
    ),
}
#: The statuses each run action applies to; selected runs in other statuses are skipped.
ACTION_STATUSES: dict[str, frozenset[str]] = {"retry": RETRYABLE, "cancel": CANCELLABLE}
#: The message actions: what does the work, and how the report says what was done and skipped.
MESSAGE_ACTIONS: dict[str, tuple[Callable[[Iterable[int], str], control.Outcome], Report]] = {
    "requeue": (
        control.requeue_dead_messages,
        Report(ngettext_lazy("%(n)d message requeued", "%(n)d messages requeued", "n"), _("not dead")),
    ),
    "delete": (
        control.delete_dead_messages,
        Report(ngettext_lazy("%(n)d message deleted", "%(n)d messages deleted", "n"), _("not dead")),
    ),
}


def _include(name: str, context: dict[str, Any]) -> SafeString:
    """The template ``admin/django_events/includes/<name>.html``, rendered (auto-escaped)."""
    return render_to_string(f"admin/django_events/includes/{name}.html", context)


def _badge(value: str, choices: type[models.TextChoices] = RunStatus) -> SafeString:
    """A coloured label for a run status, an attempt outcome or a message state: ``includes/badge.html``.

    The label is the choice's; the colour is the value's own class in ``admin.css``,
    except that a message state borrows a run status's (:data:`MESSAGE_BADGES`).
    """
    label = _LABELS[choices].get(value) or value.replace("_", " ") or "-"
    style = MESSAGE_BADGES.get(value, value) if choices is QueuedMessageState else value
    return _include("badge", {"style": style, "label": label})


def _printable(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\ud800``).

    A page is sent as UTF-8, which has no lone surrogates: one left in would make
    the response fail. JSON can hold them (as escapes), so event data and run
    results on SQLite and the database broker's message bodies may; no text
    column can (SQLite's driver and PostgreSQL refuse them).
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_text(value: Any) -> str:
    """``value`` as indented JSON to show; ``TypeError`` or ``ValueError`` if JSON cannot hold it."""
    return _printable(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _pretty_json(value: Any) -> SafeString:
    return _include("json", {"text": _json_text(value)})


def _duration(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _when(value: dt.datetime | None, *, millis: bool = False) -> str:
    """A time in the current time zone, to the second (or millisecond); "-" for none."""
    if value is None:
        return "-"
    text = timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S.%f")
    return text[:-3] if millis else text[:-7]


def _short_json(value: Any, limit: int = STEP_RESULT_CHARS) -> str:
    """``value`` as one line of JSON, cut to ``limit`` characters with an ellipsis (plain text)."""
    try:
        text = _printable(json.dumps(value, sort_keys=True, ensure_ascii=False))
    except (TypeError, ValueError):  # JSONField gives back only what JSON holds; be safe anyway
        text = _printable(repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _not_found() -> NoReturn:
    raise Http404


def _as_uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term)
    except ValueError:
        return None


class _ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """History is never added, edited or deleted by hand here."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # per-choice counts would scan the table
    list_per_page = 50

    class Media:
        css = {"all": ["django_events/admin.css"]}

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _post_only(self, request: HttpRequest) -> HttpResponse | None:
        return None if request.method == "POST" else HttpResponseNotAllowed(["POST"])

    def _report(self, request: HttpRequest, outcome: control.Outcome, report: Report) -> None:
        """Tell the user "n done; m skipped (why)." after an action; a warning if nothing was done."""
        text = report.done % {"n": outcome.done}
        if outcome.skipped:
            text += "; " + SKIPPED % {"n": outcome.skipped, "why": report.why}
        self.message_user(request, f"{text}.", messages.SUCCESS if outcome.done else messages.WARNING)


# -- flow control ----------------------------------------------------------------------------------


@dataclass
class RunFlow:
    """What flow control did with one run, as its page shows it (see :func:`run_flow`)."""

    #: The run's ``reason``, when it explains the run's status (waiting, skipped, cancelled); else "".
    reason: str = ""
    #: The concurrency key (a ``FlowKey`` id) a held run waits on, and its row (``None`` if gone).
    held_on: str = ""
    held_key: FlowKey | None = None
    #: Runs held on that key (counted up to the paginator's cap, plus one), and its slots in use now.
    held_waiting: int = 0
    slots_in_use: int = 0
    #: A skipped run merged into another: "debounced", "batched" or "merged"; the run, if still stored.
    merged_verb: str = ""
    merged_into: uuid.UUID | None = None
    merged_target: Run | None = None
    #: A cancelled run: the event that cancelled it, if still stored.
    cancelled_by: uuid.UUID | None = None
    cancelling_event: Event | None = None
    #: Runs merged into this one (the first ``MERGED_SHOWN``), how many in all (capped), and how.
    merged: list[Run] = field(default_factory=list)
    merged_count: int = 0
    merged_runs_verb: str = ""

    @property
    def says_why(self) -> bool:
        """Whether there is anything to say about why the run waits, or was skipped or cancelled."""
        return bool(self.reason or self.held_on or self.merged_into or self.cancelled_by)


def _merged_verb(run: Run) -> str:
    """How a run was merged into another: as its ``reason`` says, else as its function is set up."""
    for verb in ("batched", "debounced"):
        if run.reason.startswith(verb):
            return verb
    spec = get_function(run.function)
    if spec is not None and spec.batch is not None:
        return "batched"
    if spec is not None and spec.debounce is not None:
        return "debounced"
    return "merged"


def _capped_count(queryset: QuerySet[Any]) -> int:
    """How many rows ``queryset`` has, counting at most the paginator's cap plus one."""
    return queryset.order_by()[: CappedCountPaginator.cap + 1].count()


def run_flow(run: Run, now: dt.datetime | None = None) -> RunFlow:
    """What flow control did with ``run``: a few primary-key or index-range queries, once per page.

    The result is kept on the run, so the page's fields share it. Lines that would
    describe a state the run has left (a retried run that was skipped) are left out.
    """
    cached: RunFlow | None = getattr(run, "_django_events_flow", None)
    if cached is not None:
        return cached
    now = now or clock.now()
    flow = RunFlow()
    if run.status in EXPLAINED:
        flow.reason = run.reason
    if run.status == RunStatus.HELD and run.held_on:
        flow.held_on = run.held_on
        flow.held_key = FlowKey.objects.filter(pk=run.held_on).first()
        flow.held_waiting = _capped_count(Run.objects.filter(status=RunStatus.HELD, held_on=run.held_on))
        flow.slots_in_use = _capped_count(Slot.objects.filter(flow_key=run.held_on, lease_expires_at__gt=now))
    if run.status == RunStatus.SKIPPED and run.merged_into is not None:
        flow.merged_verb = _merged_verb(run)
        flow.merged_into = run.merged_into
        flow.merged_target = Run.objects.filter(pk=run.merged_into).only("pk", "status", "function").first()
    if run.status == RunStatus.CANCELLED and run.cancelled_by is not None:
        flow.cancelled_by = run.cancelled_by
        flow.cancelling_event = Event.objects.filter(pk=run.cancelled_by).only("pk", "name").first()
    # The partial index django_events_run_merged holds only merged runs: a probe for most runs.
    flow.merged = list(
        Run.objects.filter(merged_into=run.pk)
        .order_by("created_at", "pk")
        .only("pk", "event_id", "event_name", "status", "reason", "function", "created_at")[:MERGED_SHOWN]
    )
    if flow.merged:
        flow.merged_runs_verb = _merged_verb(flow.merged[0])
        flow.merged_count = (
            len(flow.merged)
            if len(flow.merged) < MERGED_SHOWN
            else _capped_count(Run.objects.filter(merged_into=run.pk))
        )
    run._django_events_flow = flow  # type: ignore[attr-defined]
    return flow


# -- durable steps ---------------------------------------------------------------------------------


@dataclass
class StepRow:
    """One step as the run's timeline shows it: all plain text, escaped by the template."""

    step: Step
    kind: StrOrPromise
    badge: SafeString
    started: str
    duration: str
    #: The step's result as shortened JSON ("" when it has an error, or none to show).
    result: str
    #: A sleep's end, a wait's or an invoke's timeout ("" if none).
    wake_at: str


@dataclass
class RunSteps:
    """A run's durable steps, as its page shows them (see :func:`run_steps`)."""

    #: The first ``STEPS_SHOWN`` steps, in position order; ``more``: the run has others after them.
    rows: list[StepRow] = field(default_factory=list)
    more: bool = False
    #: "sleeping" or "waiting" when the run is; then the step it waits at (``None`` if not found),
    #: and until when (``None``: no timeout).
    suspended: str = ""
    current: Step | None = None
    until: dt.datetime | None = None
    #: A waiting invoke's run, if still stored.
    invoked: Run | None = None
    #: The run that invoked this one (``Run.parent``), and its row if still stored.
    parent_id: uuid.UUID | None = None
    parent: Run | None = None

    @property
    def says_what(self) -> bool:
        """Whether there is anything to say about what the run waits for, or which run invoked it."""
        return bool(self.suspended or self.parent_id)


def _step_row(step: Step) -> StepRow:
    shows_result = not step.error and step.status == StepStatus.COMPLETED and step.result is not None
    return StepRow(
        step=step,
        kind=_LABELS[StepKind].get(step.kind) or step.kind,
        badge=_badge(step.status, StepStatus),
        started=_when(step.started_at, millis=True),
        duration=_duration(step.started_at, step.finished_at),
        result=_short_json(step.result) if shows_result else "",
        wake_at=_when(step.wake_at) if step.wake_at is not None else "",
    )


def run_steps(run: Run) -> RunSteps:
    """``run``'s steps and what it waits at: one query for the steps, and a primary-key lookup each
    for a waiting invoke's run and for the run that invoked it.

    Kept on the run, so the page's fields share it. The steps are read by the run's
    unique (run, step_id) index; only the first ``STEPS_SHOWN`` by position are read.
    """
    cached: RunSteps | None = getattr(run, "_django_events_steps", None)
    if cached is not None:
        return cached
    found = RunSteps()
    steps = list(Step.objects.filter(run_id=run.pk).order_by("position", "pk")[: STEPS_SHOWN + 1])
    found.more = len(steps) > STEPS_SHOWN
    steps = steps[:STEPS_SHOWN]
    found.rows = [_step_row(step) for step in steps]
    if run.status in (RunStatus.SLEEPING, RunStatus.WAITING):
        found.suspended = run.status
        kinds = (StepKind.SLEEP,) if run.status == RunStatus.SLEEPING else (StepKind.WAIT, StepKind.INVOKE)
        waiting = [step for step in steps if step.status == StepStatus.WAITING and step.kind in kinds]
        if not waiting and found.more:  # past the steps listed: look it up by itself
            waiting = list(
                Step.objects.filter(run_id=run.pk, status=StepStatus.WAITING, kind__in=kinds).order_by(
                    "-position"
                )[:1]
            )
        found.current = max(waiting, key=lambda step: step.position) if waiting else None
        if run.status == RunStatus.SLEEPING:
            found.until = run.due_at or (found.current.wake_at if found.current else None)
        else:
            found.until = found.current.wake_at if found.current else run.due_at
        current = found.current
        if current is not None and current.kind == StepKind.INVOKE and current.invoked_run is not None:
            found.invoked = (
                Run.objects.filter(pk=current.invoked_run).only("pk", "function", "status").first()
            )
    if run.parent is not None:
        found.parent_id = run.parent
        found.parent = Run.objects.filter(pk=run.parent).only("pk", "function", "status").first()
    run._django_events_steps = found  # type: ignore[attr-defined]
    return found


def _run_note(run: Run) -> str:
    """What an event's page says next to one of its runs: why it waits or was skipped, or its error."""
    if run.status in EXPLAINED and run.reason:
        return run.reason
    return run.last_error if run.status not in FINAL_STATUSES or run.status == RunStatus.DEAD else ""


def _skipped_by(event: Event) -> list[tuple[str, str]]:
    """The functions that gave ``event`` no run, and why, sorted by function id, as text to show."""
    skipped = event.skipped_by
    if not isinstance(skipped, dict):
        return [("", _printable(str(skipped)))] if skipped else []
    return [
        (_printable(str(function_id)), _printable(reason if isinstance(reason, str) else json.dumps(reason)))
        for function_id, reason in sorted(skipped.items(), key=lambda item: str(item[0]))
    ]


@dataclass
class FunctionWork:
    """One function's waiting work, for the overview."""

    function: str
    scheduled: int = 0
    throttled: int = 0
    held: int = 0
    #: Concurrency slots in use now (leases not over): its running runs, and woken ones about to start.
    slots: int = 0
    #: When its next scheduled or throttled run is due.
    next_due: dt.datetime | None = None


@dataclass
class KeyCount:
    """A flow-control key and how many runs (or slots) it has, for the overview."""

    flow_key_id: str
    count: int
    #: The key's row; ``None`` if it was deleted since.
    flow_key: FlowKey | None = None


def waiting_work(now: dt.datetime) -> dict[str, Any]:
    """The waiting work per function and per key: a handful of bounded ``GROUP BY`` queries.

    Each reads only runs in a waiting state, through the partial indexes that hold
    them (``django_events_run_due`` for scheduled and throttled runs,
    ``django_events_run_held`` for held ones), and the live concurrency slots; none
    touches the finished runs, however many there are.
    """
    work: dict[str, FunctionWork] = {}

    def row(function: str) -> FunctionWork:
        return work.setdefault(function, FunctionWork(function))

    for function, status, count, first_due in (
        Run.objects.filter(status__in=[RunStatus.SCHEDULED, RunStatus.THROTTLED])
        .values_list("function", "status")
        .annotate(n=Count("pk"), first_due=Min("due_at"))
        .order_by()[:TOP_FUNCTIONS]
    ):
        setattr(row(function), status, count)
        current = row(function).next_due
        if first_due is not None and (current is None or first_due < current):
            row(function).next_due = first_due
    held = Run.objects.filter(status=RunStatus.HELD)
    for function, count in held.values_list("function").annotate(n=Count("pk")).order_by()[:TOP_FUNCTIONS]:
        row(function).held = count
    live = Slot.objects.filter(lease_expires_at__gt=now)
    function_of_key = Subquery(FlowKey.objects.filter(pk=OuterRef("flow_key")).values("function")[:1])
    for function, count in (
        live.annotate(function=function_of_key)
        .values_list("function")
        .annotate(n=Count("pk"))
        .order_by()[:TOP_FUNCTIONS]
    ):
        row(function or "?").slots = count
    held_keys = [
        KeyCount(key, count)
        for key, count in held.values_list("held_on")
        .annotate(n=Count("pk"))
        .order_by("-n", "held_on")[:TOP_KEYS]
    ]
    slot_keys = [
        KeyCount(key, count)
        for key, count in live.values_list("flow_key")
        .annotate(n=Count("pk"))
        .order_by("-n", "flow_key")[:TOP_KEYS]
    ]
    keys = FlowKey.objects.in_bulk({item.flow_key_id for item in (*held_keys, *slot_keys)})
    for item in (*held_keys, *slot_keys):
        item.flow_key = keys.get(item.flow_key_id)
    return {
        "functions": sorted(work.values(), key=lambda item: item.function),
        "held_keys": held_keys,
        "slot_keys": slot_keys,
        "top_keys": TOP_KEYS,
    }


@admin.register(Run)
class RunAdmin(_ReadOnlyAdmin):
    list_display = [
        "function",
        "event_link",
        "status_badge",
        "attempts_used",
        "duration",
        "due",
        "why_short",
        "created_at",
    ]
    # "status" offers every RunStatus choice, the flow-control states too; each is a range of the
    # (status, -created_at) index, in the list's order.
    list_filter = ["status", FunctionFilter, EventNameFilter]
    date_hierarchy = "created_at"
    search_fields = ["function"]  # shows the search box; get_search_results does the work
    search_help_text = _(
        "A run or event id, an idempotency key, an event name or function id (exact), "
        "or words from the error message."
    )
    ordering = ["-created_at"]
    actions = ["retry_selected", "cancel_selected"]
    fields = readonly_fields = (
        "id",
        "function",
        "event_link",
        "status_badge",
        "why",
        "waits_for",
        "priority",
        "attempts_used",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "due",
        "lease_expires_at",
        "last_error",
        "event_data",
        "result_json",
        "merged_runs",
        "step_timeline",
        "attempt_history",
    )
    #: Links from the run page and the overview filter the list by these (not in the sidebar).
    hidden_lookups = frozenset({"held_on", "merged_into"})

    # -- columns and fields ----------------------------------------------------------------

    @admin.display(description=_("event"), ordering="event_name")
    def event_link(self, run: Run) -> SafeString:
        url = reverse("admin:django_events_event_change", args=[run.event_id])
        return format_html('<a href="{}">{}</a>', url, run.event_name)

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, run: Run) -> SafeString:
        return _badge(run.status)

    @admin.display(description=_("attempts"))
    def attempts_used(self, run: Run) -> str:
        return f"{run.attempts} / {run.max_attempts}"

    @admin.display(description=_("duration"))
    def duration(self, run: Run) -> str:
        return _duration(run.started_at, run.finished_at)

    @admin.display(description=_("due"), ordering="due_at")
    def due(self, run: Run) -> str:
        """When a retrying, scheduled, throttled, sleeping or waiting run is next due to start."""
        if run.status in SHOWS_DUE and run.due_at:
            return timezone.localtime(run.due_at).strftime("%Y-%m-%d %H:%M:%S")
        return "-"

    @admin.display(description=_("why"))
    def why_short(self, run: Run) -> str:
        """The run's reason in the list, when it explains the run's status (escaped by the list)."""
        return run.reason if run.status in EXPLAINED and run.reason else ""

    @admin.display(description=_("why"))
    def why(self, run: Run) -> SafeString:
        """Why the run waits, or was skipped or cancelled: ``includes/flow.html``."""
        return _include("flow", {"flow": run_flow(run), "cap": CappedCountPaginator.cap})

    @admin.display(description=_("merged runs"))
    def merged_runs(self, run: Run) -> SafeString:
        """The runs batched (or debounced) into this one: ``includes/merged.html``."""
        flow = run_flow(run)
        return _include(
            "merged",
            {
                "runs": [(merged, _badge(merged.status)) for merged in flow.merged],
                "count": flow.merged_count,
                "more": flow.merged_count - len(flow.merged),
                "cap": CappedCountPaginator.cap,
                "verb": flow.merged_runs_verb,
                "run_id": run.pk,
            },
        )

    @admin.display(description=_("waits for"))
    def waits_for(self, run: Run) -> SafeString:
        """What a sleeping or waiting run waits for and until when; the run that invoked this one."""
        steps = run_steps(run)
        return _include("waits", {"steps": steps, "until": _when(steps.until) if steps.until else ""})

    @admin.display(description=_("steps"))
    def step_timeline(self, run: Run) -> SafeString:
        """The run's durable steps in position order, the first ``STEPS_SHOWN``: ``includes/steps.html``."""
        steps = run_steps(run)
        return _include("steps", {"rows": steps.rows, "more": steps.more, "shown": STEPS_SHOWN})

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """The run page's fields, without the flow-control and step ones that have nothing to say."""
        fields = list(super().get_fields(request, obj))
        if isinstance(obj, Run):
            flow = run_flow(obj)
            steps = run_steps(obj)
            hidden = {
                "why": not flow.says_why,
                "waits_for": not steps.says_what,
                "step_timeline": not steps.rows,
                "priority": obj.priority is None,
                "merged_runs": not flow.merged,
            }
            fields = [name for name in fields if not (isinstance(name, str) and hidden.get(name, False))]
        return fields

    @admin.display(description=_("event data"))
    def event_data(self, run: Run) -> SafeString:
        return _pretty_json(run.event.data)

    @admin.display(description=_("result"))
    def result_json(self, run: Run) -> StrOrPromise:
        if run.status != RunStatus.SUCCEEDED:
            return "-"
        return _pretty_json(run.result)

    @admin.display(description=_("attempts"))
    def attempt_history(self, run: Run) -> SafeString:
        attempts = Attempt.objects.filter(run=run).order_by("number")
        return _include(
            "attempts",
            {
                "attempts": [
                    (
                        attempt,
                        _badge(attempt.outcome, AttemptOutcome),
                        timezone.localtime(attempt.started_at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                        _duration(attempt.started_at, attempt.finished_at),
                    )
                    for attempt in attempts
                ]
            },
        )

    # -- queries ---------------------------------------------------------------------------

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return IndexedDateHierarchyChangeList

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        """Also the exact lookups the flow-control links use: runs held on a key, runs merged into one."""
        return lookup in self.hidden_lookups or super().lookup_allowed(lookup, value, request)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        queryset = super().get_queryset(request)
        if request.resolver_match and request.resolver_match.url_name == "django_events_run_change":
            return queryset.select_related("event")
        return queryset  # the list needs no join: the event's name is on the run

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Run], search_term: str
    ) -> tuple[QuerySet[Run], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        # "<> ''" changes no answer (the term is not empty) but lets PostgreSQL use the trigram
        # index, which holds only the runs that have an error.
        error = Q(ContainsText(F("last_error"), term)) & ~Q(last_error="")
        condition = Q(function=term) | Q(event_name=term) | error
        as_uuid = _as_uuid(term)
        if as_uuid is not None:
            condition |= Q(pk=as_uuid) | Q(event_id=as_uuid)
        keyed = list(Event.objects.filter(idempotency_key=term).values_list("pk", flat=True)[:1])
        if keyed:
            condition |= Q(event_id=keyed[0])
        return queryset.filter(condition), False

    # -- actions ---------------------------------------------------------------------------

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_events.retry_run")

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_events.cancel_run")

    @admin.action(description=_("Retry selected runs"), permissions=["retry"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._act(request, queryset, "retry")

    @admin.action(description=_("Cancel selected runs"), permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._act(request, queryset, "cancel")

    def _act(self, request: HttpRequest, runs: QuerySet[Run], name: str) -> None:
        """Do action ``name`` on the eligible ones of ``runs``; report them done, the rest skipped.

        The runs are narrowed to the action's statuses first (:data:`ACTION_STATUSES`): the
        state machine also lets a held run go to pending, but only when flow control wakes it.
        """
        action, report = RUN_ACTIONS[name]
        asked = len(runs.values_list("pk", flat=True))
        outcome = action(runs.filter(status__in=ACTION_STATUSES[name]).values_list("pk", flat=True))
        self._report(request, control.Outcome(done=outcome.done, skipped=asked - outcome.done), report)

    # -- views -----------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("overview/", wrap(self.overview_view), name="django_events_run_overview"),
            path("<path:object_id>/retry/", wrap(self.retry_view), name="django_events_run_retry"),
            path("<path:object_id>/cancel/", wrap(self.cancel_view), name="django_events_run_cancel"),
            *super().get_urls(),
        ]

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: retry one run (the button on a dead, cancelled or succeeded run's page)."""
        if not self.has_retry_permission(request):
            raise PermissionDenied
        return self._one_run_action(request, object_id, "retry")

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: cancel one run not started yet (pending, scheduled, throttled, held or retrying)."""
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        return self._one_run_action(request, object_id, "cancel")

    def _one_run_action(self, request: HttpRequest, object_id: str, name: str) -> HttpResponse:
        not_post = self._post_only(request)
        if not_post:
            return not_post
        run = get_object_or_404(Run, pk=_as_uuid(object_id) or _not_found())
        self._act(request, Run.objects.filter(pk=run.pk), name)
        return HttpResponseRedirect(reverse("admin:django_events_run_change", args=[run.pk]))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        pk = _as_uuid(object_id)
        run = Run.objects.filter(pk=pk).only("status").first() if pk is not None else None
        extra_context = {
            **(extra_context or {}),
            "can_retry": run is not None and run.status in RETRYABLE and self.has_retry_permission(request),
            "can_cancel": run is not None
            and run.status in CANCELLABLE
            and self.has_cancel_permission(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Runs by status and function over the last hour and day, the dead runs to look at, the
        waiting work per function and key (flow control), and each cron function's next tick."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        now = clock.now()
        windows = []
        for label, since in (
            (_("Last hour"), now - dt.timedelta(hours=1)),
            (_("Last day"), now - dt.timedelta(days=1)),
        ):
            rows: dict[str, Counter[str]] = defaultdict(Counter)
            for function, status, count in (
                Run.objects.filter(created_at__gte=since)
                .values_list("function", "status")
                .annotate(n=Count("pk"))
                .order_by()
            ):
                rows[function][status] = count
            totals: Counter[str] = Counter()
            for counts in rows.values():
                totals.update(counts)
            windows.append(
                {
                    "label": label,
                    "since": since,
                    "rows": [
                        (
                            function,
                            [counts.get(status, 0) for status in RunStatus.values],
                            sum(counts.values()),
                        )
                        for function, counts in sorted(rows.items())
                    ],
                    "totals": [totals.get(status, 0) for status in RunStatus.values],
                    "total": sum(totals.values()),
                }
            )
        dead = list(Run.objects.dead().order_by("-created_at")[:25])
        context = {
            **self.admin_site.each_context(request),
            "title": _("Events overview"),
            "opts": self.opts,
            "statuses": [(status, _badge(status)) for status in RunStatus.values],
            "badges": {status: _badge(status) for status in RunStatus.values},
            "windows": windows,
            "dead_runs": dead,
            "dead_count": Run.objects.dead()[: CappedCountPaginator.cap + 1].count(),
            "cap": CappedCountPaginator.cap,
            "attention": [RunStatus.DEAD],
            "waiting": waiting_work(now),
            "cron": cron.next_ticks(now=now),
        }
        return TemplateResponse(request, "admin/django_events/overview.html", context)


@admin.register(Event)
class EventAdmin(_ReadOnlyAdmin):
    list_display = ["name", "created_at", "idempotency_key", "runs_summary"]
    date_hierarchy = "created_at"
    search_fields = ["name"]
    search_help_text = _(
        "An event id, an idempotency key or an event name (exact), or key=value to find events "
        "whose data has that value (user_id=42)."
    )
    ordering = ["-created_at"]
    actions = ["replay_selected"]
    fields = readonly_fields = (
        "id",
        "name",
        "idempotency_key",
        "created_at",
        "data_json",
        "dead_run",
        "skipped_list",
        "run_list",
    )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return EventChangeList

    @admin.display(description=_("dead run"))
    def dead_run(self, event: Event) -> SafeString:
        """A ``django_events/run.dead`` event's run and its event, linked if still stored:
        ``includes/dead_run.html`` (ids that are not UUIDs are shown as text, never looked up)."""
        data = event.data if isinstance(event.data, dict) else {}
        given = {key: _printable(str(data.get(key) or "")) for key in ("run_id", "event_id")}
        run_pk, event_pk = _as_uuid(given["run_id"]), _as_uuid(given["event_id"])
        return _include(
            "dead_run",
            {
                **given,
                "run": Run.objects.filter(pk=run_pk).only("pk", "function", "status").first()
                if run_pk
                else None,
                "event": Event.objects.filter(pk=event_pk).only("pk", "name").first() if event_pk else None,
            },
        )

    @admin.display(description=_("runs"))
    def runs_summary(self, event: Event) -> SafeString:
        counts: Counter[str] = getattr(event, "run_counts", None) or Counter()
        return _include(
            "run_counts",
            {
                "counts": [(counts[status], _badge(status)) for status in RunStatus.values if counts[status]],
                "filtered": len(event.skipped_by) if isinstance(event.skipped_by, dict) else 0,
            },
        )

    @admin.display(description=_("why didn't it run?"))
    def skipped_list(self, event: Event) -> SafeString:
        """The functions subscribed to the event that gave it no run, and why (``skipped_by.html``)."""
        return _include("skipped_by", {"skipped": _skipped_by(event)})

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """The event page's fields; "why didn't it run?" only when a function gave it no run, and
        "dead run" only on a ``django_events/run.dead`` event."""
        fields = list(super().get_fields(request, obj))
        if isinstance(obj, Event) and not obj.skipped_by:
            fields.remove("skipped_list")
        if isinstance(obj, Event) and obj.name != RUN_DEAD_EVENT:
            fields.remove("dead_run")
        return fields

    @admin.display(description=_("data"))
    def data_json(self, event: Event) -> SafeString:
        return _pretty_json(event.data)

    @admin.display(description=_("runs"))
    def run_list(self, event: Event) -> SafeString:
        runs = Run.objects.filter(event=event).order_by("created_at", "function")
        return _include(
            "runs",
            {
                "runs": [(run, _badge(run.status), _run_note(run)) for run in runs],
                "event_name": event.name,
                "filtered": bool(event.skipped_by),
            },
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Event], search_term: str
    ) -> tuple[QuerySet[Event], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if "=" in term:
            key, _sep, text = term.partition("=")
            key, values = key.strip(), search_values(text.strip())
            if not values or has_unstorable(key):
                return queryset.none(), False  # no stored data can hold that key or value
            return queryset.filter(HasMember("data", key, values)), False
        condition = Q(name=term) | Q(idempotency_key=term)
        as_uuid = _as_uuid(term)
        if as_uuid is not None:
            condition |= Q(pk=as_uuid)
        return queryset.filter(condition), False

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_events.replay_event")

    @admin.action(description=_("Replay selected events"), permissions=["replay"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[Event]) -> None:
        created = sum(len(control.replay_event(event)) for event in queryset)
        self.message_user(
            request,
            CREATED % {"n": created},
            messages.SUCCESS if created else messages.WARNING,
        )

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/replay/", wrap(self.replay_view), name="django_events_event_replay"),
            *super().get_urls(),
        ]

    def replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: run every function subscribed to the event's name again, as new runs."""
        if not self.has_replay_permission(request):
            raise PermissionDenied
        not_post = self._post_only(request)
        if not_post:
            return not_post
        event = get_object_or_404(Event, pk=_as_uuid(object_id) or _not_found())
        runs = control.replay_event(event)
        if runs:
            self.message_user(
                request,
                CREATED % {"n": len(runs)},
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request,
                _("No function subscribes to %(name)s now: nothing to replay.") % {"name": event.name},
                messages.WARNING,
            )
        return HttpResponseRedirect(reverse("admin:django_events_event_change", args=[event.pk]))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra_context = {**(extra_context or {}), "can_replay": self.has_replay_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context)


# -- the database broker's messages ----------------------------------------------------------------


def _decode_body(queued: QueuedMessage) -> dramatiq.Message[Any] | None:
    """The Dramatiq message a row holds, or ``None`` if its body does not decode (never raises)."""
    try:
        return dramatiq.Message.decode(bytes(queued.body))
    except (DecodeError, TypeError, ValueError):  # decode() wraps its own failures in DecodeError
        return None


def _malformed(queued: QueuedMessage) -> str:
    """Why a worker could not process the message a row holds (``broker.read_message``), or ``""``."""
    try:
        read_message(bytes(queued.body))
    except DecodeError as error:
        return _printable(str(error))
    return ""


def _run_id(message: dramatiq.Message[Any]) -> uuid.UUID | None:
    """The run id a message of django-events' actor carries (its one argument), if it is one."""
    if message.actor_name != ACTOR_NAME or len(message.args) != 1 or message.kwargs:
        return None
    arg = message.args[0]
    return _as_uuid(arg) if isinstance(arg, str) else None


@admin.register(QueuedMessage)
class QueuedMessageAdmin(_ReadOnlyAdmin):
    """The database broker's messages: read-only, with requeue and delete for dead ones.

    Requeue needs Django's ``change_queuedmessage`` permission and delete its
    ``delete_queuedmessage``; the pages stay read-only either way (no form, no
    delete page).
    """

    list_display = [
        "id",
        "queue_name",
        "actor_name",
        "state_badge",
        "available_at",
        "delivery_count",
        "taken_by",
        "created_at",
        "run_link",
    ]
    list_filter = ["state", QueueNameFilter]
    search_fields = ["message_id"]  # shows the search box; get_search_results does the work
    search_help_text = _("The Dramatiq id of a dead message (exact).")
    ordering = ["-id"]
    actions = ["requeue_selected", "delete_selected_dead"]
    fields = readonly_fields = (
        "id",
        "message_id",
        "queue_name",
        "actor_name",
        "state_badge",
        "available_at",
        "delivery_count",
        "taken_by",
        "created_at",
        "run_link",
        "message_json",
    )

    # -- columns and fields ----------------------------------------------------------------

    @admin.display(description=_("state"), ordering="state")
    def state_badge(self, queued: QueuedMessage) -> SafeString:
        return _badge(queued.state, QueuedMessageState)

    @admin.display(description=_("run"))
    def run_link(self, queued: QueuedMessage) -> StrOrPromise:
        if queued.actor_name != ACTOR_NAME:
            return "-"
        message = _decode_body(queued)
        if message is None:
            return _("undecodable")
        run_id = _run_id(message)
        if run_id is None:
            return "-"
        url = reverse("admin:django_events_run_change", args=[run_id])
        return format_html('<a href="{}">{}</a>', url, run_id)

    @admin.display(description=_("message"))
    def message_json(self, queued: QueuedMessage) -> SafeString:
        message = _decode_body(queued)
        if message is None:
            return _include("message", {"undecodable": True, "text": repr(bytes(queued.body or b"")[:2000])})
        problem = _malformed(queued)
        fields = {
            "actor_name": message.actor_name,
            "args": list(message.args),
            "kwargs": message.kwargs,
            "options": message.options,
        }
        try:
            text = _json_text(fields)
        except (TypeError, ValueError):  # a custom Dramatiq encoder may give what JSON cannot hold
            text = _printable(repr(fields))
        return _include("message", {"undecodable": False, "problem": problem, "text": text})

    # -- queries ---------------------------------------------------------------------------

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[QueuedMessage], search_term: str
    ) -> tuple[QuerySet[QueuedMessage], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        # Dead messages only: the ones worth finding by id, and the ones the partial index holds.
        return queryset.filter(state=QueuedMessageState.DEAD, message_id=term), False

    # -- actions ---------------------------------------------------------------------------

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename('change', self.opts)}")

    def has_delete_dead_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename('delete', self.opts)}")

    @admin.action(description=_("Requeue selected dead messages"), permissions=["requeue"])
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet[QueuedMessage]) -> None:
        self._act(request, queryset, "requeue")

    @admin.action(description=_("Delete selected dead messages"), permissions=["delete_dead"])
    def delete_selected_dead(self, request: HttpRequest, queryset: QuerySet[QueuedMessage]) -> None:
        self._act(request, queryset, "delete")

    def _act(self, request: HttpRequest, queryset: QuerySet[QueuedMessage], name: str) -> None:
        action, report = MESSAGE_ACTIONS[name]
        self._report(request, action(queryset.values_list("pk", flat=True), queryset.db), report)
