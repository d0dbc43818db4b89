"""``send()`` and ``send_many()``: validate, store the event and its runs (``ledger``), send their
messages with the transaction (``dispatch``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, router, transaction
from django.utils import timezone

from . import clock, dispatch, flow, ledger, registry, waits
from .conf import get_settings
from .exceptions import EventValidationError
from .models import Event, Run, RunStatus
from .names import MAX_NAME_LENGTH, validate_event_name
from .options import seconds
from .text import has_nul_escape, has_unstorable, short_repr

__all__ = ["send", "send_many"]

logger = logging.getLogger("django_events")

_ITEM_KEYS = frozenset({"name", "data", "id", "delay", "run_at"})


@dataclass(frozen=True)
class _Outgoing:
    name: str
    data: dict[str, Any]
    key: str | None
    due: dt.datetime | None = None


def send(
    name: str,
    data: Mapping[str, Any] | None = None,
    *,
    id: str | None = None,
    delay: float | dt.timedelta | None = None,
    run_at: dt.datetime | None = None,
) -> Event:
    """Store an event and one run per subscribed function; enqueue the runs when the transaction commits.

    Args:
        name: the event's name, 1 to 255 characters without whitespace, such as ``"api/source.connected"``.
        data: a JSON object (a ``dict`` of JSON values); ``None`` stores ``{}``.
        id: an optional idempotency key. If an event with this key exists, it is
            returned and nothing new is stored or run.
        delay: start the runs this many seconds (or this ``timedelta``) from now.
            They exist at once, ``scheduled`` (visible, cancellable).
        run_at: start the runs at this aware ``datetime`` instead (one in the past: now).

    Inside ``transaction.atomic()`` the event and its runs are written in the
    caller's transaction: if it rolls back, nothing is stored and nothing runs.
    Outside one, they are committed before ``send`` returns.

    Returns:
        The stored ``Event`` (the earlier one, for a repeated ``id``).

    Raises:
        EventValidationError: bad name, data or id; nothing was stored.
    """
    return _store([_validate(name, data, id, delay, run_at)])[0]


def send_many(events: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Send many events at once with bulk inserts; all are stored, or none.

    Args:
        events: mappings with the keys of :func:`send`'s arguments:
            ``{"name": ..., "data": ..., "id": ..., "delay": ..., "run_at": ...}``
            (all but ``name`` optional).

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
                f"Item {index} of send_many() must have a 'name' and may have 'data', 'id', 'delay' and "
                "'run_at'; "
                f"got the keys {sorted(map(str, item))}."
            )
        try:
            outgoing.append(
                _validate(
                    item["name"], item.get("data"), item.get("id"), item.get("delay"), item.get("run_at")
                )
            )
        except EventValidationError as exc:
            raise EventValidationError(f"Item {index} of send_many(): {exc}") from exc
    if not outgoing:
        return []
    return _store(outgoing)


#: The event of a run started by ``step.invoke``: it holds the invoke's data, and no function
#: subscribes to it (the run is made for the invoked function only).
INVOKE_EVENT = "django_events/function.invoked"


def validate_event(
    name: object, data: object, key: object, delay: object = None, run_at: object = None
) -> _Outgoing:
    """Check an event as :func:`send` does (``EventValidationError`` if bad); return it ready to store."""
    return _validate(name, data, key, delay, run_at)


def store_invoke(spec: registry.Function, outgoing: _Outgoing, *, parent: Any, using: str) -> Run:
    """Store the event of a ``step.invoke`` and one run of ``spec`` for it (``parent``'s child), in
    the current transaction; its message is sent with it. Returns the run."""
    now = clock.now()
    event = _new_event(outgoing, now)
    run = ledger.new_run(event, spec, now)
    run.parent = parent
    ledger.insert([event], [run], using)
    dispatch.send_with_transaction([(run.pk, run.function)], using)
    return run


def _due(delay: object, run_at: object) -> dt.datetime | None:
    """When the runs of an event sent with ``delay`` or ``run_at`` start (``None``: now)."""
    if delay is not None and run_at is not None:
        raise EventValidationError("Pass delay= or run_at=, not both.")
    if delay is not None:
        try:
            seconds_ = seconds(delay, "delay", minimum=0.0)
        except TypeError as exc:
            raise EventValidationError(str(exc)) from None
        return clock.now() + dt.timedelta(seconds=seconds_) if seconds_ > 0 else None
    if run_at is not None:
        if not isinstance(run_at, dt.datetime):
            raise EventValidationError(f"run_at must be a datetime, not {type(run_at).__name__}.")
        if timezone.is_naive(run_at):
            raise EventValidationError(
                "run_at must be an aware datetime (with a time zone), such as "
                "timezone.now() + timedelta(hours=1)."
            )
        return run_at
    return None


def _validate(
    name: object, data: object, key: object, delay: object = None, run_at: object = None
) -> _Outgoing:
    validate_event_name(name)
    due = _due(delay, run_at)
    assert isinstance(name, str)
    if key is not None and (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_NAME_LENGTH
        or not key.isprintable()  # NUL, control characters, lone surrogates
    ):
        raise EventValidationError(
            f"An event id must be a non-empty str of at most {MAX_NAME_LENGTH} printable characters "
            f"(no NUL, control characters or lone surrogates), not {short_repr(key)}."
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EventValidationError(f"Event data must be a dict (a JSON object), not {type(data).__name__}.")
    try:
        text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except RecursionError as exc:
        raise EventValidationError(_too_deep(name)) from exc
    except (TypeError, ValueError) as exc:
        raise EventValidationError(
            f"Event data for {name!r} is not JSON-serialisable: {short_repr(str(exc), 300)}."
        ) from exc
    if has_nul_escape(text):
        raise EventValidationError(f"Event data for {name!r} contains a NUL character (\\u0000).")
    if has_unstorable(text):
        raise EventValidationError(
            f"Event data for {name!r} contains a lone surrogate (a code point from U+D800 to U+DFFF), "
            "which UTF-8 cannot encode."
        )
    size = len(text.encode("utf-8"))
    limit = get_settings().MAX_EVENT_BYTES
    if size > limit:
        raise EventValidationError(
            f"Event data for {name!r} is {size} bytes as JSON, over the limit of {limit} "
            "(DJANGO_EVENTS['MAX_EVENT_BYTES'])."
        )
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise EventValidationError(
            f"Event data for {name!r} is nested too deeply (at most {MAX_DEPTH} levels)."
        )
    # Store what the function will read back: tuples become lists, keys strings.
    try:
        stored = json.loads(text, object_pairs_hook=_unique_keys)
    except _CollidingKeys as exc:
        raise EventValidationError(
            f"Event data for {name!r} has keys that are the same once made strings, as JSON keys are: "
            f"{short_repr(exc.key)}."
        ) from None
    return _Outgoing(name=name, data=stored, key=key, due=due)


#: The deepest nesting of objects and arrays accepted in event data (the outer object is level 1).
MAX_DEPTH = 100


def _too_deep(name: str) -> str:
    return f"Event data for {name!r} is nested too deeply (at most {MAX_DEPTH} levels of objects and arrays)."


def _depth(value: Any) -> int:
    """How deeply ``value``'s dicts and lists nest, found without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


class _CollidingKeys(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict; raises if a key repeats (``{1: "a", "1": "b"}`` once dumped)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _CollidingKeys(key)
            seen.add(key)
    return result


def _store(outgoing: list[_Outgoing]) -> list[Event]:
    using = router.db_for_write(Event)
    now = clock.now()
    # No savepoint inside the caller's transaction: what is written here commits or rolls back
    # with it anyway, and the input was validated before. A database error here leaves the
    # caller's transaction to roll back, as any failed query does on PostgreSQL.
    with transaction.atomic(using=using, savepoint=False):
        keyed = [_new_event(item, now) for item in outgoing if item.key is not None]
        by_key = ledger.insert_keyed(keyed, using) if keyed else {}
        result: list[Event] = []
        unkeyed: list[Event] = []
        runs: list[Run] = []
        has_cancellers, folding = registry.has_cancellers(), registry.folding_ids()
        for item in outgoing:
            if item.key is None:
                event, is_new = _new_event(item, now), True
                unkeyed.append(event)
            else:
                event, is_new = by_key[item.key]
                by_key[item.key] = (event, False)  # a repeated id in one batch runs once
            if is_new:
                if has_cancellers:
                    flow.cancel_matching(event, using=using, now=now)
                runs.extend(flow.route(event, now, item.due, using=using))
                if item.key is not None and event.skipped_by:
                    Event.objects.using(using).filter(pk=event.pk).update(skipped_by=event.skipped_by)
            result.append(event)
        ledger.insert(unkeyed, runs, using)  # one statement on PostgreSQL
        # (A run the rate limit skipped joins no window: its event does not run.)
        folded = [run for run in runs if run.function in folding and run.status != RunStatus.SKIPPED]
        if folded:
            folded_ids = {run.pk for run in folded}
            runs = [run for run in runs if run.pk not in folded_ids]
            runs += flow.after_insert(folded, using=using, now=now)
        _send(runs, using, now, group=len(outgoing) == 1)
        stored = list(result)
        # Once committed, the events end the waits they match (waits.py: both sides look after
        # their commit, so none is missed).
        transaction.on_commit(lambda: _deliver(stored, using), using=using)
    return result


def _deliver(events: list[Event], using: str) -> None:
    for attempt in range(2):
        try:
            waits.deliver(events, using=using)
            return
        except DatabaseError:
            if attempt:
                # The waits are not lost: each looks for its event again when its timeout comes.
                logger.exception(
                    "Could not match %d sent event(s) to the runs waiting for them.", len(events)
                )


def _send(runs: list[Run], using: str, now: dt.datetime, *, group: bool) -> None:
    """Send the messages of new runs with the transaction: due now together, scheduled ones delayed."""
    due_now: list[dispatch.RunRef] = []
    later: dict[float, list[dispatch.RunRef]] = {}
    for run in runs:
        if run.status == RunStatus.PENDING:
            due_now.append((run.pk, run.function))
        elif run.status == RunStatus.SCHEDULED and run.due_at is not None:
            later.setdefault((run.due_at - now).total_seconds(), []).append((run.pk, run.function))
    # One event's runs (a fan-out) go in one message; send_many keeps one message per run,
    # so that a bulk send does not hand its workers the enqueueing it saved.
    dispatch.send_with_transaction(due_now, using, group=group)
    for delay, refs in later.items():
        dispatch.send_with_transaction(refs, using, delay=delay)


def _new_event(item: _Outgoing, now: dt.datetime) -> Event:
    return Event(name=item.name, data=item.data, idempotency_key=item.key, created_at=now)
