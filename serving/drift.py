r"""Drift statistics: has the stream moved away from what it was a window ago?

Each signal keeps its last ``2 * window`` observations: the older half is the **reference
window**, the newer half the **current window**, and both statistics compare the two. A stream
that keeps its distribution scores near 0; a shift scores high until both windows hold shifted
data (then the new normal becomes the reference).

**Population stability index** over $B$ bins with proportions $r_b$ (reference) and $c_b$
(current): $\mathrm{PSI} = \sum_b (c_b - r_b) \ln(c_b / r_b)$. Rules of thumb: below 0.1 stable,
0.1 to 0.2 moderate, above 0.2 a significant shift. Half a count is added to every bin so an
empty bin stays finite.

**Kolmogorov-Smirnov**: the largest distance between the two empirical CDFs, in [0, 1].

**When a statistic is an alarm.** Under no drift, with $B$ bins and windows of $n$ and $m$
observations, the PSI (a symmetrised Kullback-Leibler divergence) is to second order
$(1/n + 1/m)\,\chi^2_{B-1}$. So ``stats()`` also returns the PSI level that a stable stream
exceeds with probability ``alpha`` (the false-alarm rate per comparison of two fresh windows),
$(1/n + 1/m)\,\chi^2_{B-1}(1 - \alpha)$, and the alarm is the PSI above it. This assumes
independent observations; ids that come in bursts (a user's several outcomes of one slate)
exceed it far more often, so for ids the threshold is multiplied by the design effect of the
bursts, the mean length of the run of equal consecutive ids an observation belongs to
(``burst_design_effect``). Ids of one actor spread over the stream (a bot) are not runs and keep
the plain threshold. Which signals may alarm, and why the others
only inform: docs/monitoring.md.

Two kinds of signals:

* numeric (served scores, labels, shares): bins are the deciles of the reference window, or the
  distinct values of both windows when they have at most ``bins`` of them (labels: 0/1 clicks,
  1..5 stars; a 0/1 share whose reference is all 0 still gets a bin for the 1s);
* categorical (which items, which users): each id with at least ``2 * min_count`` observations
  in the two windows together (at most ``bins`` of them, the most frequent) is a bin, all others
  share one.
  Rare ids never get bins of their own: with a large catalogue each window sees different rare
  items by chance, which is noise, not drift. KS runs over the bins ordered by reference
  frequency (so it asks whether the mass moved between popular and less popular ids).
"""
from __future__ import annotations

from collections import Counter, deque
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

_SMOOTHING = 0.5
ALPHA = 1e-4  # false-alarm probability per comparison of two fresh windows


class DriftStats(NamedTuple):
    """PSI and KS of the two windows, and the PSI level a stable stream exceeds with probability
    alpha; ``may_alarm`` is False when the shift goes the way a one-sided signal ignores."""

    psi: float
    ks: float
    threshold: float
    may_alarm: bool = True

    @property
    def alarm(self) -> bool:
        return self.may_alarm and self.psi > self.threshold  # False while NaN


_NOT_READY = DriftStats(float("nan"), float("nan"), float("nan"))


def chi2_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of a chi-square with ``dof`` degrees of freedom (Wilson-Hilferty).

    >>> round(chi2_quantile(0.95, 9), 1)  # tables: 16.92
    16.9
    """
    if dof < 1:
        return float("inf")
    z = NormalDist().inv_cdf(q)
    h = 2.0 / (9.0 * dof)
    return dof * max(0.0, 1.0 - h + z * h ** 0.5) ** 3


def psi_threshold(n_bins: int, n_reference: int, n_current: int, alpha: float = ALPHA) -> float:
    """The PSI that two samples of a stable stream exceed with probability ``alpha`` (module docstring)."""
    return (1.0 / n_reference + 1.0 / n_current) * chi2_quantile(1.0 - alpha, n_bins - 1)


def psi_from_counts(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two count vectors over the same bins."""
    r = (reference + _SMOOTHING) / (reference.sum() + _SMOOTHING * len(reference))
    c = (current + _SMOOTHING) / (current.sum() + _SMOOTHING * len(current))
    return float(np.sum((c - r) * np.log(c / r)))


def ks_from_counts(reference: np.ndarray, current: np.ndarray) -> float:
    """KS distance of two count vectors over the same ordered bins."""
    return float(np.max(np.abs(np.cumsum(reference) / reference.sum() - np.cumsum(current) / current.sum())))


