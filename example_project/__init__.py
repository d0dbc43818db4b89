"""The example site: a small Django project that uses django-events (run ``python manage.py demo``)."""
