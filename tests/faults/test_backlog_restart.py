"""A backlog older than the grace period, then a Redis restart that loses it.

Recovery leaves runs alone whose messages still wait in the queue, however long they
have waited; a restart of Redis without persistence loses every queued message, and
recovery then sends every one of those runs again. Redis is private to the test (a
``redis-server`` on a free port, no persistence); the runs are in the test database.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import redis
from django.db.models import F
from django.utils import timezone
from dramatiq.brokers.redis import RedisBroker

import django_events
from django_events import dispatch
from django_events.models import Run, RunStatus
from django_events.recovery import COUNTED_MISSING, QUEUE_EMPTY, recover

from .harness import (
    RedisServer,
    Workers,
    check_ledger,
    django_counts,
    django_ledger,
    patience,
    report,
    scaled,
    settle,
    wait_until,
)

#: Recovery timings for the worker of the second scenario: a pass every quarter second, and a run
#: overdue one second after it was due, so that its backlog is many grace periods long.
SHORT_GRACE = {"RECOVERY_INTERVAL": 0.25, "RECOVERY_GRACE": 1.0, "LEASE_MARGIN": 1.0}


def _resent(log: str) -> int:
    """Runs the workers' recovery passes sent again, from their log lines (the plain ones)."""
    return sum(int(n) for n in re.findall(r"^Recovery: re-enqueued (\d+) overdue run", log, re.MULTILINE))


def test_queued_backlog_is_left_alone_and_all_of_it_sent_again_after_a_redis_restart_loses_it(
    transactional_db: None, redis_server: RedisServer, private_broker: RedisBroker
) -> None:
    # Given a backlog of events sent two minutes ago whose messages still wait in Redis (no worker)
    count = scaled(1000)
    django_events.send_many([{"name": "test/ok", "data": {"i": i}} for i in range(count)])
    two_minutes = dt.timedelta(minutes=2)
    Run.objects.update(due_at=F("due_at") - two_minutes, created_at=F("created_at") - two_minutes)
    queue = dispatch.run_queue(private_broker)
    assert private_broker.do_qsize(queue) == count

    # When recovery passes
    before = recover(limit=count)

    # Then it sends none of them again
    assert before.requeued == []
    assert before.reason == COUNTED_MISSING
    assert private_broker.do_qsize(queue) == count

    # When Redis restarts, empty, and recovery passes once the broker is connected again
    redis_server.restart()

    def reconnected() -> bool:
        """the broker's client reaches the restarted server"""
        try:
            return bool(private_broker.client.ping())
        except redis.ConnectionError:
            return False

    wait_until(reconnected, timeout=20, what="the broker reconnects")
    assert private_broker.do_qsize(queue) == 0
    after = recover(limit=count)

    # Then every run is sent again, once, and due again now
    assert after.reason == QUEUE_EMPTY
    assert len(after.requeued) == count
    assert {status for _pk, _function, status in after.requeued} == {RunStatus.PENDING}
    assert private_broker.do_qsize(queue) == count
    assert not Run.objects.filter(due_at__lt=timezone.now() - dt.timedelta(minutes=1)).exists()
    assert recover(limit=count).requeued == []


def test_a_worker_draining_a_long_backlog_sends_nothing_again_until_a_redis_restart_loses_the_queue(
    workers: Workers, redis_server: RedisServer, private_broker: RedisBroker
) -> None:
    # Given a backlog of events whose function takes 0.2 s, for one worker of four threads: about
    # ten seconds of work, ten times the grace period of one second
    count = scaled(1000)
    django_events.send_many([{"name": "faults/ok", "data": {"i": i, "sleep": 0.2}} for i in range(count)])
    workers.env["DJANGO_EVENTS_TEST_SETTINGS"] = json.dumps(SHORT_GRACE)

    # When the worker works through it
    workers.start(1)
    wait_until(
        lambda: django_counts()["succeeded"] >= count * 2 // 5,
        timeout=patience(120),
        what="two fifths succeeded",
        describe=workers.tail,
    )
    log_before = workers.log_text()

    # And Redis restarts (empty: every queued message is lost) when two fifths have succeeded
    redis_server.restart()
    waiting_after = Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.RETRYING]).count()

    # Then every run succeeds, once, through the worker's recovery
    settle(django_counts, total=count, timeout=patience(120), what="every run final")
    workers.assert_alive()
    figures = check_ledger(django_ledger(), ok_runs=count)
    resent_before = _resent(log_before)
    resent_after = _resent(workers.log_text()) - resent_before
    figures.update(
        waiting_after_restart=waiting_after, resent_before_restart=resent_before, resent_after=resent_after
    )
    report("backlog_then_redis_restart", figures)
    # And while the queue held the backlog, recovery sent nothing again, though every run waited
    # longer than the grace period
    assert resent_before == 0
    # And after the restart it sent again every run whose message was lost: all that were waiting,
    # but those the worker had already fetched (at most its prefetch, two per thread)
    assert resent_after >= waiting_after - 8
    assert figures["runs_succeeded"] == count
