r"""Off-policy estimators of a candidate ranking policy's clicks, from logged slates.

A log holds $n$ slates; slate $i$ showed user $x_i$ item $a_{ik}$ at position $k$ and got click
$c_{ik} \in \{0, 1\}$. The logging policy $\pi_0$ put $a_{ik}$ at $k$ with (marginal) probability
$p_{ik} = \pi_0(a_{ik}, k \mid x_i)$ and chose the whole slate with probability $P_i$. The
candidate $\pi$ would put it there with probability $\pi_{ik} = \pi(a_{ik}, k \mid x_i)$ and choose
the slate with probability $\Pi_i$. The value is the expected number of clicks per slate,
$V = \sum_k V_k$, with $V_k$ the CTR at position $k$; ``ctr`` is $V$ over the mean slate length.

Under the **position-based click model** (a click at $k$ depends only on the item at $k$ and on
$k$; Craswell et al. 2008) $V_k = E_x \sum_a \pi(a, k \mid x)\, P(c = 1 \mid x, a, k)$, which the
per-position weight $w_{ik} = \pi_{ik} / p_{ik}$ estimates without bias wherever $p_{ik} > 0$ covers
$\pi$ (the item-position model of Li et al. 2018):

* ``ips``: $\hat V_k = \frac{1}{n_k} \sum_i w_{ik} c_{ik}$;
* ``snips`` (self-normalised): $\hat V_k = \sum_i w_{ik} c_{ik} / \sum_i w_{ik}$ (slightly biased,
  bounded by the largest click rate, much less variance when weights are large);
* ``dr`` (doubly robust, Dudik et al. 2011) with the candidate's own click model $\hat q$ as the
  direct method: $\hat V_k = \frac{1}{n_k} \sum_i \big[\sum_a \pi(a, k \mid x_i)\, \hat q(x_i, a, k)
  + w_{ik}\,(c_{ik} - \hat q(x_i, a_{ik}, k))\big]$;
* ``slate_ips`` (no click model assumed): $\hat V = \frac{1}{n} \sum_i \frac{\Pi_i}{P_i} \sum_k c_{ik}$,
  unbiased for any click behaviour, but the slate ratio is astronomically variable once slates are long.

The 95% interval is the normal one, $\hat V \pm 1.96\,\hat\sigma/\sqrt{n}$, from the per-slate
influence of each estimate (the delta method for ``snips``). ``ess`` is the effective sample size of
the weights, $(\sum w)^2 / \sum w^2$ (the smallest over positions for the per-position
estimators), and ``max_weight`` their largest value. An estimate warns of **poor support** when its
effective sample size is small, or when the mean weight (which estimates the share of the
candidate's probability that the logging policy covers, 1 when it covers all of it) is clearly
below 1.

Parameters of ``estimate``: ``log`` (``SlateLog``), ``target`` (``Target``: the candidate's
probabilities on the logged slates), ``estimators`` (names, default all that the target supports),
``min_ess`` and ``min_ess_share`` (the poor-support thresholds).

>>> import numpy as np
>>> log = SlateLog(users=np.array(["u", "v"], dtype=object), items=np.array([["a", "b"], ["b", "a"]], dtype=object),
...                shown=np.ones((2, 2), bool), clicks=np.array([[1.0, 0.0], [0.0, 1.0]]),
...                propensity=np.full((2, 2), 0.5), slate_propensity=np.array([0.5, 0.5]))
>>> target = Target(marginal=np.array([[1.0, 1.0], [0.0, 0.0]]), slate_probability=np.array([1.0, 0.0]))
>>> e = estimate(log, target, ("ips", "snips", "slate_ips"))
>>> e["ips"].clicks_per_slate, e["snips"].clicks_per_slate, e["slate_ips"].clicks_per_slate
(1.0, 1.0, 1.0)

References: L. Li, J. Y. Kim, I. Zitouni, "Toward predicting the outcome of an A/B experiment for
search relevance", WSDM 2015; S. Li, Y. Abbasi-Yadkori, B. Kveton, S. Muthukrishnan, V. Vinay,
Z. Wen, "Offline evaluation of ranking policies with click models", KDD 2018; M. Dudik, J. Langford,
L. Li, "Doubly robust policy evaluation and learning", ICML 2011; A. Swaminathan, T. Joachims, "The
self-normalized estimator for counterfactual learning", NeurIPS 2015; N. Craswell, O. Zoeter,
M. Taylor, B. Ramsey, "An experimental comparison of click position-bias models", WSDM 2008.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ESTIMATORS = ("ips", "snips", "dr", "slate_ips")
PER_POSITION = ("ips", "snips", "dr")
Z95 = 1.959963984540054


@dataclass(frozen=True)
class SlateLog:
    """Logged slates as ``(n, K)`` arrays, position $k$ in column $k-1$ (``shown`` False past a slate's end).

    ``propensity`` is the logging policy's probability of the item at that position (1 where not
    shown), ``slate_propensity`` its probability of the whole slate; ``notes`` say where they are
    approximate.
    """

    users: np.ndarray
    items: np.ndarray
    shown: np.ndarray
    clicks: np.ndarray
    propensity: np.ndarray
    slate_propensity: np.ndarray
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, k = self.items.shape
        for name in ("shown", "clicks", "propensity"):
            if getattr(self, name).shape != (n, k):
                raise ValueError(f"SlateLog.{name} has shape {getattr(self, name).shape}, not {(n, k)}")
        if self.users.shape != (n,) or self.slate_propensity.shape != (n,):
            raise ValueError(f"SlateLog.users and SlateLog.slate_propensity need shape {(n,)}")
        p = self.propensity[self.shown]
        if not (np.all(p > 0) and np.all(p <= 1)):
            raise ValueError("SlateLog.propensity must lie in (0, 1] wherever an item was shown")

    @property
    def n_slates(self) -> int:
        return len(self.users)

    def take(self, index: np.ndarray) -> SlateLog:
        """The log of the slates at ``index`` (an index array or a boolean mask)."""
        return SlateLog(self.users[index], self.items[index], self.shown[index], self.clicks[index],
                        self.propensity[index], self.slate_propensity[index], self.notes)

    def logged_value(self) -> float:
        """Clicks per slate the logging policy got."""
        return float(self.clicks[self.shown].sum() / max(self.n_slates, 1))


@dataclass(frozen=True)
class Target:
    """A candidate's probabilities on a ``SlateLog``'s slates.

    ``marginal[i, k]``: of putting the logged item at position k; ``slate_probability[i]``: of the
    whole logged slate; ``expected[i, k]``: clicks at position k its click model expects of its own
    choice; ``predicted[i, k]``: that click model's probability for the logged item (the last two
    are None without a click model, and then ``dr`` is not available).
    """

    marginal: np.ndarray
    slate_probability: np.ndarray
    expected: np.ndarray | None = None
    predicted: np.ndarray | None = None


@dataclass(frozen=True)
class Estimate:
    """One estimator's figures: clicks per slate, CTR per shown item and per position, each with
    its 95% interval, the effective sample size, the largest weight and any warnings."""

    estimator: str
    clicks_per_slate: float
    ctr: float
    ci: tuple[float, float]
    ctr_by_position: list[float]
    ci_by_position: list[tuple[float, float]]
    ess: float
    max_weight: float
    n_slates: int
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"estimator": self.estimator, "clicks_per_slate": self.clicks_per_slate, "ctr": self.ctr,
                "ci": list(self.ci), "ctr_by_position": self.ctr_by_position,
                "ci_by_position": [list(c) for c in self.ci_by_position], "ess": self.ess,
                "max_weight": self.max_weight, "n_slates": self.n_slates, "warnings": self.warnings}


def estimate(log: SlateLog, target: Target, estimators: Sequence[str] | None = None,
             min_ess: float = 30.0, min_ess_share: float = 0.01) -> dict[str, Estimate]:
    """Every requested estimator's ``Estimate`` (default: all that ``target`` supports)."""
    if target.marginal.shape != log.items.shape or target.slate_probability.shape != (log.n_slates,):
        raise ValueError("the target's arrays do not match the log's shape")
    if estimators is None:
        estimators = [e for e in ESTIMATORS if e != "dr" or target.expected is not None]
    if log.n_slates == 0:
        raise ValueError("the log holds no slates to evaluate on")
    out = {}
    for name in estimators:
        if name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
        if name == "dr" and (target.expected is None or target.predicted is None):
            raise ValueError("the dr estimator needs the candidate's click model (Target.expected, Target.predicted)")
        out[name] = _estimate(name, log, target, min_ess, min_ess_share)
    return out


