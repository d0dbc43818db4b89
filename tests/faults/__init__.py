"""Fault injection against real processes: ``pytest tests/faults -s`` prints each scenario's figures.

1. ``test_broker_down``: Redis is down while 200 transactions commit events.
2. ``test_enqueue_lost``: the sending process dies between the commit and the enqueue.
3. ``test_worker_killed``: workers are SIGKILLed mid-run, one after another.
4. ``test_restarts``: Redis, then PostgreSQL, restart while the workers work.
5. ``test_bad_input``: bad ``send()`` input, and bad messages on the queue.

``DJANGO_EVENTS_FAULT_SCALE`` (default 0.2) multiplies the issue's 1,000 events per scenario;
``DJANGO_EVENTS_FAULT_SCALE=1`` runs the full size. The figures are also written to
``var/faults/<scenario>.json``.
"""
