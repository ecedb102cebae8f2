"""Served quality beside its baseline (learner.quality) and the concept-drift test (serving.concept_drift)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from serving.concept_drift import PageHinkley
from serving.monitor import CONCEPT_DRIFT
from stream.examples import CLICK, RATING
from learner.quality import ClickQuality, RatingQuality, auc, log_loss


def test_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)
    labels = (rng.random(300) < 0.3).astype(float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(scores, labels) == pytest.approx(pairs)
    assert math.isnan(auc(scores, np.zeros(300)))


def test_log_loss_is_finite_for_certain_mistakes():
    assert log_loss(np.array([0.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1e-6))


def test_a_calibrated_model_beats_the_running_ctr_and_reads_calibrated():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.5, 20000)
    labels = (rng.random(20000) < p).astype(float)
    q = ClickQuality(window=5000)
    for start in range(0, 20000, 1000):
        q.add(p[start:start + 1000], labels[start:start + 1000])
    assert q.n == 5000
    assert q.rmse() < q.baseline_rmse()
    assert q.logloss() < q.baseline_logloss()
    assert 0.9 < q.calibration() < 1.1
    assert q.auc() > 0.65


def test_a_model_that_overpredicts_reads_as_miscalibrated_and_worse_than_its_baseline():
    rng = np.random.default_rng(2)
    labels = (rng.random(5000) < 0.1).astype(float)
    q = ClickQuality(window=5000)
    q.add(np.full(5000, 0.5), labels)
    assert q.calibration() == pytest.approx(0.5 / labels.mean())
    assert q.rmse() > q.baseline_rmse() and q.logloss() > q.baseline_logloss()


def test_the_baseline_never_sees_the_label_it_predicts():
    q = ClickQuality(window=10)
    baseline = q.add(np.zeros(3), np.array([1.0, 0.0, 1.0]))
    assert baseline.tolist() == [0.5, 1.0, 0.5]


def test_rating_baseline_is_the_running_mean():
    q = RatingQuality(window=3, prior=3.0)
    baseline = q.add(np.array([4.0, 4.0, 4.0, 4.0]), np.array([5.0, 3.0, 4.0, 2.0]))
    assert baseline.tolist() == [3.0, 5.0, 4.0, 4.0]
    assert q.rmse() == pytest.approx(math.sqrt((1 + 0 + 4) / 3))


def test_page_hinkley_on_the_click_calibration_error_is_quiet_when_steady_and_alarms_both_ways():
    # the monitor's click test (serving.monitor.CONCEPT_DRIFT): p - y of a model predicting 0.15
    p = 0.15
    quiet = 0
    for seed in range(10):
        labels = np.random.default_rng(seed).random(20000) < p
        quiet += not PageHinkley(**CONCEPT_DRIFT[CLICK]).update_many(p - labels)
    assert quiet == 10
    rng = np.random.default_rng(3)
    for moved_to in (0.05, 0.4):  # the world moved, the model still predicts 0.15
        ph = PageHinkley(**CONCEPT_DRIFT[CLICK])
        assert not ph.update_many(p - (rng.random(5000) < p))
        errors = p - (rng.random(2000) < moved_to)
        at = next((i for i, x in enumerate(errors) if ph.update(x)), None)
        assert at is not None and ph.alarm and ph.alarms == 1, moved_to
    ph.update_many(np.zeros(ph.hold))
    assert not ph.alarm  # the gauge comes down after `hold` quiet outcomes
    assert not PageHinkley(**CONCEPT_DRIFT[RATING]).two_sided  # ratings: a rise of the excess loss only


def test_page_hinkley_checks_its_parameters():
    with pytest.raises(ValueError):
        PageHinkley(threshold=0)
