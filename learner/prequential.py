"""The learner's prequential quality, always beside the running-mean baseline it must beat.

Each outcome is first predicted by the model (before it trains on it) and by the running mean
of the labels before it (the mean rating, or the running CTR), then added to a sliding window.
Figures: RMSE of both, and for clicks log loss of both (probabilities clipped to
[1e-6, 1 - 1e-6]). Serving's served figures (``serving.quality``) follow the same rules.

>>> q = PrequentialQuality(window=4, prior=0.5)
>>> q.add(np.array([0.9, 0.1, 0.8, 0.2]), np.array([1.0, 0.0, 1.0, 0.0]))
>>> q.rmse() < q.baseline_rmse(), q.logloss() < q.baseline_logloss()
(True, True)
"""
from __future__ import annotations

import math

import numpy as np

_EPS = 1e-6


class PrequentialQuality:
    """Model and running-mean figures over the last ``window`` outcomes.

    Parameters:
        window: outcomes in the window (also the span of the running mean).
        prior: what the running mean predicts before any label.
    """

    def __init__(self, window: int, prior: float) -> None:
        self._rows = np.zeros((3, window))  # model prediction, baseline prediction, label
        self._next = 0
        self.n = 0
        self._sum = 0.0
        self.prior = prior

    def add(self, predictions: np.ndarray, labels: np.ndarray) -> None:
        """Score a batch of outcomes in arrival order."""
        w = self._rows.shape[1]
        for p, y in zip(np.asarray(predictions, np.float64), np.asarray(labels, np.float64)):
            baseline = self._sum / self.n if self.n else self.prior
            if self.n == w:
                self._sum -= self._rows[2, self._next]
            else:
                self.n += 1
            self._rows[:, self._next] = (p, baseline, y)
            self._sum += y
            self._next = (self._next + 1) % w

    def _rmse(self, column: int) -> float:
        if not self.n:
            return float("nan")
        return math.sqrt(float(np.mean(np.square(self._rows[column, : self.n] - self._rows[2, : self.n]))))

    def _logloss(self, column: int) -> float:
        if not self.n:
            return float("nan")
        p, y = np.clip(self._rows[column, : self.n], _EPS, 1 - _EPS), self._rows[2, : self.n]
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))

    def rmse(self) -> float:
        return self._rmse(0)

    def baseline_rmse(self) -> float:
        return self._rmse(1)

    def logloss(self) -> float:
        return self._logloss(0)

    def baseline_logloss(self) -> float:
        return self._logloss(1)
