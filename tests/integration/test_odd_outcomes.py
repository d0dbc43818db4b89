"""Whatever a function raises or returns, its run ends in a recorded state, through a real worker.

The function ``tests.odd`` (``tests/testapp/events.py``) raises or returns, on every
attempt, something the database would refuse or that a worker thread must survive.
Each run must end ``succeeded``, ``retrying`` or ``dead`` with its attempts stored
(never left ``running`` until its lease expires), with the real exception type, a
message and a traceback that the database accepts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from django.db import connection
from django.utils import timezone

import django_events
from django_events.exceptions import RetryAfterError
from django_events.execution import MESSAGE_LENGTH, RUN_DEAD_EVENT, TRACEBACK_LENGTH
from django_events.models import FINAL_STATUSES, Attempt, Event, Run, RunStatus
from django_events.text import has_unstorable

from ..conftest import wait_for

pytestmark = pytest.mark.usefixtures("ledger_form")

U = "\ufffd"
MODULE = "tests.testapp.events"

#: kind -> (the exception type recorded on each attempt, the message it starts with)
FAILURES = {
    "str-raises": (f"{MODULE}._StrRaises", "<str() of this _StrRaises raised RuntimeError>"),
    "nul-message": ("ValueError", f"before{U}after"),
    "surrogate-message": ("ValueError", f"before{U}after"),
    "huge-message": ("ValueError", "xxxx"),
    "odd-type": (f"{MODULE}.Odd{U}Name{U}", "odd"),
    "base-exception": (f"{MODULE}._NotAnException", "not a shutdown"),
    "system-exit": ("SystemExit", "3"),
    "keyboard-interrupt": ("KeyboardInterrupt", ""),
    "retry-after-nan": ("ValueError", "RetryAfterError needs a finite, non-negative number of seconds"),
    "retry-after-forever": (f"{MODULE}._RetryAfterForever", "retry requested in 1s"),
    "deep-result": (
        "django_events.exceptions.ResultNotSerializableError",
        "The function returned a value that JSON cannot hold (list)",
    ),
}
#: kind -> the result stored
RESULTS = {
    "nul-result": {"text": f"before{U}after", f"key{U}": 1},
    "surrogate-result": {"text": f"before{U}after", f"key{U}": [1, U]},
}


def _settled(kinds: dict[str, Event]) -> bool:
    """Every run of an odd event is final, except the one retrying in a year."""
    runs = Run.objects.filter(event__in=kinds.values())
    waiting = {run.event_id for run in runs if run.status not in FINAL_STATUSES}
    return waiting == {kinds["retry-after-huge"].pk} and all(
        run.status == RunStatus.RETRYING for run in runs if run.event_id in waiting
    )


def test_every_odd_outcome_ends_in_a_recorded_state_with_storable_text(worker):
    # Given a function that raises or returns something odd, for each kind
    kinds = {
        kind: django_events.send("test/odd", {"kind": kind})
        for kind in [*FAILURES, *RESULTS, "retry-after-huge"]
    }

    # When a real worker has run them (no run is left running: its lease would take 11 minutes)
    wait_for(lambda: _settled(kinds), timeout=60)

    # Then each failure is recorded on every attempt with its real type, a storable message and traceback
    for kind, (exc_type, message) in FAILURES.items():
        run = Run.objects.get(event=kinds[kind])
        attempts = list(Attempt.objects.filter(run=run).order_by("number"))
        expected = 1 if kind == "deep-result" else 2  # a result JSON cannot hold is not retried
        assert (run.status, len(attempts)) == (RunStatus.DEAD, expected), kind
        for attempt in attempts:
            assert attempt.exc_type == exc_type, kind
            assert attempt.message.startswith(message), (kind, attempt.message[:200])
            assert attempt.traceback, kind
            assert not has_unstorable(attempt.message + attempt.traceback + run.last_error), kind
        assert run.last_error.startswith(f"{exc_type}: {message}"[:100]), kind

    # And over-long text is cut, with a marker that says by how much
    [huge, *_] = Attempt.objects.filter(run__event=kinds["huge-message"])
    assert len(huge.message) < MESSAGE_LENGTH + 200
    assert "characters cut here; the text had 3000000" in huge.message
    assert len(huge.traceback) < TRACEBACK_LENGTH + 200
    assert "characters cut here" in huge.traceback
    assert huge.traceback.rstrip().endswith("x")  # the end of the traceback is kept

    # And results the database would refuse are stored with U+FFFD in place of what it refuses
    for kind, expected in RESULTS.items():
        run = Run.objects.get(event=kinds[kind])
        assert (run.status, run.result) == (RunStatus.SUCCEEDED, expected), kind

    # And a huge RetryAfterError is cut to a year; a non-finite one is not taken
    later = Run.objects.get(event=kinds["retry-after-huge"])
    assert later.status == RunStatus.RETRYING
    assert later.due_at is not None
    year = dt.timedelta(seconds=RetryAfterError.MAX_SECONDS)
    assert timezone.now() + year - dt.timedelta(minutes=5) < later.due_at <= timezone.now() + year

    # And each dead run sent its run.dead event, whose data is storable too
    dead = Event.objects.filter(name=RUN_DEAD_EVENT)
    assert dead.count() == len(FAILURES)
    for event in dead:
        assert not has_unstorable(event.data["error"])


@pytest.fixture
def refusing_database(transactional_db: None) -> Iterator[None]:
    """The database refuses an attempt whose traceback, or a run update whose result, says REFUSE-ME."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION django_events_test_refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                "CREATE TRIGGER django_events_test_refuse_attempt BEFORE INSERT ON django_events_attempt "
                "FOR EACH ROW WHEN (NEW.traceback LIKE '%REFUSE-ME%') "
                "EXECUTE FUNCTION django_events_test_refuse()"
            )
            cursor.execute(
                "CREATE TRIGGER django_events_test_refuse_run BEFORE UPDATE ON django_events_run "
                "FOR EACH ROW WHEN (NEW.result::text LIKE '%REFUSE-ME%') "
                "EXECUTE FUNCTION django_events_test_refuse()"
            )
        else:
            cursor.execute(
                "CREATE TRIGGER django_events_test_refuse_attempt BEFORE INSERT ON django_events_attempt "
                "WHEN NEW.traceback LIKE '%REFUSE-ME%' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
            cursor.execute(
                "CREATE TRIGGER django_events_test_refuse_run BEFORE UPDATE ON django_events_run "
                "WHEN NEW.result LIKE '%REFUSE-ME%' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER django_events_test_refuse_attempt" + _on("django_events_attempt"))
            cursor.execute("DROP TRIGGER django_events_test_refuse_run" + _on("django_events_run"))
            if connection.vendor == "postgresql":
                cursor.execute("DROP FUNCTION django_events_test_refuse()")


def _on(table: str) -> str:
    return f" ON {table}" if connection.vendor == "postgresql" else ""


def test_an_outcome_the_database_refuses_is_stored_reduced(refusing_database, worker):
    # Given a function whose failure's traceback, and one whose result, the database refuses
    failing = django_events.send("test/odd", {"kind": "refused"})
    returning = django_events.send("test/odd", {"kind": "refused-result"})

    # When a real worker has run them
    wait_for(
        lambda: Run.objects.filter(event__in=[failing, returning], status__in=FINAL_STATUSES).count() == 2,
        timeout=60,
    )

    # Then the failure is recorded on each attempt, reduced: its type and message, no traceback
    run = Run.objects.get(event=failing)
    attempts = list(Attempt.objects.filter(run=run).order_by("number"))
    assert (run.status, len(attempts)) == (RunStatus.DEAD, 2)
    for attempt in attempts:
        assert attempt.exc_type == "ValueError"
        assert attempt.message.startswith("REFUSE-ME in the traceback")
        assert "[the database refused this attempt's traceback:" in attempt.message
        assert attempt.traceback == ""
    # And the success is recorded, without the result the database refused
    run = Run.objects.get(event=returning)
    [attempt] = Attempt.objects.filter(run=run)
    assert (run.status, run.result) == (RunStatus.SUCCEEDED, None)
    assert "[the database refused this attempt's result:" in attempt.message
