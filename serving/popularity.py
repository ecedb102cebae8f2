"""Recent item popularity: what a user the model does not know yet is shown.

Each interaction on ``examples`` (a rating, or a positive click; anomalous ones excluded, since
inflating an item's popularity is what a bot would do) adds 1 to the item's count, and counts
decay with a half-life, so the fallback follows what is popular now. Decay costs nothing per
event: the count is stored scaled by ``2 ** ((t - t0) / half_life)`` and only rescaled when the
scale grows large.

``scores(model)`` turns the counts into one fallback score per item row of a model version,
``log(1 + count)``, ready for the policies (a softmax over it samples items in proportion to
``(1 + count) ** (1 / temperature)``). Before any interaction has been seen it falls back to
the model's own notion of popularity, the item biases. The array is cached per model version
and rebuilt at most every ``refresh_s`` seconds.
"""
from __future__ import annotations

import time

import numpy as np

from serving.model import ServingModel

_MAX_EXPONENT = 60.0


class Popularity:
    """Exponentially decayed interaction counts per item.

    Parameters:
        half_life_s: seconds after which an interaction counts half.
        max_items: items tracked; beyond it the least popular half is forgotten.
        refresh_s: how long a fallback score array may be reused for one model version.

    >>> p = Popularity(half_life_s=10.0)
    >>> p.add(["a", "a", "b"], now=0.0)
    >>> p.add(["b"], now=10.0)
    >>> {item: round(c, 2) for item, c in sorted(p.counts(now=10.0).items())}
    {'a': 1.0, 'b': 1.5}
    """

    def __init__(self, half_life_s: float = 3600.0, max_items: int = 20_000, refresh_s: float = 1.0) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        self.half_life_s = half_life_s
        self.max_items = max_items
        self.refresh_s = refresh_s
        self._scaled: dict[str, float] = {}
        self._t0: float | None = None
        self._cache: tuple[str, str, float, np.ndarray] | None = None

    def add(self, item_ids: list[str], now: float | None = None) -> None:
        """Count one interaction with each of ``item_ids`` (repeats count repeatedly) at ``now``."""
        if not item_ids:
            return
        now = time.time() if now is None else now
        if self._t0 is None:
            self._t0 = now
        exponent = (now - self._t0) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            factor = 2.0 ** -exponent
            self._scaled = {item: c * factor for item, c in self._scaled.items()}
            self._t0, exponent = now, 0.0
        weight = 2.0 ** exponent
        scaled = self._scaled
        for item in item_ids:
            scaled[item] = scaled.get(item, 0.0) + weight
        if len(scaled) > self.max_items:
            keep = sorted(scaled.items(), key=lambda kv: kv[1], reverse=True)[: self.max_items // 2]
            self._scaled = dict(keep)

    def counts(self, now: float | None = None) -> dict[str, float]:
        """The decayed counts at ``now``."""
        if self._t0 is None:
            return {}
        now = time.time() if now is None else now
        factor = 2.0 ** (-(now - self._t0) / self.half_life_s)
        return {item: c * factor for item, c in self._scaled.items()}

    def scores(self, model: ServingModel, kind: str) -> np.ndarray:
        """One fallback score per item row of ``model`` (float32; do not write to it)."""
        now = time.monotonic()
        cached = self._cache
        if cached is not None and cached[:2] == (model.version, kind) and now - cached[2] < self.refresh_s:
            return cached[3]
        n = len(model.items)
        counts = self.counts()
        rows = model.items.rows(list(counts))
        known = rows >= 0
        if known.any():
            values = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            out = np.zeros(n, np.float32)
            out[rows[known]] = np.log1p(values[known])
        else:
            k = model.n_factors
            out = model.items.matrix()[:, k if kind == "rating" else k + 1].copy()
        self._cache = (model.version, kind, now, out)
        return out

