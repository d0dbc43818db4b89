"""The Dramatiq actor that executes runs.

``rundramatiq`` imports this module in every worker (django-dramatiq discovers
each installed app's ``tasks`` module), and the app config declares the actor at
startup in every process. Messages are built and sent by ``dispatch``: they
carry only run ids, one, or a fan-out's, which the worker splits.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import CurrentMessage

from . import dispatch
from .conf import get_settings
from .dispatch import ACTOR_NAME
from .execution import execute_run
from .models import Run
from .registry import lease_for_time_limit
from .text import short_repr

logger = logging.getLogger("django_events")

__all__ = ["ACTOR_NAME", "get_actor"]


def _execute(*args: Any, **kwargs: Any) -> None:
    if not args or kwargs:
        # Not one of ours: retrying it would not help. Drop it.
        logger.warning(
            "Dropped a malformed run message: args=%s kwargs=%s.", short_repr(args), short_repr(kwargs)
        )
        return
    if len(args) > 1:
        # One commit's runs in one message: give each of the others a message of its own, so that
        # they run in parallel, then run the first here. If sending fails, nothing has run yet and
        # Dramatiq retries the whole message.
        _send_separately(args[1:])
    # The message's time limit is the one Dramatiq enforces: the lease follows from it, so the
    # run can be claimed and read in one statement.
    message = CurrentMessage.get_current_message()
    # (A time limit of 0 means Dramatiq's default to Dramatiq, as None does here.)
    lease = None if message is None else lease_for_time_limit(message.options.get("time_limit") or None)
    function_id = None if message is None else message.options.get(dispatch.FUNCTION_OPTION)
    execute_run(args[0], lease=lease, function_id=function_id if isinstance(function_id, str) else None)


def _send_separately(run_ids: Sequence[Any]) -> None:
    ids = []
    for run_id in run_ids:
        try:
            ids.append(uuid.UUID(str(run_id)))
        except ValueError:
            logger.warning("Dropped a message for run %s: not a run id.", short_repr(run_id))
    functions = dict(Run.objects.filter(pk__in=ids).values_list("pk", "function"))
    for run_id in ids:
        if run_id not in functions:
            logger.warning("Dropped a message for run %s: no such run.", run_id)
    dispatch.send_now([(run_id, functions[run_id]) for run_id in ids if run_id in functions])


_declare_lock = threading.Lock()


def get_actor(broker: dramatiq.Broker | None = None) -> dramatiq.Actor[..., None]:
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


# Declare the actor on the configured broker as soon as a worker imports this module.
get_actor()
