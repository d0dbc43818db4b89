"""The startup check that a step.atomic's writes and its memo share one database."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.test import override_settings

from django_events.checks import check_step_database


class ProjectElsewhere:
    """Sends the test app's models to another database; the rest stays on default."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "other" if model._meta.app_label == "testapp" else None


class StepsElsewhere:
    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "other" if model._meta.model_name == "step" else None


def test_one_database_passes():
    assert check_step_database() == []


def test_project_models_on_another_database_are_refused_with_the_models_named():
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.ProjectElsewhere"]):
        errors = check_step_database()
    assert [error.id for error in errors] == ["django_events.E031"]
    assert isinstance(errors[0], checks.Error)
    assert "testapp.Call -> 'other'" in errors[0].msg
    assert "SILENCED_SYSTEM_CHECKS" in errors[0].hint


def test_steps_apart_from_runs_are_refused():
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.StepsElsewhere"]):
        errors = check_step_database()
    assert [error.id for error in errors] == ["django_events.E030"]


def test_the_check_is_registered():
    assert check_step_database in checks.registry.registry.get_checks()
