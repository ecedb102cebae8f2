"""What a broken event raises: the problems it has, each with a field path and a reason code."""
from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
    """One violation: where (``items[2].propensity``), a reason code from ``REASONS``, and a message."""

    path: str
    reason: str
    message: str


class ValidationError(ValueError):
    """An event breaks the contract; ``problems`` lists every violation."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("invalid event: " + "; ".join(p.message for p in problems))


class InvalidEvent(ValidationError):
    """A Kafka message value that is not a valid event; ``reason`` is its DLQ reason."""

    def __init__(self, reason: str, detail: str, problems: list[Problem] | None = None) -> None:
        self.reason = reason
        self.detail = detail
        ValueError.__init__(self, f"{reason}: {detail}")  # not ValidationError's "invalid event: ..." text
        self.problems = problems if problems else [Problem("", reason, detail)]
