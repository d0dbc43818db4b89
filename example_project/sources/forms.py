"""Validation of the sources API's input."""

from __future__ import annotations

from django import forms

from .models import Source


class SourceForm(forms.ModelForm):
    """The JSON body of ``POST /api/sources/``: ``{"name": ..., "email": ...}``."""

    class Meta:
        model = Source
        fields = ["name", "email"]
