"""The README's testing example, verbatim: it must keep passing."""

import django_events
from django_events.models import Attempt
from django_events.testing import run_all, run_due
from example_project.sources.models import Source


def test_connecting_a_source_runs_every_function(db, mailoutbox):
    source = Source.objects.create(name="Acme Shop", email="ana@acme.example")
    django_events.send("api/source.connected", {"source_id": source.pk, "email": source.email})

    runs = run_all()  # every waiting run, retries included, until all are final

    assert {run.function: (run.status, run.attempts) for run in runs} == {
        "sources.backfill": ("succeeded", 1),
        "sources.welcome_email": ("succeeded", 1),
        "sources.sync_to_crm": ("succeeded", 3),  # the pretend CRM fails twice
    }
    assert mailoutbox[0].to == ["ana@acme.example"]


def test_a_crm_failure_is_retried_later(db):
    source = Source.objects.create(name="Acme Shop", email="ana@acme.example")
    django_events.send("api/source.connected", {"source_id": source.pk, "email": source.email})

    runs = run_due()  # only what is due now: each function's first attempt

    crm = next(run for run in runs if run.function == "sources.sync_to_crm")
    assert crm.status == "retrying"
    assert Attempt.objects.get(run=crm).exc_type == "ConnectionError"
