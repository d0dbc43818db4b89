"""Recovery tells a lost message from one still queued behind a backlog, on each broker.

No worker runs: the messages the tests send stay in the real queue (the database
broker's table, Redis, RabbitMQ), and the runs are made older than the grace period
(60 s) by moving their times back, as a long backlog would leave them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import dramatiq
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

import django_events
from django_events import dispatch, ledger
from django_events.broker import DatabaseBroker
from django_events.models import Event, QueuedMessage, Run, RunStatus
from django_events.recovery import COUNTED_MISSING, OVERTAKEN, QUEUE_EMPTY, recover
from tests.conftest import wait_for


def _queued(broker: dramatiq.Broker) -> int:
    """Run messages in the queue and its delay queue, as the broker's own tools count them."""
    queue = dispatch.run_queue(broker)
    if isinstance(broker, DatabaseBroker):
        return QueuedMessage.objects.in_queue(queue).pending().count()
    if isinstance(broker, RedisBroker):
        return int(broker.do_qsize(queue))  # no consumer here: nothing is counted twice
    assert isinstance(broker, RabbitmqBroker)
    ready, delayed, _dead = broker.get_queue_message_counts(queue)
    return ready + delayed


def _queue_holds(broker: dramatiq.Broker, count: int) -> None:
    """Wait until the queue counts ``count`` messages (RabbitMQ counts one a moment after its publish)."""

    def holds() -> bool:
        """the queue counts the messages expected"""
        return _queued(broker) == count

    wait_for(holds, timeout=10)


def _sent(count: int) -> list[Run]:
    """Runs of ``count`` events sent as an application sends them: each message is in the queue."""
    return [Run.objects.get(event=django_events.send("test/ok", {"i": i})) for i in range(count)]


def _without_message(count: int) -> list[Run]:
    """Runs committed whose message never reached the broker (the process died before the enqueue)."""
    now = timezone.now()
    events = [Event(name="test/ok", data={"lost": i}, created_at=now) for i in range(count)]
    runs = [run for event in events for run in ledger.new_runs(event, now)]
    with transaction.atomic():
        ledger.insert(events, runs, "default")
    return runs


def _age(runs: Sequence[Run], seconds: float) -> None:
    """Move the runs' send time back: as if they had been sent ``seconds`` ago."""
    delta = dt.timedelta(seconds=seconds)
    Run.objects.filter(pk__in=[run.pk for run in runs]).update(
        due_at=F("due_at") - delta, created_at=F("created_at") - delta
    )


def _ids(runs: Sequence[Run]) -> list[object]:
    return [run.pk for run in runs]


def _requeued_ids(report: object) -> list[object]:
    return [pk for pk, _function, _status in report.requeued]  # type: ignore[attr-defined]


def test_backlog_still_queued_past_the_grace_period_is_not_sent_again(broker: dramatiq.Broker) -> None:
    # Given 30 runs sent two minutes ago whose messages still wait in the queue (no worker runs)
    runs = _sent(30)
    _age(runs, 120)
    due = dict(Run.objects.values_list("pk", "due_at"))
    _queue_holds(broker, 30)

    # When recovery passes, twice
    first, second = recover(), recover()

    # Then it sends none of them again: the queue holds a message for each
    assert first.requeued == second.requeued == []
    assert first.reason == COUNTED_MISSING
    _queue_holds(broker, 30)
    assert dict(Run.objects.values_list("pk", "due_at")) == due


def test_runs_whose_messages_were_lost_are_sent_again(broker: dramatiq.Broker) -> None:
    # Given 10 runs whose queued messages were lost (the queue flushed), and 2 that never had one
    flushed = _sent(10)
    broker.flush(dispatch.run_queue(broker))
    never = _without_message(2)
    _age([*flushed, *never], 120)
    _queue_holds(broker, 0)

    # When recovery passes
    report = recover()

    # Then every one of them is sent again, once
    assert sorted(_requeued_ids(report)) == sorted(_ids([*flushed, *never]))
    assert report.reason == QUEUE_EMPTY
    _queue_holds(broker, 12)
    assert recover().requeued == []


