"""What keeps the admin's lists fast at a million rows: counting, dates, searching and filtering.

- :class:`CappedCountPaginator` counts at most ``cap + 1`` rows, never a whole table.
- :class:`IndexedDateHierarchyChangeList` builds the date hierarchy from index probes
  (``MIN``, ``MAX``, ``EXISTS``), not from the distinct dates of every row.
- :class:`ContainsText` is ``icontains`` as ``ILIKE`` on PostgreSQL, which a trigram index serves,
  and with no limit on the text's length on SQLite.
- :class:`HasMember` finds JSON objects by one of their members, the same way on SQLite and
  PostgreSQL (``@>``, which a GIN index serves); :func:`search_values` reads a search text
  into the values it stands for.
- :class:`RegistryChoicesFilter` and its filters take their choices from the registered
  functions or the declared queues, not from a ``DISTINCT`` over the table.
- :class:`EventChangeList` adds each listed event's run counts in one query for the page.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import models
from django.db.models import BooleanField, Count, Exists, F, Max, Min, QuerySet
from django.db.models.expressions import Expression
from django.db.models.lookups import IContains, Lookup
from django.http import HttpRequest
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.text import capfirst
from django.utils.translation import gettext_lazy as _
from dramatiq.common import q_name

from .conf import get_settings
from .cron import CRON_EVENT
from .models import Run
from .names import is_wildcard
from .registry import registered_functions
from .text import has_unstorable

__all__ = [
    "CappedCountPaginator",
    "ContainsText",
    "EventChangeList",
    "EventNameFilter",
    "FunctionFilter",
    "HasMember",
    "IndexedDateHierarchyChangeList",
    "QueueNameFilter",
    "RegistryChoicesFilter",
    "search_values",
]


#: A JSON value :class:`HasMember` compares: text, a number, true, false or null.
JSONScalar = str | int | float | bool | None

#: The integers both databases compare exactly (SQLite's are 64-bit).
_SMALLEST_INT, _LARGEST_INT = -(2**63), 2**63 - 1


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``cap + 1`` rows, so a list over a million rows costs an index range, not a scan.

    The count drops the list's ordering: any ``cap + 1`` rows tell whether there
    are more, and without ``ORDER BY created_at, id`` an index on the filtered
    column answers alone (an index-only scan), with no sort and no table reads.
    Pages past the cap are not linked; filter or search to narrow the list.
    """

    #: The most rows counted.
    cap = 10_000

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if isinstance(object_list, QuerySet):
            if not object_list.query.is_sliced:
                object_list = object_list.order_by()
            return object_list[: self.cap + 1].count()
        return len(object_list)

    @property
    def capped(self) -> bool:
        """Whether there may be more rows than ``count`` says."""
        return self.count > self.cap


# -- the date hierarchy ----------------------------------------------------------------------------


def _next_month(day: dt.date) -> dt.date:
    return (day.replace(day=1) + dt.timedelta(days=32)).replace(day=1)


