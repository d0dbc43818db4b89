"""The sources API (and sign-up), mounted under ``/api/``."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "sources"
urlpatterns = [
    path("users/", views.sign_up, name="sign_up"),
    path("sources/", views.connect_source, name="connect"),
    path("sources/<int:source_id>/runs/", views.source_runs, name="runs"),
]
