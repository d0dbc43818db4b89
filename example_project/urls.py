"""URLs of the example site: the admin, and the sources API."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("example_project.sources.urls")),
]