class IndexedDateHierarchyChangeList(ChangeList):
    """A change list whose date hierarchy costs index probes, not a scan of the matching rows.

    Django's ``{% date_hierarchy %}`` lists the years, months or days that have
    rows with ``SELECT DISTINCT date_trunc(...)`` over every row of the list: a
    second over a million runs. This one asks for the first and last dates
    (``MIN`` and ``MAX``, which an index answers from its ends) and, in one query,
    whether each period in between has a row (``EXISTS``, one index probe each).
    The links are the same; the change list templates render them.
    """

    @cached_property
    def date_hierarchy_links(self) -> dict[str, Any]:
        """The context of ``admin/date_hierarchy.html``, as Django's tag would make it."""
        field = self.date_hierarchy
        year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
        year, month, day = (self.params.get(name) for name in (year_field, month_field, day_field))

        def link(filters: dict[str, Any]) -> str:
            return self.get_query_string(filters, [f"{field}__"])

        if year and month and day:
            date = dt.date(int(year), int(month), int(day))
            return {
                "show": True,
                "back": {
                    "link": link({year_field: year, month_field: month}),
                    "title": capfirst(formats.date_format(date, "YEAR_MONTH_FORMAT")),
                },
                "choices": [{"title": capfirst(formats.date_format(date, "MONTH_DAY_FORMAT"))}],
            }
        bounds = self.queryset.order_by().aggregate(first=Min(field), last=Max(field))
        first, last = (self._local_date(bounds["first"]), self._local_date(bounds["last"]))
        if not (year or month or day) and first is not None and last is not None and first.year == last.year:
            year = str(first.year)  # one year only: show its months (or days), as Django does
            if first.month == last.month:
                month = str(first.month)
        if year and month:
            days = self._periods(first, last, lambda date: date + dt.timedelta(days=1))
            return {
                "show": True,
                "back": {"link": link({year_field: year}), "title": str(year)},
                "choices": [
                    {
                        "link": link({year_field: year, month_field: month, day_field: date.day}),
                        "title": capfirst(formats.date_format(date, "MONTH_DAY_FORMAT")),
                    }
                    for date in days
                ],
            }
        if year:
            first = first and first.replace(day=1)
            months = self._periods(first, last, _next_month)
            return {
                "show": True,
                "back": {"link": link({}), "title": _("All dates")},
                "choices": [
                    {
                        "link": link({year_field: year, month_field: date.month}),
                        "title": capfirst(formats.date_format(date, "YEAR_MONTH_FORMAT")),
                    }
                    for date in months
                ],
            }
        first = first and first.replace(month=1, day=1)
        years = self._periods(first, last, lambda date: date.replace(year=date.year + 1))
        return {
            "show": True,
            "back": None,
            "choices": [
                {"link": link({year_field: str(date.year)}), "title": str(date.year)} for date in years
            ],
        }

    @staticmethod
    def _local_date(value: dt.datetime | dt.date | None) -> dt.date | None:
        if isinstance(value, dt.datetime):
            return (timezone.localtime(value) if timezone.is_aware(value) else value).date()
        return value

    def _periods(
        self, first: dt.date | None, last: dt.date | None, following: Callable[[dt.date], dt.date]
    ) -> list[dt.date]:
        """The starts of the periods from the one of ``first`` to the one of ``last`` that have rows.

        The first and the last have rows (they hold the MIN and the MAX); the ones
        in between are asked about in a single query of ``EXISTS`` subqueries.
        """
        if first is None or last is None:
            return []
        starts = [first]
        while following(starts[-1]) <= last:
            starts.append(following(starts[-1]))
        if len(starts) <= 2:
            return starts
        field = self.date_hierarchy
        queryset = self.queryset.order_by()
        probes = {
            f"period_{index}": Exists(
                queryset.filter(
                    **{f"{field}__gte": self._moment(start), f"{field}__lt": self._moment(following(start))}
                )
            )
            for index, start in enumerate(starts[1:-1], start=1)
        }
        rows = list(self.model._default_manager.using(queryset.db).order_by().values(**probes)[:1])
        found = rows[0] if rows else {}
        return [start for index, start in enumerate(starts) if found.get(f"period_{index}", True)]

    def _moment(self, date: dt.date) -> dt.datetime | dt.date:
        field = self.model._meta.get_field(self.date_hierarchy)
        if not isinstance(field, models.DateTimeField):
            return date
        moment = dt.datetime.combine(date, dt.time.min)
        return timezone.make_aware(moment) if settings.USE_TZ else moment


