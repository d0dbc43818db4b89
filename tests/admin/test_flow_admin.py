"""The admin for flow control: the new states in the run list, why a run waits or was skipped,
why an event got no run, the waiting work per function and key, and cron's next ticks.

Runs are put in each state directly with the ORM, as the ledger would leave them, so that
these tests are about what the admin shows, not about how flow control decides.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
import zoneinfo
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

import django_events
from django_events import clock, cron
from django_events.admin import MERGED_SHOWN, TOP_KEYS
from django_events.changelists import CappedCountPaginator
from django_events.cron import CRON_EVENT
from django_events.ledger import flow_key_id
from django_events.models import Event, FlowKey, Run, RunStatus, Slot
from django_events.registry import unregister
from tests.admin.plans import seq_scans

RUNS = reverse("admin:django_events_run_changelist")
EVENTS = reverse("admin:django_events_event_changelist")
OVERVIEW = reverse("admin:django_events_run_overview")
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
FLOW_STATES = [RunStatus.SCHEDULED, RunStatus.THROTTLED, RunStatus.HELD, RunStatus.SKIPPED]


def _run_url(run: Run | uuid.UUID) -> str:
    return reverse("admin:django_events_run_change", args=[getattr(run, "pk", run)])


def _event_url(event: Event) -> str:
    return reverse("admin:django_events_event_change", args=[event.pk])


def _event(name: str = "test/flow", data: Any = None, **fields: Any) -> Event:
    return Event.objects.create(name=name, data={"note": SCRIPT} if data is None else data, **fields)


def _run(status: str, function: str = "tests.flow", event: Event | None = None, **fields: Any) -> Run:
    """A run of ``function`` in ``status``, as the ledger would leave it (due now if it waits for a time)."""
    event = event or _event()
    if status in (RunStatus.SCHEDULED, RunStatus.THROTTLED, RunStatus.PENDING):
        fields.setdefault("due_at", timezone.now() + dt.timedelta(minutes=5))
    if status in (RunStatus.SKIPPED, RunStatus.CANCELLED):
        fields.setdefault("finished_at", timezone.now())
    return Run.objects.create(
        event=event, event_name=event.name, function=function, status=status, max_attempts=3, **fields
    )


def _key(function: str = "tests.flow", key: str = "7", kind: str = "concurrency") -> FlowKey:
    return FlowKey.objects.create(id=flow_key_id(function, kind, key), function=function, kind=kind, key=key)


def _slot(flow_key: FlowKey, *, seconds: float = 60) -> Slot:
    return Slot.objects.create(
        flow_key=flow_key.pk,
        run_id=uuid.uuid4(),
        lease_expires_at=timezone.now() + dt.timedelta(seconds=seconds),
    )


def _page(client: Any, url: str, params: dict[str, str] | None = None) -> str:
    response = client.get(url, params or {})
    assert response.status_code == 200
    return str(response.content.decode())


def _listed(client: Any, params: dict[str, str]) -> set[Any]:
    response = client.get(RUNS, params)
    assert response.status_code == 200
    return {run.pk for run in response.context["cl"].result_list}


@pytest.fixture
def cron_function() -> Iterator[str]:
    """A cron function registered for the test only, read in a zone other than the project's."""

    @django_events.function(
        cron=["0 9 * * MON", "30 17 * * FRI"], timezone="Europe/Paris", id="tests.admin_cron"
    )
    def weekly(ctx: Any) -> None:  # pragma: no cover - never run here
        pass

    try:
        yield "tests.admin_cron"
    finally:
        unregister("tests.admin_cron")


# -- the run list --------------------------------------------------------------------------------


def test_status_filter_offers_and_applies_each_flow_state(admin_client, db):
    # Given a run in each flow-control state, and a pending one
    runs = {status: _run(status) for status in FLOW_STATES}
    _run(RunStatus.PENDING)

    # When the list is filtered by each state
    page = _page(admin_client, RUNS)
    for status in FLOW_STATES:
        # Then the sidebar offers it, and the list holds that state's run only
        assert f"?status__exact={status}" in page
        assert _listed(admin_client, {"status__exact": status}) == {runs[status].pk}


# The flow-control states, and those of durable steps (sleeping, waiting).
@pytest.mark.parametrize("status", [*FLOW_STATES, RunStatus.SLEEPING, RunStatus.WAITING])
def test_status_filter_is_served_by_an_index(admin_client, db, status):
    # Given runs in the state asked for
    _run(status)

    # When the list's query for that state is planned with table scans discouraged
    queryset = admin_client.get(RUNS, {"status__exact": status}).context["cl"].queryset
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL enable_seqscan = off")
        plan = queryset.explain()

    # Then the (status, -created_at) index answers it, in the list's order
    assert "django_events_run_status" in plan, plan


