"""``DatabaseBroker``: a Dramatiq broker whose queues are a table in the project's own database.

Use it instead of Redis or RabbitMQ when the database is all you want to run::

    DRAMATIQ_BROKER = {
        "BROKER": "django_events.broker.DatabaseBroker",
        "OPTIONS": {"database": "default"},  # and any other keyword of DatabaseBroker
        "MIDDLEWARE": [...],
    }

``manage.py rundramatiq`` is unchanged. Each message is a ``QueuedMessage``
row (``models.py``): ``enqueue()`` inserts it, a consumer takes it, the
worker's acknowledgement deletes it, a rejection keeps it as ``dead``.

Because the row is written through the ORM on the calling thread's connection,
a message sent inside ``transaction.atomic()`` is part of that transaction: it
exists if, and only if, the transaction commits. ``DatabaseBroker.transactional``
and :func:`is_transactional` let django-events send its messages inside the
transaction rather than after the commit.

How consumers work:

* **Taking.** One statement, so one short transaction: ``UPDATE … WHERE id IN
  (SELECT … ORDER BY available_at LIMIT n FOR UPDATE SKIP LOCKED) RETURNING …``
  on PostgreSQL (concurrent consumers skip each other's rows instead of waiting),
  the same without the locking clause on SQLite, where a writing statement holds
  the database's write lock from its start and so cannot interleave with another.
  On SQLite an idle consumer only reads (the next due time) and writes only when
  a message is due (and for its heartbeat), so idle workers do not contend for the
  write lock.
* **Waking up.** On PostgreSQL ``enqueue()`` runs ``pg_notify(channel, queue)`` after
  its INSERT, in the caller's transaction if there is one, so that the notification
  goes out when the message is committed (never for a rolled-back one); consumers wait
  on ``LISTEN`` on a connection of their own: an idle worker gets a new message in
  milliseconds without polling. Elsewhere consumers poll every ``poll_interval``
  milliseconds (and a consumer in the process that enqueued is woken at once). On
  both, a consumer also wakes when the next delayed message falls due.
* **Delays.** A message's ``eta`` is its row's ``available_at``: it is not
  delivered before then, so there are no ``.DQ`` delay queues and no delay
  consumers. Delivered messages carry no ``eta`` option, so the stock
  ``dramatiq.Worker`` processes them at once.
* **Visibility timeout.** A taken message is held until ``available_at`` =
  take time + ``visibility_timeout``. Each consumer extends the holds of every
  message its broker has taken (a heartbeat, every third of the timeout) as long
  as its worker lives. If the worker dies (SIGKILL, OOM, lost host), the holds
  run out and any consumer takes the messages again: nothing is lost.
* **Acknowledgement.** ``ack`` deletes the row, ``nack`` marks it ``dead`` (kept for
  inspection), ``requeue`` makes it ready again; each applies only to the delivery
  it came from (the row's ``delivery_count``), so a worker that lost its hold can
  never settle a later delivery of the same message.
* **Malformed rows.** A row whose body is not a message the worker can process (it
  does not decode, or a field has the wrong type: see :func:`read_message`) is
  dead-lettered as it is taken, with a warning, and the other rows of its batch are
  delivered as usual: one bad row never stalls a consumer.
* **Connections.** Each consumer has a Django database connection of its own
  (opened with the project's settings for ``database``, outside Django's
  per-thread connections, so ``close_old_connections`` in worker threads never
  touches it), used by its consumer thread and, under a lock, by the worker
  threads that acknowledge messages. ``close()`` closes it from whichever thread
  calls it. On PostgreSQL the ``LISTEN`` connection is a second one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import dramatiq
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.common import current_millis, q_name
from dramatiq.errors import (
    BrokerConnectionError,
    ConnectionClosed,
    ConnectionFailed,
    DecodeError,
    DramatiqError,
    QueueJoinTimeout,
    QueueNotFound,
)
from dramatiq.logging import get_logger
from dramatiq.message import Message

from .conf import MAX_DURATION
from .exceptions import ConfigurationError

# The models are imported where they are used, not here: django-dramatiq imports this module
# from its AppConfig's __init__ (to build the broker named in DRAMATIQ_BROKER), before Django's
# app registry can load any model. There is no import cycle behind it.
from .text import short_repr

if TYPE_CHECKING:
    import psycopg
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = [
    "DEFAULT_CHANNEL",
    "DEFAULT_NOTIFY_POLL_INTERVAL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DatabaseBroker",
    "is_transactional",
    "read_message",
]

#: Milliseconds a consumer holds a message it took before another may take it,
#: unless its worker, alive, extends the hold (it does, every third of this).
DEFAULT_VISIBILITY_TIMEOUT = 300_000
#: Milliseconds between two looks at the queue when nothing wakes consumers up.
DEFAULT_POLL_INTERVAL = 100
#: Milliseconds between two looks at the queue when ``LISTEN/NOTIFY`` wakes consumers
#: up: only a safety net, for rows inserted by other means or notifications missed
#: while reconnecting (delayed messages and ended holds are waited for exactly).
DEFAULT_NOTIFY_POLL_INTERVAL = 5_000
#: The PostgreSQL ``NOTIFY`` channel; the payload is the queue's name.
DEFAULT_CHANNEL = "django_events_broker"
#: Milliseconds a broker connection to SQLite waits for the write lock, unless the
#: database's ``OPTIONS`` set a ``timeout``.
DEFAULT_SQLITE_BUSY_TIMEOUT = 30_000
#: Vendors whose SQL the broker speaks (``UPDATE … RETURNING``).
SUPPORTED_VENDORS = frozenset({"postgresql", "sqlite"})

#: Messages per INSERT statement of ``enqueue_many`` (9 parameters each: SQLite allows 32,766).
_INSERT_BATCH = 1000

#: A consumer that could not take a message that is due (another consumer is taking it)
#: looks again after this many seconds, not at once.
_RETRY_GAP = 0.05

logger = logging.getLogger("django_events")

_E = TypeVar("_E", bound=DramatiqError)


def is_transactional(broker: dramatiq.Broker, using: str) -> bool:
    """Whether ``broker.enqueue()`` writes in the current transaction of database ``using``.

    Then a message sent inside ``transaction.atomic(using=using)`` commits or rolls
    back with it, and there is no reason to wait for the commit to send it.
    """
    return bool(getattr(broker, "transactional", False)) and getattr(broker, "database", None) == using


#: The fields of an encoded Dramatiq message: a body has each of them and no other.
_MESSAGE_FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")
#: Largest magnitude of a number among a message's options (Dramatiq makes whole milliseconds of some).
_MAX_OPTION_NUMBER = 2**63
#: Largest ``time_limit`` option, and longest wait for an ``eta``, in milliseconds (ten years:
#: a date this far ahead is still a date).
_MAX_TIME_LIMIT = MAX_DURATION * 1000


class _Malformed(ValueError):
    """A decoded body that is not a message the worker can process."""


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any, low: float = -_MAX_OPTION_NUMBER, high: float = _MAX_OPTION_NUMBER) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return low <= value <= high


def _is_exception_types(value: Any) -> bool:
    types = value if isinstance(value, tuple) else (value,)
    return all(isinstance(t, type) and issubclass(t, BaseException) for t in types)


#: What each field of a message must be: a check, and what it says when the field fails it.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "queue_name": (_is_str, "a string"),
    "actor_name": (_is_name, "a non-empty string"),
    "args": (_is_list, "a list"),
    "kwargs": (_is_object, "an object with string keys"),
    "options": (_is_object, "an object with string keys"),
    "message_id": (_is_name, "a non-empty string"),
    "message_timestamp": (_is_whole, "a whole number of milliseconds"),
}
_NUMBER = "a finite number"
#: The options Dramatiq's worker, its stock middleware and django-events read, and what each
#: must be when present: a check, what it says, and whether ``None`` is allowed (the readers
#: that fall back on the actor's value with ``or`` take it; those that do arithmetic do not).
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "retries": (lambda v: _is_whole(v) and v >= 0, "a whole number, 0 or more", False),
    "max_retries": (_is_number, _NUMBER, True),
    "min_backoff": (_is_number, _NUMBER, False),
    "max_backoff": (_is_number, _NUMBER, False),
    "max_age": (_is_number, _NUMBER, True),
    "delay": (_is_number, _NUMBER, True),
    "result_ttl": (_is_number, _NUMBER, True),
    "broker_priority": (_is_number, _NUMBER, True),
    "time_limit": (
        lambda v: _is_number(v, 0, _MAX_TIME_LIMIT),
        f"a number of milliseconds from 0 to {_MAX_TIME_LIMIT} (ten years)",
        True,
    ),
    "throws": (_is_exception_types, "an exception class or a tuple of them", True),
    "on_success": (_is_name, "an actor name", True),
    "on_failure": (_is_name, "an actor name", True),
    "on_retry_exhausted": (_is_name, "an actor name", True),
    "pipe_target": (lambda v: isinstance(v, dict), "a message", True),
    "group_completion_uuid": (_is_str, "a string", True),
    "group_completion_callbacks": (_is_list, "a list of messages", True),
}


def read_message(body: bytes, queue_name: str | None = None) -> Message[Any]:
    """The Dramatiq message in a queue row's ``body``, checked for everything the worker touches.

    Beyond decoding (as ``Message.decode`` does), the body must hold every field of a
    message and no other, each of the type Dramatiq's worker and middleware rely on:
    ``queue_name`` a string; ``actor_name`` and ``message_id`` non-empty strings;
    ``args`` a list; ``kwargs`` and ``options`` objects with string keys;
    ``message_timestamp`` a whole number. Among the options, those the worker, the stock
    middleware and django-events read must have their type when present: ``retries`` a
    whole number, ``time_limit`` from 0 to ten years of milliseconds, ``max_retries``,
    ``min_backoff``, ``max_backoff``, ``max_age``, ``delay``, ``result_ttl`` and
    ``broker_priority`` finite numbers, the callbacks' actor names strings, ``throws``
    exception classes, and a pipeline's next message (``pipe_target``) and a group's
    callbacks (``group_completion_callbacks``) messages of this same shape. Other
    options are left as they are.

    The ``eta`` option is dropped: the row's ``available_at`` held it, and it has come.

    Parameters:
      body: the row's ``body``.
      queue_name: the queue the message is delivered from, which replaces the body's.

    Raises:
      DecodeError: the body does not decode, or a field is wrong; the error's text
        names the first such field, with values cut to 200 characters.
    """
    try:
        fields = dramatiq.get_encoder().decode(body)
        _check_message(fields)
        options = {name: value for name, value in fields["options"].items() if name != "eta"}
        fields = {**fields, "args": tuple(fields["args"]), "options": options}
        if queue_name is not None:
            fields["queue_name"] = queue_name
        return Message(**fields)
    except _Malformed as exc:
        reason = f"Malformed message: {exc}."
    except Exception as exc:  # whatever the encoder raises (a recursion error on deep JSON, say)
        # Dramatiq's own DecodeError repeats the whole body: name its cause instead.
        cause = exc.error if isinstance(exc, DecodeError) and isinstance(exc.error, BaseException) else exc
        reason = f"Undecodable message: {type(cause).__name__}: {short_repr(str(cause))}."
    raise DecodeError(reason, body, None)  # type: ignore[no-untyped-call]


def _check_message(fields: Any) -> None:
    """Raise ``_Malformed`` naming what is wrong with a decoded message (and the messages it carries)."""
    pending: list[tuple[str, Any]] = [("the body", fields)]
    while pending:  # iteratively: a pipeline nests each next message in the one before
        where, message = pending.pop()
        if not isinstance(message, dict):
            raise _Malformed(f"{where} is {short_repr(message)}, not an object")
        missing = [name for name in _MESSAGE_FIELDS if name not in message]
        if missing:
            raise _Malformed(f"{where} has no {', '.join(missing)}")
        unknown = [name for name in message if name not in _MESSAGE_FIELDS]
        if unknown:
            raise _Malformed(f"{where} has unknown fields {short_repr(unknown)}")
        for name, (check, expected) in _FIELD_RULES.items():
            if not check(message[name]):
                raise _Malformed(f"{where}: {name} is {short_repr(message[name])}, not {expected}")
        options = message["options"]
        for name, (check, expected, none_ok) in _OPTION_RULES.items():
            if name in options and not ((options[name] is None and none_ok) or check(options[name])):
                raise _Malformed(f"{where}: options[{name!r}] is {short_repr(options[name])}, not {expected}")
        nested = "a message it carries"
        if options.get("pipe_target") is not None:
            pending.append((nested, options["pipe_target"]))
        pending.extend((nested, callback) for callback in options.get("group_completion_callbacks") or ())


class DatabaseBroker(Broker):
    """A Dramatiq broker that keeps its queues in a table of the project's database.

    Supports PostgreSQL (``SELECT … FOR UPDATE SKIP LOCKED``, ``LISTEN/NOTIFY``) and
    SQLite (polling; the broker switches the database to WAL mode so that readers
    and the writer do not block each other). See the module's docstring for how it
    works.

    Parameters:
      middleware: as for every Dramatiq broker.
      database: the alias, in ``DATABASES``, of the database that holds the queues.
        For messages to commit with the caller's writes, use the database those go to.
      poll_interval: milliseconds between two looks at an idle queue. Default
        ``DEFAULT_NOTIFY_POLL_INTERVAL`` (5 s) when notifications wake consumers up,
        else ``DEFAULT_POLL_INTERVAL`` (100 ms).
      visibility_timeout: milliseconds after which a message taken by a worker that
        stopped extending its hold (it died) is delivered again. Default 5 minutes.
      notify: wake consumers with ``LISTEN/NOTIFY`` on PostgreSQL (with psycopg 3).
      channel: the ``NOTIFY`` channel.
      sqlite_wal: on SQLite, switch the database to WAL mode when a consumer connects.
      sqlite_busy_timeout: on SQLite, milliseconds the broker's own connections wait for
        the write lock. Default: the database's ``OPTIONS["timeout"]`` if set, else 30 s.

    Attributes:
      transactional: ``True``: ``enqueue()`` writes in the caller's transaction.
      database: the alias of the queues' database.
    """

    #: ``enqueue()`` inserts the message in the caller's transaction on ``database``.
    transactional = True

    def __init__(
        self,
        *,
        middleware: list[dramatiq.Middleware] | None = None,
        database: str = "default",
        poll_interval: float | None = None,
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        notify: bool = True,
        channel: str = DEFAULT_CHANNEL,
        sqlite_wal: bool = True,
        sqlite_busy_timeout: float | None = None,
    ) -> None:
        super().__init__(middleware=middleware)
        if database not in settings.DATABASES:
            raise ConfigurationError(
                f"DatabaseBroker(database={database!r}): no such alias in settings.DATABASES "
                f"(there are {', '.join(sorted(settings.DATABASES))})."
            )
        for name, value in [
            ("poll_interval", poll_interval),
            ("visibility_timeout", visibility_timeout),
            ("sqlite_busy_timeout", sqlite_busy_timeout),
        ]:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ConfigurationError(
                    f"DatabaseBroker({name}={value!r}): give a positive number of milliseconds."
                )
        if not isinstance(channel, str) or not channel or len(channel.encode()) > 63:
            raise ConfigurationError(f"DatabaseBroker(channel={channel!r}): give a name of 1 to 63 bytes.")
        self.database = database
        self.visibility_timeout = visibility_timeout
        self.notify = bool(notify)
        self.channel = channel
        self.sqlite_wal = bool(sqlite_wal)
        self.sqlite_busy_timeout = sqlite_busy_timeout
        self._poll_interval = poll_interval
        self.queues: set[str] = set()
        self._consumers: set[_DatabaseConsumer] = set()
        self._lock = threading.Lock()
        self._token_pid = 0
        self._token = ""
        self._wal_checked = False
        self._vendor: str | None = None
        self._uses_notify: bool | None = None
        self._insert_sql: dict[int, tuple[str, list[Any]]] = {}
        # Rows to mark dead ("nack") or make ready again ("requeue") that a consumer could not settle
        # when it meant to (its connection failed): the next poll of any consumer settles them.
        self._unsettled: list[tuple[str, tuple[int, int]]] = []

    # -- Properties ----------------------------------------------------------------------------

    @property
    def vendor(self) -> str:
        """The database's vendor ("postgresql", "sqlite"); raises ``ConfigurationError`` for others."""
        if self._vendor is None:
            vendor = connections[self.database].vendor
            if vendor not in SUPPORTED_VENDORS:
                raise ConfigurationError(
                    f"DatabaseBroker supports PostgreSQL and SQLite; database {self.database!r} is {vendor}."
                )
            self._vendor = vendor
        return self._vendor

    @property
    def uses_notify(self) -> bool:
        """Whether consumers wait on ``LISTEN`` (PostgreSQL with psycopg 3 and ``notify``)."""
        if self._uses_notify is None:
            uses_notify = False
            if self.notify and self.vendor == "postgresql":
                from django.db.backends.postgresql.psycopg_any import is_psycopg3

                uses_notify = is_psycopg3
            self._uses_notify = uses_notify
        return self._uses_notify

    @property
    def poll_interval(self) -> float:
        """Milliseconds between two looks at an idle queue."""
        if self._poll_interval is not None:
            return self._poll_interval
        return DEFAULT_NOTIFY_POLL_INTERVAL if self.uses_notify else DEFAULT_POLL_INTERVAL

    @property
    def token(self) -> str:
        """This broker in this process, as written in the ``taken_by`` of the messages it holds."""
        pid = os.getpid()
        if self._token_pid != pid:  # a fork is another worker, whose holds must not be ours
            with self._lock:  # one token for all the threads of the process
                if self._token_pid != pid:
                    self._token = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}"[-255:]
                    self._token_pid = pid
        return self._token

    # -- The Broker interface ------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A consumer of ``queue_name`` holding at most ``prefetch`` unacknowledged messages.

        Its ``__next__`` returns ``None`` after ``timeout`` milliseconds without a message.

        Raises:
          QueueNotFound: if the queue was never declared.
        """
        if queue_name not in self.queues:
            raise _error(QueueNotFound, queue_name)
        _ = self.vendor  # fail here, at once, on an unsupported database
        consumer = _DatabaseConsumer(self, queue_name, prefetch=max(1, prefetch), timeout=timeout)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue (its canonical name: ``x.DQ`` declares ``x``); declaring twice does nothing.

        No delay queue is declared: delayed messages wait in their own queue until their eta.
        """
        queue_name = q_name(queue_name)
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        """The names of the queues declared so far."""
        return self.queues.copy()

    def get_declared_delay_queues(self) -> set[str]:
        """None: a delayed message waits in its own queue, as a row not due before its eta."""
        return set()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Insert ``message`` in its queue (declared if need be), deliverable after ``delay`` ms if given.

        The insert uses the calling thread's connection to ``database``: inside
        ``transaction.atomic()`` the message is committed, or rolled back, with the
        rest of the transaction (``after_enqueue`` middleware hooks run at once,
        though, not on commit). Outside one it is committed at once.

        A delay or ``eta`` more than ten years ahead, infinite included, is cut to ten years.

        Returns:
          The message as stored: with an ``eta`` option if delayed.

        Raises:
          ConnectionClosed: the database could not be reached.
        """
        return self.enqueue_many([message], delay=delay)[0]

    def enqueue_many(
        self, messages: Sequence[Message[Any]], *, delay: int | None = None
    ) -> list[Message[Any]]:
        """Insert several messages as :meth:`enqueue` does, in one statement per 1,000 messages.

        Middleware hooks run for each message, as if each were enqueued alone.
        """
        from .models import QueuedMessage

        rows: list[QueuedMessage] = []
        stored: list[Message[Any]] = []
        for message in messages:
            queue_name = q_name(message.queue_name)
            self.declare_queue(queue_name)
            if message.queue_name != queue_name:
                message = message.copy(queue_name=queue_name)
            if delay is not None:
                message = message.copy(options={"eta": current_millis() + delay})
            eta = message.options.get("eta")
            now = timezone.now()
            available_at = now
            if isinstance(eta, int | float) and not isinstance(eta, bool):
                # At most ten years ahead: an infinite or enormous eta is not a date (nan is now).
                wait = min(max(0, eta - current_millis()), _MAX_TIME_LIMIT)
                available_at = now + dt.timedelta(milliseconds=wait)
            self.logger.debug("Enqueueing message %r on queue %r.", message.message_id, queue_name)
            self.emit_before("enqueue", message, delay)
            rows.append(
                QueuedMessage(
                    queue_name=queue_name,
                    actor_name=message.actor_name[:255],
                    message_id=message.message_id[:255],
                    body=message.encode(),
                    available_at=available_at,
                    created_at=now,
                )
            )
            stored.append(message)
        try:
            # No transaction of our own: inside the caller's, the messages are part of it; outside
            # one, each statement commits by itself. On PostgreSQL the statement's WITH clause
            # inserts the rows and its SELECT notifies the consumers of their queues (on commit).
            db = connections[self.database]
            for start in range(0, len(rows), _INSERT_BATCH):
                chunk = rows[start : start + _INSERT_BATCH]
                sql, fields = self._insert_statement(db, len(chunk))
                params = [f.get_db_prep_save(getattr(row, f.attname), db) for row in chunk for f in fields]
                with db.cursor() as cursor:
                    if self.uses_notify:
                        cursor.execute(sql, [*params, self.channel])
                    else:
                        cursor.execute(sql, params)
                        for queue_name in sorted({row.queue_name for row in chunk}):
                            self._announce(db, queue_name)
        except (OperationalError, InterfaceError) as exc:
            raise _error(ConnectionClosed, exc) from exc
        for message in stored:
            self.emit_after("enqueue", message, delay)
        return stored

    def flush(self, queue_name: str) -> None:
        """Delete every message of ``queue_name``, dead ones included."""
        from .models import QueuedMessage

        QueuedMessage.objects.using(self.database).in_queue(q_name(queue_name)).delete()

    def flush_all(self) -> None:
        """Delete every message of every declared queue."""
        from .models import QueuedMessage

        QueuedMessage.objects.using(self.database).filter(queue_name__in=sorted(self.queues)).delete()

    def join(self, queue_name: str, *, timeout: int | None = None, interval: int = 50) -> None:
        """Wait until ``queue_name`` has no message left to deliver or to acknowledge.

        Delayed messages count, dead ones do not. Meant for tests.

        Parameters:
          timeout: the most milliseconds to wait.
          interval: milliseconds between two looks.

        Raises:
          QueueJoinTimeout: when ``timeout`` elapses first.
        """
        from .models import QueuedMessage

        queue_name = q_name(queue_name)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        pending = QueuedMessage.objects.using(self.database).in_queue(queue_name).pending()
        while pending.exists():
            if deadline is not None and time.monotonic() >= deadline:
                raise _error(QueueJoinTimeout, queue_name)
            time.sleep(interval / 1000)

    def close(self) -> None:
        """Close every consumer still open, and their connections."""
        with self._lock:
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.close()

    # -- For consumers -------------------------------------------------------------------------

    def _insert_statement(self, db: BaseDatabaseWrapper, rows: int) -> tuple[str, list[Any]]:
        """The INSERT of ``rows`` messages (with the notification of their queues, if consumers listen)."""
        key = rows  # db is always this broker's database
        if key not in self._insert_sql:
            from .models import QueuedMessage

            quote = db.ops.quote_name
            fields = [field for field in QueuedMessage._meta.concrete_fields if not field.primary_key]
            columns = ", ".join(quote(str(field.column)) for field in fields)
            values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * rows)
            sql = f"INSERT INTO {quote(QueuedMessage._meta.db_table)} ({columns}) VALUES {values}"
            if self.uses_notify:
                queue = quote(str(QueuedMessage._meta.get_field("queue_name").column))
                sql = (
                    f"WITH inserted AS ({sql} RETURNING {queue} AS queue) "
                    f"SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM inserted) AS queues"
                )
            self._insert_sql[key] = (sql, fields)
        return self._insert_sql[key]

    def _announce(self, db: BaseDatabaseWrapper, queue_name: str) -> None:
        """Tell consumers of ``queue_name`` that messages await, once ``db``'s transaction commits."""
        if self.uses_notify:
            # Inside a transaction PostgreSQL sends it on commit, and drops it on rollback.
            with db.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [self.channel, queue_name])
        else:
            transaction.on_commit(partial(self._wake_local, queue_name), using=db.alias)

    def _wake_local(self, queue_name: str) -> None:
        with self._lock:
            consumers = [c for c in self._consumers if c.queue_name == queue_name]
        for consumer in consumers:
            consumer.wake()

    def _forget(self, consumer: _DatabaseConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)

    def _leave_unsettled(self, kind: str, keys: Iterable[tuple[int, int]]) -> None:
        """Remember deliveries to ``nack`` or ``requeue`` later (see ``_DatabaseConsumer._settle_left``)."""
        with self._lock:
            self._unsettled.extend((kind, key) for key in keys)

    def _take_unsettled(self) -> list[tuple[str, tuple[int, int]]]:
        with self._lock:
            unsettled, self._unsettled = self._unsettled, []
        return unsettled

    def _prepare_sqlite(self, db: BaseDatabaseWrapper) -> None:
        """Give a new broker connection to SQLite its busy timeout, and the database WAL mode, once."""
        busy_timeout = self.sqlite_busy_timeout
        if busy_timeout is None and "timeout" not in db.settings_dict.get("OPTIONS", {}):
            busy_timeout = DEFAULT_SQLITE_BUSY_TIMEOUT
        with db.cursor() as cursor:
            if busy_timeout is not None:
                cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout)}")
            if self.sqlite_wal and not self._wal_checked:
                self._wal_checked = True
                cursor.execute("PRAGMA journal_mode")
                row = cursor.fetchone()
                if row is not None and str(row[0]).lower() not in {"wal", "memory"}:
                    try:
                        cursor.execute("PRAGMA journal_mode = WAL")
                    except OperationalError:
                        logger.warning(
                            "DatabaseBroker could not switch SQLite database %r to WAL mode; "
                            "workers will wait on each other more.",
                            self.database,
                            exc_info=True,
                        )


