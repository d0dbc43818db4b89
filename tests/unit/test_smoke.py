import django_events
from django_events.testing import run_all


def test_smoke(db):
    event = django_events.send("test/flaky", {"succeed_on": 2})
    runs = run_all()
    assert [r.status for r in runs] == ["succeeded"]
    assert runs[0].attempts == 2
    assert event.runs.get().result == {"attempt": 2}
