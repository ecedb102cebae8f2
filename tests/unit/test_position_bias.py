"""PositionBiasEstimator: recovers planted examination curves online, validates its input, and
restores exactly from its saved state."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

import learner.position_bias
from learner import PositionBiasEstimator

TOLERANCE = 0.05  # max absolute error on the relative examination curve


def planted_logs(seed: int, n_impressions: int, exam: np.ndarray, n_items: int = 30,
                 temperature: float | None = None):
    """Slates of ``len(exam)`` items under the PBM. Placement is uniformly random when
    ``temperature`` is None, else Plackett-Luce on a fixed item score (a non-uniform, confounded
    logging policy: good-scoring items mostly sit at the top)."""
    rng = np.random.default_rng(seed)
    slate = len(exam)
    attractiveness = rng.uniform(0.05, 0.7, n_items)
    keys = rng.gumbel(size=(n_impressions, n_items))
    if temperature is not None:
        keys += rng.normal(0, 1, n_items) / temperature
    items = np.argsort(-keys, axis=1)[:, :slate]
    positions = np.broadcast_to(np.arange(1, slate + 1), items.shape)
    clicks = rng.random(items.shape) < exam[None, :] * attractiveness[items]
    return positions.ravel(), clicks.ravel(), np.array([f"item{d}" for d in items.ravel()], dtype=object)


def feed(estimator: PositionBiasEstimator, logs, batch: int = 20_000) -> None:
    positions, clicks, keys = logs
    for start in range(0, len(positions), batch):
        stop = start + batch
        estimator.update(positions[start:stop], clicks[start:stop], keys[start:stop])
        assert np.all(np.isfinite(estimator.examination()))  # usable after every batch


@pytest.mark.parametrize("temperature", [None, 0.7], ids=["random-placement", "plackett-luce"])
def test_recovers_planted_examination_curve(temperature):
    exam = np.array([1.0, 0.62, 0.45, 0.33, 0.25, 0.2])
    est = PositionBiasEstimator()
    feed(est, planted_logs(0, 30_000, exam, temperature=temperature))
    got = est.examination(range(1, 7))
    assert np.max(np.abs(got - exam)) <= TOLERANCE, got


def test_more_logs_refine_the_estimate():
    exam = np.array([1.0, 0.5, 0.3])
    est = PositionBiasEstimator()
    logs = planted_logs(1, 40_000, exam)
    feed(est, tuple(a[:3_000] for a in logs))
    early = np.abs(est.examination([1, 2, 3]) - exam).max()
    feed(est, tuple(a[3_000:] for a in logs))
    late = np.abs(est.examination([1, 2, 3]) - exam).max()
    assert late < early and late <= TOLERANCE / 2


def test_unseen_positions_are_not_corrected():
    est = PositionBiasEstimator()
    assert est.examination([1, 5]).tolist() == [1.0, 1.0]
    est.update([1, 2, 1, 2], [1, 0, 1, 1], ["a", "a", "b", "b"])
    assert est.examination([7]).tolist() == [1.0]
    assert est.n_positions == 2


@pytest.mark.parametrize(
    "positions, clicks, keys, field",
    [
        ([0, 1], [0, 1], ["a", "b"], "positions"),
        ([1.5, 1], [0, 1], ["a", "b"], "positions"),
        ([float("nan"), 1], [0, 1], ["a", "b"], "positions"),
        ([1, 2], [0, 2], ["a", "b"], "clicks"),
        ([1, 2], [0, float("nan")], ["a", "b"], "clicks"),
        ([1, 2], [0, 1], ["a"], "length"),
        ([1, 2], [0, 1], ["a", ""], "key"),
    ],
)
def test_rejects_bad_logs(positions, clicks, keys, field):
    est = PositionBiasEstimator()
    with pytest.raises(ValueError, match=field):
        est.update(positions, clicks, keys)
    assert est.n_positions == 0 and len(est.keys) == 0


def test_state_round_trip():
    est = PositionBiasEstimator(smoothing=2.0)
    feed(est, planted_logs(2, 2_000, np.array([1.0, 0.5, 0.25])))
    again = PositionBiasEstimator.from_state(*est.state())
    np.testing.assert_array_equal(again.examination(), est.examination())
    more = planted_logs(3, 500, np.array([1.0, 0.5, 0.25]))
    est.update(*more)
    again.update(*more)
    np.testing.assert_array_equal(again.examination(), est.examination())


def test_docstring_examples_run():
    result = doctest.testmod(learner.position_bias)
    assert result.attempted > 0 and result.failed == 0
