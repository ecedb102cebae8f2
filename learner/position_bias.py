r"""Position bias (examination probability per slate position), learned online from impression logs.

Under the position-based click model (PBM) a shown item is clicked only if its position was
examined and the item is attractive, independently:

$$P(c = 1 \mid d, k) = \theta_k \, \gamma_d$$

$\theta_k$ is the examination probability of position $k$ and $\gamma_d$ the attractiveness of key
$d$ (an item id, or ``context|item`` when attractiveness depends on context). The impressions
$N_{dk}$ and clicks $C_{dk}$ per key and position are sufficient statistics of the PBM, so the
estimator keeps exactly those counts as the logs stream in and fits $\theta$ and $\gamma$ by
expectation-maximisation on them (Chuklin, Markov & de Rijke, *Click Models for Web Search*,
2015, ch. 4). A non-click at $(d, k)$ was examined with posterior probability
$\theta_k (1 - \gamma_d) / (1 - \theta_k \gamma_d)$ and attractive with posterior probability
$(1 - \theta_k) \gamma_d / (1 - \theta_k \gamma_d)$; the M-step averages these posteriors (clicks
count as 1 for both) over the cells of a position or a key. $\gamma$ is smoothed towards 1/2 with a
few pseudo-impressions so that rarely shown keys stay finite. EM is warm-started from the last fit
and run lazily, only when an estimate is asked for after new data arrived.

Only the ratios $\theta_k / \theta_j$ are identified (scaling $\theta$ up and $\gamma$ down fits
the clicks equally well), and only when keys are shown at several positions (a randomised or
stochastic logging policy). :meth:`examination` therefore returns $\theta$ relative to the most
examined position, the quantity inverse-propensity weighting needs. Attractiveness is pooled over
everyone a key was shown to: with a personalised logging policy choose keys that carry the
context, or the curve absorbs the policy's selection.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learner.ids import IdMap

_TINY = 1e-12


class PositionBiasEstimator:
    """Relative examination probability per position under the PBM, fitted by EM on click counts.

    Parameters
    ----------
    smoothing
        Pseudo-impressions (at attractiveness 1/2) added to every key's M-step.
    tol
        EM stops when no relative examination probability moves by more than this.
    max_iter
        Upper bound on EM iterations per refit.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> exam = np.array([1.0, 0.6, 0.3])                 # planted curve for positions 1..3
    >>> attract = rng.uniform(0.1, 0.9, size=20)          # 20 items
    >>> items = rng.integers(0, 20, size=50_000)
    >>> positions = rng.integers(1, 4, size=50_000)      # items placed at random
    >>> clicks = rng.random(50_000) < exam[positions - 1] * attract[items]
    >>> est = PositionBiasEstimator()
    >>> est.update(positions, clicks, [f"item{d}" for d in items])
    >>> np.round(est.examination([1, 2, 3]), 1).tolist()
    [1.0, 0.6, 0.3]
    """

    def __init__(self, smoothing: float = 1.0, tol: float = 1e-6, max_iter: int = 500) -> None:
        if not (np.isfinite(smoothing) and smoothing > 0):
            raise ValueError(f"smoothing must be a positive finite number, got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.keys = IdMap(name="key")
        self.impressions = np.zeros((0, 0))  # N[key, position - 1]
        self.clicks = np.zeros((0, 0))  # C[key, position - 1]
        self._theta = np.zeros(0)  # absolute examination estimate, warm start for EM
        self._gamma = np.zeros(0)  # attractiveness per key, warm start for EM
        self._stale = False

    @property
    def n_positions(self) -> int:
        """Highest position seen so far."""
        return self.impressions.shape[1]

    def update(self, positions: Sequence[int], clicks: Sequence[float], keys: Sequence[str]) -> None:
        """Add a batch of logged impressions: 1-based ``positions``, 0/1 ``clicks``, ``keys``."""
        pos = np.asarray(positions)
        clk = np.asarray(clicks, dtype=np.float64)
        if not (len(pos) == len(clk) == len(keys)):
            raise ValueError(
                f"positions, clicks and keys differ in length: {len(pos)}, {len(clk)}, {len(keys)}"
            )
        if len(pos) == 0:
            return
        check_positions(pos)
        if not np.all((clk == 0) | (clk == 1)):
            raise ValueError(f"clicks must be 0 or 1, got {clk[(clk != 0) & (clk != 1)][0]!r}")
        rows = self.keys.add(keys)
        self._grow(len(self.keys), int(pos.max()))
        n_pos = self.n_positions
        flat = rows * n_pos + (pos.astype(np.int64) - 1)
        size = self.impressions.size
        self.impressions += np.bincount(flat, minlength=size).reshape(self.impressions.shape)
        self.clicks += np.bincount(flat, weights=clk, minlength=size).reshape(self.clicks.shape)
        self._stale = True

    def examination(self, positions: Sequence[int] | None = None) -> np.ndarray:
        """Examination probability of ``positions`` (all seen positions when None), relative to the
        most examined position; a position with no logged impression gets 1 (nothing to correct)."""
        if self._stale:
            self._fit()
        seen = self.impressions.sum(axis=0) > 0
        rel = np.ones(self.n_positions)
        if seen.any():
            rel[seen] = self._theta[seen] / self._theta[seen].max()
        if positions is None:
            return rel
        pos = np.asarray(positions)
        check_positions(pos)
        out = np.ones(len(pos))
        known = pos <= self.n_positions
        out[known] = rel[pos[known].astype(np.int64) - 1]
        return out

    def _grow(self, n_keys: int, n_pos: int) -> None:
        old_keys, old_pos = self.impressions.shape
        if n_keys <= old_keys and n_pos <= old_pos:
            return
        shape = (max(n_keys, old_keys), max(n_pos, old_pos))
        for name in ("impressions", "clicks"):
            grown = np.zeros(shape)
            grown[:old_keys, :old_pos] = getattr(self, name)
            setattr(self, name, grown)
        self._theta = np.concatenate([self._theta, np.full(shape[1] - old_pos, 0.5)])
        self._gamma = np.concatenate([self._gamma, np.full(shape[0] - old_keys, 0.5)])

    def _fit(self) -> None:
        n, c = self.impressions, self.clicks
        unclicked = n - c
        per_pos = n.sum(axis=0)
        per_key = n.sum(axis=1) + self.smoothing
        theta, gamma = self._theta, self._gamma
        for _ in range(self.max_iter):
            tg = theta[None, :] * gamma[:, None]
            denom = np.maximum(1.0 - tg, _TINY)
            examined = c + unclicked * (theta[None, :] - tg) / denom
            attractive = c + unclicked * (gamma[:, None] - tg) / denom
            new_theta = np.where(per_pos > 0, examined.sum(axis=0) / np.maximum(per_pos, _TINY), theta)
            gamma = (attractive.sum(axis=1) + 0.5 * self.smoothing) / per_key
            new_theta = np.clip(new_theta, _TINY, 1.0)
            # only the shape of the curve matters (see the module docstring), and it settles long
            # before EM finishes drifting along the ridge of equally good scalings
            delta = np.abs(new_theta / new_theta.max() - theta / theta.max()).max()
            theta = new_theta
            if delta < self.tol:
                break
        self._theta, self._gamma = theta, gamma
        self._stale = False

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and JSON-able metadata that :meth:`from_state` restores exactly."""
        arrays = {
            "impressions": self.impressions,
            "clicks": self.clicks,
            "theta": self._theta,
            "gamma": self._gamma,
        }
        meta = {
            "smoothing": self.smoothing,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "keys": self.keys.ids,
            "stale": self._stale,
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> PositionBiasEstimator:
        """Inverse of :meth:`state`."""
        est = cls(smoothing=meta["smoothing"], tol=meta["tol"], max_iter=meta["max_iter"])
        est.keys = IdMap(meta["keys"], name="key")
        est.impressions = np.asarray(arrays["impressions"], dtype=np.float64)
        est.clicks = np.asarray(arrays["clicks"], dtype=np.float64)
        est._theta = np.asarray(arrays["theta"], dtype=np.float64)
        est._gamma = np.asarray(arrays["gamma"], dtype=np.float64)
        est._stale = bool(meta["stale"])
        return est


def check_positions(pos: np.ndarray) -> None:
    """Raise ValueError unless every position is a whole number >= 1."""
    if pos.size and not (
        np.issubdtype(pos.dtype, np.number)
        and np.all(np.isfinite(pos))
        and np.all(pos >= 1)
        and np.all(pos == np.floor(pos))
    ):
        raise ValueError(f"positions must be whole numbers >= 1 (1 = top of the slate), got {pos!r}")
