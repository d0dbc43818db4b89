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
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import dramatiq
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import Count, F, Q, QuerySet
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

from . import control
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
from .models import (
    FINAL_STATUSES,
    Attempt,
    AttemptOutcome,
    Event,
    QueuedMessage,
    QueuedMessageState,
    Run,
    RunStatus,
    sources_of,
)
from .text import has_unstorable

__all__ = ["CappedCountPaginator", "EventAdmin", "QueuedMessageAdmin", "RunAdmin"]

StrOrPromise = str | Promise

#: Statuses a run can be retried from, and cancelled from (derived from the state machine).
RETRYABLE = frozenset(sources_of(RunStatus.PENDING))
CANCELLABLE = frozenset(sources_of(RunStatus.CANCELLED))

#: The colour a broker message's state borrows from a run status (``admin.css`` styles run
#: statuses and attempt outcomes by their own names).
MESSAGE_BADGES: dict[str, str] = {
    QueuedMessageState.READY: RunStatus.PENDING,
    QueuedMessageState.TAKEN: RunStatus.RUNNING,
    QueuedMessageState.DEAD: RunStatus.DEAD,
}
#: The label of each value a badge shows, by its choices.
_LABELS: dict[type[models.TextChoices], dict[str, StrOrPromise]] = {
    choices: dict(choices.choices) for choices in (RunStatus, AttemptOutcome, QueuedMessageState)
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
            _("not dead, cancelled or succeeded"),
        ),
    ),
    "cancel": (
        control.cancel_runs,
        Report(
            ngettext_lazy("%(n)d run cancelled", "%(n)d runs cancelled", "n"), _("not pending or retrying")
        ),
    ),
}
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


@admin.register(Run)
class RunAdmin(_ReadOnlyAdmin):
    list_display = [
        "function",
        "event_link",
        "status_badge",
        "attempts_used",
        "duration",
        "next_retry",
        "created_at",
    ]
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
        "attempts_used",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "next_retry",
        "lease_expires_at",
        "last_error",
        "event_data",
        "result_json",
        "attempt_history",
    )

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

    @admin.display(description=_("next retry"), ordering="due_at")
    def next_retry(self, run: Run) -> str:
        if run.status == RunStatus.RETRYING and run.due_at:
            return timezone.localtime(run.due_at).strftime("%Y-%m-%d %H:%M:%S")
        return "-"

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
        self._act(request, queryset.values_list("pk", flat=True), "retry")

    @admin.action(description=_("Cancel selected runs"), permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._act(request, queryset.values_list("pk", flat=True), "cancel")

    def _act(self, request: HttpRequest, run_ids: Iterable[Any], name: str) -> None:
        action, report = RUN_ACTIONS[name]
        self._report(request, action(run_ids), report)

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
        """POST: cancel one pending or retrying run."""
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        return self._one_run_action(request, object_id, "cancel")

    def _one_run_action(self, request: HttpRequest, object_id: str, name: str) -> HttpResponse:
        not_post = self._post_only(request)
        if not_post:
            return not_post
        run = get_object_or_404(Run, pk=_as_uuid(object_id) or _not_found())
        self._act(request, [run.pk], name)
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
        """Runs by status and function over the last hour and day, and the dead runs to look at."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        now = timezone.now()
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
            "windows": windows,
            "dead_runs": dead,
            "dead_count": Run.objects.dead()[: CappedCountPaginator.cap + 1].count(),
            "cap": CappedCountPaginator.cap,
            "attention": [RunStatus.DEAD],
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
    fields = readonly_fields = ("id", "name", "idempotency_key", "created_at", "data_json", "run_list")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return EventChangeList

    @admin.display(description=_("runs"))
    def runs_summary(self, event: Event) -> SafeString:
        counts: Counter[str] = getattr(event, "run_counts", None) or Counter()
        return _include(
            "run_counts",
            {"counts": [(counts[status], _badge(status)) for status in RunStatus.values if counts[status]]},
        )

    @admin.display(description=_("data"))
    def data_json(self, event: Event) -> SafeString:
        return _pretty_json(event.data)

    @admin.display(description=_("runs"))
    def run_list(self, event: Event) -> SafeString:
        runs = Run.objects.filter(event=event).order_by("created_at", "function")
        return _include(
            "runs",
            {
                "runs": [
                    (
                        run,
                        _badge(run.status),
                        run.last_error
                        if run.status not in FINAL_STATUSES or run.status == RunStatus.DEAD
                        else "",
                    )
                    for run in runs
                ]
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
