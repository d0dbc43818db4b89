"""Settings of the backlog benchmark (``benchmarks/backlog.py``): the suite's, with short recovery timings.

- ``BENCH_RECOVERY_GRACE``: ``RECOVERY_GRACE`` in seconds (5 by default, against 60 by default
  in django-events), so that a backlog of a few minutes is many grace periods long.
- ``BENCH_RECOVERY_INTERVAL``: ``RECOVERY_INTERVAL`` in seconds (1 by default, against 15).

Everything else is ``bench_settings``, read from the same environment.
"""

from __future__ import annotations

from .bench_settings import *  # noqa: F403
from .bench_settings import DJANGO_EVENTS, env

DJANGO_EVENTS = {
    **DJANGO_EVENTS,
    "RECOVERY_GRACE": env.float("BENCH_RECOVERY_GRACE", default=5.0),
    "RECOVERY_INTERVAL": env.float("BENCH_RECOVERY_INTERVAL", default=1.0),
}
