r"""Concept drift on the served model's loss: the Page-Hinkley test for an increase in the mean.

Feature drift says the inputs moved; concept drift says the model got worse at predicting what
people do. The second is what a person watching a dashboard must act on, so it is tested on the
per-outcome loss of the served model (log loss for clicks, squared error for ratings) in excess
of the baseline's loss on the same outcome (``serving.monitor``).

Page-Hinkley (Page 1954; Hinkley 1971; in the form of Gama et al. 2013): with $\bar x_t$ the
running mean of the losses, the cumulative deviation

$$m_t = \sum_{i \le t} (x_i - \bar x_i - \delta), \qquad M_t = \min_{i \le t} m_i$$

raises an alarm when $m_t - M_t > \lambda$. $\delta$ is the increase of the mean loss that is
tolerated (anything smaller never accumulates), $\lambda$ how much evidence an alarm needs: a
larger $\lambda$ means fewer false alarms and a later detection. After an alarm the test starts
afresh, so a lasting degradation alarms once and the gauge stays up for ``hold`` outcomes.

The false-alarm rate of the defaults is measured, not assumed (see docs/monitoring.md).

>>> rng = np.random.default_rng(0)
>>> ph = PageHinkley(delta=0.05, threshold=20.0, burn_in=100)
>>> any(ph.update(x) for x in rng.exponential(0.4, 3000))
False
>>> any(ph.update(x) for x in rng.exponential(1.0, 500))
True

References: E. S. Page, "Continuous inspection schemes", Biometrika 41 (1954); J. Gama et al.,
"On evaluating stream learning algorithms", Machine Learning 90 (2013).
"""
from __future__ import annotations

import numpy as np


class PageHinkley:
    """Page-Hinkley test for an increase (or, two-sided, any change) in the mean of a stream.

    Parameters:
        delta: tolerated increase of the mean (in the stream's units) that never raises an alarm.
        two_sided: also test for a decrease of the mean (by the mirrored statistic).
        threshold: the evidence $\\lambda$ needed for an alarm.
        burn_in: observations before the test may alarm (the running mean settles first).
        hold: after an alarm, ``alarm`` stays true for this many observations.

    Attributes:
        alarm: whether an alarm was raised within the last ``hold`` observations.
        alarms: alarms raised so far.
        statistic: the current $m_t - M_t$.
    """

    def __init__(self, delta: float = 0.02, threshold: float = 80.0, burn_in: int = 200, hold: int = 500,
                 two_sided: bool = False) -> None:
        if delta < 0 or threshold <= 0 or burn_in < 0 or hold < 1:
            raise ValueError("PageHinkley needs delta >= 0, threshold > 0, burn_in >= 0 and hold >= 1")
        self.delta, self.threshold, self.burn_in, self.hold = delta, threshold, burn_in, hold
        self.two_sided = two_sided
        self.alarms = 0
        self._since_alarm = hold
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._cumulative = self._minimum = 0.0  # the test for an increase
        self._falling = self._maximum = 0.0  # and, when two-sided, for a decrease

    @property
    def statistic(self) -> float:
        rise = self._cumulative - self._minimum
        return max(rise, self._maximum - self._falling) if self.two_sided else rise

    @property
    def alarm(self) -> bool:
        return self._since_alarm < self.hold

    def update(self, x: float) -> bool:
        """Add one observation; True when it raises an alarm."""
        self._since_alarm += 1
        self._n += 1
        self._mean += (x - self._mean) / self._n
        self._cumulative += x - self._mean - self.delta
        self._minimum = min(self._minimum, self._cumulative)
        if self.two_sided:
            self._falling += x - self._mean + self.delta
            self._maximum = max(self._maximum, self._falling)
        if self._n > self.burn_in and self.statistic > self.threshold:
            self.alarms += 1
            self._since_alarm = 0
            self._reset()
            return True
        return False

    def update_many(self, values: np.ndarray) -> bool:
        """Add observations in order; True when any of them raised an alarm."""
        raised = False
        for x in np.asarray(values, dtype=np.float64):
            raised |= self.update(float(x))
        return raised
