from io import StringIO

from django.core.management import call_command


def test_models_and_migrations_agree(db):
    out = StringIO()
    # exits with status 1 (SystemExit) if a model change has no migration
    call_command("makemigrations", "django_events", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
