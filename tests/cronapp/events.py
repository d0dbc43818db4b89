"""A cron function every second, for the cron tests through real workers.

``DJANGO_EVENTS_TEST_CRON_BLOCK``: a file path. The first attempt that creates it
writes ``"<pid> <run id>"`` into it and then blocks (until its worker is killed, or its
time limit interrupts it), so that a test can kill a worker in the middle of a tick.
"""

from __future__ import annotations

import os
import time

import django_events
from django_events.registry import Context
from tests.testapp.models import Call

from . import BLOCK_ENV, EVERY_SECOND, EVERY_SECOND_CALL


@django_events.function(
    cron="* * * * * *", timezone="UTC", catch_up="all", id=EVERY_SECOND, retries=3, time_limit=5
)
def every_second(ctx: Context) -> str:
    Call.objects.create(
        function=EVERY_SECOND_CALL, run_id=str(ctx.run_id), attempt=ctx.attempt, event_name=ctx.event.name
    )
    block = os.environ.get(BLOCK_ENV)
    if block and ctx.attempt == 1 and _first_to_create(block, f"{os.getpid()} {ctx.run_id}"):
        time.sleep(60)  # the test kills this worker now; the time limit (5 s) ends it otherwise
    return str(ctx.event.data["scheduled_at"])


def _first_to_create(path: str, content: str) -> bool:
    """Create ``path`` with ``content`` unless it exists; whether this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(content)
    return True