@dataclass(frozen=True)
class _Statements:
    """The consumer's SQL for one table and one vendor."""

    earliest: str
    take: str
    heartbeat: str
    ack: str
    nack: str
    requeue: str

    @classmethod
    def build(cls, db: BaseDatabaseWrapper) -> _Statements:
        from .models import QueuedMessage, QueuedMessageState

        meta = QueuedMessage._meta
        quote = db.ops.quote_name
        table = quote(meta.db_table)
        c = {field.name: quote(field.column) for field in meta.concrete_fields if field.column}
        ready, taken, dead = (
            f"'{QueuedMessageState.READY.value}'",
            f"'{QueuedMessageState.TAKEN.value}'",
            f"'{QueuedMessageState.DEAD.value}'",
        )
        # Written as in the partial index's condition, so that both PostgreSQL and SQLite use it.
        pending = f"{c['state']} IN ({ready}, {taken})"
        lock = " FOR UPDATE SKIP LOCKED" if db.features.has_select_for_update_skip_locked else ""
        this_delivery = f"{c['id']} = %s AND {c['delivery_count']} = %s AND {c['state']} = {taken}"
        return cls(
            earliest=(
                f"SELECT {c['available_at']} FROM {table} WHERE {c['queue_name']} = %s AND {pending} "
                f"ORDER BY {c['available_at']} LIMIT 1"
            ),
            take=(
                f"UPDATE {table} SET {c['state']} = {taken}, {c['available_at']} = %s, "
                f"{c['taken_by']} = %s, {c['delivery_count']} = {c['delivery_count']} + 1 "
                f"WHERE {c['id']} IN (SELECT {c['id']} FROM {table} WHERE {c['queue_name']} = %s "
                f"AND {pending} AND {c['available_at']} <= %s ORDER BY {c['available_at']} LIMIT %s{lock}) "
                f"RETURNING {c['id']}, {c['body']}, {c['delivery_count']}"
            ),
            heartbeat=(
                f"UPDATE {table} SET {c['available_at']} = %s WHERE {c['taken_by']} = %s "
                f"AND {c['state']} = {taken}"
            ),
            ack=f"DELETE FROM {table} WHERE {this_delivery}",
            nack=f"UPDATE {table} SET {c['state']} = {dead}, {c['available_at']} = %s WHERE {this_delivery}",
            requeue=(
                f"UPDATE {table} SET {c['state']} = {ready}, {c['available_at']} = %s, {c['taken_by']} = '' "
                f"WHERE {this_delivery}"
            ),
        )


