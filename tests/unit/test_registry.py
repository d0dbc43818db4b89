"""The function table: ids, triggers, duplicates."""

from __future__ import annotations

import uuid

import pytest

from django_events.exceptions import DuplicateFunctionError
from django_events.ids import uuid7
from django_events.registry import Function, function, functions_for, get_function, register, unregister


def test_default_id_is_the_dotted_path():
    @function("test/default-id")
    def handler(ctx):
        return None

    try:
        spec = get_function(f"{__name__}.test_default_id_is_the_dotted_path.<locals>.handler")
        assert spec is not None
        assert spec.triggers == ("test/default-id",)
        assert functions_for("test/default-id") == (spec,)
    finally:
        unregister(f"{__name__}.test_default_id_is_the_dotted_path.<locals>.handler")


def test_decorator_returns_the_function_unchanged():
    def handler(ctx):
        return 42

    try:
        assert function("test/unchanged", id="tests.unchanged")(handler) is handler
    finally:
        unregister("tests.unchanged")


def test_two_callables_with_one_id_are_an_error():
    with pytest.raises(DuplicateFunctionError, match=r"tests\.ok.*another id"):

        @function("test/other", id="tests.ok")
        def impostor(ctx):  # pragma: no cover
            pass

    # the original registration is untouched
    assert get_function("tests.ok").fn.__name__ == "ok"
    assert functions_for("test/other") == ()


def test_registering_the_same_callable_again_replaces_it():
    original = get_function("tests.ok")
    register(Function(id=original.id, fn=original.fn, triggers=original.triggers, retries=original.retries))
    assert get_function("tests.ok").fn is original.fn
    assert len(functions_for("test/ok")) == 1


def test_repeated_trigger_subscribes_once():
    @function("test/twice", "test/twice", id="tests.twice")
    def twice(ctx):
        return None

    try:
        assert len(functions_for("test/twice")) == 1
    finally:
        unregister("tests.twice")


def test_uuid7_is_version_7_and_time_ordered():
    ids = [uuid7() for _ in range(1000)]
    assert all(isinstance(i, uuid.UUID) and i.version == 7 for i in ids)
    assert all(i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 1000
    # later milliseconds sort later
    millis = [i.int >> 80 for i in ids]
    assert millis == sorted(millis)