def test_list_shows_why_and_when_due_escaped(admin_client, db):
    # Given a throttled run whose reason holds HTML
    due = timezone.now() + dt.timedelta(minutes=3)
    _run(RunStatus.THROTTLED, reason=f"throttled until 12:03:04 {SCRIPT}", due_at=due)

    # When the list is opened
    page = _page(admin_client, RUNS)

    # Then the reason shows escaped, with the run's turn
    assert f"throttled until 12:03:04 {ESCAPED}" in page
    assert SCRIPT not in page
    assert timezone.localtime(due).strftime("%Y-%m-%d %H:%M:%S") in page


def test_event_name_filter_offers_names_not_patterns_and_the_cron_tick(admin_client, db, cron_function):
    # Given a cron function (and the test app's functions, one of them on a pattern or not)
    # When the run list is opened
    response = admin_client.get(RUNS)

    # Then the event-name filter offers the tick's name and no wildcard pattern
    event_names = next(
        spec
        for spec in response.context["cl"].filter_specs
        if getattr(spec, "parameter_name", None) == "event_name"
    )
    offered = [value for value, _label in event_names.lookup_choices]
    assert CRON_EVENT in offered
    assert not [value for value in offered if "*" in value]


# -- a run's page ----------------------------------------------------------------------------------


def test_held_run_page_says_why_and_which_key_escaped(admin_client, db):
    # Given a key whose value holds HTML, two runs held on it and a slot in use (and one lease over)
    key = _key(key=f"user {SCRIPT}")
    reason = f"waiting for a concurrency slot (limit 1 for user_id {SCRIPT})"
    held = _run(RunStatus.HELD, held_on=key.pk, reason=reason)
    _run(RunStatus.HELD, held_on=key.pk, reason=reason)
    _slot(key)
    _slot(key, seconds=-1)

    # When the held run's page is opened
    page = _page(admin_client, _run_url(held))

    # Then it says why, which key it waits on, and how that key stands, all escaped
    assert f"waiting for a concurrency slot (limit 1 for user_id {ESCAPED})" in page
    assert f"<code>user {ESCAPED}</code> of tests.flow" in page
    assert "1 slot in use" in page
    assert "2 runs waiting" in page
    assert f"?status__exact=held&amp;held_on={key.pk}" in page
    assert SCRIPT not in page


def test_held_runs_of_a_key_are_listed_by_the_pages_link(admin_client, db):
    # Given runs held on two keys
    first, second = _key(key="1"), _key(key="2")
    on_first = {_run(RunStatus.HELD, held_on=first.pk).pk for _ in range(2)}
    _run(RunStatus.HELD, held_on=second.pk)

    # When the list is opened from the link of the first key
    listed = _listed(admin_client, {"status__exact": "held", "held_on": first.pk})

    # Then it holds that key's runs only
    assert listed == on_first


def test_held_run_whose_key_is_gone_says_so(admin_client, db):
    held = _run(RunStatus.HELD, held_on="f" * 64, reason="waiting for a concurrency slot (limit 2)")
    page = _page(admin_client, _run_url(held))
    assert f"Waits on the key {'f' * 64} (no longer stored)" in page


@pytest.mark.parametrize(
    ("verb", "text"), [("batched", "Batched into run"), ("debounced", "Debounced into run")]
)
def test_merged_run_links_to_the_run_that_handles_its_event(admin_client, db, verb, text):
    # Given a run that handles two events, and a run merged into it
    target = _run(RunStatus.SCHEDULED)
    merged = _run(RunStatus.SKIPPED, merged_into=target.pk, reason=f"{verb} into run {target.pk}")

    # When the merged run's page is opened
    page = _page(admin_client, _run_url(merged))

    # Then it says into which run, with a link to it and its status
    assert f"{verb} into run {target.pk}" in page
    assert re.search(rf'{text}\s*<a href="{_run_url(target)}">{target.pk}</a> \(scheduled\)', page)


def test_merged_run_whose_target_is_gone_says_so(admin_client, db):
    gone = uuid.uuid4()
    merged = _run(RunStatus.SKIPPED, merged_into=gone, reason="")
    page = _page(admin_client, _run_url(merged))
    assert re.search(rf"Merged into run\s*{gone} \(no longer stored\)", page)


