"""Worker threads keep their database connection between messages, and drop broken or old ones."""

from __future__ import annotations

import pytest
from django.db import connection

from django_events.middleware import release_connections


@pytest.fixture
def connected(transactional_db, settings):
    """A connection opened the way a message's first query opens it, with Django's default CONN_MAX_AGE."""
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    connection.close()
    connection.settings_dict["CONN_MAX_AGE"] = 0
    connection.ensure_connection()
    yield connection.connection
    connection.close()


def test_connection_is_kept_for_the_next_message(connected):
    release_connections()  # after one message
    release_connections()  # before the next
    assert connection.connection is connected


def test_with_no_worker_age_django_conn_max_age_applies(connected, settings):
    settings.DJANGO_EVENTS = {"WORKER_CONN_MAX_AGE": None}
    release_connections()
    assert connection.connection is None  # CONN_MAX_AGE 0: closed after each message


def test_connection_older_than_the_worker_age_is_closed(connected, settings):
    settings.DJANGO_EVENTS = {"WORKER_CONN_MAX_AGE": 0}
    release_connections()
    assert connection.connection is None


def test_connection_that_failed_and_is_unusable_is_closed(connected, monkeypatch):
    release_connections()
    connection.errors_occurred = True
    monkeypatch.setattr(connection, "is_usable", lambda: False)
    release_connections()
    assert connection.connection is None


def test_connection_left_outside_autocommit_is_closed(connected):
    release_connections()
    connection.set_autocommit(False)  # a function that began a transaction and never ended it
    release_connections()
    assert connection.connection is None
