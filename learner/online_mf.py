r"""Online matrix factorisation: ratings and clicks on shared user and item embeddings, in torch.

The learner consumes micro-batches and scores every example before training on it (prequential
evaluation); :meth:`OnlineMF.learn_batch` returns those scores. The parameters live in torch
tables (CUDA when present) that grow in chunks as new ids arrive; ids are strings mapped to rows
by :class:`learner.ids.IdMap`, and a new item row is initialised from the model's own seeded
generator, so a run is reproducible and a saved model resumes exactly.

Why the optimiser looks the way it does: event streams are bursty per user (in MovieLens a
256-event window holds about 8 users) and users drift, while items are seen by many users and
change slowly. So a user takes implicit (proximal) steps in stream order, even inside a batch,
whose size shrinks with the user's example count down to a floor; items take one bounded step
per batch. This module holds the model (state, scoring, the public API); the training steps are
:mod:`learner.mf_steps` and the saved files :mod:`learner.mf_files`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from learner.ids import IdMap
from learner.mf_files import read_model, write_model
from learner.mf_steps import (
    KERNEL_TABLES, clip_ratings, click_step, rating_step_compiled, rating_step_torch, user_vectors,
)
from learner.position_bias import PositionBiasEstimator, check_positions
from learner.updates import ModelRows
from stream.examples import EXAMPLE_KINDS as KINDS

_CHUNK_ROWS = 4096
_BIAS = {"rating": "bias", "click": "click_bias"}
_HYPERPARAMETERS = (
    "n_factors", "user_prior", "user_memory", "bias_decay", "implicit_lr", "implicit_window",
    "item_prior", "lr", "l2", "init_std", "rating_range", "ips_clip", "self_normalize", "seed",
)


class OnlineMF:
    r"""Biased matrix factorisation for ratings and a logistic click model, learned online.

    Both models share the user and item embeddings and have their own biases:

    $$\hat{r}_{ui} = \mu + \ell_u + b_u + b_i + \langle \mathbf{v}_u, \mathbf{q}_i \rangle
    \qquad
    \hat{c}_{ui} = \sigma\left(c + c_u + c_i + \langle \mathbf{v}_u, \mathbf{q}_i \rangle\right)
    \qquad
    \mathbf{v}_u = \mathbf{p}_u + |N(u)|^{-1/2}\,\mathbf{s}_u$$

    $\mu$ is the mean of the rating labels seen before the example; $\ell_u$ is the user's rating
    level and $b_u$ a transient rating bias that fades with each of the user's ratings (runs of
    high or low ratings are common and short-lived); $b_i$ is the item's rating bias, $c$ the
    click intercept, $c_u$ and $c_i$ the click biases, $\sigma$ the logistic function. The user's
    embedding $\mathbf{v}_u$ adds to its own factors $\mathbf{p}_u$ the implicit part of SVD++:
    $N(u)$ are the user's earlier rating events and $\mathbf{s}_u \approx \sum_{j \in N(u)}
    \mathbf{y}_j$ sums implicit factors $\mathbf{y}_j$ of the items rated, so which items a user
    chose to rate informs its taste before the ratings have taught $\mathbf{p}_u$ much. $N(u)$
    holds the ratings learned before the example, never the one being scored, so
    :meth:`learn_batch` scores a pair as :meth:`predict` and serving would at that point; every
    rating event counts once in $N(u)$, whatever its weight and even when it repeats an item.
    Exported rows carry $\mathbf{v}_u$ as the user's vector and $\ell_u + b_u$ as its rating
    bias, so serving's score stays bias plus dot product. Unknown users and items score with zero
    biases and zero embeddings, the global prior, until trained on.

    Ratings train on the squared loss, clicks on the logistic loss, each example's loss scaled by
    its weight $w$. A user takes an implicit (proximal) step per example, in stream order even
    inside a batch, damped by its prior plus its capped example count; items take a Newton step
    on their biases and row-wise Adagrad on their embeddings, once per batch (the steps and their
    equations: :mod:`learner.mf_steps`).

    **Display-bias correction.** A shown item was chosen by the logging policy with probability
    $p$ (its logged propensity) and its position $k$ was examined with probability $\theta_k$
    (position-based click model, :attr:`position_bias`). A click example's logistic gradient
    becomes

    $$\frac{\partial \ell}{\partial s} = w \, \left(\sigma(s) - \frac{y}{\tilde\theta_k}\right),
    \qquad w = \frac{\text{weight}}{\max(p, \text{ips\_clip})},
    \quad \tilde\theta_k = \max(\theta_k, \text{ips\_clip})$$

    which in expectation over examination and logging is the logistic gradient on true relevance
    over all items: a click counts $1/(p\,\theta_k)$ times, so items shown rarely or low in the
    slate are not mistaken for irrelevant ones. With ``self_normalize`` the factors $1/p$ are
    rescaled to mean 1 within each batch (self-normalised IPS), which keeps steps steady when a
    few propensities are tiny.

    The click model follows the stream's order: a burst of slates whose positives all arrive
    before their negatives can collapse its item factors onto one direction (steady traffic does
    not). Measurements behind the defaults, and this case: docs/learner.md.

    Parameters
    ----------
    n_factors
        Embedding size.
    user_prior
        $\lambda_u$: prior strength of a user's state, in examples.
    user_memory
        $m$: cap on the example count in the user step; a user's state averages over roughly
        its last ``user_prior + user_memory`` examples. Short on purpose: users drift and rate in
        runs.
    bias_decay
        $\rho$ in [0, 1]: factor on the transient rating bias $b_u$ after each rating of the user
        (the level $\ell_u$ does not decay). 0.8 halves it about every three ratings: runs of high
        or low ratings are short.
    implicit_lr
        $\eta$: SGD rate of the implicit item factors $\mathbf{y}_j$; 0 leaves them at zero, which
        switches the implicit feedback off.
    implicit_window
        $L$: how many of a user's most recent rated items receive the implicit steps (the user
        keeps a ring of that many item rows). It bounds the cost of a rating; longer windows
        gained little.
    item_prior
        $\lambda_i$: prior strength of the item biases (and of the click intercept), in examples.
    lr
        Adagrad learning rate of the item embeddings. Smaller rates resist the burst case above
        but rank clicks worse.
    l2
        L2 shrinkage of the item embeddings an example touches. Small for the same reason as
        ``lr``.
    init_std
        Standard deviation of the normal initialisation of new item embeddings. New users start
        at zero, so a new user's first score is exactly the prior.
    rating_range
        ``(low, high)`` when ratings are known to be bounded: rating scores are clipped to the
        range (training uses the unclipped score), labels outside it are rejected, and $\mu$
        starts at the midpoint before the first rating.
    ips_clip
        Floor on the propensity and on the examination probability in the IPS correction, so
        neither factor exceeds 20 by default.
    self_normalize
        Rescale the propensity weights of a click batch to mean 1.
    device
        ``"auto"`` (CUDA when available) or any torch device string.
    seed
        Seed of the generator that initialises new item rows.

    Attributes
    ----------
    users, items
        :class:`learner.ids.IdMap` of the ids trained on, in first-seen order (their rows).
    position_bias
        :class:`learner.position_bias.PositionBiasEstimator`: the examination curve $\theta$,
        fitted on the clicks' positions.
    n_examples
        Examples trained on, per kind.
    rating_sum
        Sum of the rating labels trained on ($\mu$ is ``rating_sum / n_examples["rating"]``).
    click_curvature
        The click intercept's accumulated curvature.
    tables
        The parameters by name (torch tensors on ``device``); the user and item tables have spare
        rows past ``len(users)`` and ``len(items)``.
    device
        The torch device of ``tables``.

    Examples
    --------
    >>> m = OnlineMF(n_factors=8, rating_range=(1, 5), device="cpu")
    >>> users = ["ann", "ann", "bob", "bob", "cid"] * 40
    >>> items = ["dune", "up", "dune", "alien", "up"] * 40
    >>> ratings = [5.0, 1.0, 4.0, 5.0, 2.0] * 40
    >>> for start in range(0, 200, 10):
    ...     batch = slice(start, start + 10)
    ...     _ = m.learn_batch(users[batch], items[batch], ratings[batch])
    >>> m.predict(["ann", "ann", "cid"], ["dune", "up", "up"]).round(0).tolist()
    [5.0, 1.0, 2.0]

    A new user scores with the prior (global mean plus item bias), and ``learn_batch`` returns
    the score made before it trained on the example:

    >>> m.predict(["dan"], ["dune"]).round(2).tolist()
    [4.12]
    >>> m.learn_batch(["dan"], ["dune"], [5.0]).round(2).tolist()
    [4.12]

    References
    ----------
    1. Koren, Bell & Volinsky, *Matrix Factorization Techniques for Recommender Systems*, IEEE
       Computer 42(8), 2009 (biased matrix factorisation).
    2. Koren, *Factorization Meets the Neighborhood*, KDD 2008 (SVD++: the implicit part).
    3. Kulis & Bartlett, *Implicit Online Learning*, ICML 2010 (the implicit user steps).
    4. Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning and Stochastic
       Optimization*, JMLR 12, 2011 (Adagrad, the item embeddings).
    5. Joachims, Swaminathan & Schnabel, *Unbiased Learning-to-Rank with Biased Feedback*, WSDM
       2017 (inverse propensity weighting for position bias).
    6. Saito, Yaginuma, Nishino, Sakata & Nakata, *Unbiased Recommender Learning from
       Missing-Not-At-Random Implicit Feedback*, WSDM 2020 (the corrected logistic gradient).
    7. Swaminathan & Joachims, *The Self-Normalized Estimator for Counterfactual Learning*,
       NeurIPS 2015 (``self_normalize``).
    """

    def __init__(
        self,
        n_factors: int = 32,
        *,
        user_prior: float = 8.0,
        user_memory: float = 10.0,
        bias_decay: float = 0.8,
        implicit_lr: float = 0.02,
        implicit_window: int = 64,
        item_prior: float = 5.0,
        lr: float = 0.08,
        l2: float = 0.01,
        init_std: float = 0.05,
        rating_range: tuple[float, float] | None = None,
        ips_clip: float = 0.05,
        self_normalize: bool = True,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        _require(isinstance(n_factors, int) and n_factors > 0, "n_factors", n_factors, "a positive int")
        for name, value in (("user_prior", user_prior), ("item_prior", item_prior), ("lr", lr),
                            ("init_std", init_std)):
            _require(math.isfinite(value) and value > 0, name, value, "a positive finite number")
        for name, value in (("user_memory", user_memory), ("l2", l2)):
            _require(math.isfinite(value) and value >= 0, name, value, "a finite number >= 0")
        _require(0 < ips_clip <= 1, "ips_clip", ips_clip, "in (0, 1]")
        _require(math.isfinite(implicit_lr) and implicit_lr >= 0, "implicit_lr", implicit_lr,
                 "a finite number >= 0")
        _require(0 <= bias_decay <= 1, "bias_decay", bias_decay, "in [0, 1]")
        _require(isinstance(implicit_window, int) and implicit_window > 0, "implicit_window",
                 implicit_window, "a positive int")
        if rating_range is not None:
            low, high = (float(v) for v in rating_range)
            _require(math.isfinite(low) and math.isfinite(high) and low < high,
                     "rating_range", rating_range, "a finite (low, high) with low < high")
            rating_range = (low, high)
        self.n_factors = n_factors
        self.user_prior = float(user_prior)
        self.user_memory = float(user_memory)
        self.bias_decay = float(bias_decay)
        self.implicit_lr = float(implicit_lr)
        self.implicit_window = implicit_window
        self.item_prior = float(item_prior)
        self.lr = float(lr)
        self.l2 = float(l2)
        self.init_std = float(init_std)
        self.rating_range = rating_range
        self.ips_clip = float(ips_clip)
        self.self_normalize = bool(self_normalize)
        self.seed = int(seed)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.users = IdMap(name="user id")
        self.items = IdMap(name="item id")
        self.position_bias = PositionBiasEstimator()
        self.n_examples = {kind: 0 for kind in KINDS}
        self.rating_sum = 0.0
        self.click_curvature = 0.0
        self._rng = np.random.default_rng(self.seed)  # draws do not depend on how they are split
        self._items_initialised = 0
        self._compiled_cpu_step = True  # False runs the torch formulation on CPU too (tests)
        self._kernel_arrays: tuple[np.ndarray, ...] | None = None
        self.tables: dict[str, torch.Tensor] = {}
        for side in ("user", "item"):
            self.tables[f"{side}_factors"] = torch.zeros((0, n_factors), device=self.device)
            for kind in KINDS:
                self.tables[f"{side}_{_BIAS[kind]}"] = torch.zeros(0, device=self.device)
                self.tables[f"{side}_{kind}_curvature"] = torch.zeros(0, device=self.device)
        self.tables["item_factors_g2"] = torch.zeros(0, device=self.device)
        self.tables["user_level"] = torch.zeros(0, device=self.device)
        self.tables["user_implicit"] = torch.zeros((0, n_factors), device=self.device)
        self.tables["user_rated"] = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.tables["user_history"] = torch.zeros((0, implicit_window), dtype=torch.int32,
                                                  device=self.device)
        self.tables["item_implicit"] = torch.zeros((0, n_factors), device=self.device)
        self.tables["click_offset"] = torch.zeros(1, device=self.device)
        self._grow(0, 0)

    # ------------------------------------------------------------------ scoring

    @property
    def global_mean(self) -> float:
        """$\\mu$: mean rating label so far (the range midpoint, or 0, before any rating)."""
        if self.n_examples["rating"]:
            return self.rating_sum / self.n_examples["rating"]
        return sum(self.rating_range) / 2 if self.rating_range else 0.0

    @property
    def default_kind(self) -> str:
        """The kind trained on most so far (``"rating"`` on a tie): the scorers' default."""
        return "click" if self.n_examples["click"] > self.n_examples["rating"] else "rating"

    @property
    def click_intercept(self) -> float:
        """$c$: the click model's intercept."""
        return float(self.tables["click_offset"][0])

    def export_rows(
        self, users: Sequence[str] | None, items: Sequence[str] | None
    ) -> tuple[ModelRows, ModelRows]:
        """The rows serving needs (``learner.updates.ModelRows``) for these user and item ids, or
        for every known id where None is given; unknown ids raise ValueError."""
        return self._rows("user", self.users, users), self._rows("item", self.items, items)

    def _rows(self, side: str, id_map: IdMap, ids: Sequence[str] | None) -> ModelRows:
        if ids is None:
            ids = list(id_map.ids)
            rows = torch.arange(len(ids), device=self.device)
        else:
            found = id_map.lookup(ids)
            unknown = [ids[j] for j in np.flatnonzero(found < 0)[:3]]
            _require(not unknown, f"{side} ids", unknown, "known to the model")
            rows = torch.from_numpy(found).to(self.device)
        t = self.tables
        if side == "user":
            columns = (user_vectors(t, rows), self._user_bias(rows, "rating"), t["user_click_bias"][rows])
        else:
            columns = (t["item_factors"][rows], t["item_bias"][rows], t["item_click_bias"][rows])
        return ModelRows(list(ids), *(column.cpu().numpy() for column in columns))

    def _user_bias(self, rows: torch.Tensor, kind: str) -> torch.Tensor:
        """$b_u + \\ell_u$ for ratings (level plus the decaying part), $c_u$ for clicks."""
        t = self.tables
        if kind == "rating":
            return t["user_bias"][rows] + t["user_level"][rows]
        return t["user_click_bias"][rows]

    def predict(self, users: Sequence[str], items: Sequence[str], kind: str | None = None) -> np.ndarray:
        """Scores of (user, item) pairs: ratings, or click probabilities for ``kind="click"``.

        Never changes the model; unknown ids score with the prior. ``kind`` defaults to
        :attr:`default_kind`.
        """
        kind = self.default_kind if kind is None else kind
        _require(kind in KINDS, "kind", kind, f"one of {KINDS}")
        _require(len(users) == len(items), "items", f"length {len(items)}",
                 f"length {len(users)} (as users)")
        u = torch.from_numpy(self.users.lookup(users)).to(self.device)
        i = torch.from_numpy(self.items.lookup(items)).to(self.device)
        t, bias = self.tables, _BIAS[kind]
        with torch.no_grad():
            known_u, known_i = u >= 0, i >= 0
            u, i = u.clamp(min=0), i.clamp(min=0)
            dot = (user_vectors(t, u) * t["item_factors"][i]).sum(1)
            offset = self.global_mean if kind == "rating" else t["click_offset"]
            score = (
                offset
                + torch.where(known_u, self._user_bias(u, kind), 0.0)
                + torch.where(known_i, t[f"item_{bias}"][i], 0.0)
                + torch.where(known_u & known_i, dot, 0.0)
            )
            score = torch.sigmoid(score) if kind == "click" else clip_ratings(score, self.rating_range)
            return score.double().cpu().numpy()

    # ------------------------------------------------------------------ learning

    def learn_batch(
        self,
        users: Sequence[str],
        items: Sequence[str],
        labels: Sequence[float],
        kind: str = "rating",
        weights: Sequence[float] | None = None,
        positions: Sequence[int] | None = None,
        propensities: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Score a batch, then train on it; returns the scores, each made before its example
        trained the model (ratings clipped to ``rating_range``, or click probabilities).

        Parameters
        ----------
        users, items
            String ids; new ones get rows.
        labels
            Ratings (finite, inside ``rating_range`` when given) or clicks (0 or 1).
        kind
            ``"rating"`` or ``"click"``.
        weights
            Per-example loss weights (finite, >= 0), used as given, e.g. to down-weight doubtful
            examples. Not for inverse propensities: pass ``propensities`` for those.
        positions
            Clicks only: 1-based slate positions. The clicks are corrected by the examination
            estimate of :attr:`position_bias` from before this batch, which the batch then updates.
        propensities
            Clicks only: the logging policy's probability of having shown the item there, in
            (0, 1]; turned into clipped (and, with ``self_normalize``, self-normalised) inverse
            weights.
        """
        _require(kind in KINDS, "kind", kind, f"one of {KINDS}")
        n = len(users)
        if len(items) != n or len(labels) != n:
            raise ValueError(f"items and labels must have the length of users ({n}), "
                             f"got {len(items)} and {len(labels)}")
        y = _finite_array("labels", labels, n)
        if weights is None:
            w = np.ones(n)
        else:
            w = _finite_array("weights", weights, n)
            _check_all(w >= 0, "weights", w, ">= 0")
        target, pos = y, None
        if kind == "rating":
            if positions is not None or propensities is not None:
                raise ValueError("positions and propensities must be None for kind='rating' "
                                 "(they only apply to clicks)")
            if self.rating_range is not None:
                low, high = self.rating_range
                _check_all((y >= low) & (y <= high), "labels", y,
                           f"inside rating_range {self.rating_range}")
        else:
            _check_all((y == 0) | (y == 1), "labels", y, "0 or 1 for clicks")
            if propensities is not None:
                p = _finite_array("propensities", propensities, n)
                _check_all((p > 0) & (p <= 1), "propensities", p, "in (0, 1]")
                ips = 1.0 / np.maximum(p, self.ips_clip)
                w = w * (ips / ips.mean() if self.self_normalize and n else ips)
            if positions is not None:
                pos = np.asarray(positions)
                _require(pos.shape == (n,), "positions", f"shape {pos.shape}", f"shape ({n},)")
                check_positions(pos)
                target = y / np.maximum(self.position_bias.examination(pos), self.ips_clip)
        if n == 0:
            return np.zeros(0)

        n_users, n_items = len(self.users), len(self.items)
        u_rows = self.users.add(users)
        try:
            i_rows = self.items.add(items)
        except ValueError:
            self.users.truncate(n_users)
            raise
        if len(self.users) > n_users or len(self.items) > n_items:
            self._grow(len(self.users), len(self.items))
        if pos is not None:
            self.position_bias.update(pos, y, items)
        with torch.no_grad():
            if kind == "rating":
                before = self._rating_step(u_rows, i_rows, target, w)
            else:
                before = click_step(self, u_rows, i_rows, target, w)
        self.n_examples[kind] += n
        if kind == "rating":
            self.rating_sum += float(y.sum())
        return before

    def _rating_step(self, u_rows: np.ndarray, i_rows: np.ndarray, labels: np.ndarray,
                     weights: np.ndarray) -> np.ndarray:
        """The compiled rating step on CPU, the torch one elsewhere (same updates, same order)."""
        if self.device.type == "cpu" and self._compiled_cpu_step:
            if self._kernel_arrays is None:  # numpy views of the tables, until they are regrown
                self._kernel_arrays = tuple(self.tables[name].numpy() for name in KERNEL_TABLES)
            return rating_step_compiled(self, self._kernel_arrays, u_rows, i_rows, labels, weights)
        return rating_step_torch(self, u_rows, i_rows, labels, weights)

    def _grow(self, n_users: int, n_items: int) -> None:
        """Make room for ``n_users``/``n_items`` rows, in chunks, and initialise new item rows."""
        for side, needed in (("user", n_users), ("item", n_items)):
            capacity = self.tables[f"{side}_factors"].shape[0]
            if needed > capacity or capacity == 0:
                new_capacity = _round_up(max(needed, capacity + capacity // 2, 1), _CHUNK_ROWS)
                for name, table in list(self.tables.items()):
                    if name.startswith(side + "_"):
                        grown = torch.zeros((new_capacity, *table.shape[1:]), dtype=table.dtype,
                                            device=self.device)
                        grown[: table.shape[0]] = table
                        self.tables[name] = grown
                self._kernel_arrays = None
        if n_items > self._items_initialised:
            start = self._items_initialised
            fresh = self._rng.standard_normal((n_items - start, self.n_factors), dtype=np.float32)
            fresh *= self.init_std
            if self.device.type == "cpu":  # through a numpy view: much cheaper for a few rows
                self.tables["item_factors"].numpy()[start:n_items] = fresh
            else:
                self.tables["item_factors"][start:n_items] = torch.from_numpy(fresh).to(self.device)
            self._items_initialised = n_items

    # ------------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to the folder ``path`` (``learner.mf_files``: safetensors plus a JSON
        sidecar that carries the sha256 of the tensors)."""
        rows = {"user": len(self.users), "item": len(self.items)}
        tensors = {
            name: table[: rows[name.split("_", 1)[0]]] if name.split("_", 1)[0] in rows else table
            for name, table in self.tables.items()
        }
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        pbm_arrays, pbm_meta = self.position_bias.state()
        for name, array in pbm_arrays.items():
            tensors[f"position_bias.{name}"] = torch.from_numpy(np.ascontiguousarray(array))
        write_model(path, tensors, {
            "hyperparameters": {name: getattr(self, name) for name in _HYPERPARAMETERS},
            "n_examples": self.n_examples,
            "rating_sum": self.rating_sum,
            "click_curvature": self.click_curvature,
            "items_initialised": self._items_initialised,
            "rng_state": self._rng.bit_generator.state,
            "users": self.users.ids,
            "items": self.items.ids,
            "position_bias": pbm_meta,
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> OnlineMF:
        """Read a model written by :meth:`save`, after checking the tensors' sha256."""
        tensors, meta = read_model(path)
        hp = dict(meta["hyperparameters"])
        if hp["rating_range"] is not None:
            hp["rating_range"] = tuple(hp["rating_range"])
        model = cls(**hp, device=device)
        model.users = IdMap(meta["users"], name="user id")
        model.items = IdMap(meta["items"], name="item id")
        model.n_examples = dict(meta["n_examples"])
        model.rating_sum = meta["rating_sum"]
        model.click_curvature = meta["click_curvature"]
        model._items_initialised = meta["items_initialised"]
        model._rng.bit_generator.state = meta["rng_state"]
        pbm = {name.split(".", 1)[1]: tensors.pop(name).numpy()
               for name in list(tensors) if name.startswith("position_bias.")}
        model.position_bias = PositionBiasEstimator.from_state(pbm, meta["position_bias"])
        model.tables = {name: tensor.to(model.device) for name, tensor in tensors.items()}
        model._kernel_arrays = None
        model._grow(len(model.users), len(model.items))
        return model


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _check_all(ok: np.ndarray, field: str, values: np.ndarray, expected: str) -> None:
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{field} must be {expected}, got {values[first]!r} at index {first}")


def _finite_array(field: str, values: Sequence[float], n: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be numbers, got {values!r}") from exc
    if array.shape != (n,):
        raise ValueError(f"{field} must have shape ({n},), got {array.shape}")
    _check_all(np.isfinite(array), field, array, "finite")
    return array


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
