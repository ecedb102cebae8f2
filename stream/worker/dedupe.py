"""Drops events whose ``event_id`` was already accepted within a time window.

Producers retry, and a retried send can reach Kafka twice; replays overlap. The window is kept in
event time: an id is remembered for ``window_s`` seconds after its event's timestamp (measured
against the newest timestamp seen), then forgotten, so memory stays bounded. The worker seeds it
from the log when it is assigned a partition (one window per partition), which carries
deduplication across restarts, crashes and rebalances.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable


class DedupeWindow:
    """Remembers event ids for ``window_s`` seconds of event time.

    >>> d = DedupeWindow(window_s=60)
    >>> d.add("a", ts=0.0), d.add("a", ts=1.0), d.add("b", ts=100.0), d.add("a", ts=101.0)
    (True, False, True, True)
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._order: deque[tuple[float, str]] = deque()
        self._newest = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._seen

    def add(self, event_id: str, ts: float) -> bool:
        """Record ``event_id``; True if it is new within the window, False for a duplicate."""
        if event_id in self._seen:
            return False
        self._seen[event_id] = ts
        self._order.append((ts, event_id))
        if ts > self._newest:
            self._newest = ts
            self._expire()
        return True

    def seed(self, ids_and_ts: Iterable[tuple[str, float]]) -> None:
        """Remember ids already accepted (from the log) without counting them as new."""
        for event_id, ts in sorted(ids_and_ts, key=lambda p: p[1]):
            self.add(event_id, ts)

    def _expire(self) -> None:
        horizon = self._newest - self.window_s
        order, seen = self._order, self._seen
        # Ids arrive roughly in time order; an old straggler at the head only delays expiry.
        while order and order[0][0] < horizon:
            _, event_id = order.popleft()
            seen.pop(event_id, None)
