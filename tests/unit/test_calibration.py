"""Click probabilities at a position (learner.calibration): calibrated per position whatever the logits' scale."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

from learner import calibration
from learner.calibration import PositionCalibration, click_probability


def _world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A position-based world: position k is examined with probability 1/k, the item attracts with gamma."""
    rng = np.random.default_rng(seed)
    relevance_logit = rng.normal(-1.0, 1.2, n)
    positions = rng.integers(1, 11, n)
    clicks = rng.random(n) < (1.0 / positions) / (1.0 + np.exp(-relevance_logit))
    return relevance_logit, positions, clicks, rng.normal(0, 0.3, n)


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (1.8, 1.5), (0.5, -0.7)])
def test_calibrated_within_ten_percent_at_every_position(scale, shift):
    """Logits distorted as IPS weighting distorts them still give calibrated probabilities, prequentially."""
    logit, positions, clicks, noise = _world(60_000, seed=1)
    model_logit = scale * (logit + noise) + shift
    cal = PositionCalibration(max_position=10, refit_every=500)
    predicted = np.empty(len(logit))
    for start in range(0, len(logit), 500):  # predict-then-train, as the learner does
        s = slice(start, start + 500)
        predicted[s] = cal.predict(model_logit[s], positions[s])
        cal.update(model_logit[s], positions[s], clicks[s])
    after = slice(20_000, None)  # after warm-up
    for k in range(1, 11):
        at = positions[after] == k
        ratio = predicted[after][at].mean() / clicks[after][at].mean()
        assert 0.9 <= ratio <= 1.1, (k, ratio)


def test_before_any_fit_the_probability_is_the_click_models_own():
    cal = PositionCalibration()
    logits = np.array([-2.0, 0.0, 3.0])
    assert cal.predict(logits, np.array([1, 5, 30])) == pytest.approx(1 / (1 + np.exp(-logits)))


def test_published_state_predicts_the_same():
    logit, positions, clicks, _ = _world(5000, seed=2)
    cal = PositionCalibration(max_position=10, refit_every=1000)
    cal.update(logit, positions, clicks)
    state = cal.state()
    assert click_probability(state["intercepts"], state["slope"], logit, positions) == pytest.approx(
        cal.predict(logit, positions))
    assert state["intercepts"][0] > state["intercepts"][9]  # the top slot is examined more


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        PositionCalibration(window=0)


def test_the_fit_cannot_run_away_when_the_click_models_logits_jump():
    # the click model saturates between two fits (logits ~ +-20) while clicks stay rare; Newton
    # steps from the previous fit without a line search diverged here (slope ~25,000, predicted
    # CTR 12x the observed), as in a quick demo run whose served calibration read 3-8
    rng = np.random.default_rng(0)
    cal = PositionCalibration(max_position=10, window=5000, refit_every=1000)
    positions = rng.integers(1, 11, 20000)
    early, late = rng.normal(-1.0, 1.0, 10000), rng.normal(0.0, 12.0, 10000)
    logits = np.concatenate([early, late])
    truth = 0.3 / positions / (1.0 + np.exp(-np.concatenate([early, late / 12.0])))
    clicks = rng.random(20000) < truth
    for j in range(0, 20000, 500):
        cal.update(logits[j:j + 500], positions[j:j + 500], clicks[j:j + 500])
    ratio = cal.predict(logits[-5000:], positions[-5000:]).mean() / clicks[-5000:].mean()
    assert 0.8 < ratio < 1.3 and 0 < cal.slope < 1


def test_a_new_calibration_is_fitted_after_100_outcomes_and_then_as_they_double():
    fits = []
    cal = PositionCalibration(max_position=5, refit_every=1000)
    cal._fit = lambda: fits.append(cal._n)  # record when it fits, not how
    for _ in range(80):
        cal.update(np.zeros(50), np.ones(50, dtype=int), np.zeros(50))
    assert fits == [100, 200, 400, 800, 1600, 2600, 3600]


def test_docstring_example_runs() -> None:
    assert doctest.testmod(calibration).failed == 0