def test_batch_run_lists_its_merged_runs_bounded_with_a_link_to_the_rest(
    admin_client, db, django_assert_max_num_queries
):
    # Given a batch run with more merged runs than the page lists
    batch = _run(RunStatus.SCHEDULED, reason="")
    extra = 7
    merged = [
        _run(
            RunStatus.SKIPPED,
            event=_event(f"test/item.{i}"),
            merged_into=batch.pk,
            reason=f"batched into run {batch.pk}",
        )
        for i in range(MERGED_SHOWN + extra)
    ]

    # When its page is opened
    with django_assert_max_num_queries(14):
        page = _page(admin_client, _run_url(batch))

    # Then it counts them all, lists the first ones in order, and links to the rest
    assert f"{MERGED_SHOWN + extra} runs\n  batched into this one." in page
    assert _run_url(merged[0]) in page
    assert _run_url(merged[MERGED_SHOWN - 1]) in page
    assert _run_url(merged[MERGED_SHOWN]) not in page
    assert f"and {extra} more" in page
    assert f"?merged_into={batch.pk}" in page
    # And the link lists them all
    response = admin_client.get(RUNS, {"merged_into": str(batch.pk)})
    assert response.context["cl"].result_count == MERGED_SHOWN + extra


def test_run_page_queries_stay_bounded_however_many_runs_are_merged(admin_client, db):
    # Given two batch runs, one with a few merged runs and one with many
    def batch_with(count: int) -> Run:
        batch = _run(RunStatus.SCHEDULED)
        event = _event()
        Run.objects.bulk_create(
            Run(
                event=event,
                event_name=event.name,
                function="tests.flow",
                status=RunStatus.SKIPPED,
                max_attempts=1,
                merged_into=batch.pk,
                reason=f"batched into run {batch.pk}",
            )
            for _ in range(count)
        )
        return batch

    small, large = batch_with(2), batch_with(MERGED_SHOWN * 3)

    # When each page is opened
    def queries(run: Run) -> int:
        with CaptureQueriesContext(connection) as captured:
            _page(admin_client, _run_url(run))
        return len(captured.captured_queries)

    # Then the large one costs one query more (the capped count of the rest), not one per run
    assert queries(large) <= queries(small) + 1


def test_a_malformed_merged_into_link_is_refused_not_a_server_error(admin_client, db):
    response = admin_client.get(RUNS, {"merged_into": "not-a-uuid"})
    assert response.status_code in (200, 302)


def test_cancelled_run_links_to_the_cancelling_event(admin_client, db):
    # Given an event that cancelled a run
    cancelling = _event("test/flow.cancelled")
    run = _run(
        RunStatus.CANCELLED,
        cancelled_by=cancelling.pk,
        reason=f"cancelled by event {cancelling.name} {cancelling.pk}",
    )

    # When the run's page is opened
    page = _page(admin_client, _run_url(run))

    # Then it says so, with a link to that event
    assert f"cancelled by event test/flow.cancelled {cancelling.pk}" in page
    assert f'<a href="{_event_url(cancelling)}">test/flow.cancelled</a>' in page


def test_run_cancelled_by_a_start_timeout_says_why(admin_client, db):
    run = _run(RunStatus.CANCELLED, reason="cancelled: not started within 30 s (Timeouts.start)")
    page = _page(admin_client, _run_url(run))
    assert "cancelled: not started within 30 s (Timeouts.start)" in page
    assert "Cancelled by event" not in page


def test_priority_shows_only_when_the_run_has_one(admin_client, db):
    with_priority = _run(RunStatus.SCHEDULED, priority=-5)
    without = _run(RunStatus.SCHEDULED)
    assert "field-priority" in _page(admin_client, _run_url(with_priority))
    assert ">-5<" in _page(admin_client, _run_url(with_priority))
    assert "field-priority" not in _page(admin_client, _run_url(without))


def test_a_plain_run_shows_no_flow_fields(admin_client, db):
    page = _page(admin_client, _run_url(_run(RunStatus.PENDING)))
    for field in ("field-why", "field-priority", "field-merged_runs"):
        assert field not in page


def test_a_reason_left_from_a_state_the_run_has_left_is_not_shown(admin_client, db):
    # Given a run that was skipped, then retried: it runs now
    target = _run(RunStatus.SCHEDULED)
    run = _run(RunStatus.RUNNING, reason=f"debounced into run {target.pk}", merged_into=target.pk)

    # When its page is opened, Then it does not say it was merged
    page = _page(admin_client, _run_url(run))
    assert "field-why" not in page
    assert "Debounced into run" not in page


