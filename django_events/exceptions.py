"""Every exception django-events raises, or lets a function raise to steer its run."""

from __future__ import annotations

import math

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "ConfigurationError",
    "DjangoEventsError",
    "DuplicateFunctionError",
    "EventValidationError",
    "FunctionNotFoundError",
    "InvokeFailedError",
    "InvokeTimeoutError",
    "NonDeterminismError",
    "NonRetriableError",
    "ResultNotSerializableError",
    "RetryAfterError",
    "RunTimedOutError",
    "WorkerLostError",
]


class DjangoEventsError(Exception):
    """Base class for the errors of django-events."""


class ConfigurationError(DjangoEventsError, ImproperlyConfigured):
    """Raised when settings, ``INSTALLED_APPS`` or the broker are set up wrongly."""


class DuplicateFunctionError(ConfigurationError):
    """Raised when two different callables are registered under one function id."""


class EventValidationError(DjangoEventsError, ValueError):
    """Raised when ``send()`` is given a bad event name, data or id; nothing is stored."""


class FunctionNotFoundError(DjangoEventsError):
    """Raised (and recorded on the run) when a run's function is no longer registered."""


class WorkerLostError(DjangoEventsError):
    """Recorded on an attempt whose worker stopped before it ended (its lease expired)."""


class RunTimedOutError(DjangoEventsError):
    """Given to ``run_dead`` for a run ended by its ``Timeouts.finish`` before its next attempt."""


class ResultNotSerializableError(DjangoEventsError, TypeError):
    """Raised (and recorded on the run) when a function returns a value JSON cannot hold."""


class NonRetriableError(DjangoEventsError):
    """Raised by a function to fail its run at once: it goes to ``dead`` with no retries."""


class RetryAfterError(DjangoEventsError):
    """Raised by a function to be retried after exactly ``seconds`` (retries still count).

    ``RetryAfterError(30)`` or ``RetryAfterError(30, "rate limited")``. A delay
    longer than ``MAX_SECONDS`` (a year) is cut to it; a negative, infinite or NaN
    delay is refused with ``ValueError`` (which the run then records as its failure).
    """

    #: The longest delay a run can ask for, in seconds: 366 days.
    MAX_SECONDS = 366 * 24 * 3600.0

    def __init__(self, seconds: float, message: str = "") -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"RetryAfterError needs a number of seconds, not {type(seconds).__name__}.")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"RetryAfterError needs a finite, non-negative number of seconds, not {seconds!r}."
            )
        self.seconds = min(float(seconds), self.MAX_SECONDS)
        super().__init__(message or f"retry requested in {self.seconds:g}s")


class NonDeterminismError(NonRetriableError):
    """Raised at a step when a replay meets steps in another order than the one recorded.

    The run goes dead (a retry would meet the same code): deploy code whose steps
    come in the recorded order, then retry it from the admin.
    """


class InvokeFailedError(NonRetriableError):
    """Raised at a ``step.invoke`` whose run went dead, was cancelled or skipped; ``run_id`` is that run.

    Uncaught, it sends the calling run to ``dead`` (retrying would raise it again).
    """

    def __init__(self, message: str, run_id: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id


class InvokeTimeoutError(InvokeFailedError):
    """Raised at a ``step.invoke`` whose run did not end within the step's ``timeout``."""
