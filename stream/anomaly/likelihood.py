"""Anomaly likelihood: raw anomaly scores turned into a causal probability of an anomaly.

A forest's raw score says how isolated a point is, on a scale that differs from stream to
stream; a threshold on it fires all the time on a noisy stream and never on a calm one. The
anomaly likelihood of Ahmad et al. (2017) asks instead how unusual the recent scores are for
this stream: the tail probability of the short-window mean score under a Gaussian fitted to the
same means over a long window. ``score_series`` (``stream/anomaly/series.py``) puts it after the
forest; the compiled loop is here because it is this layer's only hot path.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

_LOG_FLOOR = 1e-10  # NAB's log scale: tail probabilities below it all map to 1
_NEUTRAL = 0.5  # tail probability reported while the layer warms up (likelihood 0.5)
# positions in the state arrays
_SEEN, _SHORT_N, _SHORT_POS, _LONG_N, _LONG_POS, _PREV_RED, _FITTED = range(7)
_TOTAL, _MEAN, _STD = range(3)


class AnomalyLikelihood:
    """Anomaly likelihood of a stream of raw anomaly scores (Ahmad et al., 2017).

    Each score s_t is first mapped to v_t = log(1 + s_t) (``log_scores``; forest scores are
    heavy-tailed and a Gaussian fits their logarithm better), then

        m_t = mean(v_{t-W+1}, ..., v_t)                    (short window W)
        mu, sd = mean and standard deviation of the m over the last L steps before t
        q_t = Q((m_t - mu) / max(sd, min_std)),  Q(z) = erfc(z / sqrt 2) / 2
        likelihood_t = 1 - q_t

    The Gaussian is refitted every ``reestimation_period`` steps, from means that came before
    t only, so the likelihood is causal and a score never vouches for itself. The tail is
    one-sided: only scores above the usual count as anomalous. As in Numenta's implementation,
    only the first step of a run in the red zone (q <= 1 - ``red_zone``) keeps its tail
    probability; the rest of the run is reported at q = 1 - ``yellow_zone``, so a long
    anomaly raises one alarm, not hundreds. Until ``learning_period + estimation_samples``
    scores have been seen the likelihood is 0.5; the first ``learning_period`` means (the
    forest is still filling its sample) never enter the fit.

    Likelihoods near 1 differ in their far decimals, so thresholds are set on the log scale of
    NAB's HTM detector, ``log_likelihood = log(q + 1e-10) / log(1e-10)``: 0 for q = 1, 0.5 for
    q = 1e-5 (likelihood 0.99999), 1 for q <= 1e-10. ``update`` returns that scale by default.

    Parameters
    ----------
    short_window
        W, scores averaged into the recent mean (Numenta: 10).
    long_window
        L, recent means the Gaussian is fitted to (Numenta: 8640, a month of 5-minute data).
    learning_period
        Leading scores left out of the fit (the scorer is still learning).
    estimation_samples
        Means needed for the first fit; the likelihood is 0.5 until then.
    reestimation_period
        Steps between refits of the Gaussian (Numenta: 100).
    min_std
        Floor of the fitted standard deviation (in the units of v), so that a stream whose
        scores were constant does not turn its first small blip into a certain anomaly.
    red_zone, yellow_zone
        The filter described above (Numenta: 0.99999 and 0.999). ``red_zone=None`` turns it
        off: every score keeps its tail probability. That is for a stream whose consecutive
        scores belong to different entities (``AnomalyDetector``), where a "run" is no anomaly.
    log_scores
        Fit the Gaussian to log(1 + score) rather than to the raw score.

    Attributes
    ----------
    n_seen
        Scores seen so far.

    Measurements behind the defaults: docs/anomaly-nab.md.

    Examples
    --------
    >>> import numpy as np
    >>> from stream.anomaly.likelihood import AnomalyLikelihood
    >>> scores = np.random.default_rng(0).gamma(2.0, 1.0, 3000)
    >>> scores[2500:2510] += 40.0  # a burst of isolated points
    >>> out = AnomalyLikelihood().update(scores)
    >>> int(np.argmax(out)) in range(2500, 2510), bool(out.max() > 0.5)
    (True, True)
    >>> float(out[2509].round(2))  # later in the same red run: the yellow zone, q = 1e-3
    0.3

    References
    ----------
    Ahmad, S., Lavin, A., Purdy, S., Agha, Z. (2017). Unsupervised real-time anomaly detection
    for streaming data. Neurocomputing 262, 134-147.
    Numenta, nupic ``algorithms/anomaly_likelihood.py`` (filter, log scale, defaults).
    """

    def __init__(self, short_window: int = 10, long_window: int = 8640,
                 learning_period: int = 256, estimation_samples: int = 100,
                 reestimation_period: int = 100, min_std: float = 0.05,
                 red_zone: float | None = 0.99999, yellow_zone: float = 0.999,
                 log_scores: bool = True) -> None:
        for name, value, low in (("short_window", short_window, 1), ("long_window", long_window, 2),
                                 ("learning_period", learning_period, 0),
                                 ("estimation_samples", estimation_samples, 2),
                                 ("reestimation_period", reestimation_period, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if estimation_samples > long_window:
            raise ValueError(f"estimation_samples ({estimation_samples}) exceeds long_window ({long_window})")
        if not (np.isfinite(min_std) and min_std > 0):
            raise ValueError(f"min_std must be a finite number > 0, got {min_std!r}")
        if not 0.0 < yellow_zone <= (yellow_zone if red_zone is None else red_zone) < 1.0:
            raise ValueError(f"need 0 < yellow_zone <= red_zone < 1, got {yellow_zone!r}, {red_zone!r}")
        self.short_window = int(short_window)
        self.long_window = int(long_window)
        self.learning_period = int(learning_period)
        self.estimation_samples = int(estimation_samples)
        self.reestimation_period = int(reestimation_period)
        self.min_std = float(min_std)
        self.red_zone = None if red_zone is None else float(red_zone)
        self.yellow_zone = float(yellow_zone)
        self.log_scores = bool(log_scores)
        self._short = np.zeros(self.short_window)
        self._long = np.zeros(self.long_window)
        self._counters = np.zeros(7, dtype=np.int64)
        self._stats = np.zeros(3)

    @property
    def n_seen(self) -> int:
        return int(self._counters[_SEEN])

    def state(self) -> dict[str, Any]:
        """Parameters and learned state as JSON-serialisable values (``from_state`` rebuilds it)."""
        return {"params": {"short_window": self.short_window, "long_window": self.long_window,
                           "learning_period": self.learning_period,
                           "estimation_samples": self.estimation_samples,
                           "reestimation_period": self.reestimation_period, "min_std": self.min_std,
                           "red_zone": self.red_zone, "yellow_zone": self.yellow_zone,
                           "log_scores": self.log_scores},
                "short": self._short.tolist(), "long": self._long.tolist(),
                "counters": self._counters.tolist(), "stats": self._stats.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AnomalyLikelihood:
        """The layer ``state()`` described: it scores the next scores as the original would."""
        layer = cls(**state["params"])
        for name, size in (("short", layer.short_window), ("long", layer.long_window),
                           ("counters", 7), ("stats", 3)):
            values = np.asarray(state[name], dtype=np.float64)
            if values.shape != (size,) or not np.isfinite(values).all():
                raise ValueError(f"{name} must hold {size} finite numbers")
        counters = np.asarray(state["counters"], dtype=np.float64)
        if (counters < 0).any() or (counters != np.round(counters)).any():
            raise ValueError("counters must be integers >= 0")
        layer._short[:] = state["short"]
        layer._long[:] = state["long"]
        layer._counters[:] = counters.astype(np.int64)
        layer._stats[:] = state["stats"]
        return layer

    def update(self, scores: np.ndarray, log: bool = True) -> np.ndarray:
        """Take raw scores (>= 0) in order; return one log-likelihood (or, with ``log=False``,
        likelihood) per score, each computed before its score is learned."""
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError(f"scores must be finite: score {int(np.argmin(np.isfinite(x)))} is not")
        tails = np.empty(len(x))
        red = -1.0 if self.red_zone is None else 1.0 - self.red_zone  # -1: no tail is red
        _likelihood_pass(x, self.log_scores, self.learning_period, self.estimation_samples,
                         self.reestimation_period, self.min_std, red,
                         1.0 - self.yellow_zone, self._short, self._long, self._counters,
                         self._stats, tails)
        return log_likelihood(tails) if log else 1.0 - tails


def log_likelihood(tail: np.ndarray) -> np.ndarray:
    """NAB's log scale of a likelihood 1 - q, from the tail probability q (0.5 at q = 1e-5)."""
    return np.log(np.asarray(tail) + _LOG_FLOOR) / math.log(_LOG_FLOOR)