# -- actions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [RunStatus.SCHEDULED, RunStatus.THROTTLED, RunStatus.HELD])
def test_cancel_stops_a_run_not_started_in_each_new_state(admin_client, db, status):
    # Given a run waiting in a flow-control state
    run = _run(status, held_on=_key().pk if status == RunStatus.HELD else "")
    assert 'id="de-cancel"' in _page(admin_client, _run_url(run))

    # When it is cancelled from its page
    response = admin_client.post(reverse("admin:django_events_run_cancel", args=[run.pk]), follow=True)

    # Then it is cancelled
    assert "1 run cancelled." in response.content.decode()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED


def test_bulk_cancel_reports_running_and_ended_runs_as_skipped(admin_client, db):
    selected = [_run(status).pk for status in (*FLOW_STATES, RunStatus.RUNNING)]
    response = admin_client.post(
        RUNS, {"action": "cancel_selected", "_selected_action": [str(pk) for pk in selected]}, follow=True
    )
    assert "3 runs cancelled; 2 skipped (running or ended)." in response.content.decode()
    assert Run.objects.filter(status=RunStatus.CANCELLED).count() == 3


def test_retry_sends_a_skipped_run_back_to_pending(admin_client, db):
    # Given a run skipped by a rate limit
    run = _run(RunStatus.SKIPPED, reason="skipped: rate limit 1 per 4 h for company 7")
    assert 'id="de-retry"' in _page(admin_client, _run_url(run))

    # When it is retried
    response = admin_client.post(reverse("admin:django_events_run_retry", args=[run.pk]), follow=True)

    # Then it is pending again
    assert "1 run retried." in response.content.decode()
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING


@pytest.mark.parametrize("status", [RunStatus.HELD, RunStatus.SCHEDULED, RunStatus.THROTTLED])
def test_retry_never_jumps_a_waiting_run_ahead_of_flow_control(admin_client, db, status):
    # Given a run waiting for a slot, its time or its turn (the state machine lets some go to pending,
    # but only flow control may move them there)
    run = _run(status, held_on=_key().pk if status == RunStatus.HELD else "")
    assert 'id="de-retry"' not in _page(admin_client, _run_url(run))

    # When the operator asks to retry it
    response = admin_client.post(
        RUNS, {"action": "retry_selected", "_selected_action": [str(run.pk)]}, follow=True
    )
    admin_client.post(reverse("admin:django_events_run_retry", args=[run.pk]))

    # Then it is left waiting
    assert "0 runs retried; 1 skipped" in response.content.decode()
    run.refresh_from_db()
    assert run.status == status


# -- an event's page -----------------------------------------------------------------------------


def test_event_page_says_which_functions_filtered_it_out_escaped(admin_client, db):
    # Given an event two functions filtered out, one of them with HTML in why
    event = _event(
        "test/flow.filtered",
        skipped_by={"tests.b": f"if_ raised ValueError: {SCRIPT}", "tests.a": "if_ returned False"},
    )

    # When its page and the event list are opened
    page = _page(admin_client, _event_url(event))
    listed = _page(admin_client, EVENTS)

    # Then the page lists each function and why, escaped, and the list says it was filtered out
    assert "Why didn&#x27;t it run?" in page
    assert re.search(r"<td>tests.a</td><td>if_ returned False</td>\s*</tr>\s*<tr><td>tests.b</td>", page)
    assert f"if_ raised ValueError: {ESCAPED}" in page
    assert SCRIPT not in page
    assert "No run: every function subscribed to it filtered it out" in page
    assert "filtered out by 2 functions" in listed


@pytest.mark.skipif(connection.vendor != "sqlite", reason="only SQLite's JSON holds a lone surrogate")
def test_event_page_shows_a_lone_surrogate_in_why_as_its_escape(admin_client, db):
    # Given a reason no UTF-8 page can hold as it is
    event = _event("test/flow.odd", skipped_by={"tests.a": "if_ raised: \ud800"})

    # When the event's page is opened, Then it shows, escaped
    assert "if_ raised: \\ud800" in _page(admin_client, _event_url(event))


def test_event_page_says_when_no_function_was_subscribed(admin_client, db):
    event = _event("nobody/listens")
    page = _page(admin_client, _event_url(event))
    assert "No function was subscribed to nobody/listens when it was sent." in page
    assert "field-skipped_list" not in page


