import django_events


@django_events.function("test/ok", id="tests.ok")
def another_ok(ctx):  # pragma: no cover - startup fails before any run
    pass
