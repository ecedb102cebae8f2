"""Tests of the closed-loop user simulator (stream/simulator.py): determinism, the position-based
click model, the phases (bot attack, preference shift), NDCG, and the MovieLens-fitted world."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sim.simulator import Preferences, Request, Schedule, Simulation, ndcg_at_k


def slate_of(item_ids: list[str]) -> list[dict]:
    return [{"item_id": item, "position": p + 1, "propensity": 0.5} for p, item in enumerate(item_ids)]


def hand_world(rule: str = "threshold") -> Preferences:
    """Two users, five items, one factor: user a likes items 0-2 (scores 2, 1, 0.5), user b the
    others; ``threshold`` at 0.25 makes exactly those relevant."""
    return Preferences(
        user_ids=("a", "b"), item_ids=tuple(f"i{j}" for j in range(5)),
        user_factors=np.array([[1.0], [-1.0]]), item_factors=np.array([[2.0], [1.0], [0.5], [-1.0], [-2.0]]),
        user_bias=np.zeros(2), item_bias=np.zeros(5), rule=rule, cutoff=0.25,
    )


def test_same_seed_same_run_and_responses_do_not_depend_on_call_order() -> None:
    def run(seed: int, reverse: bool) -> list:
        sim = Simulation.planted(n_users=50, n_items=40, seed=seed)
        slate = slate_of(list(sim.item_ids[:10]))
        requests = [r for step in range(3) for r in sim.requests(step)]
        answers = {r: sim.respond(r, slate) for r in (reversed(requests) if reverse else requests)}
        return [(r, answers[r]) for r in requests]

    first = run(7, reverse=False)
    assert first == run(7, reverse=True)  # keyed by request, not by call order
    assert sum(len(clicks) for _, clicks in first) > 0
    assert first != run(8, reverse=False)
    a, b = Simulation.planted(seed=7), Simulation.planted(seed=7)
    assert np.array_equal(a.preferences.relevance(np.arange(10)), b.preferences.relevance(np.arange(10)))


def test_requests_are_time_ordered_inside_their_step() -> None:
    sim = Simulation.planted(n_users=100, n_items=30, seed=1, schedule=Schedule(step_s=60.0, start_ts=1000.0))
    requests = sim.requests(2)
    ts = [r.ts for r in requests]
    assert ts == sorted(ts) and 1120.0 <= ts[0] and ts[-1] < 1180.0
    assert [r.index for r in requests] == list(range(len(requests)))
    assert 60 <= len(requests) <= 140  # one request per user and step on average


def test_top_positions_are_examined_more_following_the_power_law() -> None:
    """Every item relevant (huge quality): the click rate of position p is its examination p**-eta."""
    eta, n = 0.8, 4000
    world = Preferences.planted(n_users=10, n_items=10, seed=0, quality_mean=30.0, quality_std=0.1)
    sim = Simulation(world, seed=0, eta=eta)
    slate = slate_of(list(sim.item_ids))
    clicks = np.zeros(10)
    for index in range(n):
        for click in sim.respond(Request("sim-u0", 0, index, 0.0, False), slate):
            clicks[click.position - 1] += 1
    rate = clicks / n
    expected = np.arange(1, 11) ** -eta
    assert np.allclose(rate, expected, atol=4 * np.sqrt(0.25 / n))
    assert rate[0] > 0.99 and rate[0] > 2 * rate[4]
    assert np.allclose(sim.examination([1, 2, 4]), [1.0, 2**-eta, 4**-eta])


def test_irrelevant_and_unknown_items_are_never_clicked() -> None:
    sim = Simulation(hand_world(), seed=0, eta=0.0)  # eta 0: every position examined
    slate = slate_of(["i3", "i0", "i4", "not-in-catalogue", "i1"])
    clicked = {c.item_id for index in range(500)
               for c in sim.respond(Request("a", 0, index, 0.0, False), slate)}
    assert clicked == {"i0", "i1"}  # with eta 0 every relevant item is clicked, the rest never
    clicks = sim.respond(Request("a", 0, 0, 100.0, False), slate)
    assert [c.position for c in clicks] in ([2, 5], [5, 2])
    assert all(101.0 <= c.ts for c in clicks) and [c.ts for c in clicks] == sorted(c.ts for c in clicks)


def test_phases_follow_the_schedule_and_bots_appear_only_in_the_attack() -> None:
    schedule = Schedule(warmup=1, steady=2, attack=2, shift=1)
    sim = Simulation.planted(n_users=60, n_items=50, seed=2, schedule=schedule, n_bots=3)
    assert [sim.phase(t) for t in range(6)] == ["warmup", "steady", "steady", "attack", "attack", "shift"]
    assert schedule.start("attack") == 3 and schedule.n_steps == 6
    with pytest.raises(ValueError):
        sim.phase(6)
    for step in range(6):
        bots = {r.user_id for r in sim.requests(step) if r.is_bot}
        assert bots == (set(sim.bot_ids) if sim.phase(step) == "attack" else set())
    assert Schedule(warmup=0, steady=2).phase(0) == "steady"


def test_bots_request_and_click_far_more_than_normal_users() -> None:
    schedule = Schedule(warmup=0, steady=0, attack=1, shift=0)
    sim = Simulation.planted(n_users=200, n_items=100, seed=3, schedule=schedule, n_bots=2)
    slate = slate_of(list(sim.item_ids[:10]))
    requests = sim.requests(0)
    stats = {True: [0, 0], False: [0, 0]}  # is_bot -> [requests, clicks]
    clicked_by_bots = set()
    for r in requests:
        clicks = sim.respond(r, slate)
        stats[r.is_bot][0] += 1
        stats[r.is_bot][1] += len(clicks)
        if r.is_bot:
            clicked_by_bots.update(c.item_id for c in clicks)
            assert clicks[-1].ts - r.ts < 5.0  # a whole slate clicked within seconds
    bot_requests, bot_clicks = stats[True]
    normal_requests, normal_clicks = stats[False]
    assert bot_requests / 2 > 20 * normal_requests / 200  # per account: ~40 vs ~1 requests a minute
    assert bot_clicks / bot_requests > 8.5  # ~95% of a 10-item slate
    assert normal_clicks / normal_requests < 2.0
    assert clicked_by_bots == set(sim.item_ids[:10])


def test_the_shift_rotates_tastes_and_changes_the_ground_truth() -> None:
    schedule = Schedule(warmup=1, steady=1, attack=0, shift=1)
    sim = Simulation.planted(n_users=300, n_items=100, seed=4, schedule=schedule, shift_angle_deg=90.0)
    before, after = sim.preferences_at(1), sim.preferences_at(2)
    assert before is sim.preferences and after is sim.shifted
    x, y = before.user_factors, after.user_factors
    assert np.allclose(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
    assert np.allclose(np.einsum("ij,ij->i", x, y), 0.0, atol=1e-9)  # 90 degrees: orthogonal
    assert np.array_equal(before.item_factors, after.item_factors)
    old = np.array([sim.ground_truth_relevance(u, 1) for u in sim.user_ids[:50]])
    new = np.array([sim.ground_truth_relevance(u, 2) for u in sim.user_ids[:50]])
    # what remains in common is item quality; the personal part of relevance is gone
    assert np.corrcoef(old.ravel(), new.ravel())[0, 1] < 0.7
    assert np.allclose(before.rotated(0.0, seed=0).user_factors, x)


def test_ndcg_of_a_hand_ranking() -> None:
    # gains of the ranked items 1, 0, 1 against the ideal 1, 1, 0:
    # DCG = 1 + 0 + 1/log2(4) = 1.5, IDCG = 1 + 1/log2(3)
    value = ndcg_at_k(np.array([[1.0, 0.0, 1.0]]), np.array([[1.0, 1.0, 0.0]]), k=3)
    assert value[0] == pytest.approx(1.5 / (1.0 + 1.0 / math.log2(3)))
    assert ndcg_at_k(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]]), k=2)[0] == 0.0  # nothing relevant
    sim = Simulation(hand_world(), seed=0)
    assert sim.ndcg_at_k("a", ["i1", "i0"], step=0, k=2) == pytest.approx(1.0)  # 0/1 relevance: order within is free
    second_only = (1 / math.log2(3)) / (1 + 1 / math.log2(3))  # one relevant item, ranked second
    assert sim.ndcg_at_k("a", ["i3", "i0"], step=0, k=2) == pytest.approx(second_only)
    assert sim.ndcg_at_k("b", ["unknown", "i4"], step=0, k=2) == pytest.approx(second_only)


def test_expected_ctr_and_relevance_rules() -> None:
    sim = Simulation(hand_world(), seed=0, eta=1.0)
    assert sim.expected_ctr("a", ["i0", "i3", "i1"], step=0) == pytest.approx((1.0 + 0.0 + 1 / 3) / 3)
    assert sim.ground_truth_relevance("b", 0).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    logistic = hand_world("logistic").relevance(np.array([0]))[0]
    assert logistic == pytest.approx(1 / (1 + np.exp(-np.array([2.0, 1.0, 0.5, -1.0, -2.0]))))
    world = Preferences.planted(n_users=20, n_items=50, seed=0, rule="top_fraction", top_fraction=0.1)
    assert (world.relevance(np.arange(20)).sum(axis=1) == 5).all()


@pytest.mark.data
def test_movielens_world_uses_the_files_ids_and_rating_threshold(shared_data: Path) -> None:
    sim = Simulation.from_movielens(shared_data / "ml-100k", seed=0, n_factors=8)
    world = sim.preferences
    assert len(world.user_ids) == 943 and len(world.item_ids) == 1682 and "196" in world.user_ids
    relevant = world.relevance(np.arange(943))
    predicted = world.scores(np.arange(943))
    assert np.array_equal(relevant, (predicted >= 4.0).astype(float))
    assert 0.03 < relevant.mean() < 0.4
    raw = np.loadtxt(shared_data / "ml-100k" / "u.data", dtype=np.int64)[:5000]
    rows = {u: j for j, u in enumerate(world.user_ids)}
    fitted = predicted[[rows[str(u)] for u in raw[:, 0]], world.item_rows([str(i) for i in raw[:, 1]])]
    assert np.sqrt(np.mean((fitted - raw[:, 2]) ** 2)) < 0.9  # the fit follows the ratings
