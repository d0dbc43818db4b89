"""The DJANGO_EVENTS settings dict: defaults, overrides, and clear errors."""

from __future__ import annotations

import datetime as dt
import threading

import dramatiq
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from dramatiq.brokers.stub import StubBroker

from django_events.conf import (
    MAX_DURATION,
    MAX_QUEUE_NAME_LENGTH,
    EventsSettings,
    get_settings,
    is_valid_queue_name,
)
from django_events.exceptions import ConfigurationError


def test_defaults(settings):
    settings.DJANGO_EVENTS = {}
    conf = get_settings()
    assert conf == EventsSettings()
    assert conf.DEFAULT_RETRIES == 4
    assert conf.MAX_EVENT_BYTES == 256 * 1024
    assert conf.QUEUE_NAME == "django_events"


def test_missing_setting_means_defaults(settings):
    del settings.DJANGO_EVENTS
    assert get_settings() == EventsSettings()


def test_settings_are_read_at_use_time(settings):
    settings.DJANGO_EVENTS = {"DEFAULT_RETRIES": 9}
    assert get_settings().DEFAULT_RETRIES == 9
    settings.DJANGO_EVENTS = {"DEFAULT_RETRIES": 1}
    assert get_settings().DEFAULT_RETRIES == 1


def test_unknown_key_is_an_error_naming_the_valid_ones(settings):
    settings.DJANGO_EVENTS = {"DEFAULT_RETRIESS": 3}
    with pytest.raises(ConfigurationError, match=r"DEFAULT_RETRIESS.*Valid keys are: DEFAULT_RETRIES"):
        get_settings()


@pytest.mark.parametrize(
    "bad",
    [
        {"DEFAULT_RETRIES": -1},
        {"DEFAULT_RETRIES": "4"},
        {"DEFAULT_RETRIES": True},
        {"RETRY_BACKOFF_MIN": -1},
        {"RETRY_BACKOFF_MIN": 10, "RETRY_BACKOFF_MAX": 5},
        {"QUEUE_NAME": ""},
        {"MAX_EVENT_BYTES": 0},
        {"LEASE_MARGIN": 0},
        {"DEFAULT_TIME_LIMIT": -5},
        {"WORKER_CONN_MAX_AGE": -1},
        {"WORKER_CONN_MAX_AGE": "300"},
    ],
)
def test_invalid_values_are_errors(settings, bad):
    settings.DJANGO_EVENTS = bad
    with pytest.raises(ConfigurationError, match="invalid value"):
        get_settings()


def test_not_a_dict_is_an_error(settings):
    settings.DJANGO_EVENTS = ["DEFAULT_RETRIES"]
    with pytest.raises(ConfigurationError, match="must be a dict"):
        get_settings()


DURATIONS = [
    "RETRY_BACKOFF_MIN",
    "RETRY_BACKOFF_MAX",
    "LEASE_MARGIN",
    "RECOVERY_INTERVAL",
    "RECOVERY_GRACE",
    "DEFAULT_TIME_LIMIT",
    "WORKER_CONN_MAX_AGE",
]


@pytest.mark.parametrize("key", DURATIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300, MAX_DURATION + 1, -1])
def test_a_duration_not_finite_or_out_of_range_is_an_error_naming_the_key(settings, key, value):
    # Given a duration that is not a number of seconds a date or a timer can take
    settings.DJANGO_EVENTS = {key: value}

    # When the settings are read, then the error names the key, the value and the range
    with pytest.raises(
        ImproperlyConfigured, match=rf"DJANGO_EVENTS\['{key}'\] has an invalid value"
    ) as error:
        get_settings()
    assert "ten years" in str(error.value)