def test_event_page_shows_why_each_run_waits_or_was_skipped(admin_client, db):
    # Given an event with a throttled run and a skipped one, and a function that filtered it out
    event = _event("test/flow.mixed", skipped_by={"tests.c": "if_ returned False"})
    _run(RunStatus.THROTTLED, function="tests.a", event=event, reason=f"throttled until 12:03:04 {SCRIPT}")
    _run(
        RunStatus.SKIPPED,
        function="tests.b",
        event=event,
        reason="skipped: rate limit 1 per 4 h for company 7",
    )

    # When its page is opened
    page = _page(admin_client, _event_url(event))

    # Then each run says why, and the filtering function is listed too
    assert f"throttled until 12:03:04 {ESCAPED}" in page
    assert "skipped: rate limit 1 per 4 h for company 7" in page
    assert "<td>tests.c</td><td>if_ returned False</td>" in page
    assert "No function was subscribed" not in page


# -- the overview ----------------------------------------------------------------------------------


@pytest.fixture
def waiting(db: None) -> dict[str, Any]:
    """Waiting work: tests.a has 3 scheduled and 2 throttled runs; tests.b has 4 runs held on key k1
    (with HTML in its value), 1 on k2, and 2 slots in use on k1 (and 1 whose lease is over)."""
    soon = timezone.now() + dt.timedelta(minutes=1)
    for minutes in (1, 2, 3):
        _run(RunStatus.SCHEDULED, function="tests.a", due_at=soon + dt.timedelta(minutes=minutes))
    for _ in range(2):
        _run(RunStatus.THROTTLED, function="tests.a", due_at=soon)
    k1, k2 = _key("tests.b", f"k1 {SCRIPT}"), _key("tests.b", "k2")
    for _ in range(4):
        _run(RunStatus.HELD, function="tests.b", held_on=k1.pk)
    _run(RunStatus.HELD, function="tests.b", held_on=k2.pk)
    _slot(k1)
    _slot(k1)
    _slot(k1, seconds=-5)
    # Work that does not wait: counted in the windows, not here
    _run(RunStatus.SUCCEEDED, function="tests.a")
    _run(RunStatus.SKIPPED, function="tests.b")
    return {"k1": k1, "k2": k2, "soon": soon}


def test_overview_counts_waiting_work_per_function(admin_client, waiting):
    response = admin_client.get(OVERVIEW)
    rows = {row.function: row for row in response.context["waiting"]["functions"]}
    assert set(rows) == {"tests.a", "tests.b"}
    a, b = rows["tests.a"], rows["tests.b"]
    assert (a.scheduled, a.throttled, a.held, a.slots) == (3, 2, 0, 0)
    assert (b.scheduled, b.throttled, b.held, b.slots) == (0, 0, 5, 2)
    assert a.next_due == waiting["soon"]
    assert b.next_due is None
    page = response.content.decode()
    assert "?status__exact=held&amp;function=tests.b" in page


def test_overview_counts_held_runs_and_slots_per_key_escaped(admin_client, waiting):
    response = admin_client.get(OVERVIEW)
    held = [(item.flow_key_id, item.count) for item in response.context["waiting"]["held_keys"]]
    slots = [(item.flow_key_id, item.count) for item in response.context["waiting"]["slot_keys"]]
    assert held == [(waiting["k1"].pk, 4), (waiting["k2"].pk, 1)]
    assert slots == [(waiting["k1"].pk, 2)]
    page = response.content.decode()
    assert f"k1 {ESCAPED}" in page
    assert SCRIPT not in page
    assert f"?status__exact=held&amp;held_on={waiting['k1'].pk}" in page


def test_overview_lists_the_busiest_keys_only(admin_client, db):
    # Given more keys with held runs than the overview lists, one of them busier than the rest
    keys = [_key(key=str(i)) for i in range(TOP_KEYS + 5)]
    event = _event()
    Run.objects.bulk_create(
        Run(
            event=event,
            event_name=event.name,
            function="tests.flow",
            status=RunStatus.HELD,
            max_attempts=1,
            held_on=key.pk,
        )
        for key in keys
    )
    _run(RunStatus.HELD, held_on=keys[-1].pk)

    # When the overview is opened
    held = admin_client.get(OVERVIEW).context["waiting"]["held_keys"]

    # Then it lists TOP_KEYS keys, the busiest first, and the function's total counts them all
    assert len(held) == TOP_KEYS
    assert (held[0].flow_key_id, held[0].count) == (keys[-1].pk, 2)
    rows = admin_client.get(OVERVIEW).context["waiting"]["functions"]
    assert [(row.function, row.held) for row in rows] == [("tests.flow", TOP_KEYS + 6)]


