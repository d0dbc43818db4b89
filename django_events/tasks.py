"""The Dramatiq actor that executes runs, and the helper that sends its messages.

``rundramatiq`` imports this module in every worker (django-dramatiq discovers
each installed app's ``tasks`` module), and the app config imports it at startup
so that web processes can send. A message carries only run ids: one, or a fan-out's
(``enqueue_group``), which the worker splits.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.errors import ActorNotFound

from .conf import get_settings
from .execution import execute_run, lease_for_time_limit
from .registry import get_function

logger = logging.getLogger("django_events")

__all__ = [
    "ACTOR_NAME",
    "GROUP_SIZE",
    "MAX_DELAY_SECONDS",
    "enqueue_group",
    "enqueue_run",
    "enqueue_runs",
    "get_actor",
]

#: The name of the actor every run message is sent to.
ACTOR_NAME = "django_events.execute_run"
#: Most runs one message of :func:`enqueue_group` carries.
GROUP_SIZE = 100
#: Longest delay given to the broker (Redis refuses 7 days or more). A run due
#: later gets a message that arrives early and is sent again for the remainder.
MAX_DELAY_SECONDS = 6 * 24 * 3600


def _execute(*args: Any, **kwargs: Any) -> None:
    if not args or kwargs:
        # Not one of ours: retrying it would not help. Drop it.
        logger.warning("Dropped a malformed run message: args=%r kwargs=%r.", args, kwargs)
        return
    from .middleware import current_message

    if len(args) > 1:
        # One commit's runs in one message: give each of the others a message of its own, so that
        # they run in parallel, then run the first here. If sending fails, nothing has run yet and
        # Dramatiq retries the whole message.
        _send_separately(args[1:])
    # The message's time limit is the one Dramatiq enforces: the lease follows from it, so the
    # run can be claimed and read in one statement.
    message = current_message()
    lease = None if message is None else lease_for_time_limit(message.options.get("time_limit"))
    execute_run(args[0], lease=lease)


def _send_separately(run_ids: Sequence[Any]) -> None:
    from .models import Run

    ids = []
    for run_id in run_ids:
        try:
            ids.append(uuid.UUID(str(run_id)))
        except ValueError:
            logger.warning("Dropped a message for run %r: not a run id.", run_id)
    functions = dict(Run.objects.filter(pk__in=ids).values_list("pk", "function"))
    for run_id in ids:
        if run_id not in functions:
            logger.warning("Dropped a message for run %s: no such run.", run_id)
    enqueue_runs([(run_id, functions[run_id]) for run_id in ids if run_id in functions])


_declare_lock = threading.Lock()


def get_actor(broker: dramatiq.Broker | None = None) -> dramatiq.Actor[[str], None]:
    """The run actor on ``broker`` (default: the global broker), declared there if need be."""
    broker = broker or dramatiq.get_broker()
    try:
        return broker.get_actor(ACTOR_NAME)
    except ActorNotFound:
        pass
    with _declare_lock:
        try:
            return broker.get_actor(ACTOR_NAME)
        except ActorNotFound:
            pass
        options: dict[str, Any] = {}
        # Function failures are caught and retried from the ledger. The actor itself
        # only raises when infrastructure fails (the database is unreachable, say):
        # then let Dramatiq's Retries middleware send the message again.
        if {"max_retries", "min_backoff", "max_backoff"} <= broker.actor_options:
            options.update(max_retries=20, min_backoff=500, max_backoff=60_000)
        declare = dramatiq.actor(
            actor_name=ACTOR_NAME, queue_name=get_settings().QUEUE_NAME, broker=broker, **options
        )
        return declare(_execute)


def enqueue_run(run_id: Any, function_id: str, *, delay: float | None = None) -> None:
    """Send the message that executes run ``run_id``, after ``delay`` seconds if given."""
    enqueue_runs([(run_id, function_id)], delay=delay)


def enqueue_runs(refs: Sequence[tuple[Any, str]], *, delay: float | None = None) -> None:
    """Send the messages of runs ``(run id, function id)``, after ``delay`` seconds if given.

    With a broker that has ``enqueue_many`` (``DatabaseBroker``) they go in one
    statement; otherwise one by one, in order (a failure stops the rest).
    """
    actor = get_actor()
    delay_ms = None
    if delay is not None and delay > 0:
        delay_ms = int(min(delay, MAX_DELAY_SECONDS) * 1000)
    messages = [actor.message_with_options(args=(str(pk),), **_options(function)) for pk, function in refs]
    enqueue_many = getattr(actor.broker, "enqueue_many", None)
    if enqueue_many is not None:
        enqueue_many(messages, delay=delay_ms)
        return
    for message in messages:
        actor.broker.enqueue(message, delay=delay_ms)


def enqueue_group(refs: Sequence[tuple[Any, str]]) -> None:
    """Send one message for several runs ``(run id, function id)`` due now (at most ``GROUP_SIZE``).

    The worker that receives it sends each run after the first a message of its
    own and executes the first: the sender pays for one message, whatever the
    fan-out. The message carries only the runs' ids, and the first run's options.
    """
    if not refs or len(refs) > GROUP_SIZE:
        raise ValueError(f"enqueue_group() takes 1 to {GROUP_SIZE} runs, not {len(refs)}.")
    actor = get_actor()
    first_function = refs[0][1]
    actor.send_with_options(args=tuple(str(pk) for pk, _function in refs), **_options(first_function))


def _options(function_id: str) -> dict[str, Any]:
    """The message options of a run of ``function_id``: its time limit, which Dramatiq enforces."""
    spec = get_function(function_id)
    time_limit = spec.time_limit_ms() if spec is not None else get_settings().default_time_limit_ms
    return {} if time_limit is None else {"time_limit": time_limit}


# Declare the actor on the configured broker as soon as a worker imports this module.
get_actor()
