"""Tests of the feedback-protocol learners of the display-bias benchmark (``sim.bias``): the
simulation's traffic through the worker's pipeline into the learner service, once per protocol."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sim.bias
from sim.bias import BiasConfig, PopularityPolicy, ProtocolLearners, run, simulate_step
from sim.simulator import Schedule, Simulation
from stream.examples import FEEDBACK_PROTOCOLS

TINY = BiasConfig(n_users=60, n_items=40, model_factors=8, warmup_steps=2, steady_steps=3, attack_steps=1,
                  n_bots=2, seed=0)


def _clicks_in_window(events: list[dict], bots: frozenset[str], window_s: float) -> tuple[int, int]:
    """The normal users' clicks in ``events``, and those within ``window_s`` of their slate."""
    shown = {e["request_id"]: e["ts"] for e in events if e["type"] == "impression"}
    clicks = [e for e in events if e["type"] == "click" and e["user_id"] not in bots]
    return len(clicks), sum(e["ts"] - shown[e["request_id"]] <= window_s for e in clicks)


def test_each_protocol_learns_every_normal_click_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny run: the new figures exist and are in [0, 1], and each protocol's worker sent its learner
    every click of the learning steps that came within the attribution window, exactly once
    (the events are recorded as ``simulate_step`` made them, so the count is independent of the
    learners' own bookkeeping)."""
    steps: dict[int, list[dict]] = {}

    def recording(sim_, requests, items, propensities):
        events, log = simulate_step(sim_, requests, items, propensities)
        if requests:
            steps[requests[0].step] = events
        return events, log

    monkeypatch.setattr(sim.bias, "simulate_step", recording)
    result = run(TINY, progress=False)
    learn_until = TINY.warmup_steps + TINY.steady_steps
    learned_events = [e for step, events in steps.items() if step < learn_until for e in events]
    bots = frozenset(f"sim-bot{j}" for j in range(TINY.n_bots))
    clicks, in_window = _clicks_in_window(learned_events, bots, TINY.attribution_window_s)

    for name in ("ndcg_wait", "ndcg_immediate", "ctr_wait", "ctr_immediate"):
        assert 0.0 <= result[name] <= 1.0, name
        assert np.isfinite(result[name])
    assert clicks > 50 and clicks - in_window <= 0.01 * clicks  # 1 s + Exp(8 s) delays, 60 s window
    assert result["clicks_logged"] == clicks
    for protocol in FEEDBACK_PROTOCOLS:
        assert result[f"clicks_sent_{protocol}"] == in_window, protocol
    summary = sim.bias.summarize([result])
    assert summary["per_seed"]["ndcg_wait"] == [result["ndcg_wait"]]
    assert summary["per_seed"]["ctr_immediate"] == [result["ctr_immediate"]]


def test_bots_traffic_stays_out_of_the_protocol_learners(tmp_path: Path) -> None:
    """An attack step's traffic, bots included: the workers get only the normal users' events
    and send every click of theirs within the window; no bot reaches a learner."""
    sim_ = Simulation.planted(n_users=40, n_items=30, seed=0, n_bots=3,
                              schedule=Schedule(warmup=0, steady=0, attack=1, shift=0))
    config = BiasConfig(n_users=40, n_items=30, model_factors=8, seed=0)
    requests = sim_.requests(0)
    assert any(r.is_bot for r in requests)
    items, propensities = PopularityPolicy(30, 1.0, 0).slates(len(requests), 10, np.random.default_rng(0))
    events, _ = simulate_step(sim_, requests, items, propensities)
    learners = ProtocolLearners(sim_, config, tmp_path)
    learners.observe(events, until=None)
    _, in_window = _clicks_in_window(events, frozenset(sim_.bot_ids), config.attribution_window_s)
    assert in_window > 0
    assert learners.clicks() == {f"clicks_sent_{p}": in_window for p in FEEDBACK_PROTOCOLS}
    assert learners.offset == sum(e["user_id"] not in sim_.bot_ids for e in events)  # records the workers got
    for model in learners.models().values():
        assert not set(model.users.ids) & set(sim_.bot_ids)
