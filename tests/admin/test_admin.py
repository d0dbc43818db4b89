"""The admin: pages, filters, search, actions and permissions, through Django's test client."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

import django_events
from django_events.changelists import CappedCountPaginator
from django_events.execution import RUN_DEAD_EVENT, Execution, execute_run
from django_events.models import Attempt, Event, Run, RunStatus
from django_events.testing import run_all

RUNS = reverse("admin:django_events_run_changelist")
EVENTS = reverse("admin:django_events_event_changelist")
OVERVIEW = reverse("admin:django_events_run_overview")


def _run_url(run: Run) -> str:
    return reverse("admin:django_events_run_change", args=[run.pk])


def _staff(django_user_model: type[User], username: str, *perms: str) -> User:
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    codenames = ["view_run", "view_event", *perms]
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="django_events", codename__in=codenames)
    )
    return user


@pytest.fixture
def viewer(client, django_user_model):
    """A staff client that may look, but not retry, cancel or replay."""
    client.force_login(_staff(django_user_model, "viewer"))
    return client


@pytest.fixture
def history(db):
    """One succeeded, one dead (HTML in its error), one retrying and one pending run."""
    django_events.send("test/ok", {"user_id": 42, "note": "<script>alert(1)</script>"}, id="order-7")
    django_events.send("test/always-fails", {"user_id": "42"})
    run_all()
    django_events.send("test/flaky", {"succeed_on": 3})
    flaky = Run.objects.get(function="tests.flaky")
    execute_run(flaky.pk, enqueue=False)
    django_events.send("test/fanout")
    return {
        "ok": Run.objects.get(function="tests.ok"),
        "dead": Run.objects.get(function="tests.always_fails"),
        "retrying": Run.objects.get(function="tests.flaky"),
        "pending": Run.objects.filter(function="tests.fanout_a").get(),
    }


# -- the run list ------------------------------------------------------------------------------


def test_run_list_shows_newest_first_with_its_columns(admin_client, history):
    response = admin_client.get(RUNS)
    assert response.status_code == 200
    page = response.content.decode()
    # newest first: the fan-out runs were created last, the ok run first
    assert page.index("tests.fanout_a") < page.index("tests.ok")
    assert 'class="de-badge de-badge-dead"' in page
    assert "3 / 3" in page  # attempts used / allowed of the dead run
    assert reverse("admin:django_events_event_change", args=[history["ok"].event_id]) in page
    assert _run_url(history["ok"]) in page
    due = timezone.localtime(history["retrying"].due_at).strftime("%Y-%m-%d %H:%M:%S")
    assert due in page  # next retry time of the retrying run


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status__exact": "dead"}, {"tests.always_fails"}),
        ({"status__exact": "retrying"}, {"tests.flaky"}),
        ({"function": "tests.ok"}, {"tests.ok"}),
        ({"event_name": "test/fanout"}, {"tests.fanout_a", "tests.fanout_b", "tests.fanout_c"}),
    ],
)
def test_run_list_filters(admin_client, history, query, expected):
    response = admin_client.get(RUNS, query)
    assert response.status_code == 200
    assert {run.function for run in response.context["cl"].result_list} == expected


def test_run_list_date_hierarchy(admin_client, history):
    Run.objects.filter(pk=history["ok"].pk).update(created_at=timezone.now() - dt.timedelta(days=400))
    year = timezone.localtime().year
    response = admin_client.get(RUNS, {"created_at__year": year})
    assert response.status_code == 200
    functions = {run.function for run in response.context["cl"].result_list}
    assert "tests.ok" not in functions
    assert "tests.always_fails" in functions


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("tests.flaky", {"tests.flaky"}),
        ("test/always-fails", {"tests.always_fails"}),
        ("order-7", {"tests.ok"}),
        ("broken</b> on attempt 3", {"tests.always_fails"}),
        ("flaky failure", {"tests.flaky"}),
        ("nothing matches this", set()),
    ],
)
def test_run_search(admin_client, history, term, expected):
    response = admin_client.get(RUNS, {"q": term})
    assert response.status_code == 200
    assert {run.function for run in response.context["cl"].result_list} == expected


def test_run_search_by_run_id_and_event_id(admin_client, history):
    dead = history["dead"]
    for term in (str(dead.pk), str(dead.event_id)):
        response = admin_client.get(RUNS, {"q": term})
        assert [run.pk for run in response.context["cl"].result_list] == [dead.pk]


def test_run_list_counts_are_capped_not_full_table_counts(admin_client, history, monkeypatch):
    monkeypatch.setattr(CappedCountPaginator, "cap", 3)
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(RUNS)
    page = response.content.decode()
    assert "More than 3 runs" in page
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts, "the list counts something"
    assert all("LIMIT" in sql.upper() for sql in counts), counts


# -- the run page ------------------------------------------------------------------------------


def test_run_page_shows_data_result_and_every_attempt(admin_client, history):
    ok = admin_client.get(_run_url(history["ok"])).content.decode()
    assert "&quot;user_id&quot;: 42" in ok  # pretty JSON, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in ok
    assert "<script>alert(1)</script>" not in ok
    assert "&quot;echo&quot;" in ok  # the result

    dead = admin_client.get(_run_url(history["dead"])).content.decode()
    assert dead.count('<tr class="de-traceback">') == 3
    assert "Traceback (most recent call last)" in dead
    assert "&lt;b&gt;broken&lt;/b&gt; on attempt 1" in dead
    assert "<b>broken</b>" not in dead
    assert "(pid " in dead  # which worker ran it


def test_run_page_is_read_only(admin_client, history):
    response = admin_client.get(_run_url(history["dead"]))
    assert response.context["has_change_permission"] is False
    assert b'name="_save"' not in response.content
    assert admin_client.post(_run_url(history["dead"]), {"status": "succeeded"}).status_code == 403
    history["dead"].refresh_from_db()
    assert history["dead"].status == RunStatus.DEAD


# -- retry -------------------------------------------------------------------------------------


def test_retry_button_sends_dead_run_back_to_pending_keeping_history(admin_client, history):
    dead = history["dead"]
    page = admin_client.get(_run_url(dead)).content.decode()
    assert 'id="de-retry"' in page
    assert "csrfmiddlewaretoken" in page

    response = admin_client.post(reverse("admin:django_events_run_retry", args=[dead.pk]), follow=True)

    assert response.status_code == 200
    dead.refresh_from_db()
    assert dead.status == RunStatus.PENDING
    assert dead.attempts == 3
    assert dead.max_attempts == 6  # a fresh allowance of 3 after the 3 used
    assert dead.finished_at is None
    assert Attempt.objects.filter(run=dead).count() == 3
    assert "1 run retried." in response.content.decode()
    # and it runs again, continuing the attempt numbers
    run_all()
    assert list(Attempt.objects.filter(run=dead).values_list("number", flat=True)) == [1, 2, 3, 4, 5, 6]


def test_retry_enqueues_after_commit(admin_client, history, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        admin_client.post(reverse("admin:django_events_run_retry", args=[history["dead"].pk]))
    assert len(callbacks) == 1


def test_retry_button_only_on_retryable_runs(admin_client, history):
    assert 'id="de-retry"' in admin_client.get(_run_url(history["ok"])).content.decode()
    assert 'id="de-retry"' not in admin_client.get(_run_url(history["pending"])).content.decode()
    assert 'id="de-retry"' not in admin_client.get(_run_url(history["retrying"])).content.decode()


def test_retry_of_a_pending_run_is_skipped(admin_client, history):
    response = admin_client.post(
        reverse("admin:django_events_run_retry", args=[history["pending"].pk]), follow=True
    )
    assert "0 runs retried; 1 skipped" in response.content.decode()
    history["pending"].refresh_from_db()
    assert history["pending"].status == RunStatus.PENDING


def test_retry_url_needs_post(admin_client, history):
    response = admin_client.get(reverse("admin:django_events_run_retry", args=[history["dead"].pk]))
    assert response.status_code == 405


def test_retry_of_unknown_run_is_404(admin_client, db):
    for run_id in ("00000000-0000-7000-8000-000000000000", "not-a-uuid"):
        assert admin_client.post(reverse("admin:django_events_run_retry", args=[run_id])).status_code == 404


def test_bulk_retry_reports_retried_and_skipped(admin_client, history):
    selected = [history["dead"].pk, history["ok"].pk, history["pending"].pk, history["retrying"].pk]
    response = admin_client.post(
        RUNS, {"action": "retry_selected", "_selected_action": [str(pk) for pk in selected]}, follow=True
    )
    assert (
        "2 runs retried; 2 skipped (not dead, cancelled, skipped or succeeded)." in response.content.decode()
    )
    statuses = dict(Run.objects.filter(pk__in=selected).values_list("function", "status"))
    assert statuses == {
        "tests.always_fails": "pending",
        "tests.ok": "pending",
        "tests.fanout_a": "pending",
        "tests.flaky": "retrying",
    }


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_button_cancels_a_retrying_run_which_then_never_runs(admin_client, history):
    retrying = history["retrying"]
    assert 'id="de-cancel"' in admin_client.get(_run_url(retrying)).content.decode()
    response = admin_client.post(reverse("admin:django_events_run_cancel", args=[retrying.pk]), follow=True)
    assert "1 run cancelled." in response.content.decode()
    retrying.refresh_from_db()
    assert retrying.status == RunStatus.CANCELLED
    # a message still in the broker finds nothing to do
    assert execute_run(retrying.pk, ignore_due=True) is Execution.SKIPPED
    assert Attempt.objects.filter(run=retrying).count() == 1


def test_bulk_cancel_skips_final_runs(admin_client, history):
    selected = [history["pending"].pk, history["retrying"].pk, history["dead"].pk]
    response = admin_client.post(
        RUNS, {"action": "cancel_selected", "_selected_action": [str(pk) for pk in selected]}, follow=True
    )
    assert "2 runs cancelled; 1 skipped (running or ended)." in response.content.decode()


# -- permissions -------------------------------------------------------------------------------


def test_read_only_staff_browse_but_see_no_buttons_or_actions(viewer, history):
    assert viewer.get(RUNS).status_code == 200
    assert viewer.get(EVENTS).status_code == 200
    assert viewer.get(OVERVIEW).status_code == 200
    page = viewer.get(_run_url(history["dead"])).content.decode()
    assert "Traceback" in page
    assert 'id="de-retry"' not in page
    assert (
        'id="de-replay"'
        not in viewer.get(
            reverse("admin:django_events_event_change", args=[history["dead"].event_id])
        ).content.decode()
    )
    assert viewer.get(RUNS).context["action_form"] is None  # no action is offered at all


def test_read_only_staff_get_403_on_action_urls(viewer, history):
    urls = [
        reverse("admin:django_events_run_retry", args=[history["dead"].pk]),
        reverse("admin:django_events_run_cancel", args=[history["pending"].pk]),
        reverse("admin:django_events_event_replay", args=[history["dead"].event_id]),
    ]
    for url in urls:
        assert viewer.post(url).status_code == 403
    history["dead"].refresh_from_db()
    assert history["dead"].status == RunStatus.DEAD


def test_bulk_action_without_permission_does_nothing(viewer, history):
    response = viewer.post(RUNS, {"action": "retry_selected", "_selected_action": [str(history["dead"].pk)]})
    assert response.status_code in (200, 302)
    history["dead"].refresh_from_db()
    assert history["dead"].status == RunStatus.DEAD


def test_retry_permission_alone_allows_retry_not_cancel(client, django_user_model, history):
    client.force_login(_staff(django_user_model, "retrier", "retry_run"))
    assert 'id="de-retry"' in client.get(_run_url(history["dead"])).content.decode()
    assert client.post(reverse("admin:django_events_run_retry", args=[history["dead"].pk])).status_code == 302
    assert (
        client.post(reverse("admin:django_events_run_cancel", args=[history["pending"].pk])).status_code
        == 403
    )


def test_anonymous_users_are_sent_to_login(client, history):
    response = client.post(reverse("admin:django_events_run_retry", args=[history["dead"].pk]))
    assert response.status_code == 302
    assert "/login/" in response["Location"]


# -- events ------------------------------------------------------------------------------------


def test_event_list_summarises_runs_by_status(admin_client, history):
    django_events.send("nobody/listens")
    page = admin_client.get(EVENTS).content.decode()
    assert "no function subscribed" in page
    assert "3 <span" in page  # three pending fan-out runs
    assert "order-7" in page


def test_event_page_shows_data_and_runs(admin_client, history):
    page = admin_client.get(
        reverse("admin:django_events_event_change", args=[history["ok"].event_id])
    ).content
    page = page.decode()
    assert "&lt;script&gt;" in page
    assert _run_url(history["ok"]) in page


def test_event_page_says_when_nothing_subscribed(admin_client, db):
    event = django_events.send("nobody/listens")
    page = admin_client.get(reverse("admin:django_events_event_change", args=[event.pk])).content.decode()
    assert "No function was subscribed to nobody/listens when it was sent." in page


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("user_id=42", {"test/ok", "test/always-fails"}),  # the number 42 and the text "42"
        ('user_id="42"', {"test/always-fails"}),
        ("user_id=43", set()),
        ("succeed_on=3", {"test/flaky"}),
        ("order-7", {"test/ok"}),
        ("test/fanout", {"test/fanout"}),
    ],
)
def test_event_search(admin_client, history, term, expected):
    response = admin_client.get(EVENTS, {"q": term})
    assert response.status_code == 200
    assert {event.name for event in response.context["cl"].result_list} == expected


def test_replay_creates_new_runs_and_keeps_the_old(admin_client, history):
    event_id = history["ok"].event_id
    response = admin_client.post(reverse("admin:django_events_event_replay", args=[event_id]), follow=True)
    assert "1 new run created." in response.content.decode()
    runs = Run.objects.filter(event_id=event_id).order_by("created_at")
    assert [run.status for run in runs] == [RunStatus.SUCCEEDED, RunStatus.PENDING]


def test_replay_of_event_nothing_subscribes_to(admin_client, db):
    event = django_events.send("nobody/listens")
    response = admin_client.post(reverse("admin:django_events_event_replay", args=[event.pk]), follow=True)
    assert "nothing to replay" in response.content.decode()
    assert not Run.objects.exists()


def test_bulk_replay(admin_client, history):
    ids = [str(history["ok"].event_id), str(history["pending"].event_id)]
    response = admin_client.post(EVENTS, {"action": "replay_selected", "_selected_action": ids}, follow=True)
    assert "4 new runs created." in response.content.decode()


# -- overview ----------------------------------------------------------------------------------


def test_overview_counts_runs_and_lists_dead_ones(admin_client, history):
    Run.objects.filter(pk=history["ok"].pk).update(created_at=timezone.now() - dt.timedelta(hours=3))
    response = admin_client.get(OVERVIEW)
    assert response.status_code == 200
    hour, day = response.context["windows"]
    assert hour["total"] == 5
    assert day["total"] == 6
    assert [run.pk for run in response.context["dead_runs"]] == [history["dead"].pk]
    page = response.content.decode()
    assert "1 dead run." in page
    assert "&lt;b&gt;broken&lt;/b&gt;" in page


def test_app_index_links_to_overview(admin_client, db):
    page = admin_client.get(reverse("admin:app_list", args=["django_events"])).content.decode()
    assert OVERVIEW in page


# -- the run.dead event ------------------------------------------------------------------------


def _event_page(client, event: Event) -> str:
    return client.get(reverse("admin:django_events_event_change", args=[event.pk])).content.decode()


def test_run_dead_event_page_links_its_run_and_event(admin_client, history):
    # Given: the run.dead event the dead run sent
    dead = history["dead"]
    event = Event.objects.get(name=RUN_DEAD_EVENT)
    assert event.data["run_id"] == str(dead.pk)

    # When: its page is opened
    page = _event_page(admin_client, event)

    # Then: the run id links to the run's page, the event id to its event's, with what they are
    assert f'href="{_run_url(dead)}" id="de-dead-run-link">{dead.pk}</a> (tests.always_fails, dead)' in page
    assert f'href="{reverse("admin:django_events_event_change", args=[dead.event_id])}"' in page
    # and other events' pages have no such field
    assert "de-dead-run" not in _event_page(admin_client, Event.objects.get(name="test/ok"))


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"run_id": "<b>not-a-uuid</b>"}, "<code>&lt;b&gt;not-a-uuid&lt;/b&gt;</code> (no such run stored)"),
        ({"run_id": "00000000-0000-7000-8000-000000000000"}, "(no such run stored)"),
        ({"run_id": 7, "event_id": ["x"]}, "<code>7</code> (no such run stored)"),
        ({}, "not given"),
    ],
)
def test_run_dead_event_with_a_bad_or_gone_run_id_shows_it_as_text(admin_client, db, data, shown):
    # Given: a run.dead event whose run id is not a UUID, names no stored run, or is missing
    event = Event.objects.create(name=RUN_DEAD_EVENT, data=data)

    # When: its page is opened
    response = admin_client.get(reverse("admin:django_events_event_change", args=[event.pk]))

    # Then: it shows the id as escaped text, with no link to a run
    page = response.content.decode()
    assert response.status_code == 200
    assert shown in page
    assert "de-dead-run-link" not in page
    assert "<b>not-a-uuid</b>" not in page
