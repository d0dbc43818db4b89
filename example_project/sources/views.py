"""The sources API: connect a source (which sends an event), and see what its event caused.

``POST /api/sources/`` does only the critical path, storing the source, and
hands the rest (backfill, welcome e-mail, CRM sync) to the functions
subscribed to ``api/source.connected``, which run in the workers.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import django_events
from django_events.models import Run

from .forms import SourceForm
from .models import Source

#: The event sent when a source is connected; the functions in ``events.py`` subscribe to it.
SOURCE_CONNECTED = "api/source.connected"


@csrf_exempt  # a JSON API for scripts; the browser-facing admin keeps its CSRF protection
@require_POST
def connect_source(request: HttpRequest) -> JsonResponse:
    """Create a source from ``{"name": ..., "email": ...}`` and send ``api/source.connected``.

    Returns 201 with ``{"source_id": ..., "event_id": ...}``, or 400 with
    ``{"error": ..., "fields": {...}}`` if the input is invalid. The source and
    the event are committed together, or not at all.
    """
    try:
        payload = json.loads(request.body or b"null")
    except (UnicodeDecodeError, ValueError):
        return _error("The body must be a JSON object.")
    if not isinstance(payload, dict):
        return _error(
            'The body must be a JSON object such as {"name": "My shop", "email": "me@example.com"}.'
        )
    not_text = sorted(key for key in SourceForm.Meta.fields if not isinstance(payload.get(key, ""), str))
    if not_text:
        return _error(
            "Invalid source.",
            fields={key: [{"message": "Must be a string.", "code": "invalid"}] for key in not_text},
        )
    form = SourceForm(data={key: payload.get(key) for key in SourceForm.Meta.fields})
    if not form.is_valid():
        return _error("Invalid source.", fields=form.errors.get_json_data())
    with transaction.atomic():
        source = form.save()
        event = django_events.send(SOURCE_CONNECTED, {"source_id": source.pk, "email": source.email})
    return JsonResponse({"source_id": source.pk, "event_id": str(event.pk)}, status=201)


@require_GET
def source_runs(request: HttpRequest, source_id: int) -> JsonResponse:
    """List the runs caused by the events about source ``source_id``: function, status, attempts."""
    if not Source.objects.filter(pk=source_id).exists():
        return JsonResponse({"error": f"No source with id {source_id}."}, status=404)
    runs = (
        Run.objects.filter(event__name=SOURCE_CONNECTED, event__data__source_id=source_id)
        .select_related("event")
        .order_by("event__created_at", "function")
    )
    return JsonResponse(
        {
            "source_id": source_id,
            "runs": [
                {
                    "id": str(run.pk),
                    "event_id": str(run.event_id),
                    "function": run.function,
                    "status": run.status,
                    "attempts": run.attempts,
                    "max_attempts": run.max_attempts,
                    "result": run.result,
                    "last_error": run.last_error,
                }
                for run in runs
            ],
        }
    )


def _error(message: str, *, status: int = 400, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)
