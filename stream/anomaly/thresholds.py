"""From anomaly scores to alarms: an adaptive threshold learned from the recent score stream.

A forest's scores have no fixed scale (they depend on the data, the sample size, the shingle),
so a hand-tuned cut-off does not carry from one stream to the next. ``AdaptiveThreshold`` learns
the recent distribution of scores and grades each new score by how far it lies above it, like
the basic thresholder of AWS's Random Cut Forest library (running mean and deviation of the
scores, a z-factor, a warm-up period).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


class AdaptiveThreshold:
    """Anomaly grade in [0, 1] from an exponentially weighted mean and deviation of past scores.

    The statistics are kept on y = log(1 + score) when ``log_scale`` (the default), y = score
    otherwise: displacement scores are ratios of masses with a long right tail, and on the log
    scale their spread is close to symmetric, so one z fits streams of any scale. With m and sd
    the weighted mean and standard deviation of y over the scores before s_t:

        threshold_t = max(y^-1(m + z * sd), min_threshold)
        grade_t     = 0                                                 if s_t <= threshold_t
                    = min(1, (y(s_t) - y(threshold_t)) / (z * sd))      otherwise

    so grade 1 means at least 2z deviations above the mean. The weights decay by 1 - 1/horizon
    per score (the first ``horizon`` scores weigh equally), so the threshold follows slow changes
    of the stream; one outlier moves it little, a lasting change of level is absorbed within
    about ``horizon`` scores. During the first ``warmup`` scores every grade is 0 while the
    statistics (and the forest behind them) settle.

    Parameters
    ----------
    z
        How many deviations above the mean a score must lie to raise an alarm.
    horizon
        Number of recent scores the statistics cover (their decay is 1 - 1 / horizon).
    warmup
        Number of first scores that only feed the statistics (default: one AWS forest sample).
    log_scale
        Keep the statistics of log(1 + score) (scores must then be >= 0).
    min_threshold
        Floor of the threshold in score units, for streams whose scores barely vary.

    Attributes
    ----------
    n
        Number of scores learned so far.
    mean, var
        Weighted mean and variance of y over the scores learned so far.
    threshold
        The score above which the next score raises an alarm (inf during the warm-up).

    Measurements behind the defaults: docs/anomaly.md.

    Examples
    --------
    >>> import numpy as np
    >>> from stream.anomaly import AdaptiveThreshold
    >>> scores = np.random.default_rng(0).gamma(4.0, 0.5, 2000)
    >>> scores[1500] = 40.0
    >>> grades = AdaptiveThreshold().update(scores)
    >>> float(grades[1500]), float(grades[:256].max()), bool((grades[256:1500] == 0).mean() > 0.99)
    (1.0, 0.0, True)

    References
    ----------
    AWS, randomcutforest-by-aws, ``BasicThresholder`` (parkservices):
    https://github.com/aws/random-cut-forest-by-aws
    Guha, S., Mishra, N., Roy, G., Schrijvers, O. (2016). Robust Random Cut Forest Based Anomaly
    Detection on Streams. ICML 2016, PMLR 48:2712-2721.
    """

    def __init__(self, z: float = 3.0, horizon: int = 1000, warmup: int = 256,
                 log_scale: bool = True, min_threshold: float = 0.0) -> None:
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"z must be a finite number > 0, got {z!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if not (math.isfinite(min_threshold) and min_threshold >= 0):
            raise ValueError(f"min_threshold must be a finite number >= 0, got {min_threshold!r}")
        self.z = float(z)
        self.horizon = int(horizon)
        self.warmup = int(warmup)
        self.log_scale = bool(log_scale)
        self.min_threshold = float(min_threshold)
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def state(self) -> dict[str, Any]:
        """Parameters and statistics as JSON-serialisable values (``from_state`` rebuilds it)."""
        return {"z": self.z, "horizon": self.horizon, "warmup": self.warmup, "log_scale": self.log_scale,
                "min_threshold": self.min_threshold, "n": self.n, "mean": self.mean, "var": self.var}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AdaptiveThreshold:
        """The threshold ``state()`` described: it grades the next scores as the original would."""
        threshold = cls(state["z"], state["horizon"], state["warmup"], state["log_scale"], state["min_threshold"])
        n, mean, var = state["n"], state["mean"], state["var"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        for name, value in (("mean", mean), ("var", var)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if var < 0:
            raise ValueError(f"var must be >= 0, got {var!r}")
        threshold.n, threshold.mean, threshold.var = n, float(mean), float(var)
        return threshold

    @property
    def threshold(self) -> float:
        """The score above which the next score raises an alarm (inf during the warm-up)."""
        if self.n < max(self.warmup, 1):
            return math.inf
        y = self.mean + self.z * math.sqrt(self.var)
        return max(math.expm1(y) if self.log_scale else y, self.min_threshold)

    def update(self, scores: np.ndarray) -> np.ndarray:
        """Grade each score against the scores before it, then learn it; returns the grades."""
        values = self._check(scores)
        grades = np.zeros(len(values))
        for i, score in enumerate(values.tolist()):
            grades[i] = self._grade_one(score)
            self._learn(math.log1p(score) if self.log_scale else score)
        return grades

    def grade(self, scores: np.ndarray) -> np.ndarray:
        """Grade scores against the current statistics without learning them."""
        return np.array([self._grade_one(score) for score in self._check(scores).tolist()])

    def _grade_one(self, score: float) -> float:
        if self.n < max(self.warmup, 1) or score <= self.min_threshold:
            return 0.0
        y = math.log1p(score) if self.log_scale else score
        floor = math.log1p(self.min_threshold) if self.log_scale else self.min_threshold
        scale = self.z * math.sqrt(self.var)
        excess = y - max(self.mean + scale, floor)
        if excess <= 0.0:
            return 0.0
        return 1.0 if scale == 0.0 else min(1.0, excess / scale)

    def _learn(self, y: float) -> None:
        self.n += 1
        alpha = 1.0 / min(self.n, self.horizon)
        delta = y - self.mean
        self.mean += alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)

    def _check(self, scores: np.ndarray) -> np.ndarray:
        values = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        if values.ndim != 1:
            raise ValueError(f"scores must be a scalar or shape (n,), got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"scores must be finite, got {values[~np.isfinite(values)][:3].tolist()}")
        if self.log_scale and (values < 0).any():
            raise ValueError(f"scores must be >= 0 with log_scale=True, got {values[values < 0][:3].tolist()}")
        return values
