r"""Quality on a sliding window of outcomes, always beside the baseline it must beat.

The learner's prequential figures and serving's served figures both come from here, so the two
follow the same rules.

A quality figure alone cannot be read: a click RMSE of 0.3 is good when the click-through rate is
0.5 and bad when it is 0.1. So every figure here comes with the same figure of the simplest
honest predictor, scored on the same outcomes:

* clicks: the model's click probability at the position where the item was shown, against the
  **running CTR** (the mean label of the window so far, computed before each outcome is added, so
  it never sees the label it predicts). Figures: RMSE (the square root of the Brier score),
  log loss, AUC and calibration (mean predicted probability / observed CTR; 1 is calibrated);
* ratings: the model's rating, against the **running mean rating** (the same prequential rule).

Probabilities are clipped to $[10^{-6}, 1 - 10^{-6}]$ in the log loss, so one confident mistake
costs at most $\ln 10^6 \approx 13.8$ nats instead of infinity.

>>> q = ClickQuality(window=4)
>>> baseline = q.add(np.array([0.9, 0.1, 0.8, 0.2]), np.array([1.0, 0.0, 1.0, 0.0]))
>>> round(q.auc(), 3), q.rmse() < q.baseline_rmse()
(1.0, True)
"""
from __future__ import annotations

import math

import numpy as np

_EPS = 1e-6


class _Window:
    """The last ``window`` values of several aligned columns (a ring buffer)."""

    def __init__(self, window: int, columns: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._data = np.zeros((columns, window))
        self._next = 0
        self.n = 0

    def add(self, *columns: np.ndarray) -> None:
        w = self._data.shape[1]
        block = np.vstack([np.asarray(c, dtype=np.float64) for c in columns])[:, -w:]
        idx = (self._next + np.arange(block.shape[1])) % w
        self._data[:, idx] = block
        self._next = (self._next + block.shape[1]) % w
        self.n = min(self.n + block.shape[1], w)

    def column(self, i: int) -> np.ndarray:
        return self._data[i, : self.n]


class _RunningMean:
    """Prequential mean of the last ``window`` labels: each label is predicted before it is added."""

    def __init__(self, window: int, prior: float) -> None:
        self._labels = np.zeros(window)
        self._next = 0
        self._n = 0
        self._sum = 0.0
        self.prior = prior

    def predict_then_add(self, labels: np.ndarray) -> np.ndarray:
        out = np.empty(len(labels))
        w = len(self._labels)
        for i, label in enumerate(labels):  # a few thousand outcomes a second: a plain loop is fine
            out[i] = self._sum / self._n if self._n else self.prior
            if self._n == w:
                self._sum -= self._labels[self._next]
            else:
                self._n += 1
            self._labels[self._next] = label
            self._sum += label
            self._next = (self._next + 1) % w
        return out


def _rmse(errors: np.ndarray) -> float:
    return math.sqrt(float(np.mean(np.square(errors)))) if len(errors) else float("nan")


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy in nats, probabilities clipped to [1e-6, 1 - 1e-6]; NaN when empty."""
    if not len(p):
        return float("nan")
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return float(np.mean(-(labels * np.log(p) + (1.0 - labels) * np.log1p(-p))))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing their mean rank); NaN
    unless both classes are present.

    >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    positives = labels > 0.5
    n_pos = int(positives.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    rank_sums = np.bincount(inverse, weights=ranks)
    ranks = (rank_sums / counts)[inverse]
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class RatingQuality:
    """Rating RMSE of the served model and of the running mean rating over the last ``window`` outcomes.

    Parameters:
        window: outcomes in the sliding window (also the span of the running mean).
        prior: what the running mean predicts for the very first outcome.
    """

    def __init__(self, window: int = 2000, prior: float = 3.0) -> None:
        self._window = _Window(window, 3)  # model prediction, baseline prediction, label
        self._running = _RunningMean(window, prior=prior)

    def add(self, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Score a batch of outcomes in arrival order; returns the baseline's predictions for them."""
        labels = np.asarray(labels, dtype=np.float64)
        baseline = self._running.predict_then_add(labels)
        self._window.add(predictions, baseline, labels)
        return baseline

    @property
    def n(self) -> int:
        return self._window.n

    def rmse(self) -> float:
        return _rmse(self._window.column(0) - self._window.column(2))

    def baseline_rmse(self) -> float:
        return _rmse(self._window.column(1) - self._window.column(2))


class ClickQuality(RatingQuality):
    """Click figures of the served model (its click probability at the shown position) and of the
    running-CTR baseline over the last ``window`` outcomes; RMSE is the root of the Brier score.

    Parameters:
        window: outcomes in the sliding window (also the span of the running CTR).
    """

    def __init__(self, window: int = 2000) -> None:
        super().__init__(window, prior=0.5)

    def logloss(self) -> float:
        return log_loss(self._window.column(0), self._window.column(2))

    def baseline_logloss(self) -> float:
        return log_loss(self._window.column(1), self._window.column(2))

    def auc(self) -> float:
        return auc(self._window.column(0), self._window.column(2))

    def ctr(self) -> float:
        """Observed CTR of the window; NaN before any outcome."""
        labels = self._window.column(2)
        return float(labels.mean()) if len(labels) else float("nan")

    def calibration(self) -> float:
        """Mean predicted probability over observed CTR; NaN before the first click."""
        observed = self.ctr()
        return float(self._window.column(0).mean()) / observed if observed > 0 else float("nan")
