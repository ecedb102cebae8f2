"""Score a slate's click outcomes together, in the order the slates were shown.

Under the worker's ``wait`` feedback protocol a click's positive reaches ``examples`` at once and
its slate's unclicked items only when the attribution window closes. A window of outcomes in
arrival order therefore holds the positives of recent slates beside the negatives of older ones:
its observed click rate swings with the arrival pattern, and a running-CTR baseline fed in that
order learns the pattern (it predicts low just as a burst of negatives arrives), which no
predictor of a single item can do. The served quality and the concept-drift test read outcomes
through ``SlateOrder``: a positive is held until the first negative of its slate (same
``request_id``) arrives and is released just before it, or, for a slate whose every item was
clicked, once the event time has moved ``hold_s`` past it. Ratings and negatives pass at once.

>>> order = SlateOrder(hold_s=60.0)
>>> order.add([("r1", 1.0, 10.0, "p1"), ("r2", 0.0, 5.0, "n2")])
['n2']
>>> order.add([("r1", 0.0, 8.0, "n1"), ("r1", 0.0, 8.0, "n1b")])
['p1', 'n1', 'n1b']
>>> order.add([(None, 4.0, 100.0, "rating")]), order.held
(['rating'], 0)
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class SlateOrder(Generic[T]):
    """Holds click positives until their slate's negatives arrive (module docstring).

    Parameters:
        hold_s: event-time seconds after which a held positive is released without its slate
            (the worker's attribution window plus a margin).
        max_held: positives held at most; past it the oldest are released.
    """

    def __init__(self, hold_s: float, max_held: int = 100_000) -> None:
        if not hold_s > 0 or max_held < 1:
            raise ValueError("SlateOrder needs hold_s > 0 and max_held >= 1")
        self.hold_s, self.max_held = hold_s, max_held
        self._held: dict[str, list[tuple[float, T]]] = {}
        self._count = 0
        self._newest_ts = float("-inf")

    @property
    def held(self) -> int:
        """Positives waiting for their slate."""
        return self._count

    def add(self, outcomes: Iterable[tuple[str | None, float, float | None, T]]) -> list[T]:
        """Take ``(request_id, label, ts, item)`` in arrival order (``label`` > 0: a positive click;
        ``request_id`` None: not part of a slate) and return the items to score now, in order."""
        ready: list[T] = []
        for request_id, label, ts, item in outcomes:
            if ts is not None:
                self._newest_ts = max(self._newest_ts, ts)
            if request_id is None:
                ready.append(item)
            elif label > 0:
                self._held.setdefault(request_id, []).append((ts if ts is not None else self._newest_ts, item))
                self._count += 1
            else:
                ready.extend(self._release(request_id))
                ready.append(item)
        ready.extend(self._expire())
        return ready

    def _release(self, request_id: str) -> list[T]:
        positives = self._held.pop(request_id, [])
        self._count -= len(positives)
        return [item for _, item in positives]

    def _expire(self) -> list[T]:
        """Release the slates whose first positive is ``hold_s`` older than the newest event time,
        and the oldest slates beyond ``max_held`` (slates are kept in the order they were first held)."""
        released: list[T] = []
        cutoff = self._newest_ts - self.hold_s
        while self._held:  # the oldest slate first: stop at the first one that may stay
            request_id = next(iter(self._held))
            if self._held[request_id][0][0] >= cutoff and self._count <= self.max_held:
                break
            released.extend(self._release(request_id))
        return released
