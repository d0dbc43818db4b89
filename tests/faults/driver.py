"""Send events from a process of their own: ``python -m tests.faults.driver NAME=COUNT... [options]``.

The fault-injection tests run it to send into a database the test process does not use
(the private PostgreSQL cluster), and to die between a commit and its enqueue.

Several ``NAME=COUNT`` are interleaved evenly. Each event's data is ``{"i": index}`` (the index
among events of its name) merged into ``--data``.

Options:
    --per-transaction N   events committed per transaction (default 1)
    --data JSON           each event's data (default {})
    --die-after-commit    SIGKILL this process in the first enqueue after the first commit,
                          that is after the runs are committed and before any message is sent
Prints ``{"sent": TOTAL}`` as JSON when done (never, with --die-after-commit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="+", metavar="NAME=COUNT")
    parser.add_argument("--per-transaction", type=int, default=1)
    parser.add_argument("--data", type=json.loads, default={})
    parser.add_argument("--die-after-commit", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()

    from django.db import transaction

    import django_events
    import django_events.dispatch

    if args.die_after_commit:

        def die(*_args: Any, **_kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        # dispatch looks them up at enqueue time
        django_events.dispatch.send_now = die  # type: ignore[assignment]
        django_events.dispatch.send_group = die  # type: ignore[assignment]

    # (position, name, index): the events of each name spread evenly over the whole sequence
    plan = []
    for spec in args.specs:
        name, count = spec.rsplit("=", 1)
        plan.extend(((i + 0.5) / int(count), name, i) for i in range(int(count)))
    plan.sort()
    for start in range(0, len(plan), args.per_transaction):
        with transaction.atomic():
            for _position, name, index in plan[start : start + args.per_transaction]:
                django_events.send(name, {**args.data, "i": index})
    print(json.dumps({"sent": len(plan)}), flush=True)


if __name__ == "__main__":
    main()