def test_partly_lost_backlog_gets_exactly_the_lost_runs_sent_again(broker: dramatiq.Broker) -> None:
    # Given a backlog: 5 runs whose messages were lost five minutes ago, then 20 runs whose
    # messages still wait in the queue, sent two minutes ago
    lost = _without_message(5)
    _age(lost, 300)
    queued = _sent(20)
    _age(queued, 120)
    due = dict(Run.objects.values_list("pk", "due_at"))
    _queue_holds(broker, 20)

    # When recovery passes dry (it reports, and changes and sends nothing)
    dry = recover(dry_run=True)

    # Then it names the lost ones, oldest first: the queue counts 20 messages for 25 runs
    assert _requeued_ids(dry) == _ids(sorted(lost, key=lambda run: run.due_at))
    assert dry.reason == COUNTED_MISSING
    assert dict(Run.objects.values_list("pk", "due_at")) == due
    _queue_holds(broker, 20)

    # When it passes for real, twice
    first, second = recover(), recover()

    # Then exactly the lost ones are sent again, once
    assert _requeued_ids(first) == _requeued_ids(dry)
    assert second.requeued == []
    _queue_holds(broker, 25)


def test_a_run_overtaken_by_a_later_run_that_started_is_sent_again(broker: dramatiq.Broker) -> None:
    # Given a run whose message was lost five minutes ago; a fan-out sent then too, whose first
    # run a worker took (it sent the other two runs messages of their own, at the back of the
    # queue); and ten runs sent two minutes ago, whose messages wait in the queue
    [lost] = _without_message(1)
    fanout = list(Run.objects.filter(event=django_events.send("test/fanout")).order_by("function"))
    _age([lost, *fanout], 300)
    queued = _sent(10)
    _age(queued, 120)
    # And a worker has started the first of the ten (the first attempt, from its only message)
    now = timezone.now()
    for run in (fanout[0], queued[0]):
        assert ledger.claim(run.pk, using="default", now=now, lease_until=now + dt.timedelta(minutes=5))
    # (the database broker gives each run of a fan-out a message, in the transaction that sends it)
    _queue_holds(broker, 13 if isinstance(broker, DatabaseBroker) else 11)

    # When recovery passes
    report = recover()

    # Then the run sent more than the grace period before the started one is sent again: its
    # message would have left the queue before; the queued ones and the fan-out's rest are left
    assert _requeued_ids(report) == [lost.pk]
    assert report.reason == OVERTAKEN
    assert Run.objects.get(pk=fanout[1].pk).due_at == Run.objects.get(pk=fanout[2].pk).due_at < now


def test_a_retry_waiting_in_the_delay_queue_neither_is_sent_again_nor_hides_a_lost_run(
    broker: dramatiq.Broker,
) -> None:
    # Given ten runs queued two minutes ago, a run whose message was lost five minutes ago, and a
    # retrying run due in an hour whose delayed message waits in the delay queue
    queued = _sent(10)
    _age(queued, 120)
    [lost] = _without_message(1)
    _age([lost], 300)
    [retrying] = _without_message(1)
    due = timezone.now() + dt.timedelta(hours=1)
    Run.objects.filter(pk=retrying.pk).update(status=RunStatus.RETRYING, attempts=1, due_at=due)
    dispatch.send_now([(retrying.pk, retrying.function)], delay=3600)
    _queue_holds(broker, 11)

    # When recovery passes
    report = recover()

    # Then only the lost run is sent again: the retry is not overdue, and its delayed message does
    # not stand for the lost run's in the count
    assert _requeued_ids(report) == [lost.pk]
    assert report.reason == COUNTED_MISSING
    assert Run.objects.get(pk=retrying.pk).due_at == due
    _queue_holds(broker, 12)


def test_runs_whose_messages_are_on_their_way_do_not_make_queued_runs_look_lost(
    broker: dramatiq.Broker,
) -> None:
    # Given a backlog of 20 runs queued two minutes ago, and 5 runs just committed whose messages
    # are not in the queue yet (a commit's enqueue is under way)
    queued = _sent(20)
    _age(queued, 120)
    _without_message(5)
    _queue_holds(broker, 20)

    # When recovery passes
    report = recover()

    # Then nothing is sent again: only overdue runs are set against the queue's messages
    assert report.requeued == []
    assert report.reason == COUNTED_MISSING
    _queue_holds(broker, 20)
