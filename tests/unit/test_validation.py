"""Bad input to send() and @function gets a clear error and stores nothing."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from django.db import transaction

import django_events
from django_events import EventValidationError
from django_events.models import Event, Run
from django_events.registry import function, unregister


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("", None, "cannot be empty"),
        ("x" * 256, None, "at most 255"),
        (None, None, "must be a str"),
        (42, None, "must be a str"),
        ("has space", None, "whitespace"),
        ("tab\there", None, "whitespace"),
        ("nul\x00", None, "control"),
        ("test/ok", [1, 2], "must be a dict"),
        ("test/ok", "text", "must be a dict"),
        ("test/ok", 7, "must be a dict"),
        ("test/ok", {"when": dt.datetime(2026, 1, 1)}, "not JSON-serialisable"),
        ("test/ok", {"amount": decimal.Decimal("1.5")}, "not JSON-serialisable"),
        ("test/ok", {"obj": object()}, "not JSON-serialisable"),
        ("test/ok", {"set": {1, 2}}, "not JSON-serialisable"),
        ("test/ok", {"nan": float("nan")}, "not JSON-serialisable"),
        ("test/ok", {"inf": float("inf")}, "not JSON-serialisable"),
        ("test/ok", {"s": "nul \x00 char"}, "NUL"),
        ("test/ok", {(1, 2): "tuple key"}, "not JSON-serialisable"),
    ],
)
def test_bad_send_input_raises_and_stores_nothing(db, name, data, message):
    with pytest.raises(EventValidationError, match=message):
        django_events.send(name, data)
    assert not Event.objects.exists()
    assert not Run.objects.exists()


def test_circular_data_raises(db):
    data: dict = {}
    data["self"] = data
    with pytest.raises(EventValidationError, match="not JSON-serialisable"):
        django_events.send("test/ok", data)
    assert not Event.objects.exists()


def test_backslash_text_that_looks_like_nul_escape_is_accepted(db):
    event = django_events.send("test/ok", {"s": "\\u0000 is how JSON writes NUL"})
    assert Event.objects.get(pk=event.pk).data["s"].startswith("\\u0000")


def test_data_over_size_limit_raises(db, settings):
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "MAX_EVENT_BYTES": 100}
    with pytest.raises(EventValidationError, match="over the limit of 100"):
        django_events.send("test/ok", {"blob": "x" * 100})
    assert not Event.objects.exists()
    # and just under the limit is fine (the limit counts UTF-8 bytes of the JSON)
    django_events.send("test/ok", {"blob": "x" * 80})


def test_size_limit_counts_utf8_bytes(db, settings):
    settings.DJANGO_EVENTS = {**settings.DJANGO_EVENTS, "MAX_EVENT_BYTES": 50}
    with pytest.raises(EventValidationError):
        django_events.send("test/ok", {"s": "é" * 22})  # 30 characters of JSON, but 52 bytes


def test_default_size_limit_is_256_kib(db, settings):
    settings.DJANGO_EVENTS = {}
    with pytest.raises(EventValidationError, match="262144"):
        django_events.send("test/ok", {"blob": "x" * (256 * 1024)})


@pytest.mark.parametrize("bad_id", ["", "k" * 256, 5, b"bytes"])
def test_bad_idempotency_id_raises(db, bad_id):
    with pytest.raises(EventValidationError, match="event id"):
        django_events.send("test/ok", id=bad_id)
    assert not Event.objects.exists()


@pytest.mark.parametrize(
    "item",
    ["test/ok", ("test/ok", {}), {"data": {}}, {"name": "test/ok", "extra": 1}],
)
def test_bad_send_many_items_raise(db, item):
    with pytest.raises(EventValidationError):
        django_events.send_many([item])
    assert not Event.objects.exists()


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((), {}, TypeError),
        (("",), {}, EventValidationError),
        (("a b",), {}, EventValidationError),
        (("ok",), {"retries": -1}, TypeError),
        (("ok",), {"retries": 1.5}, TypeError),
        (("ok",), {"retries": True}, TypeError),
        (("ok",), {"time_limit": 0}, TypeError),
        (("ok",), {"time_limit": "5"}, TypeError),
        (("ok",), {"time_limit": float("nan")}, TypeError),
        (("ok",), {"time_limit": float("inf")}, TypeError),
        (("ok",), {"time_limit": 1e300}, TypeError),
        (("ok",), {"time_limit": 0.0001}, TypeError),
        (("ok",), {"retries": 10**7}, TypeError),
        (("ok",), {"id": ""}, TypeError),
        (("ok",), {"id": "x" * 256}, TypeError),
    ],
)
def test_bad_function_arguments_raise(args, kwargs, error):
    with pytest.raises(error):
        function(*args, **kwargs)(lambda ctx: None)


def test_function_decorates_only_callables():
    with pytest.raises(TypeError, match="callable"):
        function("ok", id="tests.not_callable")(42)  # type: ignore[type-var]
    unregister("tests.not_callable")


def test_retry_after_error_needs_seconds():
    with pytest.raises(TypeError):
        django_events.RetryAfterError("soon")  # type: ignore[arg-type]
    assert django_events.RetryAfterError(2.5).seconds == 2.5


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), float("-inf")])
def test_retry_after_error_refuses_negative_and_non_finite_delays(seconds):
    with pytest.raises(ValueError, match="finite, non-negative"):
        django_events.RetryAfterError(seconds)


def test_retry_after_error_cuts_a_huge_delay_to_a_year():
    assert django_events.RetryAfterError(1e300).seconds == django_events.RetryAfterError.MAX_SECONDS
    assert django_events.RetryAfterError.MAX_SECONDS == 366 * 24 * 3600


def _nested(levels: int) -> dict:
    """An object nested ``levels`` deep (the outer object is level 1)."""
    data: dict = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return data


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (_nested(101), None, "nested too deeply"),
        ({"a": [_nested(100)]}, None, "nested too deeply"),
        (_nested(100_000), None, "nested too deeply"),  # past Python's own recursion limit
        ({"s": "lone \ud800 surrogate"}, None, "lone surrogate"),
        ({"key \udfff": 1}, None, "lone surrogate"),
        ({1: "a", "1": "b"}, None, "same once made strings"),
        ({"x": {True: 1, "true": 2}}, None, "same once made strings"),
        ({None: 1, "null": 2}, None, "same once made strings"),
        ({}, "nul\x00id", "printable"),
        ({}, "new\nline", "printable"),
        ({}, "bell\x07", "printable"),
        ({}, "lone \ud800", "printable"),
        ({}, "", "non-empty"),
        ({}, 42, "non-empty str"),
    ],
)
def test_odd_send_input_raises_stores_nothing_and_leaves_the_transaction_usable(
    transactional_db, data, key, message
):
    # Given a transaction that has written something already
    with transaction.atomic():
        kept = django_events.send("test/nobody-listens", {"before": True})

        # When send() is given odd input
        with pytest.raises(EventValidationError, match=message):
            django_events.send("test/ok", data, id=key)

        # Then the transaction still works, and commits what it wrote, and only that
        after = django_events.send("test/nobody-listens", {"after": True})
    assert set(Event.objects.values_list("pk", flat=True)) == {kept.pk, after.pk}
    assert not Run.objects.exists()


def test_send_accepts_data_nested_to_the_limit_and_printable_ids(db):
    event = django_events.send("test/ok", _nested(100), id="order 42 — ünïcode ✓")
    stored = Event.objects.get(pk=event.pk)
    assert stored.data == _nested(100)
    assert stored.idempotency_key == "order 42 — ünïcode ✓"
