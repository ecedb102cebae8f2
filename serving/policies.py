r"""Exploration policies: which k items a user sees, in which order, and with what probability.

Every policy fills positions $j = 1..k$ one after the other and reports, for the item $i_j$ it put
at position $j$, its **propensity**: the probability with which the policy chose $i_j$ at
position $j$ *given the items it had placed at positions $1..j-1$* (the conditional probability
the sampler actually used). The product of the $k$ propensities is the probability of the whole
ranked slate, so an off-policy estimator can use either the per-position or the slate
probability. The client logs these numbers with the impression; they are exact, not estimates.

Input: ``scores``, one finite score (a logit, see ``serving.model``) per candidate item, and
``-inf`` for items the policy must not show (excluded as already seen). $R_j$ is the set of
eligible items not placed at positions $< j$.

* ``greedy``: the k best items, best first; propensity 1.
* ``epsilon_greedy``: at each position, with probability $1-\varepsilon$ the best item of $R_j$,
  otherwise an item drawn uniformly from $R_j$ (which may be the best one too), so
  $\pi_j(i) = (1-\varepsilon)\,[i = \arg\max_{R_j} s] + \varepsilon / |R_j|$. It explores the
  whole catalogue.
* ``softmax``: Plackett-Luce sampling over the ``candidates`` best-scored eligible items $C$
  (all of them when ``candidates`` is None):
  $\pi_j(i) = e^{s_i/\tau} / \sum_{l \in C \cap R_j} e^{s_l/\tau}$. Items outside $C$ have
  probability 0 under this policy.

Ties between equal scores are broken by a deterministic selection, so greedy's propensity 1 is
true as well.

**Candidates from an index.** A replica with an item index (``serving.index``) scores only the
candidates the index retrieves for the user, exactly, and the policies run on those scores:
greedy's slate is the best k *candidates*, softmax's pool $C$ is the ``candidates`` best of the
retrieved items, and epsilon-greedy's greedy choice is the best remaining *candidate*, while its
uniform draw still covers every eligible item of the catalogue (``Catalogue``). Retrieval is a
deterministic function of the model version and the user, so the policy as executed is exactly
the one these formulas describe, with "best" read as "best retrieved", and the propensities stay
exact: they are the probabilities the sampler used, not estimates.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

POLICIES = ("greedy", "epsilon_greedy", "softmax")
# From this many scores on, top-k first keeps only the scores above a threshold read off a
# sample, and a uniform draw rejects ineligible items instead of listing the eligible ones.
_LARGE = 8192
_SAMPLE_SIZE = 1024


class Slate(NamedTuple):
    """Chosen indices into ``scores``, best position first, and their propensities."""

    indices: np.ndarray
    propensities: np.ndarray


class Catalogue(NamedTuple):
    """The catalogue behind scores that cover only retrieved candidates.

    ``scores[i]`` is the score of catalogue row ``rows[i]``; the catalogue has ``n`` rows, of
    which ``excluded`` must not be shown.
    """

    rows: np.ndarray
    n: int
    excluded: np.ndarray


def top_indices(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` highest finite scores, highest first (fewer if fewer are finite).

    For a large array, the m-th highest of an evenly spaced sample is a threshold that at
    least m scores reach; only those are partitioned, which is exact and about 4x faster than
    ``argpartition`` over 100,000 scores.

    >>> top_indices(np.array([0.1, 3.0, -np.inf, 2.0]), 3).tolist()
    [1, 3, 0]
    """
    n = len(scores)
    m = min(m, n)
    if m <= 0:
        return np.zeros(0, np.int64)
    candidates = None
    if n >= _LARGE:
        sample = scores[:: n // _SAMPLE_SIZE]
        if len(sample) > m:
            threshold = np.partition(sample, len(sample) - m)[len(sample) - m]
            if threshold > -np.inf:
                candidates = np.flatnonzero(scores >= threshold)
    if candidates is None:
        candidates = np.flatnonzero(scores > -np.inf)
    if len(candidates) > m:
        sub = scores[candidates]
        candidates = candidates[np.argpartition(sub, len(sub) - m)[len(sub) - m:]]
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order].astype(np.int64, copy=False)


def greedy(scores: np.ndarray, k: int) -> Slate:
    """The ``k`` best eligible items, best first, each with propensity 1.

    >>> greedy(np.array([0.5, 2.0, 1.0]), 2)
    Slate(indices=array([1, 2]), propensities=array([1., 1.]))
    """
    chosen = top_indices(scores, k)
    return Slate(chosen, np.ones(len(chosen)))


