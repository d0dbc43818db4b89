"""Fewer index entries per send and per run (issue 11, section 4).

* The idempotency key's uniqueness becomes a partial unique constraint: events sent
  without a key (most) get no entry, and PostgreSQL's second, LIKE-only index on the
  column (made for every unique CharField) goes away.
* The attempt's foreign key gets no index of its own: the unique (run, number) serves it.
* On PostgreSQL, the trigram index on a run's last error becomes partial
  (``last_error <> ''``): a run that never failed gets no entry, on its insert nor on
  each of its updates. The admin's error search asks for non-empty errors to use it.
"""

import django.db.models.deletion
from django.db import migrations, models


def partial_error_index(apps, schema_editor):
    _replace_error_index(schema_editor, "WHERE last_error <> ''")


def whole_error_index(apps, schema_editor):
    _replace_error_index(schema_editor, "")


def _replace_error_index(schema_editor, where):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
        if cursor.fetchone() is None:
            return  # migration 0002 could not create the extension: no index to replace
    schema_editor.execute("DROP INDEX IF EXISTS django_events_run_error_trgm")
    schema_editor.execute(
        f"CREATE INDEX django_events_run_error_trgm ON django_events_run USING gin (last_error gin_trgm_ops) {where}"
    )


class Migration(migrations.Migration):
    dependencies = [
        ("django_events", "0005_queued_message_dead_indexes"),
    ]

    operations = [
        # The new constraint first, so that the key is never without one.
        migrations.AddConstraint(
            model_name="event",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("idempotency_key",),
                name="django_events_event_idempotency_key",
            ),
        ),
        migrations.AlterField(
            model_name="event",
            name="idempotency_key",
            field=models.CharField(
                blank=True,
                help_text="The id given to send(); a second send with the same id returns this event.",
                max_length=255,
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="attempt",
            name="run",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="attempt_set",
                to="django_events.run",
            ),
        ),
        migrations.RunPython(partial_error_index, whole_error_index),
    ]
