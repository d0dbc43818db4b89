"""Signals sent when a run's attempt ends. Receivers run in the worker, after the outcome is committed.

Each is sent with ``sender=Run`` and keyword arguments; a receiver that raises is
logged and does not disturb the worker (``send_robust``).

Example::

    from django.dispatch import receiver
    from django_events.signals import run_dead

    @receiver(run_dead)
    def page_someone(sender, run, attempt, exception, **kwargs):
        ...
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["run_dead", "run_failed", "run_succeeded"]

#: A run succeeded. Arguments: ``run``, ``attempt`` (the ``Attempt``), ``result``.
run_succeeded = Signal()

#: An attempt failed (including timed out, lost and interrupted attempts). Arguments: ``run``,
#: ``attempt``, ``exception``, ``will_retry`` (``False`` when the run is now dead).
run_failed = Signal()

#: A run went dead: its attempts ran out, or it raised ``NonRetriableError``. Arguments:
#: ``run``, ``attempt``, ``exception``. (``run_failed`` is sent for that attempt too.)
run_dead = Signal()
