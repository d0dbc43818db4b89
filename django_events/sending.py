"""``send()`` and ``send_many()``: validate, store the event and its runs, enqueue them with the transaction.

Models are imported inside the functions: this module is imported by
``django_events/__init__.py``, which must load before the apps are ready.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, router, transaction
from django.utils import timezone

from .conf import get_settings
from .exceptions import EventValidationError
from .registry import MAX_NAME_LENGTH, functions_for, validate_event_name

if TYPE_CHECKING:
    from .models import Event, Run

__all__ = ["send", "send_many"]

logger = logging.getLogger("django_events")

# A JSON text holds a NUL character as the escape \u0000 (preceded by an even
# number of backslashes). PostgreSQL's jsonb refuses it, so we refuse it everywhere.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_ITEM_KEYS = frozenset({"name", "data", "id"})


@dataclass(frozen=True)
class _Outgoing:
    name: str
    data: dict[str, Any]
    key: str | None


def send(name: str, data: Mapping[str, Any] | None = None, *, id: str | None = None) -> Event:
    """Store an event and one run per subscribed function; enqueue the runs when the transaction commits.

    Args:
        name: the event's name, 1 to 255 characters without whitespace, such as ``"api/source.connected"``.
        data: a JSON object (a ``dict`` of JSON values); ``None`` stores ``{}``.
        id: an optional idempotency key. If an event with this key exists, it is
            returned and nothing new is stored or run.

    Inside ``transaction.atomic()`` the event and its runs are written in the
    caller's transaction: if it rolls back, nothing is stored and nothing runs.
    Outside one, they are committed before ``send`` returns.

    Returns:
        The stored ``Event`` (the earlier one, for a repeated ``id``).

    Raises:
        EventValidationError: bad name, data or id; nothing was stored.
    """
    return _store([_validate(name, data, id)])[0]


def send_many(events: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Send many events at once with bulk inserts; all are stored, or none.

    Args:
        events: mappings with the keys of :func:`send`'s arguments:
            ``{"name": ..., "data": ..., "id": ...}`` (``data`` and ``id`` optional).

    Returns:
        The stored events, in the order given.

    Raises:
        EventValidationError: any item is invalid; nothing was stored.
    """
    outgoing = []
    for index, item in enumerate(events):
        if not isinstance(item, Mapping):
            raise EventValidationError(
                f"send_many() takes mappings such as {{'name': ..., 'data': ...}}; item {index} is a "
                f"{type(item).__name__}."
            )
        unknown = set(item) - _ITEM_KEYS
        if unknown or "name" not in item:
            raise EventValidationError(
                f"Item {index} of send_many() must have a 'name' and may have 'data' and 'id'; "
                f"got the keys {sorted(map(str, item))}."
            )
        try:
            outgoing.append(_validate(item["name"], item.get("data"), item.get("id")))
        except EventValidationError as exc:
            raise EventValidationError(f"Item {index} of send_many(): {exc}") from exc
    if not outgoing:
        return []
    return _store(outgoing)


