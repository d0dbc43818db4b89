"""Sending run messages: now, once the transaction commits, or inside it with ``DatabaseBroker``.

Every message django-events sends goes through this module. A message carries
only run ids, as the one argument of the actor ``ACTOR_NAME`` (``tasks.py``), or
several for a fan-out (:func:`send_group`), which the worker splits. Its options
hold the function's time limit, which Dramatiq enforces and from which the worker
derives the run's lease.

* :func:`send_now`: the messages of some runs, at once, optionally delayed.
* :func:`send_group`: one message for up to ``GROUP_SIZE`` runs due now.
* :func:`send_with_transaction`: the messages of runs written in the current
  transaction, sent if, and only if, it commits: inside it with a broker that
  writes to the same database (``DatabaseBroker``), else from ``on_commit``.

The messages are built here, not through the actor object, so that sending
needs nothing of the worker's code (``tasks.py`` declares the actor and imports
``execution``; this module imports neither).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dramatiq
from django.db import transaction
from dramatiq.errors import ActorNotFound

from .broker import is_transactional
from .conf import get_settings
from .registry import time_limit_ms_for

__all__ = [
    "ACTOR_NAME",
    "FUNCTION_OPTION",
    "GROUP_SIZE",
    "MAX_DELAY_SECONDS",
    "RunRef",
    "run_queue",
    "send_group",
    "send_now",
    "send_with_transaction",
]

logger = logging.getLogger("django_events")

#: The name of the actor every run message is sent to.
ACTOR_NAME = "django_events.execute_run"
#: Most runs one message of :func:`send_group` carries.
GROUP_SIZE = 100
#: Longest delay given to the broker (Redis refuses 7 days or more). A run due
#: later gets a message that arrives early and is sent again for the remainder.
MAX_DELAY_SECONDS = 6 * 24 * 3600

#: A run as the sender knows it: ``(run id, function id)``.
RunRef = tuple[Any, str]


def _queue_name(broker: dramatiq.Broker) -> str:
    """The queue of run messages: the declared actor's (fixed at startup), else the setting."""
    try:
        return str(broker.get_actor(ACTOR_NAME).queue_name)
    except ActorNotFound:
        return get_settings().QUEUE_NAME


#: The message option that names the function of the message's (first) run: the worker knows,
#: before reading the run, whether flow control must admit it.
FUNCTION_OPTION = "django_events_function"


def _options(function_id: str) -> dict[str, Any]:
    """A run message's options: the time limit of ``function_id`` (which Dramatiq enforces), and its id."""
    time_limit = time_limit_ms_for(function_id)
    options: dict[str, Any] = {FUNCTION_OPTION: function_id}
    if time_limit is not None:
        options["time_limit"] = time_limit
    return options


def _message(broker: dramatiq.Broker, run_ids: Sequence[Any], function_id: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=_queue_name(broker),
        actor_name=ACTOR_NAME,
        args=tuple(str(pk) for pk in run_ids),
        kwargs={},
        options=_options(function_id),
    )


def send_now(refs: Sequence[RunRef], *, delay: float | None = None) -> None:
    """Send one message per run ``(run id, function id)``, deliverable after ``delay`` seconds if given.

    With a broker that has ``enqueue_many`` (``DatabaseBroker``) they go in one
    statement; otherwise one by one, in order (a failure stops the rest and raises).
    """
    if not refs:
        return
    broker = dramatiq.get_broker()
    delay_ms = None
    if delay is not None and delay > 0:
        delay_ms = int(min(delay, MAX_DELAY_SECONDS) * 1000)
    messages = [_message(broker, [pk], function_id) for pk, function_id in refs]
    enqueue_many = getattr(broker, "enqueue_many", None)
    if enqueue_many is not None:
        enqueue_many(messages, delay=delay_ms)
        return
    for message in messages:
        broker.enqueue(message, delay=delay_ms)


def send_group(refs: Sequence[RunRef]) -> None:
    """Send one message for several runs ``(run id, function id)`` due now (at most ``GROUP_SIZE``).

    The worker that receives it sends each run after the first a message of its
    own and executes the first: the sender pays for one message, whatever the
    fan-out. The message carries only the runs' ids, and the first run's options.
    """
    if not refs or len(refs) > GROUP_SIZE:
        raise ValueError(f"send_group() takes 1 to {GROUP_SIZE} runs, not {len(refs)}.")
    broker = dramatiq.get_broker()
    broker.enqueue(_message(broker, [pk for pk, _function in refs], refs[0][1]))


def send_with_transaction(
    refs: Sequence[RunRef], using: str, *, delay: float | None = None, group: bool = False
) -> None:
    """Send the messages of runs ``(run id, function id)`` if, and only if, the transaction commits.

    With a broker that writes to database ``using`` itself (``DatabaseBroker``),
    the messages are written now, in the current transaction: they commit or roll
    back with the runs, and there is no moment between the commit and the enqueue.
    A failure to write them is a database error like any other and fails the
    transaction, so nothing is half-stored.

    With any other broker they are sent once the transaction commits (at once
    outside a transaction); a broker failure then is logged, never raised: the
    runs stay in the database and recovery sends them later.

    ``delay``: seconds before the messages may be delivered (a retry's backoff).
    ``group``: with a broker that is not transactional, send the runs (one event's
    fan-out) up to ``GROUP_SIZE`` to a message, which the worker splits.
    """
    if not refs:
        return
    refs = list(refs)
    if is_transactional(dramatiq.get_broker(), using):
        send_now(refs, delay=delay)  # one statement with DatabaseBroker
    else:
        transaction.on_commit(lambda: _send_after_commit(refs, delay, group), using=using)


def _send_after_commit(refs: list[RunRef], delay: float | None, group: bool) -> None:
    # A fan-out's runs go GROUP_SIZE to a message (the worker sends each its own), so the request
    # pays for one message whatever the number of functions. Delayed ones go one by one.
    size = GROUP_SIZE if group and delay is None else 1
    for index in range(0, len(refs), size):
        chunk = refs[index : index + size]
        try:
            if len(chunk) > 1:
                send_group(chunk)
            else:
                send_now(chunk, delay=delay)
        except Exception:
            # The runs are committed and stay waiting in the database; recovery sends them later.
            # Stop at the first failure: a hung broker would cost its timeout for every message.
            run_id, function_id = chunk[0]
            logger.exception(
                "Could not enqueue run %s of %s (and %d more run(s) of this commit); they stay %s "
                "in the database until recovery sends them.",
                run_id,
                function_id,
                len(refs) - index - 1,
                "pending" if delay is None else "retrying",
            )
            return


def run_queue(broker: dramatiq.Broker | None = None) -> str:
    """The name of the queue that run messages go to on ``broker`` (default: the global broker).

    The queue of the run actor if it is declared there (the name is fixed when the
    worker starts), else ``QUEUE_NAME``. Recovery asks the broker how many messages
    wait in it (``recovery``).
    """
    return _queue_name(broker or dramatiq.get_broker())
