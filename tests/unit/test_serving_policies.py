"""The exploration policies report the probabilities they actually sample with.

For each position j the reported propensity must be the conditional probability of the chosen
item given the items at positions < j. Checked three ways over many seeded draws: the reported
number equals the policy's formula computed here independently; the empirical conditional
frequency of each item after each prefix matches it; and the empirical marginal frequency of
each (item, position) matches the exact marginal obtained by enumerating every ranking.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from serving import policies
from serving.policies import epsilon_greedy, greedy, softmax, top_indices

SCORES = np.array([2.0, 1.5, 1.4, 0.3, -np.inf, -0.5, 0.9])  # item 4 is excluded (seen)
ELIGIBLE = [i for i, s in enumerate(SCORES) if s > -np.inf]
K = 3
DRAWS = 12_000


def softmax_conditional(pool: list[int], temperature: float):
    @functools.cache
    def p(item: int, prefix: tuple[int, ...]) -> float:
        remaining = [i for i in pool if i not in prefix]
        if item not in remaining:
            return 0.0
        weights = {i: math.exp(SCORES[i] / temperature) for i in remaining}
        return weights[item] / sum(weights.values())
    return p


def epsilon_conditional(epsilon: float):
    @functools.cache
    def p(item: int, prefix: tuple[int, ...]) -> float:
        remaining = [i for i in ELIGIBLE if i not in prefix]
        if item not in remaining:
            return 0.0
        best = max(remaining, key=lambda i: SCORES[i])
        return (1 - epsilon) * (item == best) + epsilon / len(remaining)
    return p


def draw(policy, seed: int = 7) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DRAWS):
        slate = policy(SCORES, rng)
        out.append((tuple(int(i) for i in slate.indices), tuple(float(p) for p in slate.propensities)))
    return out


def check_propensities(draws, conditional, pool: list[int]) -> None:
    # 1. Every reported propensity is the formula's value for that prefix.
    for ranking, props in draws:
        assert len(set(ranking)) == len(ranking) == K
        assert set(ranking) <= set(pool)
        for j, (item, prop) in enumerate(zip(ranking, props)):
            assert math.isclose(prop, conditional(item, ranking[:j]), rel_tol=1e-9), (ranking, j, prop)
            assert 0 < prop <= 1
    # 2. Conditional frequencies after each frequent prefix match the reported propensities.
    after: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for ranking, _ in draws:
        for j in range(K):
            after[ranking[:j]][ranking[j]] += 1
    checked = 0
    for prefix, counts in after.items():
        n = sum(counts.values())
        if n < 300:
            continue
        for item in pool:
            p = conditional(item, prefix)
            tolerance = 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
            assert counts[item] / n == pytest.approx(p, abs=tolerance), (prefix, item, counts[item], n, p)
            checked += 1
    assert checked >= 3 * len(pool)
    # 3. Marginal frequency of each item at each position = the exact marginal over all rankings.
    exact = defaultdict(float)
    for ranking in itertools.permutations(pool, K):
        prob = math.prod(conditional(item, ranking[:j]) for j, item in enumerate(ranking))
        for j, item in enumerate(ranking):
            exact[item, j] += prob
    seen = Counter((item, j) for ranking, _ in draws for j, item in enumerate(ranking))
    for item in pool:
        for j in range(K):
            p = exact[item, j]
            tolerance = 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / DRAWS)
            assert seen[item, j] / DRAWS == pytest.approx(p, abs=tolerance), (item, j)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_softmax_propensities_are_the_plackett_luce_probabilities(temperature):
    draws = draw(lambda s, rng: softmax(s, K, temperature, rng))
    check_propensities(draws, softmax_conditional(ELIGIBLE, temperature), ELIGIBLE)


def test_softmax_samples_only_among_its_candidate_pool():
    pool = [0, 1, 2, 6]  # the 4 best-scored eligible items
    draws = draw(lambda s, rng: softmax(s, K, 1.0, rng, candidates=4))
    check_propensities(draws, softmax_conditional(pool, 1.0), pool)


@pytest.mark.parametrize("epsilon", [0.2, 0.7])
def test_epsilon_greedy_propensities(epsilon):
    draws = draw(lambda s, rng: epsilon_greedy(s, K, epsilon, rng))
    check_propensities(draws, epsilon_conditional(epsilon), ELIGIBLE)


def test_greedy_is_the_top_k_with_propensity_one():
    slate = greedy(SCORES, K)
    assert slate.indices.tolist() == [0, 1, 2]
    assert slate.propensities.tolist() == [1.0, 1.0, 1.0]


def test_epsilon_greedy_on_a_large_catalogue_explores_uniformly_over_the_eligible_items():
    """Above the size where uniform draws reject ineligible items instead of listing them."""
    n = 20_000
    rng = np.random.default_rng(3)
    scores = rng.normal(size=n).astype(np.float32)
    scores[:5000] = -np.inf
    eligible = n - 5000
    explored = []
    for _ in range(3000):
        slate = epsilon_greedy(scores, 2, 1.0, rng)
        assert (slate.indices >= 5000).all()
        assert slate.propensities[0] == pytest.approx(1 / eligible, rel=1e-6) or slate.propensities[0] > 1 / eligible
        assert slate.propensities[1] == pytest.approx(1 / (eligible - 1), rel=1e-6) or \
            slate.propensities[1] > 1 / (eligible - 1)
        explored.extend(slate.indices.tolist())
    quartiles = np.bincount((np.array(explored) - 5000) * 4 // eligible, minlength=4)
    expected = len(explored) / 4
    assert ((quartiles - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 dof, p = 0.001


def test_policies_return_short_slates_when_few_items_are_eligible():
    scores = np.array([-np.inf, 1.0, -np.inf])
    rng = np.random.default_rng(0)
    for slate in (greedy(scores, 5), epsilon_greedy(scores, 5, 0.5, rng), softmax(scores, 5, 1.0, rng)):
        assert slate.indices.tolist() == [1]
        assert slate.propensities.tolist() == [1.0]
    empty = np.zeros(0, np.float32)
    for slate in (greedy(empty, 5), epsilon_greedy(empty, 5, 0.5, rng), softmax(empty, 5, 1.0, rng)):
        assert len(slate.indices) == 0


@pytest.mark.parametrize("n", [5, 1000, 8192, 100_000])
def test_top_indices_is_exact(n):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n).astype(np.float32)
    scores[rng.choice(n, n // 3, replace=False)] = -np.inf
    for m in (1, 10, 100):
        expected = np.argsort(-scores, kind="stable")[:m]
        expected = expected[scores[expected] > -np.inf]
        assert top_indices(scores, m).tolist() == expected.tolist()


def test_top_indices_with_every_score_tied_or_excluded():
    scores = np.full(50_000, -np.inf, np.float32)
    scores[[7, 70, 700]] = 1.0
    assert sorted(top_indices(scores, 10).tolist()) == [7, 70, 700]
    tied = np.zeros(50_000, np.float32)
    assert len(set(top_indices(tied, 10).tolist())) == 10


def test_policy_names_match_the_event_contract():
    from stream.events import POLICIES

    assert set(policies.POLICIES) <= set(POLICIES)
