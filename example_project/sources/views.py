"""The sources API: sign up, connect a source (each sends an event), and see what an event caused.

``POST /api/sources/`` does only the critical path, storing the source, and
hands the rest (backfill, welcome e-mail, CRM sync) to the functions
subscribed to ``api/source.connected``, which run in the workers.
``POST /api/users/`` stores a user and sends ``api/user.signed_up``, which
starts the user's onboarding flow (``events.onboard_user``).
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import django_events
from django_events.models import Run

from .forms import SignUpForm, SourceForm
from .models import Source

#: The event sent when a source is connected; the functions in ``events.py`` subscribe to it.
SOURCE_CONNECTED = "api/source.connected"
#: The event sent when a user signs up; the onboarding flow in ``events.py`` runs on it.
USER_SIGNED_UP = "api/user.signed_up"


@csrf_exempt  # a JSON API for scripts; the browser-facing admin keeps its CSRF protection
@require_POST
def connect_source(request: HttpRequest) -> JsonResponse:
    """Create a source from ``{"name": ..., "email": ...}`` and send ``api/source.connected``.

    Returns 201 with ``{"source_id": ..., "event_id": ...}``, or 400 with
    ``{"error": ..., "fields": {...}}`` if the input is invalid. The source and
    the event are committed together, or not at all.
    """
    payload = _json_object(request, '{"name": "My shop", "email": "me@example.com"}')
    if isinstance(payload, JsonResponse):
        return payload
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


@csrf_exempt
@require_POST
def sign_up(request: HttpRequest) -> JsonResponse:
    """Create a user from ``{"email": ...}`` (the e-mail is the username) and send ``api/user.signed_up``.

    Returns 201 with ``{"user_id": ..., "event_id": ...}``, or 400 with
    ``{"error": ..., "fields": {...}}`` if the input is invalid or the e-mail
    taken. The user (with no usable password) and the event are committed
    together, or not at all.
    """
    payload = _json_object(request, '{"email": "me@example.com"}')
    if isinstance(payload, JsonResponse):
        return payload
    if not isinstance(payload.get("email", ""), str):
        return _error(
            "Invalid sign-up.", fields={"email": [{"message": "Must be a string.", "code": "invalid"}]}
        )
    form = SignUpForm(data={"email": payload.get("email")})
    if not form.is_valid():
        return _error("Invalid sign-up.", fields=form.errors.get_json_data())
    email = form.cleaned_data["email"]
    try:
        with transaction.atomic():
            user = get_user_model()._default_manager.create_user(username=email, email=email)
            event = django_events.send(USER_SIGNED_UP, {"user_id": user.pk, "email": email})
    except IntegrityError:  # signed up at the same moment by another request
        taken = {"email": [{"message": "A user with this e-mail address exists already.", "code": "unique"}]}
        return _error("Invalid sign-up.", fields=taken)
    return JsonResponse({"user_id": user.pk, "event_id": str(event.pk)}, status=201)


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


def _json_object(request: HttpRequest, example: str) -> dict[str, Any] | JsonResponse:
    """The request's JSON body if it is an object, else a 400 answer saying so (with ``example``)."""
    try:
        payload = json.loads(request.body or b"null")
    except (UnicodeDecodeError, ValueError):
        return _error("The body must be a JSON object.")
    if not isinstance(payload, dict):
        return _error(f"The body must be a JSON object such as {example}.")
    return payload


def _error(message: str, *, status: int = 400, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)
