"""Promotion on evidence: serving's shadow check asks the off-policy evaluator, on the recent click
slates its monitor kept, whether a candidate snapshot would get fewer clicks than the live model;
a worse one is refused and counted with that reason, a better one promoted. No broker: the model
store is a temporary folder and the snapshot announcement is handed to the updater directly."""
from __future__ import annotations

import asyncio

import numpy as np
import orjson

from learner.updates import Delta, ModelRows, write_snapshot
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel
from serving.monitor import Monitor
from serving.ope.evidence import evidence_check
from serving.popularity import Popularity
from serving.seen import SeenItems
from serving.shadow import Outcome, shadow_check
from serving.updates import ModelUpdater

N_ITEMS, SLATE = 20, 3
THETA = np.array([1.0, 0.7, 0.5])
TRUE_CTR = np.linspace(0.02, 0.45, N_ITEMS)  # item j is better than item j - 1
ITEMS = [f"i{j}" for j in range(N_ITEMS)]


def item_rows(click_biases: np.ndarray) -> ModelRows:
    return ModelRows(ITEMS, np.zeros((N_ITEMS, 2), np.float32), np.zeros(N_ITEMS, np.float32),
                     click_biases.astype(np.float32))


def model(click_biases: np.ndarray, seq: int = 1) -> ServingModel:
    delta = Delta("mf", seq, f"mf-{seq}", 0.0, -1.0, ModelRows.empty(2), item_rows(click_biases), 0.0, None)
    return ServingModel.empty("mf", 2).apply([delta])


# The live model ranks the middle items first, the better one the truly best, the worse one the worst.
MIDDLE = -np.abs(np.arange(N_ITEMS) - N_ITEMS / 2)
BETTER = np.arange(N_ITEMS, dtype=float)
WORSE = -np.arange(N_ITEMS, dtype=float)


def logged_outcomes(n_slates: int, seed: int = 3) -> list[Outcome]:
    """Uniform random slates (conditional propensities 1/20, 1/19, 1/18) and position-based clicks."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_slates):
        shown = rng.choice(N_ITEMS, SLATE, replace=False)
        clicks = rng.random(SLATE) < THETA * TRUE_CTR[shown]
        for k, (item, clicked) in enumerate(zip(shown, clicks)):
            out.append(Outcome(f"u{s % 50}", ITEMS[item], float(clicked), "click", k + 1, 1.0 / (N_ITEMS - k),
                               f"r{s}", "uniform"))
    return out


def test_a_worse_candidate_is_refused_on_evidence_and_a_better_one_promoted():
    outcomes = logged_outcomes(3000)
    live = model(MIDDLE)
    worse = evidence_check(live, model(WORSE), outcomes)
    assert not worse.promote and "below the live model's" in worse.reason
    assert worse.candidate.ci[1] < worse.live.ctr
    better = evidence_check(live, model(BETTER), outcomes)
    assert better.promote and better.candidate.ci[0] > better.live.ctr
    # The live model's own estimate is close to the truth of its greedy slate.
    top = np.argsort(-MIDDLE, kind="stable")[:SLATE]
    assert abs(better.live.ctr - float(THETA @ TRUE_CTR[top]) / SLATE) < 4 * (better.live.ci[1] - better.live.ctr) / 1.96


def test_the_shadow_check_reports_the_ctr_reason_and_passes_without_evidence():
    outcomes = logged_outcomes(3000)
    live = model(MIDDLE)
    verdict = shadow_check(live, model(WORSE), outcomes, min_outcomes=10 ** 9)  # the RMSE check has too little
    assert not verdict.promote and verdict.refused_for == "ctr"
    assert shadow_check(live, model(BETTER), outcomes, min_outcomes=10 ** 9).promote
    # Too few slates, or outcomes without their slate (ratings, old examples): no evidence either way.
    assert shadow_check(live, model(WORSE), outcomes[:30], min_outcomes=10 ** 9).promote
    bare = [Outcome(o.user_id, o.item_id, o.label, o.kind) for o in outcomes]
    assert shadow_check(live, model(WORSE), bare, min_outcomes=10 ** 9).promote


def test_a_greedy_log_is_no_evidence_against_a_different_ranking():
    live = model(MIDDLE)
    top = np.argsort(-MIDDLE, kind="stable")[:SLATE]
    rng = np.random.default_rng(1)
    outcomes = [Outcome(f"u{s}", ITEMS[item], float(rng.random() < TRUE_CTR[item]), "click", k + 1, 1.0, f"r{s}",
                        "greedy") for s in range(500) for k, item in enumerate(top)]
    verdict = evidence_check(live, model(WORSE), outcomes)
    assert verdict.promote and "too poorly" in verdict.reason


def test_the_monitor_keeps_the_slate_of_each_click_outcome():
    metrics = ServingMetrics()
    live = LiveModel(history=2, metrics=metrics)
    live.swap(model(MIDDLE))
    monitor = Monitor(live, metrics, SeenItems(10, 10), Popularity())
    monitor.observe([
        {"user_id": "u", "item_id": "i1", "label": 1.0, "kind": "click", "ts": 0.0, "anomalous": False,
         "position": 2, "propensity": 0.25, "request_id": "r1", "policy": "softmax", "model_version": "mf-1"},
        {"user_id": "u", "item_id": "i2", "label": 0.0, "kind": "click", "ts": 0.0, "anomalous": False,
         "position": 1, "propensity": 7.0, "request_id": "r1", "policy": "softmax"},  # invalid propensity
        {"user_id": "u", "item_id": "i3", "label": 4.0, "kind": "rating", "ts": 0.0, "anomalous": False},
    ])
    first, second, rating = monitor.recent_outcomes()
    assert (first.position, first.propensity, first.request_id, first.policy) == (2, 0.25, "r1", "softmax")
    assert second.propensity is None and rating.request_id is None


def test_the_updater_refuses_a_worse_snapshot_and_counts_the_reason(tmp_path):
    outcomes = logged_outcomes(3000)
    metrics = ServingMetrics()
    live = LiveModel(history=2, metrics=metrics)
    live.swap(model(MIDDLE))
    updater = ModelUpdater(tmp_path, "mf", live, metrics, lambda: outcomes, shadow_min_outcomes=10 ** 9)
    users = ModelRows(["u0"], np.zeros((1, 2), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32))

    def announce(click_biases: np.ndarray, seq: int) -> None:
        manifest = write_snapshot(tmp_path, "mf", seq, 0.0, -1.0, users, item_rows(click_biases))
        asyncio.run(updater.process([(b"snapshot/mf", orjson.dumps(manifest))]))

    announce(WORSE, 2)
    assert live.current.version == "mf-1"
    assert metrics.registry.get_sample_value("streamrec_serving_shadow_refusals_total", {"reason": "ctr"}) == 1
    announce(BETTER, 3)
    assert live.current.version == "mf-3"
    assert metrics.registry.get_sample_value("streamrec_serving_shadow_refusals_total", {"reason": "ctr"}) == 1
