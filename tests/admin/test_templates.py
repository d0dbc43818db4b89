"""The admin's HTML comes from templates a project can override, rendered with auto-escaping."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.contrib import messages
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

import django_events
from django_events.models import Attempt, AttemptOutcome, Run
from django_events.testing import run_all

INCLUDES = Path("admin") / "django_events" / "includes"


@pytest.fixture
def dead(db: None) -> Run:
    """A run that died after three attempts, each with a traceback."""
    django_events.send("test/always-fails", {"user_id": 42})
    run_all()
    return Run.objects.get(function="tests.always_fails")


def _run_page(client, run: Run) -> str:
    return client.get(reverse("admin:django_events_run_change", args=[run.pk])).content.decode()


def test_run_page_shows_when_each_attempt_started_to_the_millisecond(admin_client, dead):
    # Given a run with attempts
    started = [
        timezone.localtime(attempt.started_at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        for attempt in Attempt.objects.filter(run=dead).order_by("number")
    ]

    # When its page is opened
    page = _run_page(admin_client, dead)

    # Then each attempt's row shows its start
    for text in started:
        assert f"<td>{text}</td>" in page


def test_a_project_overrides_an_include_template(admin_client, dead, tmp_path):
    # Given a project template for the attempt history, found before the app's own
    override = tmp_path / INCLUDES / "attempts.html"
    override.parent.mkdir(parents=True)
    override.write_text(
        '<ol class="my-attempts">{% for attempt, badge, started, duration in attempts %}'
        "<li>{{ attempt.number }} {{ badge }} {{ attempt.message }}</li>{% endfor %}</ol>"
    )
    templates = [{**settings.TEMPLATES[0], "DIRS": [tmp_path]}]

    # When the run's page is opened
    with override_settings(TEMPLATES=templates):
        page = _run_page(admin_client, dead)

    # Then the project's template renders the attempts, with the badge and the escaped message
    assert '<ol class="my-attempts">' in page
    assert '<li>1 <span class="de-badge de-badge-failed">failed</span> &lt;b&gt;broken' in page
    assert 'class="de-attempts"' not in page


def test_an_event_with_no_run_says_so_on_the_list_and_on_its_page(admin_client, db):
    # Given an event no function subscribes to
    event = django_events.send("nobody/listens")

    # When the list and its page are opened
    listed = admin_client.get(reverse("admin:django_events_event_changelist")).content.decode()
    page = admin_client.get(reverse("admin:django_events_event_change", args=[event.pk])).content.decode()

    # Then both say so
    assert '<td class="field-runs_summary">no function subscribed</td>' in listed
    assert "No function was subscribed to nobody/listens when it was sent." in page


def test_a_run_not_yet_attempted_says_so(admin_client, db):
    # Given a pending run
    django_events.send("test/ok")
    run = Run.objects.get()

    # When its page is opened
    page = _run_page(admin_client, run)

    # Then the attempts say there is none yet, and no table is drawn
    assert "No attempt yet." in page
    assert 'class="de-attempts"' not in page


def test_every_attempt_outcome_has_a_labelled_badge(admin_client, dead):
    # Given a run whose history holds an attempt of every outcome
    started = timezone.now()
    for number, outcome in enumerate(AttemptOutcome.values, start=4):
        Attempt.objects.create(
            run=dead, number=number, started_at=started, finished_at=started, outcome=outcome
        )

    # When its page is opened
    page = _run_page(admin_client, dead)

    # Then each outcome shows with its label, coloured by its own class
    for outcome in AttemptOutcome:
        assert f'<span class="de-badge de-badge-{outcome.value}">{outcome.label}</span>' in page
    assert '<span class="de-badge de-badge-timed_out">timed out</span>' in page


@pytest.mark.parametrize(
    ("selected", "text", "level"),
    [
        ("dead", "1 run retried.", messages.SUCCESS),
        (
            "pending",
            "0 runs retried; 1 skipped (not dead, cancelled, skipped or succeeded).",
            messages.WARNING,
        ),
    ],
)
def test_an_action_reports_done_and_skipped_as_success_or_warning(admin_client, dead, selected, text, level):
    # Given a dead run and a pending one
    django_events.send("test/ok")
    runs = {"dead": dead, "pending": Run.objects.get(function="tests.ok")}

    # When the operator retries one of them
    response = admin_client.post(
        reverse("admin:django_events_run_changelist"),
        {"action": "retry_selected", "_selected_action": [str(runs[selected].pk)]},
        follow=True,
    )

    # Then the report counts it as done or skipped, as a success or a warning
    assert [(str(message), message.level) for message in response.context["messages"]] == [(text, level)]
