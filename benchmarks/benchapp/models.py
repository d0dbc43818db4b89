"""The "row of the app's own" that the send benchmark inserts beside each event."""

from __future__ import annotations

from django.db import models


class Item(models.Model):
    """A small row, as a view's critical path would write."""

    name = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name
