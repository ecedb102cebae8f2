"""Off-policy estimators (``serving.ope.estimators``, ``serving.ope.candidates``): exact values on a
log small enough to compute by hand, unbiasedness over many seeded logs of a world whose truth is
known exactly, and the poor-support warning."""
from __future__ import annotations

import doctest
import importlib
import itertools

import numpy as np
import pytest

from bench.ope import plackett_luce_marginals
from serving.ope.candidates import ScoredCandidate, UniformCandidate
from serving.ope.estimators import Z95, SlateLog, Target, effective_sample_size, estimate


@pytest.mark.parametrize("name", ["estimators", "candidates", "evidence"])
def test_docstring_examples(name):
    assert doctest.testmod(importlib.import_module(f"serving.ope.{name}")).failed == 0


def hand_log() -> tuple[SlateLog, Target]:
    """Four slates of two positions; the weights pi / p are [2, 0], [0, 2], [1, 2], [4, 0]."""
    log = SlateLog(
        users=np.array(["u0", "u1", "u2", "u3"], dtype=object),
        items=np.array([["a", "b"], ["b", "c"], ["a", "c"], ["d", "a"]], dtype=object),
        shown=np.ones((4, 2), bool),
        clicks=np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float),
        propensity=np.array([[0.5, 0.25], [0.5, 0.5], [1.0, 0.5], [0.25, 1.0]]),
        slate_propensity=np.array([0.125, 0.25, 0.5, 0.25]),
    )
    target = Target(marginal=np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=float),
                    slate_probability=np.array([0.5, 0.5, 1.0, 0.0]),
                    expected=np.full((4, 2), 0.6), predicted=np.full((4, 2), 0.5))
    return log, target


def test_estimators_give_the_hand_computed_values():
    log, target = hand_log()
    e = estimate(log, target)
    # ips: position 1 (2*1 + 0 + 1*1 + 4*0) / 4, position 2 (0 + 2*1 + 2*1 + 0) / 4
    assert e["ips"].ctr_by_position == pytest.approx([0.75, 1.0])
    assert e["ips"].clicks_per_slate == pytest.approx(1.75)
    assert e["ips"].ctr == pytest.approx(0.875)
    # per-slate sums 2, 2, 3, 0 around 1.75: se = sqrt(4.75) / 4, halved for the CTR of 2 positions
    half = Z95 * np.sqrt(4.75) / 4 / 2
    assert e["ips"].ci == pytest.approx((0.875 - half, 0.875 + half))
    # snips: position 1 (2 + 1) / (2 + 1 + 4), position 2 (2 + 2) / (2 + 2)
    assert e["snips"].ctr_by_position == pytest.approx([3 / 7, 1.0])
    assert e["snips"].clicks_per_slate == pytest.approx(10 / 7)
    # dr: 0.6 + mean(w * (c - 0.5)) per position
    assert e["dr"].ctr_by_position == pytest.approx([0.6 - 0.125, 1.1])
    # slate_ips: slate weights 4, 2, 2, 0 times clicks per slate 1, 1, 2, 0
    assert e["slate_ips"].clicks_per_slate == pytest.approx(2.5)
    assert e["ips"].ess == pytest.approx(2.0)  # position 2: (2 + 2)^2 / (4 + 4); position 1: 49 / 21
    assert e["slate_ips"].ess == pytest.approx(64 / 24)
    assert e["ips"].max_weight == 4.0 and e["slate_ips"].max_weight == 4.0
    assert effective_sample_size(np.array([2.0, 0.0, 1.0, 4.0])) == pytest.approx(49 / 21)


def test_short_slates_average_each_position_over_the_slates_that_have_it():
    log, target = hand_log()
    shown = log.shown.copy()
    shown[3, 1] = False  # slate 3 showed one item
    short = SlateLog(log.users, log.items, shown, log.clicks, log.propensity, log.slate_propensity)
    e = estimate(short, target, ["ips"])["ips"]
    assert e.ctr_by_position == pytest.approx([0.75, 4 / 3])
    assert e.clicks_per_slate == pytest.approx(1.75)
    assert e.ctr == pytest.approx(1.75 / (7 / 4))


def test_invalid_inputs_name_the_problem():
    log, target = hand_log()
    with pytest.raises(ValueError, match="propensity"):
        SlateLog(log.users, log.items, log.shown, log.clicks, np.zeros((4, 2)), log.slate_propensity)
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate(log, target, ["nope"])
    with pytest.raises(ValueError, match="click model"):
        estimate(log, Target(target.marginal, target.slate_probability), ["dr"])


# -- a world whose truth is exact: 5 items, slates of 3, Plackett-Luce logging, position-based clicks --

WEIGHTS = np.array([3.0, 2.0, 1.0, 1.0, 0.5])
THETA = np.array([1.0, 0.6, 0.3])
ATTRACTION = np.array([0.2, 0.5, 0.1, 0.7, 0.3])
ITEMS = ["a", "b", "c", "d", "e"]


