"""Bad input in the admin: searches that never fail, the same answers on SQLite and PostgreSQL,
and pages that render whatever text the rows hold."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from django.contrib import admin
from django.db import DataError, connection, transaction
from django.urls import reverse

import django_events
from django_events.conf import get_settings
from django_events.models import Event, QueuedMessage, QueuedMessageState, Run, RunStatus
from django_events.testing import run_all

EVENTS = reverse("admin:django_events_event_changelist")

#: Events by name, with the data the searches below look into.
DATA: dict[str, dict[str, Any]] = {
    "int-1": {"x": 1},
    "float-1": {"x": 1.0},
    "float-1.5": {"x": 1.5},
    "true": {"x": True},
    "false": {"x": False},
    "null": {"x": None},
    "text-1": {"x": "1"},
    "text-true": {"x": "true"},
    "text-NaN": {"x": "NaN"},
    "text-Infinity": {"x": "Infinity"},
    "text-1e999": {"x": "1e999"},
    "text-list": {"x": "[1]"},
    "text-accented": {"x": "é"},
    "list": {"x": [1]},
    "object": {"x": {"a": 1}},
    "huge-int": {"x": 12345678901234567890},
    "nested": {"a": {"b": 1}},
    "dotted-key": {"a.b": 1},
    "dunder-key": {"a__b": 1},
    "quote-key": {'a"b': 1},
    "backslash-key": {"a\\b": 1},
    "apostrophe-key": {"a'b": 1},
    "empty-key": {"": 1},
    "digit-key": {"0": 1},
    "minus-key": {"-1": 1},
    "dollar-key": {"$": 1},
    "bracket-key": {"[0]": 1},
}

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def data_events(db: None) -> None:
    """One event per entry of DATA, named after it."""
    for name, data in DATA.items():
        django_events.send(f"probe/{name}", data)


def _found(client: Any, term: str) -> set[str]:
    response = client.get(EVENTS, {"q": term})
    assert response.status_code == 200
    return {event.name.removeprefix("probe/") for event in response.context["cl"].result_list}


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        # numbers compare as numbers, and the text is searched too; true is not 1
        ("x=1", {"int-1", "float-1", "text-1"}),
        ("x=1.0", {"int-1", "float-1"}),
        ("x=1e0", {"int-1", "float-1"}),
        ("x = 1", {"int-1", "float-1", "text-1"}),
        ("x=1.5", {"float-1.5"}),
        ("x=true", {"true", "text-true"}),
        ("x=false", {"false"}),
        ("x=null", {"null"}),
        ('x="1"', {"text-1"}),
        ("x=é", {"text-accented"}),
        # what JSON cannot compare alike everywhere is text
        ("x=NaN", {"text-NaN"}),
        ("x=Infinity", {"text-Infinity"}),
        ("x=-Infinity", set()),
        ("x=1e999", {"text-1e999"}),
        ("x=12345678901234567890", set()),
        ("x=" + "1" * 5000, set()),
        # lists and objects are text, never matched by containment
        ("x=[1]", {"text-list"}),
        ('x={"a": 1}', set()),
        ("x=" + DEEP, set()),
        ('x="\\ud800"', set()),
        # a key is a name, never a path
        ("a.b=1", {"dotted-key"}),
        ("a__b=1", {"dunder-key"}),
        ('a"b=1', {"quote-key"}),
        ("a\\b=1", {"backslash-key"}),
        ("a'b=1", {"apostrophe-key"}),
        ("=1", {"empty-key"}),
        ("0=1", {"digit-key"}),
        ("-1=1", {"minus-key"}),
        ("$=1", {"dollar-key"}),
        ("[0]=1", {"bracket-key"}),
        ("a=1", set()),
        ("b=1", set()),
    ],
)
def test_data_search_gives_the_same_answer_on_every_database(admin_client, data_events, term, expected):
    # Given the events of DATA (on whichever database the suite runs)
    # When the event list is searched for key=value
    found = _found(admin_client, term)

    # Then exactly the expected events are found
    assert found == expected


def test_data_search_of_invalid_utf8_finds_nothing(admin_client, data_events):
    # Given a search whose value is the UTF-8 encoding of a lone surrogate (invalid UTF-8)
    # When the list is asked for it
    response = admin_client.get(f"{EVENTS}?q=x%3D%ED%A0%80")

    # Then the page answers, with no event
    assert response.status_code == 200
    assert not response.context["cl"].result_list


def test_a_search_holding_a_nul_character_is_refused_with_a_message(admin_client, data_events):
    # When the list is searched for a term with a NUL character (which no database compares)
    response = admin_client.get(EVENTS, {"q": "x\x00=1"})

    # Then the page answers and says why the search was not made
    assert response.status_code == 200
    assert "Null characters are not allowed." in response.content.decode()


@pytest.mark.parametrize(
    ("model", "term", "postgresql_index", "sqlite_form"),
    [
        (Event, "x=1", "django_events_event_data_gin", "json_each("),
        (Run, "timed out", "django_events_run_error_trgm", "INSTR("),
    ],
)
def test_searches_take_the_index_friendly_form_of_each_database(
    rf, data_events, model, term, postgresql_index, sqlite_form
):
    # Given the search the admin makes for a term (event data, or words of a run's error)
    model_admin = admin.site._registry[model]
    queryset, _duplicates = model_admin.get_search_results(rf.get("/"), model.objects.order_by(), term)
    sql, params = queryset.query.sql_with_params()

    # When PostgreSQL plans it with sequential scans ruled out
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
            plan = "\n".join(row[0] for row in cursor.fetchall())

        # Then it reads the index made for that search (GIN on data, trigram on the error)
        assert postgresql_index in plan, plan
    else:
        # (SQLite has no such index: its form reads each object's members, or finds the text
        # whatever its length)
        assert sqlite_form in sql


@pytest.mark.parametrize(
    "changelist",
    [
        "django_events_run_changelist",
        "django_events_event_changelist",
        "django_events_queuedmessage_changelist",
    ],
)
@pytest.mark.parametrize("term", ["%", "_", "\\", "'", '"', "%_\\'\"", "x" * 10_000, DEEP, "NaN", "\udcff"])
def test_any_search_text_gets_an_answer_not_an_error(admin_client, data_events, changelist, term):
    # Given events, and a dead run with an error message to search
    django_events.send("test/always-fails")
    run_all()
    assert Run.objects.filter(status=RunStatus.DEAD).exclude(last_error="").exists()

    # When a list is searched for text with wildcards, quotes, backslashes, great length or a lone surrogate
    response = admin_client.get(reverse(f"admin:{changelist}"), {"q": term.encode("utf-8", "surrogatepass")})

    # Then the page answers, and nothing matches (no row holds such text)
    assert response.status_code == 200
    assert not response.context["cl"].result_list


@pytest.mark.parametrize(
    ("term", "found"),
    [("BROKEN</B> ON ATTEMPT 3", True), ("broken%attempt", False), ("attempt _", False), ("attempt 3", True)],
)
def test_error_search_ignores_case_and_takes_wildcards_as_text(admin_client, db, term, found):
    # Given a dead run whose error is "ValueError: <b>broken</b> on attempt 3"
    django_events.send("test/always-fails")
    run_all()
    dead = Run.objects.get(status=RunStatus.DEAD)

    # When the run list is searched for words of it, in other case or with LIKE's wildcards
    response = admin_client.get(reverse("admin:django_events_run_changelist"), {"q": term})

    # Then the words are found whatever their case, and % and _ stand only for themselves
    assert [run.pk for run in response.context["cl"].result_list] == ([dead.pk] if found else [])


# -- pages showing lone surrogates -----------------------------------------------------------------

#: A lone surrogate, as rows written before send() refused them, or by hand, may hold it.
LONE = "\ud800"
#: How the pages show it: its escape, since a page is sent as UTF-8, which has no lone surrogates.
SHOWN = "\\ud800"


def _page(client: Any, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200
    return response.content.decode()


def test_message_pages_show_lone_surrogates_in_a_message_as_escapes(admin_client, db):
    # Given a dead broker message whose argument holds a lone surrogate (JSON escapes it in the body)
    message = dramatiq.Message(
        queue_name=get_settings().QUEUE_NAME,
        actor_name="shop.notify",
        args=(f"a{LONE}b",),
        kwargs={f"k{LONE}": LONE},
        options={},
    )
    row = QueuedMessage.objects.create(
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        message_id=message.message_id,
        body=message.encode(),
        state=QueuedMessageState.DEAD,
    )

    # When its page and the list are opened
    page = _page(admin_client, reverse("admin:django_events_queuedmessage_change", args=[row.pk]))
    _page(admin_client, reverse("admin:django_events_queuedmessage_changelist"))

    # Then the page shows the surrogates as their escapes
    assert f"&quot;a{SHOWN}b&quot;" in page
    assert f"&quot;k{SHOWN}&quot;: &quot;{SHOWN}&quot;" in page


def test_event_and_run_pages_show_lone_surrogates_in_json_as_escapes(admin_client, db):
    # Given an event whose data, and a run whose result, hold lone surrogates in keys and values
    data = {"note": f"a{LONE}b", f"key{LONE}": [LONE]}
    if connection.vendor == "postgresql":
        # PostgreSQL's jsonb refuses them (and its text, too): there no row can hold one
        with pytest.raises(DataError), transaction.atomic():
            Event.objects.create(name="probe/surrogates", data=data)
        return
    event = Event.objects.create(name="probe/surrogates", data=data)
    django_events.send("test/ok")
    run = Run.objects.get(function="tests.ok")
    Run.objects.filter(pk=run.pk).update(event=event, status=RunStatus.SUCCEEDED, result={"echo": LONE})

    # When their pages and lists are opened
    event_page = _page(admin_client, reverse("admin:django_events_event_change", args=[event.pk]))
    run_page = _page(admin_client, reverse("admin:django_events_run_change", args=[run.pk]))
    _page(admin_client, reverse("admin:django_events_event_changelist"))
    _page(admin_client, reverse("admin:django_events_run_changelist"))

    # Then both pages show the surrogates as their escapes
    for page in (event_page, run_page):
        assert f"&quot;note&quot;: &quot;a{SHOWN}b&quot;" in page
        assert f"&quot;key{SHOWN}&quot;: [\n    &quot;{SHOWN}&quot;\n  ]" in page
    assert f"&quot;echo&quot;: &quot;{SHOWN}&quot;" in run_page
