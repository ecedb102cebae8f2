r"""Candidate policies, and their probabilities on logged slates (an ``estimators.Target``).

A candidate is what serving would run: scores over a catalogue and a policy of
``serving.policies`` (greedy, epsilon-greedy, softmax with its parameters), or a built-in baseline.

* ``ScoredCandidate``: per user a score per catalogue item (``model_candidate``: a ``ServingModel``'s
  click or rating logits, every item scored exactly; ``popularity_candidate``: the same scores for
  everyone, from click counts) and a serving policy. The probability of the logged item at its
  position, $\pi(a, k \mid x)$, is exact for greedy (0 or 1); for the stochastic policies it is
  the share of ``samples`` slates drawn with the policy's own sampler that put $a$ at $k$ (unbiased,
  so the IPS estimates stay unbiased). The probability of the whole logged slate is exact: the
  product, position by position, of the probability the policy gives the logged item given the
  logged items above it (the formulas of ``serving.policies``).
* ``UniformCandidate``: a uniform random slate of the catalogue: $\pi(a, k) = 1/N$, the slate's
  probability $\prod_{j < L} 1/(N - j)$.

With a click model (``ModelClickModel``: a ``ServingModel``'s calibrated probability of a click at
a position, ``ServingModel.click_probability_at``), the target also holds what ``dr`` needs: the
clicks the model expects of the candidate's own choice at each position (averaged over the sampled
slates; for ``UniformCandidate`` over at most ``max_items`` sampled items) and its prediction for the
logged item.

>>> import numpy as np
>>> from serving.ope.estimators import SlateLog
>>> log = SlateLog(np.array(["u"], dtype=object), np.array([["b", "a"]], dtype=object), np.ones((1, 2), bool),
...                np.array([[1.0, 0.0]]), np.full((1, 2), 0.5), np.array([0.5]))
>>> greedy = ScoredCandidate("pop", ["a", "b", "c"], lambda user: np.array([1.0, 2.0, 0.0]))
>>> t = greedy.target(log)
>>> t.marginal.tolist(), t.slate_probability.tolist()
([[1.0, 1.0]], [1.0])
>>> UniformCandidate(["a", "b", "c"]).target(log).slate_probability.round(4).tolist()
[0.1667]
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.model import ServingModel
from serving.ope.estimators import SlateLog, Target
from serving.policies import POLICIES, epsilon_greedy, greedy, softmax, top_indices

ClickModel = Callable[[str, Sequence[str], np.ndarray], np.ndarray]


class ModelClickModel:
    """P(click) of items shown to a user at positions, by a ``ServingModel``'s calibrated click model."""

    def __init__(self, model: ServingModel) -> None:
        self.model = model

    def __call__(self, user_id: str, item_ids: Sequence[str], positions: np.ndarray) -> np.ndarray:
        m = self.model
        users = np.full(len(item_ids), m.users.row(user_id), np.int64)
        return m.click_probability_at(users, m.items.rows(list(item_ids)), np.asarray(positions))


