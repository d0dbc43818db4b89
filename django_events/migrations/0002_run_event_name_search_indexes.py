"""Keep the event's name on each run, and add the indexes the admin's filters and searches use."""

from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_event_names(apps, schema_editor):
    Run = apps.get_model("django_events", "Run")
    Event = apps.get_model("django_events", "Event")
    Run.objects.using(schema_editor.connection.alias).update(
        event_name=Subquery(Event.objects.filter(pk=OuterRef("event_id")).values("name")[:1])
    )


def create_postgres_search_indexes(apps, schema_editor):
    """On PostgreSQL: GIN indexes for event data (``@>``) and error text (trigram ``ILIKE``).

    The trigram index needs the pg_trgm extension; if the database user may not
    create it, the index is skipped and error searches scan instead of failing.
    """
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS django_events_event_data_gin "
        "ON django_events_event USING gin (data jsonb_path_ops)"
    )
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SAVEPOINT django_events_trgm")
        try:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except Exception:
            cursor.execute("ROLLBACK TO SAVEPOINT django_events_trgm")
            return
        cursor.execute("RELEASE SAVEPOINT django_events_trgm")
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS django_events_run_error_trgm "
        "ON django_events_run USING gin (last_error gin_trgm_ops)"
    )


def drop_postgres_search_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("DROP INDEX IF EXISTS django_events_run_error_trgm")
    schema_editor.execute("DROP INDEX IF EXISTS django_events_event_data_gin")


class Migration(migrations.Migration):
    dependencies = [("django_events", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="run",
            name="event_name",
            field=models.CharField(
                default="",
                help_text="The event's name, kept on the run so that runs filter by it fast.",
                max_length=255,
            ),
            preserve_default=False,
        ),
        migrations.RunPython(copy_event_names, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["event_name", "-created_at"], name="django_events_run_event_name"),
        ),
        migrations.RunPython(create_postgres_search_indexes, drop_postgres_search_indexes),
    ]
