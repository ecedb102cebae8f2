"""Tests of the adaptive threshold: grades in [0, 1], zero for normal scores, positive for
outliers, warm-up, adaptation to a lasting change, and input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stream.anomaly import AdaptiveThreshold


def normal_scores(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Forest-like scores: positive, right-skewed (median ~1.8)."""
    return np.random.default_rng(seed).gamma(4.0, 0.5, n)


def test_normal_scores_grade_zero_outliers_positive_all_in_unit_interval() -> None:
    scores = normal_scores()
    outliers = [1000, 1800, 2600]
    scores[outliers] = [30.0, 60.0, 15.0]
    grades = AdaptiveThreshold().update(scores)
    assert np.all((grades >= 0) & (grades <= 1))
    assert np.all(grades[outliers] > 0)
    normal = np.delete(grades, outliers)
    assert np.mean(normal == 0) > 0.995
    assert grades[1800] == 1.0  # far above: full grade


def test_warmup_grades_zero_even_for_huge_scores() -> None:
    threshold = AdaptiveThreshold(warmup=50)
    scores = normal_scores(60)
    scores[10] = 1e6
    grades = threshold.update(scores)
    assert np.all(grades[:50] == 0)
    assert math.isinf(AdaptiveThreshold(warmup=50).threshold)


def test_threshold_follows_a_lasting_change_of_level() -> None:
    scores = np.concatenate([normal_scores(2000), 10 * normal_scores(3000, seed=1)])
    grades = AdaptiveThreshold(horizon=500).update(scores)
    assert np.mean(grades[2000:2050] > 0) > 0.3  # the change raises alarms at first
    assert np.all(grades[2500:] == 0)  # then the new level is normal


def test_grade_does_not_learn() -> None:
    threshold = AdaptiveThreshold(warmup=10)
    threshold.update(normal_scores(100))
    state = (threshold.n, threshold.mean, threshold.var)
    first = threshold.grade([1.0, 50.0])
    assert (threshold.n, threshold.mean, threshold.var) == state
    assert first[0] == 0 and first[1] > 0


def test_linear_scale_and_floor() -> None:
    threshold = AdaptiveThreshold(warmup=10, log_scale=False, min_threshold=100.0)
    grades = threshold.update(np.r_[np.ones(20), 50.0, 150.0])
    assert grades[20] == 0  # above mean + z sd but under the floor
    assert grades[21] > 0
    assert threshold.threshold >= 100.0


def test_constant_scores_then_a_rise() -> None:
    grades = AdaptiveThreshold(warmup=10).update(np.r_[np.full(30, 2.0), 3.0])
    assert np.all(grades[:30] == 0) and grades[30] == 1.0


@pytest.mark.parametrize("bad", [[np.nan], [np.inf], [-1.0], [[1.0, 2.0]]])
def test_invalid_scores_are_rejected(bad: list) -> None:
    with pytest.raises(ValueError, match="scores"):
        AdaptiveThreshold().update(bad)


@pytest.mark.parametrize("kwargs", [{"z": 0}, {"z": np.inf}, {"horizon": 0}, {"warmup": -1},
                                    {"min_threshold": -1.0}, {"horizon": 2.5}])
def test_invalid_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdaptiveThreshold(**kwargs)
