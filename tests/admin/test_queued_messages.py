"""The admin's "Broker messages": the database broker's rows, read-only; requeue and delete of dead ones."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import dramatiq
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

import django_events
from django_events.broker import DatabaseBroker
from django_events.changelists import CappedCountPaginator, QueueNameFilter
from django_events.conf import get_settings
from django_events.models import QueuedMessage, QueuedMessageState, Run
from django_events.tasks import ACTOR_NAME
from tests.conftest import as_global_broker, wait_for

MESSAGES = reverse("admin:django_events_queuedmessage_changelist")
READY, TAKEN, DEAD = QueuedMessageState.READY, QueuedMessageState.TAKEN, QueuedMessageState.DEAD
OTHER_QUEUE = "other_queue"
LONG_AGO = timezone.now() - dt.timedelta(days=3)


def _queue() -> str:
    return get_settings().QUEUE_NAME


def _row(
    state: str,
    *,
    queue: str | None = None,
    actor: str = ACTOR_NAME,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    body: bytes | None = None,
    **fields: Any,
) -> QueuedMessage:
    """A row as the database broker would have written it."""
    message = dramatiq.Message(
        queue_name=queue or _queue(), actor_name=actor, args=args, kwargs=kwargs or {}, options={}
    )
    return QueuedMessage.objects.create(
        queue_name=message.queue_name,
        actor_name=actor,
        message_id=message.message_id,
        body=message.encode() if body is None else body,
        state=state,
        **fields,
    )


def _url(row: QueuedMessage) -> str:
    return reverse("admin:django_events_queuedmessage_change", args=[row.pk])


def _act(client: Any, action: str, *rows: QueuedMessage) -> Any:
    return client.post(
        MESSAGES, {"action": action, "_selected_action": [str(row.pk) for row in rows]}, follow=True
    )


def _staff(client: Any, django_user_model: type[User], username: str, *codenames: str) -> Any:
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="django_events", codename__in=codenames)
    )
    client.force_login(user)
    return client


def _action_names(response: Any) -> set[str]:
    form = response.context["action_form"]
    return set() if form is None else {name for name, _label in form.fields["action"].choices if name}


@pytest.fixture
def rows(db: None) -> dict[str, QueuedMessage]:
    """A ready run message, a taken one (other actor and queue), a dead one with HTML, an undecodable one."""
    django_events.send("test/ok")
    run = Run.objects.get(function="tests.ok")
    return {
        "ready": _row(READY, args=(str(run.pk),)),
        "taken": _row(
            TAKEN, queue=OTHER_QUEUE, actor="tests.other", taken_by="host-a:123:abc", delivery_count=1
        ),
        "dead": _row(
            DEAD,
            actor="shop.notify",
            args=("<script>alert(1)</script>",),
            kwargs={"n": 1},
            taken_by="host-b:9:def",
            delivery_count=3,
            available_at=LONG_AGO,
        ),
        "undecodable": _row(DEAD, body=b"\x00not a message", available_at=LONG_AGO),
    }


def _names(rows: dict[str, QueuedMessage], result_list: Any) -> set[str]:
    by_pk = {row.pk: name for name, row in rows.items()}
    return {by_pk[row.pk] for row in result_list}


# -- the list ------------------------------------------------------------------------------------


def test_list_shows_every_state_with_badges_and_run_links(admin_client, rows):
    response = admin_client.get(MESSAGES)

    assert response.status_code == 200
    assert _names(rows, response.context["cl"].result_list) == set(rows)
    page = response.content.decode()
    assert "<h1>Select broker message to view</h1>" in page
    assert 'class="de-badge de-badge-pending">ready<' in page
    assert 'class="de-badge de-badge-running">taken<' in page
    assert 'class="de-badge de-badge-dead">dead<' in page
    run = Run.objects.get(function="tests.ok")
    assert f'<a href="{reverse("admin:django_events_run_change", args=[run.pk])}">{run.pk}</a>' in page
    assert "undecodable" in page
    assert "host-a:123:abc" in page


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state__exact": "dead"}, {"dead", "undecodable"}),
        ({"state__exact": "taken"}, {"taken"}),
        ({"queue_name": OTHER_QUEUE}, {"taken"}),
        ({"queue_name": "QUEUE"}, {"ready", "dead", "undecodable"}),
        ({"state__exact": "dead", "q": "no-such-id"}, set()),
    ],
)
def test_list_filters(admin_client, rows, query, expected):
    query = {key: _queue() if value == "QUEUE" else value for key, value in query.items()}
    response = admin_client.get(MESSAGES, query)
    assert response.status_code == 200
    assert _names(rows, response.context["cl"].result_list) == expected


def test_queue_choices_come_from_the_declared_queues_not_from_the_table(admin_client, rows):
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(MESSAGES)
    [queue_filter] = [
        spec for spec in response.context["cl"].filter_specs if isinstance(spec, QueueNameFilter)
    ]
    choices = {value for value, _label in queue_filter.lookup_choices}
    assert _queue() in choices
    assert OTHER_QUEUE not in choices  # only in the table: a DISTINCT would have found it
    assert not [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]

    selected = admin_client.get(MESSAGES, {"queue_name": OTHER_QUEUE}).context["cl"].filter_specs
    [queue_filter] = [spec for spec in selected if isinstance(spec, QueueNameFilter)]
    assert OTHER_QUEUE in {value for value, _label in queue_filter.lookup_choices}


def test_list_count_is_capped(admin_client, rows, monkeypatch):
    monkeypatch.setattr(CappedCountPaginator, "cap", 2)
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(MESSAGES)
    assert "More than 2 broker messages" in response.content.decode()
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts, "the list counts something"
    assert all("LIMIT" in sql.upper() for sql in counts), counts


def test_search_finds_a_dead_message_by_its_exact_id(admin_client, rows):
    message_id = rows["dead"].message_id
    found = admin_client.get(MESSAGES, {"q": message_id}).context["cl"].result_list
    assert [row.pk for row in found] == [rows["dead"].pk]
    assert not admin_client.get(MESSAGES, {"q": message_id[:8]}).context["cl"].result_list
    # Messages still in flight are not searched (only dead ones have an index by id)
    assert not admin_client.get(MESSAGES, {"q": rows["taken"].message_id}).context["cl"].result_list


# -- the message page ----------------------------------------------------------------------------


def test_page_shows_the_decoded_message_escaped(admin_client, rows):
    page = admin_client.get(_url(rows["dead"])).content.decode()
    assert "<h1>View broker message</h1>" in page
    assert "&quot;actor_name&quot;: &quot;shop.notify&quot;" in page
    assert "&quot;kwargs&quot;: {\n    &quot;n&quot;: 1\n  }" in page  # pretty-printed
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page


def test_page_of_a_run_message_links_to_its_run(admin_client, rows):
    run = Run.objects.get(function="tests.ok")
    run_url = reverse("admin:django_events_run_change", args=[run.pk])
    assert run_url in admin_client.get(_url(rows["ready"])).content.decode()
    assert admin_client.get(run_url).status_code == 200


def test_page_of_an_undecodable_message(admin_client, rows):
    response = admin_client.get(_url(rows["undecodable"]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "undecodable" in page
    assert "not a message" in page  # the raw body, shown escaped


def test_page_of_a_malformed_message_says_what_is_wrong(admin_client):
    # Given a dead row whose body decodes, but whose args are not a list and whose actor holds HTML
    body = json.dumps(
        {
            "queue_name": _queue(),
            "actor_name": "<b>actor</b>",
            "args": "not a list",
            "kwargs": {},
            "options": {},
            "message_id": "m-1",
            "message_timestamp": 1,
        }
    ).encode()
    row = _row(DEAD, body=body)

    # When its page is shown
    response = admin_client.get(_url(row))

    # Then it says the message is malformed and why, escaped
    assert response.status_code == 200
    page = response.content.decode()
    assert "malformed" in page
    assert "args" in page
    assert "<b>actor</b>" not in page
    assert "&lt;b&gt;actor&lt;/b&gt;" in page


def test_page_is_read_only_even_with_change_permission(client, django_user_model, rows):
    _staff(client, django_user_model, "changer", "change_queuedmessage", "delete_queuedmessage")
    response = client.get(_url(rows["dead"]))
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert b'name="_save"' not in response.content
    assert client.post(_url(rows["dead"]), {"state": "ready"}).status_code == 403
    delete_url = reverse("admin:django_events_queuedmessage_delete", args=[rows["dead"].pk])
    assert client.post(delete_url, {"post": "yes"}).status_code == 403
    assert QueuedMessage.objects.get(pk=rows["dead"].pk).state == DEAD


# -- requeue and delete --------------------------------------------------------------------------


def test_requeue_makes_dead_messages_ready_now_and_skips_the_others(admin_client, rows):
    before = timezone.now()
    response = _act(admin_client, "requeue_selected", rows["dead"], rows["undecodable"], rows["ready"])

    assert "2 messages requeued; 1 skipped (not dead)." in response.content.decode()
    dead = QueuedMessage.objects.get(pk=rows["dead"].pk)
    assert (dead.state, dead.taken_by, dead.delivery_count) == (READY, "", 3)
    assert dead.available_at >= before
    assert QueuedMessage.objects.get(pk=rows["undecodable"].pk).state == READY
    ready = QueuedMessage.objects.get(pk=rows["ready"].pk)
    assert ready.available_at == rows["ready"].available_at  # skipped: untouched


def test_delete_removes_only_dead_messages(admin_client, rows):
    response = _act(admin_client, "delete_selected_dead", rows["dead"], rows["taken"])

    assert "1 message deleted; 1 skipped (not dead)." in response.content.decode()
    assert set(QueuedMessage.objects.values_list("pk", flat=True)) == {
        rows[name].pk for name in ("ready", "taken", "undecodable")
    }


def test_actions_on_no_dead_message_report_nothing_done(admin_client, rows):
    response = _act(admin_client, "requeue_selected", rows["taken"])
    assert "0 messages requeued; 1 skipped (not dead)." in response.content.decode()
    assert QueuedMessage.objects.get(pk=rows["taken"].pk).state == TAKEN


# -- permissions ---------------------------------------------------------------------------------


def test_viewers_browse_but_get_no_action(client, django_user_model, rows):
    _staff(client, django_user_model, "viewer", "view_queuedmessage")
    response = client.get(MESSAGES)
    assert response.status_code == 200
    assert response.context["action_form"] is None
    assert client.get(_url(rows["dead"])).status_code == 200

    _act(client, "requeue_selected", rows["dead"])
    _act(client, "delete_selected_dead", rows["undecodable"])
    assert set(QueuedMessage.objects.filter(state=DEAD).values_list("pk", flat=True)) == {
        rows["dead"].pk,
        rows["undecodable"].pk,
    }


def test_staff_without_view_permission_get_403(client, django_user_model, rows):
    _staff(client, django_user_model, "stranger", "view_run")
    assert client.get(MESSAGES).status_code == 403
    assert client.get(_url(rows["dead"])).status_code == 403


def test_change_permission_allows_requeue_not_delete(client, django_user_model, rows):
    _staff(client, django_user_model, "requeuer", "change_queuedmessage")
    assert _action_names(client.get(MESSAGES)) == {"requeue_selected"}

    _act(client, "delete_selected_dead", rows["dead"])
    assert QueuedMessage.objects.filter(pk=rows["dead"].pk).exists()
    response = _act(client, "requeue_selected", rows["dead"])
    assert "1 message requeued." in response.content.decode()


def test_delete_permission_allows_delete_not_requeue(client, django_user_model, rows):
    _staff(client, django_user_model, "deleter", "view_queuedmessage", "delete_queuedmessage")
    assert _action_names(client.get(MESSAGES)) == {"delete_selected_dead"}  # not Django's delete_selected

    _act(client, "requeue_selected", rows["dead"])
    assert QueuedMessage.objects.get(pk=rows["dead"].pk).state == DEAD
    response = _act(client, "delete_selected_dead", rows["dead"])
    assert "1 message deleted." in response.content.decode()
    assert not QueuedMessage.objects.filter(pk=rows["dead"].pk).exists()


# -- waking the database broker's consumers ------------------------------------------------------


@pytest.fixture
def database_broker(transactional_db: None) -> Any:
    """A ``DatabaseBroker`` on the test database as the global broker (committed transactions)."""
    yield from as_global_broker(DatabaseBroker())


def test_requeued_message_is_delivered_by_a_database_broker_consumer(admin_client, database_broker):
    database_broker.declare_queue(_queue())
    row = _row(DEAD, actor="tests.other", args=(7,), available_at=LONG_AGO)
    consumer = database_broker.consume(_queue(), timeout=100)
    try:
        assert next(consumer) is None  # dead: never delivered

        _act(admin_client, "requeue_selected", row)

        message = wait_for(lambda: next(consumer), timeout=10)
        assert (message.message_id, message.args) == (row.message_id, (7,))
        consumer.ack(message)
    finally:
        consumer.close()


def test_requeue_notifies_the_queue_on_commit_on_postgresql(admin_client, database_broker):
    if connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    import psycopg
    from psycopg import sql

    assert database_broker.uses_notify
    row = _row(DEAD, queue=OTHER_QUEUE, actor="tests.other")
    listener = psycopg.connect(**connection.get_connection_params(), autocommit=True)
    try:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(database_broker.channel)))

        _act(admin_client, "requeue_selected", row)

        notes = list(listener.notifies(timeout=5, stop_after=1))
    finally:
        listener.close()
    assert [note.payload for note in notes] == [OTHER_QUEUE]
