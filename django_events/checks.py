"""System checks of django-events (``manage.py check``, and every command that starts a process).

Imported by the app config once the models are loaded.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core import checks
from django.db import router

from .models import Run, Step

__all__ = ["check_step_database"]


@checks.register(checks.Tags.database)
def check_step_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``step.atomic`` commits a step's ORM writes with its memo: both must be on the ledger's database.

    E030: the ledger's own models are routed to more than one database. E031: models of
    the project are written to another database than the ledger's, where a step's
    writes to them could not commit with its memo. Silence E031 (``SILENCED_SYSTEM_CHECKS``)
    only if no ``step.atomic`` writes to those models.
    """
    ledger = router.db_for_write(Run)
    errors: list[checks.CheckMessage] = []
    step_db = router.db_for_write(Step)
    if step_db != ledger:
        errors.append(
            checks.Error(
                f"django_events' runs are written to database {ledger!r} but their steps to {step_db!r}.",
                hint="Route every model of the django_events app to one database.",
                id="django_events.E030",
            )
        )
    elsewhere = [
        f"{model._meta.label} -> {alias!r}"
        for model in apps.get_models()
        if model._meta.app_label != "django_events"
        and not model._meta.proxy
        and (alias := router.db_for_write(model)) != ledger
    ]
    if elsewhere:
        shown = ", ".join(elsewhere[:5]) + (f" and {len(elsewhere) - 5} more" if len(elsewhere) > 5 else "")
        errors.append(
            checks.Error(
                f"Models are written to another database than django_events' ledger ({ledger!r}): {shown}. "
                "A step.atomic commits its ORM writes with the step's memo, in one transaction on the "
                "ledger's database, so writes to these models could not happen exactly once (a step "
                "that tries is refused with StepWriteError).",
                hint="Put the ledger on the same database as these models (route django_events there), "
                "or add 'django_events.E031' to SILENCED_SYSTEM_CHECKS if no step.atomic writes to them.",
                id="django_events.E031",
            )
        )
    return errors
