from django.db import models


class Call(models.Model):
    """One call of a test function, written by the function itself (from any process)."""

    function = models.CharField(max_length=100)
    run_id = models.CharField(max_length=64)
    attempt = models.PositiveIntegerField()
    event_name = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.function} attempt {self.attempt} of run {self.run_id}"


class Span(models.Model):
    """When one attempt of a flow-control test function started and ended, and its key."""

    function = models.CharField(max_length=100)
    run_id = models.CharField(max_length=64)
    key = models.CharField(max_length=100, blank=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True)
    pid = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.function} {self.key} {self.started_at}-{self.ended_at}"


class Effect(models.Model):
    """A database effect of a durable step (``step.atomic``): counted to prove it happened once."""

    run_id = models.CharField(max_length=64)
    step = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.step} of run {self.run_id}"
