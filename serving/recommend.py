"""Answers "what should this user see now?" and "how would the model score these items?".

One request holds one model version from start to end (it reads ``LiveModel.current`` once), so
``model_version`` in a response always names the version that produced every score in it.

A user the model knows is ranked by the model's logits; an unknown user gets the popularity
fallback (``serving.popularity``), flagged with ``fallback: true``. Either way the policy runs on
the ranking scores and reports exact propensities (``serving.policies``), and every item's
``score`` is the model's prediction for this user: the predicted rating (clipped to the model's
rating range, while the ranking uses the unclipped logits: ``serving.model``), or the click
probability, per the replica's ``kind`` (an unknown user's prediction uses zero user terms).
``exclude_seen`` drops the items the user interacted with, as far as this replica has seen them
on ``examples``.

With A/B variants (``serving.variants``) the user's variant picks the model (the live one, or a
pinned store version), the policy (when the variant fixes one) or the popularity ranking, and
the response names it in ``variant``; the items' ``score`` stays the served model's prediction.

A known user of a version with an item index (``serving.index``) is scored on the candidates
the index retrieves, synchronously in the request (a few thousand rows: cheaper than queueing
it for a batch); without an index every item is scored through the ``BatchScorer``. How the
policies treat a candidate set, with exact propensities, is in ``serving.policies``.

A ``request_id`` is a random 64-bit prefix drawn once per replica followed by a 64-bit counter
(32 hex digits, like a UUID's): unique without a call into the OS's random source per request.
"""
from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from functools import partial

import numpy as np

from serving import policies
from serving.live import LiveModel
from serving.monitor import Monitor
from serving.model import KINDS, ServingModel
from serving.popularity import Popularity
from serving.scorer import BatchScorer, Choose
from serving.seen import SeenItems
from serving.variants import POPULARITY, Assignment


_NOTHING = np.zeros(0, np.int64)


class NotReady(RuntimeError):
    """No model version is loaded yet."""