def slates_with_probabilities(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered slate of ``k`` distinct items and its Plackett-Luce probability."""
    slates = np.array(list(itertools.permutations(range(len(weights)), k)))
    probabilities = np.ones(len(slates))
    for j in range(k):
        before = weights[slates[:, :j]].sum(axis=1)
        probabilities *= weights[slates[:, j]] / (weights.sum() - before)
    return slates, probabilities


def simulated_log(n: int, rng: np.random.Generator) -> SlateLog:
    slates, probabilities = slates_with_probabilities(WEIGHTS, 3)
    marginal = np.zeros((len(ITEMS), 3))
    for j in range(3):
        np.add.at(marginal[:, j], slates[:, j], probabilities)
    drawn = slates[rng.choice(len(slates), n, p=probabilities)]
    clicks = (rng.random(drawn.shape) < THETA * ATTRACTION[drawn]).astype(float)
    return SlateLog(np.full(n, "u", dtype=object), np.array(ITEMS, dtype=object)[drawn], np.ones(drawn.shape, bool),
                    clicks, marginal[drawn, np.arange(3)], probabilities[
                        np.array([np.flatnonzero((slates == d).all(axis=1))[0] for d in drawn])])


def test_plackett_luce_marginals_match_the_enumeration():
    slates, probabilities = slates_with_probabilities(WEIGHTS, 3)
    exact = np.zeros((len(WEIGHTS), 3))
    for j in range(3):
        np.add.at(exact[:, j], slates[:, j], probabilities)
    assert plackett_luce_marginals(np.log(WEIGHTS), 3) == pytest.approx(exact, abs=1e-5)


@pytest.mark.parametrize("which", ["greedy", "uniform"])
def test_ips_is_unbiased_over_many_seeded_logs(which):
    """400 logs of 100 slates: the mean estimate lies within 4 standard errors of the exact truth."""
    rng = np.random.default_rng(2024)
    if which == "greedy":
        candidate = ScoredCandidate("oracle", ITEMS, lambda user: ATTRACTION)
        truth = float(THETA @ ATTRACTION[np.argsort(-ATTRACTION)[:3]])
    else:
        candidate = UniformCandidate(ITEMS)
        truth = float(THETA.sum() * ATTRACTION.mean())
    big = simulated_log(400 * 100, rng)
    target = candidate.target(big)
    estimates = {"ips": [], "slate_ips": []}
    for chunk in np.split(np.arange(big.n_slates), 400):
        part = big.take(chunk)
        part_target = Target(target.marginal[chunk], target.slate_probability[chunk])
        for name, e in estimate(part, part_target, list(estimates)).items():
            estimates[name].append(e.clicks_per_slate)
    for name, values in estimates.items():
        values = np.array(values)
        assert abs(values.mean() - truth) < 4 * values.std() / np.sqrt(len(values)), name


def test_softmax_candidate_position_probabilities_approach_the_exact_ones():
    scores = np.log(WEIGHTS)
    candidate = ScoredCandidate("pl", ITEMS, lambda user: scores, policy="softmax", temperature=1.0, samples=20000)
    slates, probabilities = slates_with_probabilities(WEIGHTS, 3)
    log = SlateLog(np.array(["u"], dtype=object), np.array([["a", "b", "c"]], dtype=object), np.ones((1, 3), bool),
                   np.zeros((1, 3)), np.full((1, 3), 0.5), np.array([0.5]))
    target = candidate.target(log)
    exact = {j: probabilities[slates[:, j] == j].sum() for j in range(3)}  # a at 1, b at 2, c at 3
    assert target.marginal[0] == pytest.approx([exact[0], exact[1], exact[2]], abs=0.01)
    assert target.slate_probability[0] == pytest.approx(probabilities[(slates == [0, 1, 2]).all(axis=1)][0])


def test_poor_support_triggers_the_warning():
    rng = np.random.default_rng(5)
    log = simulated_log(2000, rng)
    # A candidate showing mostly an item the logging policy never shows: half its slate is unsupported.
    catalogue = ITEMS + ["z"]
    unsupported = ScoredCandidate("new", catalogue, lambda user: np.array([0, 0, 0, 1.0, 0, 5.0]))
    e = estimate(log, unsupported.target(log), ["ips", "snips"])
    assert any("poor support at position 1" in w and "covers only about 0%" in w for w in e["ips"].warnings)
    assert any("poor support" in w for w in e["snips"].warnings)
    # The logging policy's own slates (uniform over the same items would be too) are well supported.
    supported = estimate(log, UniformCandidate(ITEMS).target(log), ["ips"])["ips"]
    assert supported.warnings == []
    tiny = estimate(log.take(np.arange(20)), UniformCandidate(ITEMS).target(log.take(np.arange(20))), ["ips"])
    assert any("effective sample size" in w for w in tiny["ips"].warnings)
