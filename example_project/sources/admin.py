"""Sources in the admin, next to django-events' runs."""

from __future__ import annotations

from django.contrib import admin

from .models import Source


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    """Lists the connected sources and what the backfill found."""

    list_display = ["name", "email", "created", "backfilled_rows"]
    search_fields = ["name", "email"]
    readonly_fields = ["created", "backfilled_rows"]
    date_hierarchy = "created"