def _validate(name: object, data: object, key: object) -> _Outgoing:
    validate_event_name(name)
    assert isinstance(name, str)
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_NAME_LENGTH):
        raise EventValidationError(
            f"An event id must be a non-empty str of at most {MAX_NAME_LENGTH} characters, not {key!r}."
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EventValidationError(f"Event data must be a dict (a JSON object), not {type(data).__name__}.")
    try:
        text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EventValidationError(f"Event data for {name!r} is not JSON-serialisable: {exc}.") from exc
    if _NUL_ESCAPE.search(text):
        raise EventValidationError(f"Event data for {name!r} contains a NUL character (\\u0000).")
    size = len(text.encode("utf-8"))
    limit = get_settings().MAX_EVENT_BYTES
    if size > limit:
        raise EventValidationError(
            f"Event data for {name!r} is {size} bytes as JSON, over the limit of {limit} "
            "(DJANGO_EVENTS['MAX_EVENT_BYTES'])."
        )
    # Store what the function will read back: tuples become lists, keys strings.
    return _Outgoing(name=name, data=json.loads(text), key=key)


def _store(outgoing: list[_Outgoing]) -> list[Event]:
    from . import hotpath
    from .models import Event, Run

    using = router.db_for_write(Event)
    now = timezone.now()
    # No savepoint inside the caller's transaction: what is written here commits or rolls back
    # with it anyway, and the input was validated before. A database error here leaves the
    # caller's transaction to roll back, as any failed query does on PostgreSQL.
    with transaction.atomic(using=using, savepoint=False):
        by_key = _insert_events(outgoing, using, now)
        result: list[Event] = []
        runs: list[Run] = []
        for item in outgoing:
            event, is_new = by_key[item.key] if item.key is not None else (_new_event(item, now), True)
            if is_new:
                if item.key is not None:
                    by_key[item.key] = (event, False)  # a repeated id in one batch runs once
                runs.extend(new_runs(event, now))
            result.append(event)
        unkeyed = [event for item, event in zip(outgoing, result, strict=True) if item.key is None]
        if hotpath.supported(using):
            hotpath.insert(unkeyed, runs, using)  # one statement on PostgreSQL
        else:
            if unkeyed:
                Event.objects.using(using).bulk_create(unkeyed)
            if runs:
                Run.objects.using(using).bulk_create(runs)
        if runs:
            # One event's runs (a fan-out) go in one message; send_many keeps one message per run,
            # so that a bulk send does not hand its workers the enqueueing it saved.
            refs = [(run.pk, run.function) for run in runs]
            enqueue_with_transaction(refs, using, group=len(outgoing) == 1)
    return result


def new_runs(event: Event, now: dt.datetime) -> list[Run]:
    """Unsaved pending runs of ``event``, one per function subscribed to its name now."""
    from .models import Run

    return [
        Run(
            event=event,
            event_name=event.name,
            function=spec.id,
            max_attempts=spec.max_attempts(),
            due_at=now,
            created_at=now,
        )
        for spec in functions_for(event.name)
    ]


def enqueue_with_transaction(
    refs: list[tuple[Any, str]], using: str, *, delay: float | None = None, group: bool = False
) -> None:
    """Send the messages of runs ``(run id, function id)`` if, and only if, the transaction commits.

    With a broker that writes to database ``using`` itself (``DatabaseBroker``),
    the messages are written now, in the current transaction: they commit or roll
    back with the runs, and there is no moment between the commit and the enqueue.
    A failure to write them is a database error like any other and fails the
    transaction, so nothing is half-stored.

    With any other broker they are sent once the transaction commits; a broker
    failure then is logged, never raised: the runs stay in the database and
    recovery sends them later.

    ``delay``: seconds before the messages may be delivered (a retry's backoff).
    ``group``: with a broker that is not transactional, send the runs (one event's
    fan-out) up to ``tasks.GROUP_SIZE`` to a message, which the worker splits.
    """
    if not refs:
        return
    import dramatiq

    from .broker import is_transactional

    if is_transactional(dramatiq.get_broker(), using):
        from .tasks import enqueue_runs

        enqueue_runs(refs, delay=delay)  # one statement with DatabaseBroker
    else:
        transaction.on_commit(lambda: _enqueue_after_commit(refs, delay, group), using=using)


def _new_event(item: _Outgoing, now: Any) -> Event:
    from .models import Event

    return Event(name=item.name, data=item.data, idempotency_key=item.key, created_at=now)


def _insert_events(outgoing: list[_Outgoing], using: str, now: Any) -> dict[str, tuple[Event, bool]]:
    """Insert the events that carry an idempotency key; return ``key -> (event, inserted now)``.

    A key already stored, even by a concurrent transaction that commits while we
    insert, maps to the stored event. Events without a key are left to the caller.
    """
    from .models import Event

    keyed: dict[str, _Outgoing] = {}
    for item in outgoing:
        if item.key is not None:
            keyed.setdefault(item.key, item)  # the first of a repeated key wins
    found: dict[str, tuple[Event, bool]] = {}
    if not keyed:
        return found  # not even a query to compile
    for tries_left in range(4, -1, -1):
        for event in Event.objects.using(using).filter(idempotency_key__in=list(keyed)):
            assert event.idempotency_key is not None
            found[event.idempotency_key] = (event, False)
            del keyed[event.idempotency_key]
        if not keyed:
            break
        fresh = [_new_event(item, now) for item in keyed.values()]
        try:
            with transaction.atomic(using=using):
                Event.objects.using(using).bulk_create(fresh)
        except IntegrityError:
            # Another transaction stored one of these keys meanwhile: look again.
            if not tries_left:
                raise
            continue
        for event in fresh:
            assert event.idempotency_key is not None
            found[event.idempotency_key] = (event, True)
        break
    return found


def _enqueue_after_commit(refs: list[tuple[Any, str]], delay: float | None, group: bool) -> None:
    from .tasks import GROUP_SIZE, enqueue_group, enqueue_run

    # A fan-out's runs go GROUP_SIZE to a message (the worker sends each its own), so the request
    # pays for one message whatever the number of functions. Delayed ones go one by one.
    size = GROUP_SIZE if group and delay is None else 1
    for index in range(0, len(refs), size):
        chunk = refs[index : index + size]
        try:
            if len(chunk) > 1:
                enqueue_group(chunk)
            else:
                enqueue_run(*chunk[0], delay=delay)
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
