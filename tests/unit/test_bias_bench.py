"""Tests of the display-bias benchmark (bench/bias.py): the logging policy's propensities are
exact, IPS beats naive learning on the shared simulated log, the attack wiring, the OBD part."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sim.bias import BiasConfig, PopularityPolicy, obd_position_curves, run, simulate_step
from stream.events import validate
from sim.simulator import Schedule, Simulation


def test_logged_propensities_are_the_exact_plackett_luce_probabilities() -> None:
    """Three items, slates of two: the product of a slate's logged propensities is its probability."""
    policy = PopularityPolicy(n_items=3, alpha=1.0, seed=0)
    weights = np.exp(policy.log_weights)
    items, propensities = policy.slates(60_000, 2, np.random.default_rng(0))
    first, second = items[:, 0], items[:, 1]
    assert np.allclose(propensities[:, 0], weights[first] / weights.sum())
    assert np.allclose(propensities[:, 1], weights[second] / (weights.sum() - weights[first]))
    frequency = Counter(zip(first.tolist(), second.tolist()))
    for (a, b), count in frequency.items():
        probability = propensities[(first == a) & (second == b)][0].prod()
        assert count / 60_000 == pytest.approx(probability, abs=0.01)
    assert len(frequency) == 6  # every ordered pair is possible: full support


@pytest.fixture(scope="module")
def small_run() -> dict:
    """250 users, 100 items, 35 learning steps and 2 attack steps, seed 0 (about 5 s)."""
    config = BiasConfig(n_users=250, n_items=100, model_factors=16, warmup_steps=5, steady_steps=30,
                        attack_steps=2, seed=0)
    return run(config, progress=False)


def test_ips_beats_naive_learning_on_the_same_log(small_run: dict) -> None:
    """Seed 0: NDCG@10 naive ~0.61, IPS ~0.65 (+5.8%; seeds 1-3 give +4% to +8%). The check
    asks for +3%, with a naive model that did learn (well above the logging policy's slates),
    and for the position-bias estimate the correction used being close to the planted curve."""
    r = small_run
    assert r["ndcg_naive"] > 2 * r["ndcg_logging"]
    assert r["ndcg_ips"] >= 1.03 * r["ndcg_naive"]
    assert r["gain"] == pytest.approx(r["ndcg_ips"] / r["ndcg_naive"] - 1)
    assert r["ctr_ips"] > r["ctr_naive"] and r["ctr_oracle"] > r["ctr_ips"]
    assert np.allclose(r["examination_fitted"], r["examination_true"], atol=0.05)


def test_bots_are_flagged_and_normal_users_are_not(small_run: dict) -> None:
    """The bench's events reach the detector in a shape and order it can use: every bot flagged
    (within ~25 s), ~0.7% of the active normal users flagged at a step's end."""
    r = small_run
    assert r["attack_flagged_share"] >= 0.9 and r["bots_never_flagged"] == 0
    assert r["normal_flagged_share"] <= 0.01
    assert r["attack_detection_delay_s"] < 120.0


def test_obd_part_is_skipped_with_a_note_when_the_data_is_absent(tmp_path: Path) -> None:
    result = obd_position_curves(tmp_path)
    assert list(result) == ["obd_note"] and "not found" in result["obd_note"]


@pytest.mark.data
def test_obd_curves_are_relative_to_position_one(shared_data: Path) -> None:
    result = obd_position_curves(shared_data / "obd")
    assert result["obd_position_ctr_random"][0] == 1.0 and result["obd_examination_bts"][0] == 1.0
    assert len(result["obd_position_ctr_random"]) == len(result["obd_examination_bts"]) == 3
    assert sum(result["obd_random_impressions"]) == 10_000
    low, high = result["obd_position_ctr_random_ci95"][1]
    assert low <= result["obd_position_ctr_random"][1] <= high
    diffs = np.abs(np.subtract(result["obd_position_ctr_random"], result["obd_examination_bts"]))
    assert result["obd_max_abs_diff"] == pytest.approx(diffs.max(), abs=1e-3)


def test_simulated_events_follow_the_event_contract() -> None:
    sim = Simulation.planted(n_users=40, n_items=30, seed=0, schedule=Schedule(warmup=0, steady=0, attack=1, shift=0))
    requests = sim.requests(0)
    items, propensities = PopularityPolicy(30, 1.0, 0).slates(len(requests), 10, np.random.default_rng(0))
    events, log = simulate_step(sim, requests, items, propensities)
    assert all(validate(event) == [] for event in events)
    assert {e["type"] for e in events} == {"impression", "click"}
    normal = sum(not r.is_bot for r in requests)
    assert len(log["labels"]) == 10 * normal  # bots' traffic goes to the detector, not the learners
    clicks = sum(e["type"] == "click" and not e["user_id"].startswith("sim-bot") for e in events)
    assert log["labels"].sum() == clicks
