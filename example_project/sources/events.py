"""The functions that run, in the workers, when a source is connected or a user signs up.

django-events imports this module in every process (it looks for ``events.py``
in each installed app). Each function gets its own run per event, with its own
retries: a flaky CRM does not delay the welcome e-mail, nor make the backfill
run twice. Runs are executed at least once, so each function is idempotent, or
harmless when repeated.

``onboard_user`` is a flow of durable steps: a welcome e-mail, a wait of up to a
day for the user's first source, and a reminder if none came.
"""

from __future__ import annotations

import datetime as dt
import zlib
from typing import Any

from django.conf import settings
from django.core.mail import send_mail

import django_events
from django_events import Context, NonRetriableError

from .models import Source
from .views import SOURCE_CONNECTED, USER_SIGNED_UP

#: How many attempts of ``sync_to_crm`` fail before the (pretend) CRM answers.
CRM_FAILURES_BEFORE_SUCCESS = 2
#: How long a new user has to connect a first source before the reminder, unless the setting
#: ``ONBOARDING_REMINDER_AFTER`` (seconds or a ``timedelta``) says otherwise.
DEFAULT_REMINDER_AFTER = dt.timedelta(days=1)


def _source(ctx: Context) -> Source:
    """The source the event is about; a source deleted since is not worth retrying."""
    source_id = ctx.event.data["source_id"]
    try:
        return Source.objects.get(pk=source_id)
    except Source.DoesNotExist:
        raise NonRetriableError(f"Source {source_id} no longer exists.") from None


@django_events.function("api/source.connected", id="sources.backfill")
def backfill_source(ctx: Context) -> dict[str, Any]:
    """Import the source's history, and store how many rows it had.

    The "import" is pretend: the row count is derived from the name, so it is
    the same on every attempt, and storing it again is harmless.
    """
    source = _source(ctx)
    rows = 100 + zlib.crc32(source.name.encode()) % 900
    Source.objects.filter(pk=source.pk).update(backfilled_rows=rows)
    ctx.logger.info("Backfilled %d rows for source %s.", rows, source.pk)
    return {"rows": rows}


@django_events.function("api/source.connected", id="sources.welcome_email")
def send_welcome_email(ctx: Context) -> dict[str, Any]:
    """Send the user who connected the source a welcome e-mail."""
    source = _source(ctx)
    email = ctx.event.data["email"]
    send_mail(
        subject=f"{source.name} is connected",
        message=(f"Hello,\n\nYour source {source.name!r} is connected. We are importing its history now.\n"),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=[email],
    )
    return {"sent_to": email}


@django_events.function("api/source.connected", id="sources.sync_to_crm", retries=3)
def sync_to_crm(ctx: Context) -> dict[str, Any]:
    """Tell the CRM about the new source: the flaky one, to show retries and the dead state.

    The pretend CRM refuses the first two attempts and accepts the third, so
    the run succeeds after two retries. For a source whose name contains
    "broken" it never answers: all four attempts fail and the run ends ``dead``,
    where the admin can retry it.
    """
    source = _source(ctx)
    if "broken" in source.name.lower():
        raise ConnectionError(
            f"CRM unavailable: the CRM refused source {source.name!r} (attempt {ctx.attempt})."
        )
    if ctx.attempt <= CRM_FAILURES_BEFORE_SUCCESS:
        raise ConnectionError(f"CRM unavailable: timed out (attempt {ctx.attempt}, will be retried).")
    ctx.logger.info("Synced source %s to the CRM.", source.pk)
    return {"crm_id": f"crm-{source.pk}", "attempt": ctx.attempt}


def reminder_after() -> dt.timedelta:
    """How long ``onboard_user`` waits for a first source: ``ONBOARDING_REMINDER_AFTER``, or a day."""
    value = getattr(settings, "ONBOARDING_REMINDER_AFTER", None)
    if value is None:
        return DEFAULT_REMINDER_AFTER
    return value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=float(value))


def _mail(email: str, subject: str, message: str) -> dict[str, str]:
    send_mail(
        subject=subject, message=message, from_email=settings.DEFAULT_FROM_EMAIL, recipient_list=[email]
    )
    return {"sent_to": email, "subject": subject}


@django_events.function(USER_SIGNED_UP, id="sources.onboarding")
def onboard_user(ctx: Context) -> dict[str, Any]:
    """Onboard a new user: a welcome e-mail, then a wait for their first source, else a reminder.

    Three durable steps. The run waits (status ``waiting``, out of the worker: no
    thread is held) for an ``api/source.connected`` event with the user's e-mail,
    for up to :func:`reminder_after` (a day by default). A source connected before
    the wait began counts too, if it came after the sign-up. When the run comes back
    from its wait, the function runs again from the top, and the welcome step returns
    its kept result instead of sending the e-mail a second time.
    """
    email = ctx.event.data["email"]
    ctx.step.run(
        "welcome",
        _mail,
        email,
        "Welcome to Example Sources",
        "Hello,\n\nWelcome! Connect your first data source to start importing its history.\n",
    )
    first = ctx.step.wait_for_event(
        "first-source", event=SOURCE_CONNECTED, match="data.email", timeout=reminder_after()
    )
    if first is not None:
        ctx.logger.info("%s connected a first source (%s): no reminder.", email, first.data.get("source_id"))
        return {"email": email, "first_source_id": first.data.get("source_id"), "reminded": False}
    ctx.step.run(
        "reminder",
        _mail,
        email,
        "Connect your first source",
        "Hello,\n\nYou have not connected a data source yet. It takes a minute: "
        "POST /api/sources/ with its name and your e-mail.\n",
    )
    return {"email": email, "first_source_id": None, "reminded": True}
