"""App config of the example's ``sources`` app."""

from __future__ import annotations

from django.apps import AppConfig


class SourcesConfig(AppConfig):
    """Data sources a user connects; their ``events.py`` is discovered by django-events."""

    name = "example_project.sources"
    label = "sources"
    verbose_name = "Sources"
    default_auto_field = "django.db.models.BigAutoField"
