"""Served quality beside its baseline (learner.quality) and the concept-drift test (serving.concept_drift)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from serving.concept_drift import PageHinkley
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


def test_page_hinkley_stays_quiet_on_a_steady_click_stream_and_alarms_on_degradation():
    rng = np.random.default_rng(3)
    p = 0.15
    quiet = 0
    for seed in range(10):
        labels = np.random.default_rng(seed).random(20000) < p
        quiet += not PageHinkley().update_many(np.where(labels, -math.log(p), -math.log(1 - p)))
    assert quiet == 10
    ph = PageHinkley()
    labels = rng.random(5000) < p
    assert not ph.update_many(np.where(labels, -math.log(p), -math.log(1 - p)))
    worse = rng.random(2000) < 0.4  # the world moved: the model still predicts 0.15
    losses = np.where(worse, -math.log(p), -math.log(1 - p))
    at = next((i for i, x in enumerate(losses) if ph.update(x)), None)
    assert at is not None and ph.alarm and ph.alarms == 1
    ph.update_many(np.full(ph.hold, 0.1))
    assert not ph.alarm  # the gauge comes down after `hold` quiet outcomes


def test_page_hinkley_checks_its_parameters():
    with pytest.raises(ValueError):
        PageHinkley(threshold=0)
