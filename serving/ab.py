r"""The A/B comparison: CTR per variant and the lift of each variant over the control, with intervals.

A variant's CTR is clicks per shown item, $\hat R = \sum_u C_u / \sum_u N_u$, summed over its
users $u$ ($N_u$ items shown to $u$, $C_u$ of them clicked). Users are the unit of randomisation
(``serving.variants`` assigns by user), and one user's slates and clicks are not independent
(the same tastes, the same model state), so the variance is computed over users, not over
impressions: by the delta method for a ratio of means (Deng, Knoblich and Lu 2018),

$$\widehat{\mathrm{Var}}(\hat R) = \frac{1}{m\,\bar N^2} \cdot \frac{1}{m-1}\sum_u (C_u - \hat R N_u)^2,$$

with $m$ users and $\bar N$ their mean number of shown items. The relative lift of variant B
over control A is $L = R_B / R_A - 1$; its interval comes from the log ratio, whose variance is
$\mathrm{Var}(\hat R_B)/\hat R_B^2 + \mathrm{Var}(\hat R_A)/\hat R_A^2$ (the arms hold disjoint users,
so they are independent): $[\exp(\ln(\hat R_B/\hat R_A) \pm z\,\mathrm{se}) - 1]$, asymmetric as a
ratio's interval should be. The absolute difference $\hat R_B - \hat R_A$ has the plain interval
$\pm z\sqrt{\mathrm{Var}_A + \mathrm{Var}_B}$. docs/ab.md says why users and not slates or
impressions, and records the coverage measured on simulated tests with a known lift.

>>> control = ArmData([10, 10], [1, 3], slates=[2, 2])
>>> model = ArmData([10, 10], [2, 6], slates=[2, 2])
>>> a, b = arm_stats("control", control), arm_stats("model", model)
>>> round(a.ctr, 3), round(a.se, 3), round(b.ctr, 3), round(b.se, 3)
(0.2, 0.1, 0.4, 0.2)
>>> lift = compare(b, a)
>>> round(lift.lift, 3), [round(x, 3) for x in lift.lift_ci]
(1.0, [-0.5, 6.997])

References:
    Deng, A., Knoblich, U. and Lu, J. (2018). Applying the Delta Method in Metric Analytics: A
    Practical Guide with Novel Ideas. KDD 2018.
    Kohavi, R., Tang, D. and Xu, Y. (2020). Trustworthy Online Controlled Experiments, ch. 18
    (variance estimation when the analysis unit differs from the randomisation unit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95


@dataclass
class ArmData:
    """One variant's users: items shown to each (``shown``), clicks of each (``clicks``) and,
    for the report, slates of each (``slates``)."""

    shown: np.ndarray | list[float]
    clicks: np.ndarray | list[float]
    slates: np.ndarray | list[float] | None = None


@dataclass(frozen=True)
class ArmStats:
    """A variant's CTR (clicks per shown item) with its user-clustered standard error and interval."""

    name: str
    users: int
    slates: int
    impressions: int
    clicks: int
    ctr: float
    se: float
    ctr_ci: tuple[float, float]


@dataclass(frozen=True)
class Lift:
    """A variant against the control: relative lift and absolute CTR difference, with intervals."""

    variant: str
    control: str
    lift: float
    lift_ci: tuple[float, float]
    ctr_diff: float
    ctr_diff_ci: tuple[float, float]


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def arm_stats(name: str, data: ArmData, confidence: float = CONFIDENCE) -> ArmStats:
    """CTR of one variant with the delta-method standard error over its users (module docstring);
    the error is NaN with fewer than two users, the CTR NaN without any shown item."""
    shown = np.asarray(data.shown, dtype=np.float64)
    clicks = np.asarray(data.clicks, dtype=np.float64)
    if shown.shape != clicks.shape or shown.ndim != 1:
        raise ValueError(f"shown and clicks must be equally long 1-d arrays, got {shown.shape} and {clicks.shape}")
    m = len(shown)
    total = float(shown.sum())
    ctr = float(clicks.sum()) / total if total > 0 else float("nan")
    if m >= 2 and total > 0:
        residuals = clicks - ctr * shown
        se = math.sqrt(float(residuals @ residuals) / (m - 1) / m) / (total / m)
    else:
        se = float("nan")
    z = _z(confidence)
    slates = int(np.sum(data.slates)) if data.slates is not None else 0
    return ArmStats(name, m, slates, int(total), int(clicks.sum()), ctr, se, (ctr - z * se, ctr + z * se))


def compare(variant: ArmStats, control: ArmStats, confidence: float = CONFIDENCE) -> Lift:
    """Lift of ``variant`` over ``control`` (module docstring). The relative lift and its interval
    are NaN when either CTR is 0 or unknown (a ratio to no clicks has no finite interval)."""
    z = _z(confidence)
    diff = variant.ctr - control.ctr
    diff_se = math.sqrt(variant.se ** 2 + control.se ** 2)
    nan = float("nan")
    if variant.ctr > 0 and control.ctr > 0:
        log_ratio = math.log(variant.ctr / control.ctr)
        log_se = math.sqrt((variant.se / variant.ctr) ** 2 + (control.se / control.ctr) ** 2)
        lift = math.exp(log_ratio) - 1
        lift_ci = (math.exp(log_ratio - z * log_se) - 1, math.exp(log_ratio + z * log_se) - 1)
    else:
        lift, lift_ci = nan, (nan, nan)
    return Lift(variant.name, control.name, lift, lift_ci, diff, (diff - z * diff_se, diff + z * diff_se))