class _DatabaseMessage(MessageProxy):
    """A delivered message, and which delivery of its row it is."""

    def __init__(self, message: Message[Any], row_id: int, delivery: int) -> None:
        super().__init__(message)
        self.row_id = row_id
        self.delivery = delivery

    @property
    def key(self) -> tuple[int, int]:
        return self.row_id, self.delivery


class _Listener:
    """A PostgreSQL connection of its own that ``LISTEN``s on the broker's channel."""

    def __init__(self, db: BaseDatabaseWrapper, channel: str) -> None:
        import psycopg
        from psycopg import sql

        params = db.get_connection_params()
        try:
            self.connection: psycopg.Connection[Any] = psycopg.connect(**params, autocommit=True)
            self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            raise _error(ConnectionFailed, exc) from exc

    def wait(self, seconds: float, queue_name: str) -> bool:
        """Wait up to ``seconds`` for a notification; whether one was for ``queue_name``."""
        import psycopg

        try:
            notes = list(self.connection.notifies(timeout=max(seconds, 0.0), stop_after=1))
            notes += self.connection.notifies(timeout=0)
        except psycopg.Error as exc:
            raise _error(ConnectionClosed, exc) from exc
        return any(note.payload == queue_name for note in notes)

    def close(self) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error):
            self.connection.close()


