r"""One immutable version of the served model, and how a delta makes the next one.

Scores are ``OnlineMF``'s (``learner/PUBLISHING.md``):

$$\hat{r}_{ui} = \mu + b_u + b_i + \langle p_u, q_i \rangle \qquad
  \hat{c}_{ui} = \sigma(c + c_u + c_i + \langle p_u, q_i \rangle)$$

with zero vectors and biases for users and items the model does not know. ``kind`` selects the
model: ``"rating"`` (the score is the predicted rating, clipped to the model's ``rating_range``
when the learner has one, as ``OnlineMF`` clips it) or ``"click"`` (the click probability).
Ranking uses the *logit* of the kind: the unclipped rating, or $c + c_u + c_i + \langle p_u, q_i\rangle$
for clicks (a softmax policy wants logits, not probabilities). The clip and the sigmoid are
monotone, so this is the order of the scores, except that items whose ratings clip to the same
bound keep the model's order among them instead of tying (as in ``OnlineMF.recommend``): a
slate may show equal scores, in a deterministic order.

A ``ServingModel`` never changes after it is built. ``apply`` builds the next version off to the
side, sharing every row table chunk that the deltas do not write (``serving.table``); the live
version is then replaced with one reference assignment (``serving.live``), so a request always
scores against one complete version.

A version of a large catalogue also carries an ``ItemIndex`` (``serving.index``) over its item
matrix, built when a snapshot loads and carried through deltas (changed items become *fresh*,
scored by every query); ``index`` is None where every item is scored (the exact mode).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from learner.calibration import click_probability, sigmoid
from learner.updates import Calibration, Delta, ModelRows, Snapshot
from serving.index import IndexSettings, ItemIndex
from serving.table import USER_CHUNK_ROWS, RowTable
from stream.examples import EXAMPLE_KINDS as KINDS


def check_finite(rows: ModelRows, what: str) -> None:
    """Raise ValueError when ``rows`` hold a NaN or an infinity (a model that diverged)."""
    for name in ("vectors", "biases", "click_biases"):
        if not np.isfinite(getattr(rows, name)).all():
            raise ValueError(f"{what} {name} hold non-finite values")


@dataclass(frozen=True)
class ServingModel:
    """A complete model version: its identity, global terms and row tables.

    ``published_ts`` is when the learner produced this state (the snapshot's creation or the
    last delta's publish time): the model's age starts there. ``rating_range`` is the learner's
    ``(low, high)`` (None: unbounded), from the snapshot and then from each delta, like the
    global mean. ``click_calibration`` is the learner's ``(intercepts, slope)`` of the click
    probability at a position (``learner.calibration``; None: the plain sigmoid of the logit), from
    the snapshot and then from each delta; only ``click_probability_at`` uses it, ranking does not.

    >>> import numpy as np
    >>> from learner.updates import Delta, ModelRows
    >>> rows = lambda ids, v, b: ModelRows(ids, np.array(v, np.float32), np.array(b, np.float32), np.zeros(len(ids)))
    >>> users, items = rows(["u"], [[1.0]], [0.5]), rows(["a", "b"], [[1.0], [-1.0]], [0.0, 0.2])
    >>> m = ServingModel.empty("mf", n_factors=1).apply([Delta("mf", 1, "mf-1", 3.0, 0.0, users, items, 0.0, None)])
    >>> m.version, m.predict("u", ["a", "b", "new"], "rating").round(2).tolist()
    ('mf-1', [4.5, 2.7, 3.5])
    >>> m.apply([Delta("mf", 2, "mf-2", 3.0, 0.0, users, items, 0.0, None, (1.0, 4.0))]).predict("u", ["a"], "rating")
    array([4.])
    """

    model: str
    version: str
    seq: int
    global_mean: float
    click_intercept: float
    users: RowTable
    items: RowTable
    published_ts: float
    index: ItemIndex | None = None
    rating_range: tuple[float, float] | None = None
    click_calibration: Calibration | None = None

    @classmethod
    def empty(cls, model: str, n_factors: int) -> ServingModel:
        """The state before any delta (never served: it has no version yet)."""
        return cls(model, "", 0, 0.0, 0.0, RowTable.empty(n_factors, USER_CHUNK_ROWS),
                   RowTable.empty(n_factors, None), 0.0)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, index: IndexSettings | None = None) -> ServingModel:
        """The version a verified snapshot holds; ValueError when its values are not finite.

        With ``index`` settings that want one for this catalogue, the item index is built too
        (k-means: about a second at 100,000 items; call this off the event loop).
        """
        check_finite(snapshot.users, "snapshot users'")
        check_finite(snapshot.items, "snapshot items'")
        m = snapshot.manifest
        model = cls(
            model=m["model"], version=m["version"], seq=int(m["seq"]),
            global_mean=snapshot.global_mean, click_intercept=snapshot.click_intercept,
            users=RowTable.from_rows(snapshot.users, USER_CHUNK_ROWS),
            items=RowTable.from_rows(snapshot.items, None),
            published_ts=float(m.get("created_ts") or time.time()), rating_range=snapshot.rating_range,
            click_calibration=snapshot.click_calibration,
        )
        return model.with_index(index) if index is not None else model

    def with_index(self, settings: IndexSettings) -> ServingModel:
        """This version with an item index built from scratch when ``settings`` want one for its
        catalogue, else with none."""
        if not settings.wants_index(len(self.items)):
            return replace(self, index=None) if self.index is not None else self
        return replace(self, index=ItemIndex.build(self.items.matrix(), settings))

    @property
    def n_factors(self) -> int:
        return self.items.n_factors

    def apply(self, deltas: Sequence[Delta]) -> ServingModel:
        """The version after ``deltas`` (complete publishes in seq order), built off to the side.

        Several deltas merge into one build: each carries the full value of its rows, so the
        newest value of every row wins and each table is copied at most once.
        Raises ValueError for a delta of another model or with non-finite values.
        """
        if not deltas:
            return self
        for d in deltas:
            self.check(d)
        last = deltas[-1]
        changed = _merge([d.items for d in deltas])
        items = self.items.with_rows(changed)
        index = self.index
        if index is not None and items is not self.items:
            index = index.with_rows(items.rows(changed.ids), items.matrix())
        return replace(
            self, version=last.version, seq=last.seq, global_mean=last.global_mean,
            click_intercept=last.click_intercept, published_ts=last.published_ts, rating_range=last.rating_range,
            click_calibration=last.click_calibration,
            users=self.users.with_rows(_merge([d.users for d in deltas])),
            items=items, index=index,
        )

    def check(self, delta: Delta) -> None:
        """Raise ValueError, saying why, when ``delta`` cannot apply to this model."""
        if delta.model != self.model:
            raise ValueError(f"delta {delta.version} is of model {delta.model!r}, not {self.model!r}")
        for side, rows in (("users", delta.users), ("items", delta.items)):
            if len(rows) and rows.vectors.shape[1] != self.n_factors:
                raise ValueError(f"delta {delta.version} {side} have {rows.vectors.shape[1]} factors, "
                                 f"the model has {self.n_factors}")
            check_finite(rows, f"delta {delta.version} {side}'")

    # -- scoring -----------------------------------------------------------------------------

    def query(self, user_row: int, kind: str) -> tuple[np.ndarray, float]:
        """``(q, offset)`` such that ``items.matrix() @ q + offset`` is every item's logit."""
        k = self.n_factors
        u = self.users.vector(user_row)
        q = np.zeros(k + 2, np.float32)
        q[:k] = u[:k]
        if kind == "rating":
            q[k] = 1.0
            return q, self.global_mean + float(u[k])
        q[k + 1] = 1.0
        return q, self.click_intercept + float(u[k + 1])

    def output(self, kind: str, logits: np.ndarray) -> np.ndarray:
        """Scores from logits: ratings clipped to ``rating_range`` (when there is one), click
        probabilities through the sigmoid. Every score serving returns or evaluates passes here."""
        logits = np.asarray(logits, dtype=np.float64)
        if kind == "click":
            return sigmoid(logits)
        return np.clip(logits, *self.rating_range) if self.rating_range is not None else logits

    def _logits(self, user_rows: np.ndarray, item_rows: np.ndarray, kind: str) -> np.ndarray:
        """offset + user bias + item bias + dot product of (user row, item row) pairs, -1 meaning unknown."""
        k = self.n_factors
        u = self.users.get(user_rows)
        i = self.items.get(item_rows)
        dot = np.einsum("ij,ij->i", u[:, :k], i[:, :k], dtype=np.float64)
        col = k if kind == "rating" else k + 1
        offset = self.global_mean if kind == "rating" else self.click_intercept
        return offset + u[:, col] + i[:, col] + dot

    def predict_rows(self, user_rows: np.ndarray, item_rows: np.ndarray, kind: str) -> np.ndarray:
        """Scores of (user row, item row) pairs, -1 meaning unknown (float64)."""
        return self.output(kind, self._logits(user_rows, item_rows, kind))

    def click_probability_at(self, user_rows: np.ndarray, item_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """P(click) of (user row, item row) pairs shown at 1-based ``positions``, with this version's
        calibration (none: the sigmoid of the click logit, whatever the position)."""
        intercepts, slope = self.click_calibration or ((0.0,), 1.0)
        return click_probability(intercepts, slope, self._logits(user_rows, item_rows, "click"), positions)

    def predict(self, user_id: str, item_ids: Sequence[str], kind: str) -> np.ndarray:
        """Scores of one user for ``item_ids``."""
        user_rows = np.full(len(item_ids), self.users.row(user_id), np.int64)
        return self.predict_rows(user_rows, self.items.rows(item_ids), kind)


def _merge(parts: list[ModelRows]) -> ModelRows:
    parts = [p for p in parts if len(p)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return ModelRows([], np.zeros((0, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    return ModelRows([i for p in parts for i in p.ids], np.concatenate([p.vectors for p in parts]),
                     np.concatenate([p.biases for p in parts]), np.concatenate([p.click_biases for p in parts]))