def _estimate(name: str, log: SlateLog, target: Target, min_ess: float, min_ess_share: float) -> Estimate:
    shown, clicks = log.shown, np.where(log.shown, log.clicks, 0.0)
    n = log.n_slates
    n_k = shown.sum(axis=0)
    positions = np.flatnonzero(n_k)
    if name == "slate_ips":
        slate_w = target.slate_probability / log.slate_propensity
        weights = np.where(shown, slate_w[:, None], 0.0)
    else:
        weights = np.where(shown, target.marginal / log.propensity, 0.0)
    values = np.full(shown.shape[1], np.nan)
    influence = np.zeros(shown.shape)
    for k in positions:
        s, w, c = shown[:, k], weights[:, k], clicks[:, k]
        if name == "snips":
            total = w[s].sum()
            values[k] = (w[s] @ c[s]) / total if total > 0 else np.nan
            influence[s, k] = w[s] * (c[s] - values[k]) / (total / n_k[k]) if total > 0 else 0.0
            continue
        if name == "dr":
            terms = target.expected[s, k] + w[s] * (c[s] - target.predicted[s, k])
        else:
            terms = w[s] * c[s]
        values[k] = terms.mean()
        influence[s, k] = terms - values[k]
    share = n_k / n
    clicks_per_slate = float(np.nansum(values[positions] * share[positions])) if not np.isnan(
        values[positions]).any() else float("nan")
    se = float(np.sqrt(np.sum(influence.sum(axis=1) ** 2)) / n)
    se_k = np.sqrt((influence ** 2).sum(axis=0)) / np.maximum(n_k, 1)
    length = float(shown.sum() / n)
    ctr = clicks_per_slate / length
    ci = (ctr - Z95 * se / length, ctr + Z95 * se / length)
    ess, warnings = _support(name, weights, shown, positions, n_k, min_ess, min_ess_share)
    supporting = int(np.count_nonzero((weights > 0) & (clicks > 0)))
    if supporting < 10 and name != "dr":
        warnings.append(f"only {supporting} logged clicks carry weight: the normal interval is unreliable")
    if np.isnan(values[positions]).any():
        warnings.append("no logged slate supports the candidate at some position: the self-normalised "
                        "estimate is undefined")
    return Estimate(
        estimator=name, clicks_per_slate=clicks_per_slate, ctr=ctr, ci=(float(ci[0]), float(ci[1])),
        ctr_by_position=[float(values[k]) for k in positions],
        ci_by_position=[(float(values[k] - Z95 * se_k[k]), float(values[k] + Z95 * se_k[k])) for k in positions],
        ess=ess, max_weight=float(weights.max()) if weights.size else 0.0, n_slates=n, warnings=warnings)


