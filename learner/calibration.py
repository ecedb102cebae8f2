r"""Click probabilities at a position, calibrated on what users actually clicked.

The click model learns an item's *attractiveness* with inverse-propensity weights, which is what
ranking needs and what the clicks alone cannot show. It is not the probability of a click where
the item was shown: a slot low in the slate is examined less, and the IPS weights reshape the
fit. Monitoring and off-policy evaluation need that probability, so it is a model of its own:

$$P(\text{click} \mid u, i, k) = \sigma(a_k + b\, s_{ui})$$

with $s_{ui}$ the click model's logit (attractiveness), $a_k$ an intercept per position
(the examination of position $k$, on the logit scale) and $b$ a shared slope (Platt scaling,
Platt 1999, with a position term as in the position-based click model of Craswell et al. 2008).
It is fitted without the IPS weights by maximum likelihood (iteratively reweighted least
squares, a small ridge penalty towards the previous fit) on the last ``window`` click outcomes, refitted every
``refit_every`` outcomes. Predictions are made with the fit of before the outcomes, so the
learner's prequential figures stay honest. Before any fit $a_k = 0$ and $b = 1$: the probability
is the click model's own.

>>> rng = np.random.default_rng(0)
>>> logits = rng.normal(-1.0, 1.0, 10000); positions = rng.integers(1, 4, 10000)   # one window
>>> clicks = rng.random(10000) < (1.0 / positions) / (1.0 + np.exp(-logits))
>>> cal = PositionCalibration(max_position=3)
>>> cal.update(logits, positions, clicks)
>>> p = cal.predict(logits, positions)
>>> [round(float(p[positions == k].mean() / clicks[positions == k].mean()), 1) for k in (1, 2, 3)]
[1.0, 1.0, 1.0]

References: J. Platt, "Probabilistic outputs for support vector machines", 1999; N. Craswell et al.,
"An experimental comparison of click position-bias models", WSDM 2008.
"""
from __future__ import annotations

import numpy as np

_MAX_NEWTON_STEPS = 8
_MAX_HALVINGS = 30
_FIRST_FIT = 100  # outcomes before the first fit; until refit_every, a fit each time they double


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large |x|."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))