class EventChangeList(IndexedDateHierarchyChangeList):
    """Attaches each listed event's run counts by status (``run_counts``), in one query for the page."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        counts: dict[Any, Counter[str]] = defaultdict(Counter)
        for event_id, status, count in (
            Run.objects.filter(event_id__in=[event.pk for event in self.result_list])
            .values_list("event_id", "status")
            .annotate(n=Count("pk"))
            .order_by()
        ):
            counts[event_id][status] = count
        for event in self.result_list:
            event.run_counts = counts[event.pk]


# -- searching -------------------------------------------------------------------------------------


class ContainsText(IContains):
    """``icontains`` that PostgreSQL answers from a trigram index, and SQLite for any length of text.

    Django's own ``icontains`` compares ``UPPER(column)`` on PostgreSQL, an
    expression no index on the column serves: this is ``column ILIKE '%term%'``.
    On SQLite, ``LIKE`` refuses a pattern of more than 50,000 bytes: this is
    ``INSTR(LOWER(column), LOWER(term)) > 0``, which folds case as ``LIKE`` does
    (ASCII letters only) and has no wildcard to escape. Elsewhere it is
    ``icontains`` unchanged.
    """

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        lhs_sql, lhs_params = Lookup.process_lhs(self, compiler, connection)  # no UPPER(), no cast
        rhs_sql, rhs_params = self.process_rhs(compiler, connection)  # '%term%', escaped
        return f"{lhs_sql} ILIKE {rhs_sql}", (*lhs_params, *rhs_params)

    def as_sqlite(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        lhs_sql, lhs_params = Lookup.process_lhs(self, compiler, connection)
        rhs_sql, rhs_params = Lookup.process_rhs(self, compiler, connection)  # the term, no wildcards
        return f"INSTR(LOWER({lhs_sql}), LOWER({rhs_sql})) > 0", (*lhs_params, *rhs_params)


def search_values(text: str) -> list[JSONScalar]:
    """The values a search for ``text`` looks for: the text itself and the JSON scalar it reads as.

    ``42`` stands for the text "42" and the number 42, ``true`` for the text and
    ``true``, ``"42"`` (quoted) for the text with its quotes and the text "42".
    Numbers compare as numbers (``1``, ``1.0`` and ``1e0`` are one value; ``true``
    is not a number). Only what both databases compare alike is read as JSON:
    ``NaN``, ``Infinity``, numbers too big for a float and integers outside 64
    bits stay text, and a text beginning with ``[`` or ``{`` is never parsed (a list
    or an object is searched as the text). Texts no database can hold (see
    :func:`text.has_unstorable`) are left out, so the result may be empty.
    """
    values: list[JSONScalar] = [text]
    if text[:1] not in ("[", "{"):
        with contextlib.suppress(ValueError):  # not JSON, or not a value both databases compare alike
            values.append(_comparable(json.loads(text, parse_constant=_not_a_number)))
    return [value for value in values if not isinstance(value, str) or not has_unstorable(value)]


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _comparable(value: object) -> JSONScalar:
    """``value`` as :class:`HasMember` compares it (integral floats as integers), or ``ValueError``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not finite")
        if not value.is_integer():
            return value
        value = int(value)
    if isinstance(value, int) and _SMALLEST_INT <= value <= _LARGEST_INT:
        return value
    raise ValueError(f"{value!r} is not compared alike by every database")


class HasMember(Expression):
    """True where the JSON object in ``column`` has the member ``key`` with one of ``values``.

    ``key`` is the member's name as it is: dots, ``__``, quotes, digits and the
    empty name are not paths. A text value matches a JSON string, a number any
    JSON number equal to it, ``True``/``False``/``None`` JSON ``true``/``false``/
    ``null`` (never 1 or 0). Lists and objects in the data match nothing. Every
    value must pass :func:`text.has_unstorable` (none found); build ``values`` with :func:`search_values`.

    PostgreSQL tests ``column @> '{"key": value}'`` for each value, which the GIN
    index on the column serves; SQLite reads the object's members with
    ``json_each`` and compares each by its JSON type.
    """

    def __init__(self, column: str, key: str, values: Sequence[JSONScalar]) -> None:
        super().__init__(output_field=BooleanField())
        self.column: Any = F(column)
        self.key = key
        self.values = list(values)

    def get_source_expressions(self) -> list[Any]:
        return [self.column]

    def set_source_expressions(self, exprs: Sequence[Any]) -> None:
        (self.column,) = exprs

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        """SQLite: an ``EXISTS`` over the members of the object, by name and JSON type."""
        column_sql, column_params = compiler.compile(self.column)
        tests: list[str] = []
        params: list[Any] = []
        for value in self.values:
            if value is None:
                tests.append("de_member.type = 'null'")
            elif isinstance(value, bool):
                tests.append(f"de_member.type = '{'true' if value else 'false'}'")
            elif isinstance(value, str):
                tests.append("(de_member.type = 'text' AND de_member.value = %s)")
                params.append(value)
            else:
                tests.append("(de_member.type IN ('integer', 'real') AND de_member.value = %s)")
                params.append(value)
        if not tests:
            return "1 = 0", ()
        sql = (
            f"EXISTS (SELECT 1 FROM json_each({column_sql}) AS de_member "
            f"WHERE de_member.key = %s AND ({' OR '.join(tests)}))"
        )
        return sql, (*column_params, self.key, *params)

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        """PostgreSQL: ``column @> '{"key": value}'`` for each value, served by the GIN index."""
        column_sql, column_params = compiler.compile(self.column)
        if not self.values:
            return "1 = 0", ()
        tests = " OR ".join(f"{column_sql} @> %s::jsonb" for _value in self.values)
        params = [param for value in self.values for param in (*column_params, json.dumps({self.key: value}))]
        return f"({tests})", tuple(params)


# -- filters ---------------------------------------------------------------------------------------


class RegistryChoicesFilter(admin.SimpleListFilter):
    """A filter whose choices come from the registered functions, not from a DISTINCT over the table."""

    #: The model field the chosen value filters on.
    field: str

    def choices_from_registry(self) -> list[str]:
        """The values to offer (the value in use is offered too, even if no longer registered)."""
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]) -> list[tuple[str, str]]:
        values = set(self.choices_from_registry())
        current = self.value()
        if current:
            values.add(current)  # a function removed since still filters
        return [(value, value) for value in sorted(values)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class FunctionFilter(RegistryChoicesFilter):
    """Runs by function: the ids of the registered functions."""

    title = _("function")
    parameter_name = "function"
    field = "function"

    def choices_from_registry(self) -> list[str]:
        return [function.id for function in registered_functions()]


class EventNameFilter(RegistryChoicesFilter):
    """Runs by event name: the triggers of the registered functions that are names, not patterns
    (a run's event name is never ``app/user.*``), and the cron tick's if a function has ``cron``."""

    title = _("event name")
    parameter_name = "event_name"
    field = "event_name"

    def choices_from_registry(self) -> list[str]:
        functions = tuple(registered_functions())
        names = [name for function in functions for name in function.triggers if not is_wildcard(name)]
        if any(function.cron for function in functions):
            names.append(CRON_EVENT)
        return names


class QueueNameFilter(RegistryChoicesFilter):
    """Queues the broker has declared (and django-events' own), not a DISTINCT over the table."""

    title = _("queue")
    parameter_name = "queue_name"
    field = "queue_name"

    def choices_from_registry(self) -> list[str]:
        declared = {q_name(name) for name in dramatiq.get_broker().get_declared_queues()}
        return [*declared, get_settings().QUEUE_NAME]