def effective_sample_size(weights: np.ndarray) -> float:
    r"""$(\sum w)^2 / \sum w^2$: how many equally weighted samples the weighted ones are worth.

    >>> effective_sample_size(np.array([1.0, 1.0, 0.0, 2.0]))
    2.6666666666666665
    """
    squares = float(np.sum(weights ** 2))
    return float(np.sum(weights)) ** 2 / squares if squares > 0 else 0.0


def _support(name: str, weights: np.ndarray, shown: np.ndarray, positions: np.ndarray, n_k: np.ndarray,
             min_ess: float, min_ess_share: float) -> tuple[float, list[str]]:
    """The effective sample size (the smallest over positions) and the poor-support warnings."""
    if name == "slate_ips":  # one weight per slate, repeated at each of its positions
        columns = {"over whole slates": weights.max(axis=1, initial=0.0)}
    else:
        columns = {f"at position {k + 1}": weights[shown[:, k], k] for k in positions}
    warnings = []
    ess = min(effective_sample_size(w) for w in columns.values())
    needed = max(min_ess, min_ess_share * int(n_k.max()))
    if ess < needed:
        warnings.append(f"poor support: effective sample size {ess:.1f} of {int(n_k.max())} slates "
                        f"(below {needed:.0f}); the interval is not to be trusted")
    for where, w in columns.items():
        mean, se = float(w.mean()), float(w.std() / np.sqrt(len(w)))
        if mean + Z95 * se < 0.9:
            warnings.append(f"poor support {where}: the logging policy covers only about {mean:.0%} of the "
                            "candidate's choices")
    return ess, warnings
