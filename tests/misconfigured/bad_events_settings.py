"""Settings with a typo in DJANGO_EVENTS."""

from tests.settings import *  # noqa: F403

DJANGO_EVENTS = {"DEFAULT_RETRIESS": 3}
