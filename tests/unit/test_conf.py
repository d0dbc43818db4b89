"""The DJANGO_EVENTS settings dict: defaults, overrides, and clear errors."""

from __future__ import annotations

import pytest

from django_events.conf import EventsSettings, get_settings
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