@njit(cache=True, error_model="numpy")
def _likelihood_pass(scores, log_scores, learning, estimation, reestimation, min_std, red, yellow,
                     short, long, counters, stats, tails):
    """The loop of ``AnomalyLikelihood.update``: writes the filtered tail probability of each
    score into ``tails`` and advances the state arrays (see the class for the definition)."""
    w = short.shape[0]
    cap = long.shape[0]
    for i in range(scores.shape[0]):
        v = math.log1p(max(scores[i], 0.0)) if log_scores else scores[i]
        pos = counters[_SHORT_POS]
        if counters[_SHORT_N] == w:
            stats[_TOTAL] -= short[pos]
        else:
            counters[_SHORT_N] += 1
        short[pos] = v
        stats[_TOTAL] += v
        counters[_SHORT_POS] = (pos + 1) % w
        if pos == w - 1:  # recompute the running total once per lap: no drift
            total = 0.0
            for k in range(w):
                total += short[k]
            stats[_TOTAL] = total
        mean_now = stats[_TOTAL] / counters[_SHORT_N]
        counters[_SEEN] += 1
        if counters[_SEEN] <= learning:
            tails[i] = _NEUTRAL
            continue
        tail = _NEUTRAL
        if counters[_LONG_N] >= estimation:
            if counters[_FITTED] == 0 or counters[_SEEN] % reestimation == 0:
                n = counters[_LONG_N]
                mu = 0.0
                for k in range(n):
                    mu += long[k]
                mu /= n
                var = 0.0
                for k in range(n):
                    var += (long[k] - mu) ** 2
                stats[_MEAN] = mu
                stats[_STD] = math.sqrt(var / n)
                counters[_FITTED] = 1
            z = (mean_now - stats[_MEAN]) / max(stats[_STD], min_std)
            tail = 0.5 * math.erfc(z / math.sqrt(2.0))
            in_red = tail <= red
            if in_red and counters[_PREV_RED] == 1:
                tail = max(tail, yellow)
            counters[_PREV_RED] = 1 if in_red else 0
        tails[i] = tail
        long[counters[_LONG_POS]] = mean_now
        counters[_LONG_POS] = (counters[_LONG_POS] + 1) % cap
        if counters[_LONG_N] < cap:
            counters[_LONG_N] += 1
