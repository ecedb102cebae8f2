"""The outcomes the learner trained on lately, so that an outcome sent twice is trained once.

The ``examples`` topic is at least once (README, "Delivery guarantees"): a worker killed after
its batch's examples were acknowledged but before its offsets were, replays the batch when it
restarts and sends the same outcomes again. The learner keys every outcome message
(``stream.examples.outcome_key``: kind, stage, the event that settled the labels) and skips the
items of a key it remembers. Why this and not Kafka transactions
on the worker's output, and what it costs: docs/learner.md, "Outcomes trained once".
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np


class OutcomeWindow:
    """The keys of the outcomes trained lately, forgotten by event time and bounded in number.

    Its clock is the learner's event-time watermark, the newest example ``ts`` seen so far. A key
    is remembered for ``retention_s`` seconds of that clock after it arrived, so old data replayed
    behind live data is remembered as long as the rest. At most ``max_keys`` keys are kept: past
    that the oldest go first, counted in ``evicted`` (a re-send of one of them would be trained
    again). Keys are kept in arrival buckets, one per call of :meth:`fresh`, whose clock never
    decreases, so forgetting pops whole buckets from the front. Memory: about 45 bytes a key (one
    key per outcome message, not per item).

    Parameters:
        retention_s: seconds of event time a key is remembered after it arrived (the learner's
            default: the worker's attribution window plus a margin, ``LearnerSettings``).
        max_keys: the most keys remembered at once.

    >>> w = OutcomeWindow(retention_s=60, max_keys=1000)
    >>> w.fresh([1, 2, 2], newest_ts=10.0)
    [True, True, False]
    >>> w.fresh([1], newest_ts=20.0), len(w), w.duplicates
    ([False], 2, 2)
    >>> w.fresh([3], newest_ts=100.0), len(w)  # 1 and 2 arrived at 10, more than 60 s before 100
    ([True], 1)
    """

    def __init__(self, retention_s: float, max_keys: int) -> None:
        if not (math.isfinite(retention_s) and retention_s > 0):
            raise ValueError(f"retention_s must be a positive number of seconds, got {retention_s!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self.retention_s = float(retention_s)
        self.max_keys = int(max_keys)
        self.watermark = -math.inf
        self.duplicates = 0  # keys found already remembered, over this object's life
        self.evicted = 0  # keys forgotten early because of max_keys
        self._keys: set[int] = set()
        self._buckets: deque[tuple[float, np.ndarray]] = deque()  # (arrival clock, keys), oldest first

    def __len__(self) -> int:
        return len(self._keys)

    def fresh(self, keys: Sequence[int], newest_ts: float | None = None) -> list[bool]:
        """Remember ``keys`` (of one micro-batch, in order); for each, whether it was new. A key
        repeated inside ``keys`` is new the first time only. ``newest_ts``: the newest event time
        of the batch, which moves the clock forward (non-finite values are ignored)."""
        if newest_ts is not None and math.isfinite(newest_ts) and newest_ts > self.watermark:
            self.watermark = float(newest_ts)
        seen = self._keys
        out = []
        added = []
        for key in keys:
            new = key not in seen
            if new:
                seen.add(key)
                added.append(key)
            out.append(new)
        self.duplicates += len(out) - len(added)
        if added:
            self._buckets.append((self.watermark, np.array(added, dtype=np.int64)))
        self._forget()
        return out

    def _forget(self) -> None:
        horizon = self.watermark - self.retention_s
        buckets, seen = self._buckets, self._keys
        while buckets and (buckets[0][0] < horizon or len(seen) > self.max_keys):
            arrived, keys = buckets[0]
            excess = len(seen) - self.max_keys
            if arrived >= horizon and excess < len(keys):  # only part of this bucket is over the bound
                seen.difference_update(keys[:excess].tolist())
                buckets[0] = (arrived, keys[excess:])
                self.evicted += excess
                return
            buckets.popleft()
            seen.difference_update(keys.tolist())
            if arrived >= horizon:
                self.evicted += len(keys)

    def state(self) -> dict[str, np.ndarray]:
        """The remembered keys as plain arrays (saved with the learner's checkpoint, ``np.savez``)."""
        buckets = list(self._buckets)
        return {
            "keys": np.concatenate([k for _, k in buckets]) if buckets else np.empty(0, np.int64),
            "bucket_ts": np.array([t for t, _ in buckets], dtype=np.float64),
            "bucket_sizes": np.array([len(k) for _, k in buckets], dtype=np.int64),
            "watermark": np.array([self.watermark], dtype=np.float64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the remembered keys with those of :meth:`state` (then apply this window's
        retention and bound, which may differ from those the state was saved with)."""
        keys, sizes = np.asarray(state["keys"], dtype=np.int64), np.asarray(state["bucket_sizes"], dtype=np.int64)
        if int(sizes.sum()) != len(keys) or len(sizes) != len(state["bucket_ts"]):
            raise ValueError("outcome keys: bucket sizes do not add up to the number of keys")
        self.watermark = float(state["watermark"][0])
        self._buckets = deque(zip((float(t) for t in state["bucket_ts"]), np.split(keys, np.cumsum(sizes)[:-1])))
        self._keys = set(keys.tolist())
        self._forget()