@dataclass
class ScoredCandidate:
    """A serving policy over per-user scores of a catalogue (module docstring).

    Parameters:
        name: how reports call it.
        catalogue: the item ids the scores are of.
        scores: a user id -> one score (logit) per catalogue item.
        policy: one of ``serving.policies.POLICIES``.
        epsilon, temperature, candidates: the policy's parameters (``serving.policies``).
        samples: slates drawn per user to estimate a stochastic policy's position probabilities.
        click_model: for ``dr``; None leaves it out.
        seed: of the sampled slates.
    """

    name: str
    catalogue: Sequence[str]
    scores: Callable[[str], np.ndarray]
    policy: str = "greedy"
    epsilon: float = 0.1
    temperature: float = 1.0
    candidates: int | None = None
    samples: int = 200
    click_model: ClickModel | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.epsilon <= 1.0 or not self.temperature > 0 or self.samples < 1:
            raise ValueError("epsilon must lie in [0, 1], temperature be positive and samples at least 1")
        self._rows = {item: r for r, item in enumerate(self.catalogue)}

    def draw(self, scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Slates of ``k`` catalogue rows the policy shows for ``scores``: one for greedy, else ``samples``."""
        if self.policy == "greedy":
            return greedy(scores, k).indices[None, :]
        if self.policy == "epsilon_greedy":
            return np.stack([epsilon_greedy(scores, k, self.epsilon, rng).indices for _ in range(self.samples)])
        return np.stack([softmax(scores, k, self.temperature, rng, self.candidates).indices
                         for _ in range(self.samples)])

    def _ranked(self, k: int, n: int) -> int:
        """How many of the best items ``slate_probability`` needs in order, for slates of ``k``."""
        if self.policy != "softmax":
            return min(k + 1, n)  # the best remaining item after j < k placed is among the j + 1 best
        return n if self.candidates is None else min(max(self.candidates, k + 1), n)

    def slate_probability(self, scores: np.ndarray, rows: np.ndarray, order: np.ndarray | None = None) -> float:
        """The policy's probability of showing catalogue ``rows`` in this order (-1: not in the catalogue);
        ``order``: the ``_ranked`` best catalogue rows, best first, when already known."""
        if (rows < 0).any() or len(set(rows.tolist())) < len(rows):
            return 0.0
        order = top_indices(scores, self._ranked(len(rows), len(scores))) if order is None else order
        pool = set(order.tolist()) if self.candidates is None else set(order[:self.candidates].tolist())
        placed: set[int] = set()
        probability = 1.0
        for j, r in enumerate(rows.tolist()):
            best = next(int(b) for b in order if int(b) not in placed)
            if self.policy == "greedy":
                p = float(r == best)
            elif self.policy == "epsilon_greedy":
                p = self.epsilon / (len(scores) - j) + (1.0 - self.epsilon) * (r == best)
            else:
                remaining = np.array([i for i in pool if i not in placed])
                logits = scores[remaining] / self.temperature
                p = float(np.exp(scores[r] / self.temperature - np.logaddexp.reduce(logits))) if r in pool else 0.0
            probability *= p
            if probability == 0.0:
                return 0.0
            placed.add(r)
        return probability

    def target(self, log: SlateLog) -> Target:
        """This candidate's probabilities on ``log``'s slates."""
        n, k = log.items.shape
        rng = np.random.default_rng(self.seed)
        rows = np.vectorize(lambda item: self._rows.get(item, -1), otypes=[np.int64])(log.items) if log.items.size \
            else np.zeros((n, k), np.int64)
        marginal, slate = np.zeros((n, k)), np.zeros(n)
        expected = predicted = None
        if self.click_model is not None:
            expected, predicted = np.zeros((n, k)), np.zeros((n, k))
        catalogue = np.asarray(self.catalogue, dtype=object)
        for user, idx in _by_user(log.users):
            scores = np.asarray(self.scores(user), dtype=np.float64)
            drawn = self.draw(scores, k, rng)
            width = drawn.shape[1]
            logged = rows[idx][:, :width]
            marginal[idx, :width] = (drawn[None, :, :] == logged[:, None, :]).mean(axis=1)
            order = top_indices(scores, self._ranked(k, len(scores)))
            for i in idx:
                slate[i] = self.slate_probability(scores, rows[i][log.shown[i]], order)
            if self.click_model is not None:
                positions = np.tile(np.arange(1, width + 1), len(drawn))
                q = self.click_model(user, catalogue[drawn.ravel()], positions).reshape(drawn.shape)
                expected[idx, :width] = q.mean(axis=0)
                predicted[idx] = self.click_model(user, log.items[idx].ravel(),
                                                  np.tile(np.arange(1, k + 1), len(idx))).reshape(len(idx), k)
        return Target(marginal, slate, expected, predicted)


@dataclass
class UniformCandidate:
    """A slate drawn uniformly at random from ``catalogue`` (module docstring)."""

    catalogue: Sequence[str]
    click_model: ClickModel | None = None
    max_items: int = 1000
    seed: int = 0
    name: str = "uniform"

    def target(self, log: SlateLog) -> Target:
        n, k = log.items.shape
        size = len(self.catalogue)
        known = np.isin(log.items, np.asarray(self.catalogue, dtype=object))
        marginal = np.where(known, 1.0 / size, 0.0)
        slate = np.zeros(n)
        for i in range(n):
            length = int(log.shown[i].sum())
            if known[i][log.shown[i]].all() and length <= size:
                slate[i] = float(np.prod(1.0 / (size - np.arange(length))))
        expected = predicted = None
        if self.click_model is not None:
            rng = np.random.default_rng(self.seed)
            catalogue = np.asarray(self.catalogue, dtype=object)
            expected, predicted = np.zeros((n, k)), np.zeros((n, k))
            positions = np.arange(1, k + 1)
            for user, idx in _by_user(log.users):
                sample = catalogue if size <= self.max_items else rng.choice(catalogue, self.max_items, replace=False)
                q = self.click_model(user, np.repeat(sample, k), np.tile(positions, len(sample)))
                expected[idx] = q.reshape(len(sample), k).mean(axis=0)
                predicted[idx] = self.click_model(user, log.items[idx].ravel(),
                                                  np.tile(positions, len(idx))).reshape(len(idx), k)
        return Target(marginal, slate, expected, predicted)


def model_candidate(model: ServingModel, policy: str = "greedy", kind: str = "click", **params) -> ScoredCandidate:
    """A ``ServingModel`` ranking every item by its ``kind`` logit (as serving's exact retrieval does)
    with a serving ``policy``; its own calibrated click model is the direct method of ``dr``."""
    matrix = model.items.matrix()
    catalogue = [model.items.id_of(r) for r in range(len(model.items))]

    def scores(user: str) -> np.ndarray:
        q, offset = model.query(model.users.row(user), kind)
        return matrix @ q + offset

    params.setdefault("click_model", ModelClickModel(model))
    return ScoredCandidate(f"{model.version} {policy}", catalogue, scores, policy, **params)


def popularity_candidate(log: SlateLog, **params) -> ScoredCandidate:
    """The most clicked items of ``log`` first, the same slate for everyone (greedy unless told):
    the popularity fallback's ranking. Counting the evaluated log's own clicks flatters it a little."""
    shown = log.items[log.shown]
    catalogue = sorted(set(shown.tolist()))
    index = {item: r for r, item in enumerate(catalogue)}
    rows = np.array([index[i] for i in shown], dtype=np.int64)
    counts = np.bincount(rows, weights=log.clicks[log.shown], minlength=len(catalogue))
    scores = np.log1p(counts)
    return ScoredCandidate("popularity", catalogue, lambda user: scores, **params)


def _by_user(users: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(user id, the indices of that user's slates) for every user of a log."""
    names, inverse = np.unique(users.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return [(str(names[inverse[g[0]]]), g) for g in np.split(order, bounds) if len(g)]
