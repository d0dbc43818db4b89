"""``short_repr``: a bounded representation of any value, for logs and error messages."""

from __future__ import annotations

import pytest

from django_events.text import SHORT_REPR_LIMIT, short_repr


def test_a_short_value_is_its_repr() -> None:
    assert short_repr("run-1") == "'run-1'"
    assert short_repr(42) == "42"
    assert short_repr(b"\x00ab") == "b'\\x00ab'"
    assert short_repr({"a": [1, 2]}) == "{'a': [1, 2]}"


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("x" * 10_000_000, "10000000 chars"),
        (b"x" * 10_000_000, "10000000 bytes"),
        (bytearray(b"y" * 5000), "5000 bytes"),
        (memoryview(b"z" * 5000), "5000 bytes"),
    ],
)
def test_a_long_string_or_bytes_is_cut_with_its_full_length(value: object, size: str) -> None:
    # When a 10 MB value is represented
    text = short_repr(value)

    # Then the result is the limit plus a marker saying how long the value was
    assert len(text) <= SHORT_REPR_LIMIT + 40
    assert text.endswith(f"…[cut: {size}]")


def test_a_large_or_deep_container_is_cut() -> None:
    deep: list[object] = []
    for _ in range(10_000):
        deep = [deep]
    for value in ({str(n): "v" * 1000 for n in range(100_000)}, list(range(1_000_000)), deep):
        text = short_repr(value)
        assert len(text) <= SHORT_REPR_LIMIT + 10


def test_a_string_of_escapes_is_cut_even_if_the_value_itself_is_short() -> None:
    text = short_repr("\x00" * 150)
    assert len(text) <= SHORT_REPR_LIMIT + 20
    assert text.endswith("…[cut: 150 chars]")


def test_the_limit_can_be_chosen() -> None:
    assert short_repr("abcdefgh", 5) == "'abcd…[cut: 8 chars]"


def test_a_value_whose_repr_raises_is_shown_by_its_type() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert short_repr(Broken()).startswith("<Broken instance")


def test_lone_surrogates_are_escaped_in_the_result() -> None:
    # repr() escapes them, so the result can be logged or encoded as UTF-8
    short_repr("\ud800" * 300).encode()
