"""Validation of the sources API's input."""

from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model

from .models import Source


class SourceForm(forms.ModelForm):
    """The JSON body of ``POST /api/sources/``: ``{"name": ..., "email": ...}``."""

    class Meta:
        model = Source
        fields = ["name", "email"]


class SignUpForm(forms.Form):
    """The JSON body of ``POST /api/users/``: ``{"email": ...}``, the new user's address and username."""

    # At most 150 characters: the e-mail is the username too, and auth's usernames are that long at most.
    email = forms.EmailField(max_length=150)

    def clean_email(self) -> str:
        email: str = self.cleaned_data["email"]
        if get_user_model()._default_manager.filter(username=email).exists():
            raise forms.ValidationError("A user with this e-mail address exists already.", code="unique")
        return email
