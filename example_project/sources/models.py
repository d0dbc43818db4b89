"""The one model of the example: a data source that a user connected."""

from __future__ import annotations

from django.db import models


class Source(models.Model):
    """A data source, connected by the user at ``email``; the functions in ``events.py`` act on it."""

    name = models.CharField(max_length=200)
    email = models.EmailField(help_text="The e-mail address of the user who connected the source.")
    created = models.DateTimeField(auto_now_add=True)
    backfilled_rows = models.PositiveIntegerField(
        null=True, blank=True, help_text="Rows imported by the backfill; empty until it has run."
    )

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return self.name