def logit(p: np.ndarray) -> np.ndarray:
    """The log-odds of probabilities, clipped away from 0 and 1 (NaN stays NaN)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class PositionCalibration:
    """Per-position Platt scaling of the click model's logits.

    Parameters:
        max_position: positions above it share its intercept.
        window: click outcomes the fit uses (the most recent): short enough to follow the click
            model's scores while it is young, whose scale moves (docs/monitoring.md).
        refit_every: outcomes between two fits, once warmed up: the first fit comes after 100
            outcomes, and the next ones each time the outcomes held have about doubled, so a new
            model's calibration is fitted early, while its scores change fastest.
        l2: ridge penalty on the parameters' distance from the previous fit (before the first:
            $a_k = 0$, $b = 1$), which steadies the intercepts of rarely shown positions.

    Attributes:
        intercepts: $a_1 .. a_K$.
        slope: $b$.
    """

    def __init__(self, max_position: int = 20, window: int = 10_000, refit_every: int = 1000,
                 l2: float = 1.0) -> None:
        if max_position < 1 or window < 1 or refit_every < 1 or l2 < 0:
            raise ValueError("PositionCalibration needs max_position, window, refit_every >= 1 and l2 >= 0")
        self.max_position, self.window, self.refit_every, self.l2 = max_position, window, refit_every, l2
        self.intercepts = np.zeros(max_position)
        self.slope = 1.0
        self._logits = np.zeros(window)
        self._slots = np.zeros(window, dtype=np.int64)
        self._labels = np.zeros(window)
        self._next = 0
        self._n = 0
        self._pending = 0

    def _slot(self, positions: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(positions, dtype=np.int64), 1, self.max_position) - 1

    def predict(self, logits: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """P(click) of items with click-model ``logits`` shown at ``positions`` (1-based)."""
        return click_probability(self.intercepts, self.slope, logits, positions)

    def update(self, logits: np.ndarray, positions: np.ndarray, labels: np.ndarray) -> None:
        """Remember click outcomes (in order) and refit when enough have arrived since the last fit
        (``refit_every``, fewer while warming up)."""
        logits = np.asarray(logits, dtype=np.float64)[-self.window:]
        slots = self._slot(positions)[-self.window:]
        labels = (np.asarray(labels, dtype=np.float64) > 0.5)[-self.window:]
        idx = (self._next + np.arange(len(logits))) % self.window
        self._logits[idx], self._slots[idx], self._labels[idx] = logits, slots, labels
        self._next = (self._next + len(logits)) % self.window
        self._n = min(self._n + len(logits), self.window)
        self._pending += len(logits)
        if self._pending >= min(self.refit_every, max(_FIRST_FIT, self._n // 2)):
            self._pending = 0
            self._fit()

    def forget(self) -> None:
        """Drop the outcomes held (the fitted parameters stay, as the next fit's prior); the next
        fit comes after 100 new outcomes."""
        self._next = self._n = self._pending = 0

    def _objective(self, theta: np.ndarray, prior: np.ndarray, slots: np.ndarray, logits: np.ndarray,
                   labels: np.ndarray) -> float:
        """Penalised negative log-likelihood (computed stably: log(1 + e^z) = logaddexp(0, z))."""
        z = theta[slots] + theta[-1] * logits
        return float(np.sum(np.logaddexp(0.0, z) - labels * z) + 0.5 * self.l2 * np.sum((theta - prior) ** 2))

    def _fit(self) -> None:
        """Newton's method with a backtracking line search: every accepted step lowers the
        objective, so a fit cannot run away (undamped Newton from the previous fit diverged when
        the click model's logits moved far between two fits)."""
        n, k = self._n, self.max_position
        slots, logits, labels = self._slots[:n], self._logits[:n], self._labels[:n]
        default = np.append(np.zeros(k), 1.0)
        theta = np.append(self.intercepts, self.slope)
        prior = theta.copy()
        current = self._objective(theta, prior, slots, logits, labels)
        at_default = self._objective(default, default, slots, logits, labels)
        if not current <= at_default:  # the previous fit is worse than no fit at all here: start afresh
            theta, prior, current = default.copy(), default, at_default
        for _ in range(_MAX_NEWTON_STEPS):
            p = sigmoid(theta[slots] + theta[k] * logits)
            w = p * (1.0 - p)
            residual = p - labels
            gradient = np.append(np.bincount(slots, residual, k), residual @ logits) + self.l2 * (theta - prior)
            hessian = np.diag(np.append(np.bincount(slots, w, k), w @ (logits * logits)) + self.l2)
            cross = np.bincount(slots, w * logits, k)
            hessian[:k, k] = hessian[k, :k] = cross
            step = np.linalg.solve(hessian + 1e-9 * np.eye(k + 1), gradient)
            for _ in range(_MAX_HALVINGS):
                candidate = theta - step
                value = self._objective(candidate, prior, slots, logits, labels)
                if value <= current:
                    break
                step = step / 2.0
            else:
                break  # no step lowers the objective: theta is as good as it gets
            theta, current = candidate, value
            if np.max(np.abs(step)) < 1e-6:
                break
        self.intercepts, self.slope = theta[:k].copy(), float(theta[k])

    def load_state(self, state: dict) -> None:
        """Take back the parameters of ``state()`` (the window of outcomes starts empty)."""
        self.intercepts = np.asarray(state["intercepts"], dtype=np.float64).copy()
        self.slope = float(state["slope"])

    def state(self) -> dict:
        """The fitted parameters, as published to serving (``click_probability`` reads them back)."""
        return {"intercepts": [float(a) for a in self.intercepts], "slope": self.slope}


def click_probability(intercepts: np.ndarray | list[float], slope: float, logits: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
    """$\\sigma(a_k + b\\, s)$ for logits ``s`` at 1-based ``positions`` (past the last intercept: the last)."""
    intercepts = np.asarray(intercepts, dtype=np.float64)
    slots = np.clip(np.asarray(positions, dtype=np.int64), 1, len(intercepts)) - 1
    return sigmoid(intercepts[slots] + float(slope) * np.asarray(logits, dtype=np.float64))
