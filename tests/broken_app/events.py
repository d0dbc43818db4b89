import django_events

raise RuntimeError("this events.py is broken on purpose")


@django_events.function("never")
def never(ctx):  # pragma: no cover
    pass