def numeric_counts(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Count vectors of two numeric samples over bins from the reference (module docstring)."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    distinct = np.unique(np.concatenate([reference, current]))
    if len(distinct) <= bins:  # few values (shares, labels): one bin each, a new value included
        edges = distinct[1:]
    else:
        edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    n_bins = len(edges) + 1
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=n_bins)
    cur_counts = np.bincount(np.searchsorted(edges, current, side="right"), minlength=n_bins)
    return ref_counts.astype(np.float64), cur_counts.astype(np.float64)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of two samples of a numeric signal (bins from the reference, see the module docstring).

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=5000), rng.normal(size=5000)
    >>> psi(a, b) < 0.02, psi(a, b + 1.0) > 0.5
    (True, True)
    """
    return psi_from_counts(*numeric_counts(reference, current, bins))


def ks(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic.

    >>> ks(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])), ks(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    (0.0, 1.0)
    """
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def categorical_counts(reference: list, current: list, bins: int = 20, min_count: int = 5
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Count vectors of two samples of ids over shared bins, ordered by reference frequency."""
    ref, cur = Counter(reference), Counter(current)
    # chosen by the count of both windows together: under no drift, how an id's count splits
    # between the windows does not depend on that total, so the choice does not bias the PSI
    # (choosing ids frequent in either window would pick the ones that split unevenly by chance)
    frequent = {key for key in ref.keys() | cur.keys() if ref[key] + cur[key] >= 2 * min_count}
    keys = sorted(frequent, key=lambda key: (ref[key] + cur[key]), reverse=True)[:bins]
    keys.sort(key=lambda key: (ref[key], cur[key]), reverse=True)
    ref_counts = np.array([ref[key] for key in keys] + [0], np.float64)
    cur_counts = np.array([cur[key] for key in keys] + [0], np.float64)
    ref_counts[-1] = len(reference) - ref_counts.sum()
    cur_counts[-1] = len(current) - cur_counts.sum()
    return ref_counts, cur_counts


class NumericDrift:
    """Reference and current windows of a numeric signal, ``window`` observations each.

    >>> d = NumericDrift(window=1000)
    >>> rng = np.random.default_rng(1)
    >>> d.add(rng.normal(size=1000)); d.add(rng.normal(size=1000))
    >>> d.stats().alarm
    False
    >>> d.add(rng.normal(size=1000) + 2.0); s = d.stats()
    >>> s.psi > 0.2, s.ks > 0.5, s.alarm
    (True, True, True)

    With ``rising_only`` a shift alarms only when the current mean is above the reference mean
    (a share of unknown users that falls is the model learning them, not a new population):

    >>> d = NumericDrift(window=1000, rising_only=True)
    >>> d.add(np.ones(1000)); d.add(np.zeros(1000)); s = d.stats()
    >>> s.psi > s.threshold, s.alarm
    (True, False)
    """

    def __init__(self, window: int = 1000, bins: int = 10, alpha: float = ALPHA, rising_only: bool = False) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.window = window
        self.bins = bins
        self.alpha = alpha
        self.rising_only = rising_only
        self._clusters: deque = deque(maxlen=2 * window)  # who each value came from, when given
        self._ring = np.empty(2 * window)
        self._next = 0  # where the next value goes; the oldest value sits there once the ring is full
        self._n = 0

    def add(self, values: np.ndarray, clusters: list | None = None) -> None:
        """Append ``values``; ``clusters`` (one id per value, e.g. the user) marks values that come
        in bursts, and the alarm level is raised by the bursts' design effect (``CategoricalDrift``)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if clusters is not None:
            if len(clusters) != len(values):
                raise ValueError(f"clusters must have one id per value: {len(clusters)} ids, {len(values)} values")
            self._clusters.extend(c for c, v in zip(clusters, values) if np.isfinite(v))
        values = values[np.isfinite(values)][-len(self._ring):]
        m, size = len(values), len(self._ring)
        first = min(m, size - self._next)
        self._ring[self._next:self._next + first] = values[:first]
        self._ring[: m - first] = values[first:]
        self._next = (self._next + m) % size
        self._n = min(self._n + m, size)

    @property
    def ready(self) -> bool:
        """Both windows are full."""
        return self._n == 2 * self.window

    def stats(self) -> DriftStats:
        """PSI, KS and the alarm level of the two windows; NaN until both are full."""
        if not self.ready:
            return _NOT_READY
        ordered = np.concatenate([self._ring[self._next:], self._ring[: self._next]])
        reference, current = ordered[: self.window], ordered[self.window:]
        counts = numeric_counts(reference, current, self.bins)
        may_alarm = not self.rising_only or float(current.mean()) > float(reference.mean())
        threshold = psi_threshold(len(counts[0]), self.window, self.window, self.alpha)
        return DriftStats(psi_from_counts(*counts), ks(reference, current),
                          threshold * burst_design_effect(list(self._clusters)), may_alarm)


def burst_design_effect(ids: list) -> float:
    """How much bursts of one id inflate the PSI of a stable stream: the mean length of the run of
    equal consecutive ids that an observation belongs to (1 for independent draws of many ids).

    >>> burst_design_effect(["a", "b", "c", "d"]), burst_design_effect(["a", "a", "b", "b"])
    (1.0, 2.0)
    """
    if not ids:
        return 1.0
    starts = [0] + [j for j in range(1, len(ids)) if ids[j] != ids[j - 1]] + [len(ids)]
    runs = np.diff(starts).astype(np.float64)
    return float(np.sum(runs * runs) / np.sum(runs))


class CategoricalDrift:
    """Reference and current windows of ids (items, users), ``window`` observations each.

    >>> d = CategoricalDrift(window=1000)
    >>> rng = np.random.default_rng(2)
    >>> d.add([f"i{j}" for j in rng.zipf(1.5, 2000) % 500])
    >>> d.stats().alarm
    False
    >>> d.add([f"i{j + 7}" for j in rng.zipf(1.5, 1000) % 500]); d.stats().alarm
    True
    """

    def __init__(self, window: int = 1000, bins: int = 20, min_count: int = 5, alpha: float = ALPHA) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.window = window
        self.alpha = alpha
        self.bins = bins
        self.min_count = min_count
        self._ids: deque = deque(maxlen=2 * window)

    def add(self, ids: list) -> None:
        self._ids.extend(ids)

    @property
    def ready(self) -> bool:
        return len(self._ids) == 2 * self.window

    def stats(self) -> DriftStats:
        """PSI, KS and the alarm level of the two windows; NaN until both are full."""
        if not self.ready:
            return _NOT_READY
        ids = list(self._ids)
        counts = categorical_counts(ids[: self.window], ids[self.window:], self.bins, self.min_count)
        threshold = psi_threshold(len(counts[0]), self.window, self.window, self.alpha) * burst_design_effect(ids)
        return DriftStats(psi_from_counts(*counts), ks_from_counts(*counts), threshold)