def test_the_longest_durations_are_usable_as_dates_timers_and_milliseconds(settings):
    # Given every duration at its largest
    settings.DJANGO_EVENTS = dict.fromkeys(DURATIONS, MAX_DURATION)

    # When the settings are read
    conf = get_settings()

    # Then a lease of a time limit plus its margin is a date, a recovery interval a timer, and the
    # time limit a whole number of milliseconds
    lease = dt.timedelta(seconds=conf.DEFAULT_TIME_LIMIT + conf.LEASE_MARGIN)
    assert timezone.now() + lease + dt.timedelta(seconds=conf.RETRY_BACKOFF_MAX) < timezone.now().replace(
        year=9999
    )
    assert conf.RECOVERY_INTERVAL <= threading.TIMEOUT_MAX
    assert conf.default_time_limit_ms == MAX_DURATION * 1000


def test_a_time_limit_below_one_millisecond_is_an_error(settings):
    # Dramatiq's time limits are whole milliseconds: 0.0001 s would be 0, meaning "no limit of its own"
    settings.DJANGO_EVENTS = {"DEFAULT_TIME_LIMIT": 0.0001}
    with pytest.raises(ConfigurationError, match=r"DEFAULT_TIME_LIMIT.*from 0\.001"):
        get_settings()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DEFAULT_RETRIES", 10**9),
        ("MAX_EVENT_BYTES", 2**31),
        ("RECOVERY_BATCH", 10**12),
        ("PREPARED_STATEMENTS", "yes"),
    ],
)
def test_a_count_out_of_range_is_an_error_naming_the_key(settings, key, value):
    settings.DJANGO_EVENTS = {key: value}
    with pytest.raises(ConfigurationError, match=rf"DJANGO_EVENTS\['{key}'\] has an invalid value"):
        get_settings()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1queue",
        "-queue",
        ".queue",
        "queue name",
        "queue/name",
        "queue:name",
        "caf\u00e9",
        "queue\x00",
        "queue.DQ",
        "queue.XQ",
        "q" * (MAX_QUEUE_NAME_LENGTH + 1),
        5,
        None,
    ],
)
def test_a_queue_name_dramatiq_or_the_column_would_refuse_is_an_error(settings, name):
    settings.DJANGO_EVENTS = {"QUEUE_NAME": name}
    with pytest.raises(ImproperlyConfigured, match=r"DJANGO_EVENTS\['QUEUE_NAME'\] has an invalid value"):
        get_settings()


@pytest.mark.parametrize(
    "name", ["django_events", "_private", "Jobs.v2", "a-b_c.d", "queue.DQx", "q" * MAX_QUEUE_NAME_LENGTH]
)
def test_a_queue_name_dramatiq_accepts_is_valid(settings, name):
    settings.DJANGO_EVENTS = {"QUEUE_NAME": name}
    assert name == get_settings().QUEUE_NAME


@pytest.mark.parametrize(
    "name", ["django_events", "_x", "a.b-c", "1queue", "-q", ".q", "q q", "caf\u00e9", "q\n", "", "Q" * 300]
)
def test_queue_names_are_checked_as_dramatiq_checks_them(name):
    # Given Dramatiq's own check of an actor's queue name
    try:
        dramatiq.actor(queue_name=name, broker=StubBroker())(lambda: None)
        dramatiq_accepts = True
    except ValueError:
        dramatiq_accepts = False

    # Then every name we accept, Dramatiq accepts (we also refuse the long and the .DQ/.XQ ones)
    if is_valid_queue_name(name):
        assert dramatiq_accepts
    elif len(name) <= MAX_QUEUE_NAME_LENGTH:
        assert not dramatiq_accepts


def test_a_huge_invalid_value_makes_a_short_error(settings):
    settings.DJANGO_EVENTS = {"QUEUE_NAME": "x" * 10_000_000}
    with pytest.raises(ConfigurationError) as error:
        get_settings()
    assert len(str(error.value)) < 1000
    assert "10000000 chars" in str(error.value)


def test_an_unknown_key_that_is_not_a_string_is_named(settings):
    settings.DJANGO_EVENTS = {5: "x"}
    with pytest.raises(ConfigurationError, match=r"Unknown key.*5"):
        get_settings()
