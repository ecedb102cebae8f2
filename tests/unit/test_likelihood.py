"""Tests of the anomaly likelihood layer (stream/anomaly/likelihood.py) and of ``score_series``:
warm-up, causality, calibration on scores whose distribution is known, the red-zone filter,
one-sidedness, and the series entry point end to end."""
from __future__ import annotations

import numpy as np
import pytest

from stream.anomaly import AnomalyLikelihood, score_series
from stream.anomaly.likelihood import log_likelihood
from stream.anomaly.series import forest_inputs


def lognormal_scores(n: int, seed: int = 0) -> np.ndarray:
    """Scores whose log(1 + s) is Gaussian (mean 3, sd 1): the layer's model holds exactly."""
    return np.expm1(3.0 + np.random.default_rng(seed).normal(size=n))


def test_likelihood_is_one_half_until_the_layer_has_learned() -> None:
    layer = AnomalyLikelihood(learning_period=50, estimation_samples=30)
    out = layer.update(lognormal_scores(200), log=False)
    assert np.all(out[:80] == 0.5)
    assert np.any(out[80:] != 0.5)
    assert layer.n_seen == 200


def test_outputs_are_causal_and_independent_of_batching() -> None:
    scores = lognormal_scores(3000)
    whole = AnomalyLikelihood().update(scores)
    prefix = AnomalyLikelihood().update(scores[:1700])
    np.testing.assert_array_equal(whole[:1700], prefix)
    layer = AnomalyLikelihood()
    pieces = np.concatenate([layer.update(scores[i:i + 37]) for i in range(0, len(scores), 37)])
    np.testing.assert_array_equal(whole, pieces)


def test_both_scales_lie_in_the_unit_interval_and_agree() -> None:
    scores = lognormal_scores(3000)
    scores[2000:2005] *= 50.0
    likelihood = AnomalyLikelihood().update(scores, log=False)
    logged = AnomalyLikelihood().update(scores)
    for out in (likelihood, logged):
        assert np.all((out >= 0.0) & (out <= 1.0))
    np.testing.assert_allclose(logged, log_likelihood(1.0 - likelihood), atol=1e-6)
    assert log_likelihood(np.array([1e-5]))[0] == pytest.approx(0.5, abs=1e-4)


def test_tail_probabilities_are_calibrated_when_the_model_holds() -> None:
    """With short_window=1 and log-normal scores, likelihood >= 0.99 should happen about 1% of
    the time and >= 0.999 about 0.1%."""
    layer = AnomalyLikelihood(short_window=1, learning_period=0, estimation_samples=1000)
    out = layer.update(lognormal_scores(60_000, seed=1), log=False)[1000:]
    assert 0.007 < np.mean(out >= 0.99) < 0.013
    assert 0.0003 < np.mean(out >= 0.999) < 0.002


def test_a_burst_of_high_scores_stands_out_and_raises_one_red_alarm() -> None:
    scores = lognormal_scores(4000)
    scores[3000:3040] *= 100.0  # a long anomaly: 40 steps far above the usual
    out = AnomalyLikelihood().update(scores)
    assert out[:3000].max() < 0.5
    red = np.flatnonzero(out >= 0.5)
    assert len(red) == 1 and 3000 <= red[0] < 3010
    later = out[red[0] + 1:3040]
    np.testing.assert_allclose(later[later > 0.2], log_likelihood(np.array([1e-3]))[0])


def test_without_the_red_zone_filter_every_red_score_keeps_its_tail() -> None:
    """red_zone=None (the detector's setting, where consecutive scores are different entities):
    each score of a long anomaly is reported red on its own."""
    scores = lognormal_scores(4000)
    scores[3000:3040] = np.expm1(3.0 + 8.0)  # 8 deviations above the usual log-score
    filtered = AnomalyLikelihood(short_window=1).update(scores)
    out = AnomalyLikelihood(short_window=1, red_zone=None).update(scores)
    assert np.count_nonzero(filtered[3000:3040] >= 0.5) == 1
    assert np.all(out[3000:3040] >= 0.5)
    np.testing.assert_array_equal(out[:3000] >= 0.5, filtered[:3000] >= 0.5)


def test_only_scores_above_the_usual_count_as_anomalous() -> None:
    scores = lognormal_scores(4000)
    scores[3000:3100] = 0.0  # a quiet spell: far below the usual
    out = AnomalyLikelihood().update(scores, log=False)
    assert out[3000:3100].max() < 0.5


def test_constant_scores_raise_no_alarm() -> None:
    out = AnomalyLikelihood().update(np.full(3000, 2.0))
    assert out.max() < 0.5


@pytest.mark.parametrize("kwargs", [
    {"short_window": 0}, {"long_window": 1}, {"learning_period": -1}, {"estimation_samples": 1.5},
    {"reestimation_period": True}, {"estimation_samples": 500, "long_window": 100},
    {"min_std": 0.0}, {"min_std": np.nan}, {"red_zone": 0.99, "yellow_zone": 0.999},
    {"red_zone": 1.0},
])
def test_invalid_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AnomalyLikelihood(**kwargs)


def test_non_finite_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        AnomalyLikelihood().update(np.array([1.0, np.nan]))


def periodic_series(n: int = 4000, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    return np.sin(2 * np.pi * t / 100) + np.random.default_rng(seed).normal(0, 0.05, n)


def test_score_series_puts_a_spike_far_above_everything_else() -> None:
    x = periodic_series()
    x[3000] += 3.0
    out = score_series(x)
    assert out.shape == x.shape
    assert np.all((out >= 0.0) & (out <= 1.0))
    assert int(np.argmax(out)) in range(3000, 3003)
    assert out.max() > 0.9 > np.delete(out, range(3000, 3003)).max()


def test_score_series_is_causal_and_seeded() -> None:
    x = periodic_series(2500)
    whole = score_series(x, seed=3)
    np.testing.assert_array_equal(whole[:1200], score_series(x[:1200], seed=3))
    assert not np.array_equal(whole, score_series(x, seed=4))


def test_score_series_passes_likelihood_settings_through() -> None:
    x = periodic_series(2000)
    out = score_series(x, log=False, learning_period=500, estimation_samples=200)
    assert np.all(out[:700] == 0.5) and np.any(out[700:] != 0.5)
    with pytest.raises(TypeError):
        score_series(x, no_such_setting=1)


@pytest.mark.parametrize("inputs", ["values", "differences", "both"])
def test_score_series_accepts_every_input_kind_and_vector_series(inputs: str) -> None:
    x = np.column_stack([periodic_series(1500), periodic_series(1500, seed=1)])
    out = score_series(x, inputs=inputs, num_trees=10)
    assert out.shape == (1500,)


def test_forest_inputs_are_values_differences_or_both() -> None:
    x = np.array([1.0, 3.0, 2.0])
    np.testing.assert_array_equal(forest_inputs(x, "differences"), [0.0, 2.0, -1.0])
    np.testing.assert_array_equal(forest_inputs(x, "both"), [[1.0, 0.0], [3.0, 2.0], [2.0, -1.0]])
    with pytest.raises(ValueError, match="inputs"):
        forest_inputs(x, "ranks")
