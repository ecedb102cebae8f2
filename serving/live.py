"""The live model (double-buffered) and the recent versions the monitor scores outcomes with.

``current`` is the version new requests see. The next version is built off to the side and
becomes current with one reference assignment in ``swap``: a request reads ``current`` once and
keeps that object, so it sees one complete version from start to end whatever swaps meanwhile.

The last ``history`` versions stay available with the time each went live, so that an outcome
can be scored with the version that served it (by the ``model_version`` its impression logged)
or with the one live at its event time. Versions share the row chunks they did not change, so
keeping a few costs little unless every delta touches the item matrix (one copy of it each).
"""
from __future__ import annotations

import bisect
import time
from collections import deque

from serving.metrics import ServingMetrics
from serving.model import ServingModel


class LiveModel:
    """The served version, swapped whole, and up to ``history`` recent versions.

    >>> from dataclasses import replace
    >>> from serving.metrics import ServingMetrics
    >>> live = LiveModel(history=2, metrics=ServingMetrics())
    >>> live.current is None
    True
    >>> for seq in (1, 2, 3):
    ...     live.swap(replace(ServingModel.empty("mf", 2), version=f"mf-{seq}", seq=seq), now=float(seq))
    >>> live.current.version, live.by_version("mf-1"), live.live_at(2.5).version
    ('mf-3', None, 'mf-2')
    """

    def __init__(self, history: int, metrics: ServingMetrics) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.current: ServingModel | None = None
        self._entries: deque[tuple[float, ServingModel]] = deque(maxlen=history)
        self._by_version: dict[str, ServingModel] = {}
        self._metrics = metrics
        metrics.track_model(lambda: None if self.current is None else self.current.published_ts)

    def swap(self, model: ServingModel, now: float | None = None) -> None:
        """Make ``model`` the version that new requests see."""
        self.current = model
        self._entries.append((time.time() if now is None else now, model))
        self._by_version = {m.version: m for _, m in self._entries}
        self._metrics.set_version(model.version)

    def refresh(self, model: ServingModel) -> None:
        """Replace the current version with ``model``, the same version rebuilt (a new item
        index): requests switch to it like on a swap, but history and metrics see no new version."""
        if self.current is None or model.version != self.current.version:
            raise ValueError("refresh() takes the current version rebuilt; use swap() for a new version")
        self.current = model
        went_live, _ = self._entries[-1]
        self._entries[-1] = (went_live, model)
        self._by_version[model.version] = model

    def by_version(self, version: str) -> ServingModel | None:
        """The held version called ``version``, or None."""
        return self._by_version.get(version)

    @property
    def oldest_live_from(self) -> float:
        """When the oldest held version went live (inf when none is)."""
        return self._entries[0][0] if self._entries else float("inf")

    def live_at(self, ts: float) -> ServingModel | None:
        """The held version that was live at wall time ``ts`` (the oldest if ``ts`` is earlier)."""
        if not self._entries:
            return None
        i = bisect.bisect_right(self._entries, ts, key=lambda entry: entry[0])
        return self._entries[max(0, i - 1)][1]