def test_overview_queries_do_not_grow_with_the_waiting_work(admin_client, waiting):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            _page(admin_client, OVERVIEW)
        return len(captured.captured_queries)

    before = queries()
    for i in range(40):
        key = _key("tests.c", f"more {i}")
        _run(RunStatus.HELD, function="tests.c", held_on=key.pk)
        _run(RunStatus.SCHEDULED, function=f"tests.d{i}")
        _slot(key)
    assert queries() == before


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner")
def test_overview_and_flow_pages_read_runs_through_indexes_only(admin_client, waiting):
    # Given the overview's and a held run's queries, as they ran
    held = Run.objects.filter(status=RunStatus.HELD).first()
    assert held is not None
    with CaptureQueriesContext(connection) as captured:
        _page(admin_client, OVERVIEW)
        _page(admin_client, _run_url(held))
    statements = [q["sql"] for q in captured.captured_queries if "django_events_" in q["sql"]]
    assert statements

    # When each is planned with table scans discouraged
    # Then none has to read a whole table of runs, slots or keys: an index serves each
    assert seq_scans(statements, "django_events_") == []


def test_overview_says_when_nothing_waits(admin_client, db):
    page = _page(admin_client, OVERVIEW)
    assert "No run is scheduled, throttled or held, and no concurrency slot is in use." in page


# -- cron ------------------------------------------------------------------------------------------


def test_overview_shows_each_cron_functions_next_tick_and_its_run(admin_client, db, cron_function):
    # Given a worker's pass made the cron function's next tick ahead of its time
    (tick,) = [tick for tick in cron.schedule(now=timezone.now()) if tick.function == cron_function]
    run = Run.objects.get(pk=tick.run_id)
    assert (run.status, run.event_name) == (RunStatus.SCHEDULED, CRON_EVENT)

    # When the overview is opened
    response = admin_client.get(OVERVIEW)

    # Then it shows the function's schedule, its zone, its next tick in that zone, and a link to the run
    (item,) = [item for item in response.context["cron"] if item.function == cron_function]
    assert item.at == run.due_at
    assert item.run is not None
    assert item.run.pk == run.pk
    page = response.content.decode()
    assert "<code>0 9 * * MON</code>, <code>30 17 * * FRI</code>" in page
    assert "Europe/Paris" in page
    paris = run.due_at.astimezone(zoneinfo.ZoneInfo("Europe/Paris"))
    assert f"{paris:%Y-%m-%d %H:%M:%S} {paris.tzname()}" in page
    assert f'<a href="{_run_url(run)}">scheduled</a>' in page


def test_overview_says_when_a_next_tick_is_not_made_yet(admin_client, db, cron_function):
    # Given no worker has made the cron function's ticks yet
    # When the overview is opened
    response = admin_client.get(OVERVIEW)

    # Then its next time is shown, with no run yet
    (item,) = [item for item in response.context["cron"] if item.function == cron_function]
    assert item.at is not None
    assert item.run is None
    assert "not made yet: a worker makes it ahead of its time" in response.content.decode()


def test_paginator_cap_bounds_the_held_count_on_a_runs_page(admin_client, db, monkeypatch):
    # Given more runs held on a key than the paginator counts
    monkeypatch.setattr(CappedCountPaginator, "cap", 3)
    key = _key()
    runs = [_run(RunStatus.HELD, held_on=key.pk) for _ in range(6)]

    # When one's page is opened, Then the count stops at the cap, and says so
    assert "more than 3 runs waiting" in _page(admin_client, _run_url(runs[0]))


def test_slots_count_by_django_events_clock_as_the_workers_do(admin_client, db):
    # Given a slot whose lease ends in a minute, and a test clock moved two minutes ahead
    key = _key()
    _slot(key, seconds=60)
    held = _run(RunStatus.HELD, held_on=key.pk)
    clock.set_offset(dt.timedelta(minutes=2))
    try:
        # When the overview and the held run's page are opened
        waiting = admin_client.get(OVERVIEW).context["waiting"]
        page = _page(admin_client, _run_url(held))
    finally:
        clock.set_offset(dt.timedelta(0))

    # Then the slot no longer counts, as it no longer does for the workers
    assert waiting["slot_keys"] == []
    assert "0 slots in use" in page
