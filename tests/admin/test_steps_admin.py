"""The admin for durable steps: a run's steps as a timeline, what a sleeping or waiting run waits
for and until when, the invoking run, and the run list's sleeping and waiting runs.

The flows are driven by the testing helpers where a real run can reach the state shown; the rest
(an invoke that waits, hostile text in every field) are put in place with the ORM, as the steps'
code would leave them, so that those tests are about what the admin shows.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_events import send
from django_events.admin import STEP_RESULT_CHARS, STEPS_SHOWN
from django_events.models import Event, Run, RunStatus, Step, StepKind, StepStatus
from django_events.testing import reset_clock, run_all, run_due
from tests.admin.plans import seq_scans

RUNS = reverse("admin:django_events_run_changelist")
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
STEP_STATES = [RunStatus.SLEEPING, RunStatus.WAITING]


@pytest.fixture(autouse=True)
def _clock():
    yield
    reset_clock()


def _run_url(run: Run | uuid.UUID) -> str:
    return reverse("admin:django_events_run_change", args=[getattr(run, "pk", run)])


def _page(client: Any, url: str, params: dict[str, str] | None = None) -> str:
    response = client.get(url, params or {})
    assert response.status_code == 200
    return str(response.content.decode())


def _when(value: dt.datetime, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return timezone.localtime(value).strftime(fmt)


def _run(status: str, function: str = "tests.flow", **fields: Any) -> Run:
    """A run of ``function`` in ``status``, as the ledger would leave it."""
    event = Event.objects.create(name="test/steps", data={"order_id": 7})
    return Run.objects.create(
        event=event, event_name=event.name, function=function, status=status, max_attempts=3, **fields
    )


def _step(run: Run, position: int, **fields: Any) -> Step:
    now = timezone.now()
    fields.setdefault("step_id", f"step-{position}")
    fields.setdefault("kind", StepKind.RUN)
    fields.setdefault("status", StepStatus.COMPLETED)
    fields.setdefault("started_at", now)
    fields.setdefault("attempts", 1)
    if fields["status"] == StepStatus.COMPLETED:
        fields.setdefault("finished_at", now + dt.timedelta(milliseconds=250))
    return Step.objects.create(run=run, position=position, **fields)


def _steps_table(page: str) -> str:
    match = re.search(r'<table class="de-attempts de-steps">.*?</table>', page, re.S)
    assert match, "no steps table on the page"
    return match.group(0)


def _listed(client: Any, params: dict[str, str]) -> set[Any]:
    response = client.get(RUNS, params)
    assert response.status_code == 200
    return {run.pk for run in response.context["cl"].result_list}


# -- the timeline ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_waiting_runs_page_shows_its_steps_in_order_and_the_event_it_waits_for(admin_client):
    # Given the order flow, run until it waits for the invoice (it slept on the way, fast-forwarded)
    send("steps/order", {"order_id": 7})
    run_all()
    run = Run.objects.get(function="tests.steps_order")
    assert run.status == RunStatus.WAITING
    paid = Step.objects.get(run=run, step_id="paid")

    # When its page is opened
    page = _page(admin_client, _run_url(run))

    # Then its steps are listed in the order they ran, with kind, status, attempts and result
    table = _steps_table(page)
    ids = re.findall(r"<tr class=\"de-step de-step-(\w+)\">\s*<td><code>([^<]+)</code></td>", table)
    assert ids == [
        ("completed", "charge"),
        ("completed", "reserve"),
        ("completed", "cool-off"),
        ("waiting", "paid"),
    ]
    assert "<td>atomic</td>" in table
    assert "<td>wait for event</td>" in table
    assert 'de-badge de-badge-completed">completed</span>' in table
    assert '<code class="de-step-result">{&quot;charged&quot;: 7}</code>' in table
    # And the page says what it waits for, and until when
    assert re.search(
        r"Waiting at step <code>paid</code>\s*for event <code>steps/invoice.paid</code> "
        r"where <code>data.order_id == 7</code>\.\s*Until " + re.escape(_when(paid.wake_at)),
        page,
    ), page
    # And the attempt that left the worker says why
    assert "waiting at step &#x27;paid&#x27; for event steps/invoice.paid" in page


@pytest.mark.django_db(transaction=True)
def test_a_sleeping_runs_page_says_until_when_and_at_which_step(admin_client):
    # Given a run that left the worker at a 30 s sleep
    send("steps/sleepy", {"seconds": 30})
    run_due()
    run = Run.objects.get(function="tests.steps_sleepy")
    assert run.status == RunStatus.SLEEPING
    assert run.due_at is not None

    # When its page is opened
    page = _page(admin_client, _run_url(run))

    # Then it says it sleeps until its due time, at the sleep step, which the timeline lists as waiting
    assert re.search(
        rf"Sleeping until {re.escape(_when(run.due_at))}\s*\(at step <code>nap</code>\)\.", page
    ), page
    table = _steps_table(page)
    assert '<tr class="de-step de-step-waiting">\n      <td><code>nap</code></td>' in table
    nap = Step.objects.get(run=run, step_id="nap")
    assert f"until {_when(nap.wake_at)}" in table


@pytest.mark.django_db(transaction=True)
def test_a_wait_with_a_check_says_so_and_links_to_the_event_that_ended_it(admin_client):
    # Given a run waiting for an event its if_ check accepts
    send("steps/wait-if", {})
    run_all()
    run = Run.objects.get(function="tests.steps_wait_if")
    assert run.status == RunStatus.WAITING

    # When its page is opened, then it says the run's own check picks the event
    page = _page(admin_client, _run_url(run))
    assert re.search(r"for event <code>steps/amount</code> that its check accepts\.\s*Until ", page), page

    # And once an event it accepts came, the wait's row links to that event
    big = send("steps/amount", {"amount": 500})
    run_all()
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
    page = _page(admin_client, _run_url(run))
    event_url = reverse("admin:django_events_event_change", args=[big.pk])
    assert f'event <a href="{event_url}">{big.pk}</a>' in _steps_table(page)
    assert "de-waits-for" not in page


@pytest.mark.django_db(transaction=True)
def test_a_wait_that_timed_out_says_so(admin_client):
    send("steps/wait", {"key": "k"})
    run_all()
    run_all(until=timezone.now() + dt.timedelta(seconds=700))
    run = Run.objects.get(function="tests.steps_wait")
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    table = _steps_table(_page(admin_client, _run_url(run)))
    assert re.search(r"<td>wait for event</td>.*timed out", table, re.S)


def test_step_results_errors_and_tracebacks_are_escaped(admin_client, db):
    # Given a run whose steps hold HTML in every text they show
    run = _run(RunStatus.WAITING, due_at=timezone.now() + dt.timedelta(hours=1))
    _step(run, 0, step_id=f"charge {SCRIPT}", result={"note": SCRIPT})
    _step(
        run,
        1,
        step_id="fail",
        status=StepStatus.FAILED,
        error=f"ValueError: {SCRIPT}",
        traceback=f'Traceback (most recent call last):\n  File "x.py"\nValueError: {SCRIPT}',
        attempts=3,
    )
    _step(
        run,
        2,
        step_id="paid",
        kind=StepKind.WAIT,
        status=StepStatus.WAITING,
        event_name=f"billing/{SCRIPT}",
        match=f"data.note == '{SCRIPT}'",
        wake_at=timezone.now() + dt.timedelta(hours=1),
    )

    # When its page is opened
    page = _page(admin_client, _run_url(run))

    # Then no step's text is markup: each is shown escaped, the traceback under a fold
    assert SCRIPT not in page
    table = _steps_table(page)
    assert f"<code>charge {ESCAPED}</code>" in table
    assert "{&quot;note&quot;: &quot;" + ESCAPED + "&quot;}" in table
    assert f'<span class="de-step-error">ValueError: {ESCAPED}</span>' in table
    assert re.search(
        rf"<details><summary>traceback</summary><pre class=\"de-pre\">Traceback.*?{re.escape(ESCAPED)}</pre>",
        table,
        re.S,
    )
    assert f"<code>billing/{ESCAPED}</code>" in page  # the wait, in the timeline and what it waits for
    assert f"<code>data.note == &#x27;{ESCAPED}&#x27;</code>" in page


def test_a_long_result_is_shortened(admin_client, db):
    # Given a step whose result is far longer than a row shows
    run = _run(RunStatus.SUCCEEDED)
    _step(run, 0, result={"items": list(range(1000))})

    # When its page is opened
    table = _steps_table(_page(admin_client, _run_url(run)))

    # Then the row shows its beginning, cut with an ellipsis
    shown = re.search(r'<code class="de-step-result">([^<]*)</code>', table)
    assert shown
    assert shown.group(1).startswith("{&quot;items&quot;: [0, 1, 2,")
    assert shown.group(1).endswith("\u2026")
    assert len(shown.group(1).replace("&quot;", '"')) == STEP_RESULT_CHARS


def test_a_run_without_steps_shows_no_steps_nor_waits(admin_client, db):
    page = _page(admin_client, _run_url(_run(RunStatus.PENDING)))
    assert "de-steps" not in page
    assert "de-waits-for" not in page
    assert "de-invoked-by" not in page


# -- invoke --------------------------------------------------------------------------------------


def test_a_run_waiting_on_an_invoke_links_to_the_invoked_run_and_back(admin_client, db):
    # Given a run waiting, with no timeout, for the run its step.invoke started
    parent = _run(RunStatus.WAITING)
    child = _run(RunStatus.RUNNING, function="tests.steps_ship", parent=parent.pk)
    _step(
        parent,
        0,
        step_id="ship",
        kind=StepKind.INVOKE,
        status=StepStatus.WAITING,
        invoked_run=child.pk,
    )

    # When the waiting run's page is opened
    page = _page(admin_client, _run_url(parent))

    # Then it says which run it waits for, with a link, and that the wait has no timeout
    assert re.search(
        r"Waiting at step <code>ship</code>\s*for the end of run\s*"
        rf'<a href="{_run_url(child)}">{child.pk}</a> '
        r"\(tests.steps_ship, running\)\.\s*No timeout\.",
        page,
    ), page
    # And the invoked run's page links back to the run that invoked it
    child_page = _page(admin_client, _run_url(child))
    assert re.search(
        rf'Invoked by run\s*<a href="{_run_url(parent)}">{parent.pk}</a> \(tests.flow, waiting\)', child_page
    )


def test_an_invoke_with_a_timeout_says_until_when(admin_client, db):
    wake_at = timezone.now() + dt.timedelta(hours=2)
    parent = _run(RunStatus.WAITING, due_at=wake_at)
    child = _run(RunStatus.PENDING, parent=parent.pk)
    _step(parent, 0, kind=StepKind.INVOKE, status=StepStatus.WAITING, invoked_run=child.pk, wake_at=wake_at)
    page = _page(admin_client, _run_url(parent))
    assert f"Until {_when(wake_at)}." in page
    assert "No timeout." not in page


def test_runs_no_longer_stored_are_named_not_linked(admin_client, db):
    # Given a waiting run whose invoked run was deleted, and that was itself invoked by a deleted run
    gone_child, gone_parent = uuid.uuid4(), uuid.uuid4()
    run = _run(RunStatus.WAITING, parent=gone_parent)
    _step(run, 0, kind=StepKind.INVOKE, status=StepStatus.WAITING, invoked_run=gone_child)

    # When its page is opened
    page = _page(admin_client, _run_url(run))

    # Then both ids are shown, said to be gone
    assert re.search(rf"for the end of run\s*{gone_child} \(no longer stored\)", page)
    assert re.search(rf"Invoked by run\s*{gone_parent} \(no longer stored\)", page)
    assert _run_url(gone_parent) not in page


# -- bounds ----------------------------------------------------------------------------------------


def _queries(client: Any, run: Run) -> int:
    with CaptureQueriesContext(connection) as captured:
        _page(client, _run_url(run))
    return len(captured.captured_queries)


def test_the_run_page_lists_the_first_steps_only_in_a_query_that_does_not_grow(admin_client, db):
    # Given sleeping runs, one with a few steps and two with more than the page lists,
    # each asleep at its last step
    def run_with(count: int) -> Run:
        due = timezone.now() + dt.timedelta(minutes=5)
        run = _run(RunStatus.SLEEPING, due_at=due)
        now = timezone.now()
        Step.objects.bulk_create(
            Step(
                run=run,
                step_id=f"item:{i}",
                position=i,
                kind=StepKind.RUN,
                status=StepStatus.COMPLETED,
                result=i,
                attempts=1,
                started_at=now,
                finished_at=now,
            )
            for i in range(count)
        )
        _step(run, count, step_id="nap", kind=StepKind.SLEEP, status=StepStatus.WAITING, wake_at=due)
        return run

    small, large, huge = run_with(3), run_with(STEPS_SHOWN + 50), run_with(STEPS_SHOWN * 5)

    # When each page is opened, the pages of runs with more steps than listed cost the same, one
    # query more than the small one's (the step it sleeps at, past those listed), not one per step
    assert _queries(admin_client, huge) == _queries(admin_client, large) == _queries(admin_client, small) + 1

    # And the large one lists the first steps in order, says there are more, and still finds the sleep
    page = _page(admin_client, _run_url(large))
    table = _steps_table(page)
    assert table.count('<tr class="de-step ') == STEPS_SHOWN
    assert "<code>item:0</code>" in table
    assert f"<code>item:{STEPS_SHOWN - 1}</code>" in table
    assert f"<code>item:{STEPS_SHOWN}</code>" not in table
    assert f"The run has more steps: the first {STEPS_SHOWN} are listed." in page
    assert re.search(r"\(at step <code>nap</code>\)", page)
    # And the small one lists all, with no note
    small_page = _page(admin_client, _run_url(small))
    assert "The run has more steps" not in small_page


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner")
def test_the_steps_are_read_through_an_index(admin_client, db):
    # Given a waiting run's page's queries, as they ran
    run = _run(RunStatus.WAITING, parent=uuid.uuid4())
    child = _run(RunStatus.PENDING, parent=run.pk)
    _step(run, 0)
    _step(run, 1, kind=StepKind.INVOKE, status=StepStatus.WAITING, invoked_run=child.pk)
    with CaptureQueriesContext(connection) as captured:
        _page(admin_client, _run_url(run))
    statements = [q["sql"] for q in captured.captured_queries if "django_events_step" in q["sql"]]
    assert statements

    # When each is planned with table scans discouraged
    # Then none reads the whole table of steps
    assert seq_scans(statements, "django_events_step") == []


# -- the run list ----------------------------------------------------------------------------------


def test_status_filter_offers_and_applies_sleeping_and_waiting(admin_client, db):
    # Given a sleeping, a waiting and a pending run
    due = timezone.now() + dt.timedelta(minutes=7)
    runs = {status: _run(status, due_at=due) for status in STEP_STATES}
    _run(RunStatus.PENDING)

    # When the list is opened, and filtered by each state
    page = _page(admin_client, RUNS)
    for status in STEP_STATES:
        # Then the sidebar offers it, and the list holds that state's run only
        assert f"?status__exact={status}" in page
        assert _listed(admin_client, {"status__exact": status}) == {runs[status].pk}
    # And the list shows when they are next due
    assert page.count(_when(due)) == 2