def epsilon_greedy(scores: np.ndarray, k: int, epsilon: float, rng: np.random.Generator,
                   catalogue: Catalogue | None = None) -> Slate:
    r"""Per position: the best remaining item with probability $1-\varepsilon$, else a uniform one.

    Parameters:
        scores: one score per item, ``-inf`` for items not to show.
        k: slate length (shorter when fewer items are eligible).
        epsilon: exploration probability in [0, 1].
        rng: the random generator (the only source of randomness).
        catalogue: when ``scores`` cover only retrieved candidates, the catalogue behind them:
            the greedy choice is the best remaining candidate, the uniform draw covers every
            eligible catalogue row, and the slate's ``indices`` are catalogue rows.

    $\pi_j(i) = (1-\varepsilon)[i = \arg\max_{R_j} s] + \varepsilon/|R_j|$.

    >>> rng = np.random.default_rng(0)
    >>> slate = epsilon_greedy(np.array([3.0, 2.0, 1.0, 0.0]), 2, 0.2, rng)
    >>> slate.indices.tolist(), slate.propensities.round(3).tolist()
    ([0, 1], [0.85, 0.867])
    """
    if catalogue is not None:
        return _epsilon_greedy_catalogue(scores, k, epsilon, rng, catalogue)
    eligible = np.flatnonzero(scores > -np.inf) if len(scores) <= _LARGE else None
    n_eligible = len(eligible) if eligible is not None else int(np.count_nonzero(scores > -np.inf))
    k = min(k, n_eligible)
    # The best remaining item at position j is always among the j best: at most j-1 are placed.
    ranked = top_indices(scores, k)
    placed: set[int] = set()
    indices = np.empty(k, np.int64)
    propensities = np.empty(k)
    g = 0
    for j in range(k):
        while int(ranked[g]) in placed:
            g += 1
        best = int(ranked[g])
        remaining = n_eligible - j
        if rng.random() < epsilon:
            pick = _uniform_remaining(scores, eligible, placed, rng)
        else:
            pick = best
        indices[j] = pick
        propensities[j] = epsilon / remaining + ((1.0 - epsilon) if pick == best else 0.0)
        placed.add(pick)
    return Slate(indices, propensities)


def _epsilon_greedy_catalogue(scores: np.ndarray, k: int, epsilon: float, rng: np.random.Generator,
                              catalogue: Catalogue) -> Slate:
    """``epsilon_greedy`` over retrieved candidates, exploring the whole catalogue.

    Should every candidate be placed before the slate is full, the remaining positions are drawn
    uniformly (propensity ``1 / |R_j|``).
    """
    n = int(catalogue.n)
    excluded = {int(r) for r in np.unique(catalogue.excluded) if 0 <= r < n}
    n_eligible = n - len(excluded)
    k = min(k, n_eligible)
    ranked = catalogue.rows[top_indices(scores, k)]
    placed: set[int] = set()
    indices = np.empty(k, np.int64)
    propensities = np.empty(k)
    g = 0
    for j in range(k):
        while g < len(ranked) and int(ranked[g]) in placed:
            g += 1
        best = int(ranked[g]) if g < len(ranked) else None
        remaining = n_eligible - j
        if best is None:
            pick, propensity = _uniform_catalogue(n, excluded, placed, rng), 1.0 / remaining
        else:
            pick = _uniform_catalogue(n, excluded, placed, rng) if rng.random() < epsilon else best
            propensity = epsilon / remaining + ((1.0 - epsilon) if pick == best else 0.0)
        indices[j] = pick
        propensities[j] = propensity
        placed.add(pick)
    return Slate(indices, propensities)


def _uniform_catalogue(n: int, excluded: set[int], placed: set[int], rng: np.random.Generator) -> int:
    """One row of ``range(n)`` drawn uniformly among those neither excluded nor placed."""
    for _ in range(64):  # rejection: exact, and quick while most rows are eligible
        r = int(rng.integers(n))
        if r not in excluded and r not in placed:
            return r
    taken = np.fromiter(excluded | placed, np.int64)
    remaining = np.setdiff1d(np.arange(n), taken, assume_unique=True)
    return int(remaining[rng.integers(len(remaining))])


def _uniform_remaining(scores: np.ndarray, eligible: np.ndarray | None, placed: set[int],
                       rng: np.random.Generator) -> int:
    """One item drawn uniformly from the eligible items not yet placed."""
    if eligible is None:
        # Rejection from the whole array: exact, and quick while most items are eligible.
        n = len(scores)
        for _ in range(64):
            r = int(rng.integers(n))
            if scores[r] > -np.inf and r not in placed:
                return r
        eligible = np.flatnonzero(scores > -np.inf)
    remaining = eligible[~np.isin(eligible, np.fromiter(placed, np.int64, len(placed)))] if placed else eligible
    return int(remaining[rng.integers(len(remaining))])


def softmax(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator,
            candidates: int | None = None) -> Slate:
    r"""Plackett-Luce: position by position, draw from the softmax of the remaining candidates.

    Parameters:
        scores: one score (logit) per item, ``-inf`` for items not to show.
        k: slate length (shorter when fewer candidates are eligible).
        temperature: $\tau > 0$; small is nearly greedy, large nearly uniform.
        rng: the random generator.
        candidates: sample among this many best-scored eligible items (None: all eligible).

    $\pi_j(i) = e^{s_i/\tau} / \sum_{l \in C \cap R_j} e^{s_l/\tau}$.

    >>> rng = np.random.default_rng(0)
    >>> slate = softmax(np.array([1.0, 0.0, -np.inf]), 2, 1.0, rng)
    >>> slate.indices.tolist(), slate.propensities.round(3).tolist()
    ([0, 1], [0.731, 1.0])
    """
    if candidates is None:
        pool = np.flatnonzero(scores > -np.inf)
    else:
        pool = top_indices(scores, candidates)
    k = min(k, len(pool))
    logits = scores[pool].astype(np.float64) / temperature
    remaining = np.ones(len(pool), bool)
    indices = np.empty(k, np.int64)
    propensities = np.empty(k)
    for j in range(k):
        z = np.where(remaining, logits, -np.inf)
        weights = np.exp(z - z.max())
        cumulative = np.cumsum(weights)
        total = cumulative[-1]
        pick = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
        if pick == len(pool):  # rng.random() * total rounded up to total
            pick = int(np.flatnonzero(weights)[-1])
        indices[j] = pool[pick]
        propensities[j] = weights[pick] / total
        remaining[pick] = False
    return Slate(indices, propensities)