class _DatabaseConsumer(Consumer):
    """Takes messages of one queue; see the module's docstring.

    ``__next__`` runs in the worker's consumer thread; ``ack``, ``nack`` and
    ``requeue`` come from worker threads (and the main thread at shutdown). All of
    them share the consumer's connection under ``_lock``.
    """

    def __init__(self, broker: DatabaseBroker, queue_name: str, *, prefetch: int, timeout: int) -> None:
        self.logger = get_logger(__name__, type(self))  # type: ignore[no-untyped-call]
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout
        self._lock = threading.RLock()
        self._wakeup = threading.Event()
        self._db: BaseDatabaseWrapper | None = None
        self._prepared: object = None
        self._statements: _Statements | None = None
        self._listener: _Listener | None = None
        self._buffer: deque[_DatabaseMessage] = deque()
        self._held: set[tuple[int, int]] = set()  # (row id, delivery) taken and not yet settled
        self._poll_now = True
        self._next_poll = 0.0
        self._next_heartbeat = 0.0
        self._closed = False

    # -- Iteration (the consumer thread) -------------------------------------------------------

    def __next__(self) -> MessageProxy | None:
        try:
            return self._next()
        except BrokerConnectionError:
            # When one connection is lost the other often is too: start both afresh next time.
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            with self._lock:
                if self._db is not None:
                    self._discard(self._db)
            raise

    def _next(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout / 1000
        while not self._closed:
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._heartbeat()
            if self._buffer:
                return self._buffer.popleft()
            with self._lock:
                free = self.prefetch - len(self._held)
            if free > 0 and (self._poll_now or now >= self._next_poll):
                self._poll(free)
                if self._buffer:
                    continue
            now = time.monotonic()
            if now >= deadline:
                return None
            until = min(deadline, self._next_heartbeat)
            if free > 0:
                until = min(until, self._next_poll)
            self._wait(max(until - now, 0.0), can_take=free > 0)
        return None

    def _poll(self, free: int) -> None:
        """Take up to ``free`` due messages; plan the next look from the next due time."""
        statements = self._get_statements()
        now = timezone.now()
        rows: list[tuple[Any, ...]] = []
        # On SQLite, read first: an idle consumer must not take the write lock to find nothing.
        # On PostgreSQL the take itself is as cheap, and skips rows that others are taking.
        earliest = self._earliest(statements) if self.broker.vendor == "sqlite" else now
        if earliest is not None and earliest <= now:
            deadline = now + dt.timedelta(milliseconds=self.broker.visibility_timeout)
            rows = self._execute(
                statements.take,
                [self._adapt(deadline), self.broker.token, self.queue_name, self._adapt(now), free],
                fetch=True,
            )
            if len(rows) < free:
                earliest = self._earliest(statements)
        for row_id, body, delivery in sorted(rows, key=lambda row: row[0]):
            self._accept(int(row_id), body, int(delivery))
        self._settle_left()
        self._poll_now = len(rows) >= free
        if not self._poll_now:
            delay = self.broker.poll_interval / 1000
            if earliest is not None:
                delay = min(delay, max((earliest - timezone.now()).total_seconds(), _RETRY_GAP))
            self._next_poll = time.monotonic() + delay

    def _earliest(self, statements: _Statements) -> dt.datetime | None:
        rows = self._execute(statements.earliest, [self.queue_name], fetch=True)
        return _as_datetime(rows[0][0]) if rows else None

    def _accept(self, row_id: int, body: Any, delivery: int) -> None:
        """Hand out a row's message, or, if it holds none the worker can process, leave it to be buried.

        Never raises: whatever is wrong with one row must not stop the others of its batch.
        """
        try:
            message = read_message(bytes(body), self.queue_name)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {short_repr(exc)}"
            self.logger.warning(
                "Message %d of queue %r is dead: %s Its body: %s.",
                row_id,
                self.queue_name,
                reason,
                short_repr(body),
            )
            self.broker._leave_unsettled("nack", [(row_id, delivery)])
            return
        with self._lock:
            self._held.add((row_id, delivery))
        self._buffer.append(_DatabaseMessage(message, row_id, delivery))

    def _settle_left(self) -> None:
        """Mark dead the malformed rows, and put back the rows a failed ``close()`` could not.

        If this fails too (the connection is lost), they are left for the next poll of any
        consumer of the broker; meanwhile the heartbeat keeps them from other workers.
        """
        unsettled = self.broker._take_unsettled()
        if not unsettled:
            return
        statements = self._get_statements()
        now = self._adapt(timezone.now())
        requeued = False
        try:
            for kind, (row_id, delivery) in unsettled:
                self._execute(
                    statements.nack if kind == "nack" else statements.requeue, [now, row_id, delivery]
                )
                requeued = requeued or kind == "requeue"
        except BaseException:
            self.broker._leave_unsettled("nack", [key for kind, key in unsettled if kind == "nack"])
            self.broker._leave_unsettled("requeue", [key for kind, key in unsettled if kind == "requeue"])
            raise
        if requeued:
            self._wake_others()

    def _heartbeat(self) -> None:
        """Extend the hold of every message this broker has taken (in any of its consumers)."""
        interval = self.broker.visibility_timeout / 3000
        deadline = timezone.now() + dt.timedelta(milliseconds=self.broker.visibility_timeout)
        self._execute(self._get_statements().heartbeat, [self._adapt(deadline), self.broker.token])
        self._next_heartbeat = time.monotonic() + interval

    def _wait(self, seconds: float, *, can_take: bool) -> None:
        if can_take and self.broker.uses_notify:
            if self._listener is None:
                self._listener = _Listener(self._connection(), self.broker.channel)
                self._poll_now = True  # what was sent before we listened
                return
            if self._listener.wait(seconds, self.queue_name):
                self._poll_now = True
        elif self._wakeup.wait(seconds):
            self._wakeup.clear()
            self._poll_now = True

    def wake(self) -> None:
        """Make a waiting ``__next__`` look at the queue now (from any thread)."""
        self._wakeup.set()

    # -- Settling (worker threads) -------------------------------------------------------------

    def ack(self, message: MessageProxy) -> None:
        """Delete the message: it was processed."""
        self._settle(message, self._get_statements().ack, [])

    def nack(self, message: MessageProxy) -> None:
        """Keep the message as dead: it failed for good."""
        self._settle(message, self._get_statements().nack, [self._adapt(timezone.now())])

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Make messages taken but not processed ready again, for any consumer."""
        proxies = [m for m in messages if isinstance(m, _DatabaseMessage)]
        if not proxies:
            return
        self.logger.debug("Requeueing %d message(s) on queue %r.", len(proxies), self.queue_name)
        now = self._adapt(timezone.now())
        with self._lock:
            try:
                self._execute_many(self._get_statements().requeue, [[now, *m.key] for m in proxies])
            finally:
                self._held.difference_update(m.key for m in proxies)
        self._wake_others()

    def _settle(self, message: MessageProxy, sql: str, params: list[Any]) -> None:
        if not isinstance(message, _DatabaseMessage):
            raise TypeError(f"{message!r} was not delivered by a DatabaseBroker consumer.")
        try:
            self._execute(sql, [*params, *message.key])
        finally:
            with self._lock:
                self._held.discard(message.key)
            self._wakeup.set()  # a prefetch slot is free

    # -- Closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Put back the messages taken but never handed out, and close the connections."""
        with self._lock:
            if self._closed:
                return
            buffered = list(self._buffer)
            self._buffer.clear()
            try:
                if buffered:
                    self.requeue(buffered)
            except Exception:
                # The next consumer of this broker puts them back; if the worker stops first, they
                # are delivered again after the visibility timeout.
                self.broker._leave_unsettled("requeue", [m.key for m in buffered])
                self.logger.warning(
                    "Could not put back %d message(s) on queue %r yet.",
                    len(buffered),
                    self.queue_name,
                    exc_info=True,
                )
            self._closed = True
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if self._db is not None:
                try:
                    self._db.close()
                except DatabaseError:
                    pass
                finally:
                    self._db.dec_thread_sharing()
                    self._db = None
        self.broker._forget(self)

    # -- The connection ------------------------------------------------------------------------

    def _connection(self) -> BaseDatabaseWrapper:
        """The consumer's own connection, opened if need be; after ``close()``, the thread's one."""
        if self._closed:
            return connections[self.broker.database]
        with self._lock:
            if self._db is None:
                db = connections.create_connection(self.broker.database)
                db.inc_thread_sharing()  # used by the consumer thread and the worker threads
                self._db = db
            db = self._db
            try:
                db.ensure_connection()
            except DatabaseError as exc:
                raise _error(ConnectionFailed, exc) from exc
            if self._prepared is not db.connection:
                if db.vendor == "sqlite":
                    self.broker._prepare_sqlite(db)
                self._prepared = db.connection
            return db

    def _get_statements(self) -> _Statements:
        if self._statements is None:
            self._statements = _Statements.build(self._connection())
        return self._statements

    def _adapt(self, value: dt.datetime) -> Any:
        return self._connection().ops.adapt_datetimefield_value(value)

    def _execute(self, sql: str, params: Sequence[Any], *, fetch: bool = False) -> list[tuple[Any, ...]]:
        with self._lock:
            db = self._connection()
            try:
                with db.cursor() as cursor:
                    cursor.execute(sql, params)
                    return list(cursor.fetchall()) if fetch else []
            except (OperationalError, InterfaceError) as exc:
                self._discard(db)
                raise _error(ConnectionClosed, exc) from exc

    def _execute_many(self, sql: str, param_list: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            db = self._connection()
            try:
                with db.cursor() as cursor:
                    cursor.executemany(sql, param_list)
            except (OperationalError, InterfaceError) as exc:
                self._discard(db)
                raise _error(ConnectionClosed, exc) from exc

    def _discard(self, db: BaseDatabaseWrapper) -> None:
        """Close a connection that failed, so that the next statement opens a new one."""
        if db is self._db:
            with contextlib.suppress(DatabaseError):
                db.close()
            self._prepared = None

    def _wake_others(self) -> None:
        """After putting messages back: wake the consumers of the queue, here and in other processes."""
        if self.broker.uses_notify:
            self._execute("SELECT pg_notify(%s, %s)", [self.broker.channel, self.queue_name])
        else:
            self.broker._wake_local(self.queue_name)


def _as_datetime(value: Any) -> dt.datetime | None:
    """A datetime read by raw SQL (SQLite may give text), aware if ``USE_TZ``."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if not isinstance(value, dt.datetime):
        return None
    if settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value, dt.UTC)
    return value


def _error(error: type[_E], arg: object) -> _E:
    """A Dramatiq error (their constructors are untyped)."""
    return error(arg)