class Recommender:
    """Slates and predictions from the live model.

    Parameters:
        live: the live model.
        scorer: the batch scorer the ranking runs on.
        seen: per-user seen items (``exclude_seen``).
        popularity: fallback scores for unknown users.
        monitor: receives the served scores (drift of the ``score`` signal), if given.
        kind: ``"rating"`` or ``"click"``: which model ranks and scores.
        candidates: the softmax policy's pool of best-scored items.
        epsilon: default exploration probability of ``epsilon_greedy``.
        temperature: default temperature of ``softmax``.
        seed: seed of the policies' random generator (None: from the OS).
        variants: the A/B assignment of users to variants (None: no A/B test).
        pinned: the model of each pinned store version the variants name, by version.
    """

    def __init__(self, live: LiveModel, scorer: BatchScorer, seen: SeenItems, popularity: Popularity,
                 monitor: Monitor | None = None, kind: str = "rating", candidates: int = 200,
                 epsilon: float = 0.1, temperature: float = 1.0, seed: int | None = None,
                 variants: Assignment | None = None, pinned: dict[str, ServingModel] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.live = live
        self.scorer = scorer
        self.seen = seen
        self.popularity = popularity
        self.monitor = monitor
        self.kind = kind
        self.candidates = candidates
        self.epsilon = epsilon
        self.temperature = temperature
        self._rng = np.random.default_rng(seed)
        self.variants = variants
        self.pinned = {} if pinned is None else pinned
        self._request_prefix = secrets.token_hex(8)
        self._request_counter = itertools.count()

    def _model(self) -> ServingModel:
        model = self.live.current
        if model is None:
            raise NotReady("no model is loaded yet")
        return model

    def _policy(self, policy: str, k: int, epsilon: float | None, temperature: float | None,
                catalogue: policies.Catalogue | None = None) -> Choose:
        if policy == "greedy":
            return partial(policies.greedy, k=k)
        if policy == "epsilon_greedy":
            return partial(policies.epsilon_greedy, k=k, epsilon=self.epsilon if epsilon is None else epsilon,
                           rng=self._rng, catalogue=catalogue)
        if policy == "softmax":
            return partial(policies.softmax, k=k, temperature=self.temperature if temperature is None else temperature,
                           rng=self._rng, candidates=self.candidates)
        raise ValueError(f"policy must be one of {policies.POLICIES}, got {policy!r}")

    async def recommend(self, user_id: str, k: int = 10, policy: str = "greedy", exclude_seen: bool = True,
                        epsilon: float | None = None, temperature: float | None = None) -> dict:
        """The response of ``GET /recommendations`` (see DESIGN.md, the loop)."""
        variant = None if self.variants is None else self.variants.assign(user_id)
        if variant is not None and variant.pinned:
            model = self.pinned[variant.source]
        else:
            model = self._model()  # the live version: also the popularity variant's catalogue and scores
        if variant is not None:
            policy = variant.policy or policy
        by_popularity = variant is not None and variant.source == POPULARITY
        choose = self._policy(policy, k, epsilon, temperature)  # ValueError for an unknown policy
        user_row = model.users.row(user_id)
        seen = self.seen.get(user_id) if exclude_seen else ()
        if seen:
            exclude = model.items.rows(seen)
            exclude = exclude[exclude >= 0]
        else:
            exclude = _NOTHING
        matrix = model.items.matrix()
        if user_row >= 0 and model.index is not None and not by_popularity:
            query, offset = model.query(user_row, self.kind)
            rows, logits = model.index.search(query, exclude, need=k)
            logits += np.float32(offset)
            if policy == "epsilon_greedy":
                catalogue = policies.Catalogue(rows, len(model.items), exclude)
                slate = self._policy(policy, k, epsilon, temperature, catalogue)(logits)
                chosen = slate.indices  # catalogue rows: a uniform draw may fall outside the candidates
                chosen_logits = matrix[chosen] @ query + np.float32(offset)
            else:
                slate = choose(logits)
                chosen, chosen_logits = rows[slate.indices], logits[slate.indices]
            slate = policies.Slate(chosen, slate.propensities)
            scores = model.output(self.kind, chosen_logits)
        elif user_row >= 0 and not by_popularity:
            query, offset = model.query(user_row, self.kind)
            slate, logits = await self.scorer.rank(matrix, query, offset, exclude, choose)
            scores = model.output(self.kind, logits)
        else:
            base = self.popularity.scores(model, self.kind)
            slate, _ = await self.scorer.rank(matrix, None, 0.0, exclude, choose, base=base)
            scores = model.predict_rows(np.full(len(slate.indices), user_row, np.int64), slate.indices, self.kind)
        if self.monitor is not None and len(scores):
            self.monitor.observe_served(scores)
        id_of = model.items.id_of
        response = {
            "request_id": f"{self._request_prefix}{next(self._request_counter):016x}",
            "model_version": model.version,
            "user_id": user_id,
            "policy": policy,
            "fallback": user_row < 0 and not by_popularity,
            "items": [
                {"item_id": id_of(i), "position": position, "score": s, "propensity": p}
                for position, (i, s, p) in enumerate(zip(slate.indices.tolist(), np.asarray(scores, np.float64).tolist(),
                                                         np.asarray(slate.propensities, np.float64).tolist()), start=1)
            ],
        }
        if variant is not None:
            response["variant"] = variant.name
        return response

    def predict(self, user_id: str, item_ids: Sequence[str], kind: str | None = None) -> dict:
        """The response of ``POST /predict``: the model's scores of ``item_ids`` for ``user_id``."""
        model = self._model()
        kind = self.kind if kind is None else kind
        rows = model.items.rows(item_ids)
        user_row = model.users.row(user_id)
        scores = model.predict_rows(np.full(len(rows), user_row, np.int64), rows, kind)
        return {
            "model_version": model.version,
            "user_id": user_id,
            "kind": kind,
            "known_user": user_row >= 0,
            "items": [{"item_id": item_id, "score": float(s), "known": bool(r >= 0)}
                      for item_id, s, r in zip(item_ids, scores, rows)],
        }
