"""Delayed feedback under the worker's ``immediate`` protocol: the fake-negative weighted loss, and
each shown item's final label.

Under ``immediate`` feedback every shown item reaches ``examples`` at once as a negative
(``shown``), and a click reaches it later as a positive (``clicked``) of an item already sent as a
negative. An item clicked with probability $p$ therefore appears as a negative once and as a
positive with probability $p$: the stream's labels follow the biased distribution
$b(y{=}1 \\mid x) = p/(1+p)$, $b(y{=}0 \\mid x) = 1/(1+p)$. Importance weights $p(y \\mid x) / b(y \\mid x)$
make the expected loss on the stream that of the true distribution (Ktena et al. 2019, the
fake-negative weighted loss):

$$w_{+} = 1 + \\hat p, \\qquad w_{-} = (1 - \\hat p)(1 + \\hat p),$$

with $\\hat p$ the model's current click probability of the item at its position, taken as a
constant (no gradient flows through it). ``fake_negative_weights`` computes them.

Quality figures need the final label instead: a shown item is scored once, after its slate's
attribution window has passed, labelled 1 if a click corrected it. ``FinalLabels`` holds the
shown items until then.

>>> fake_negative_weights(np.array([0.1, 0.1]), np.array([True, False])).round(3).tolist()
[1.1, 0.99]
>>> labels = FinalLabels(settle_s=60.0)
>>> labels.shown("r1", "a", 0.0, "a at 1"), labels.shown("r1", "b", 0.0, "b at 2")
(None, None)
>>> labels.clicked("r1", "b"), labels.clicked("r9", "x")   # a correction; not a held item
(True, False)
>>> labels.release(30.0), labels.release(61.0)
([], [('a at 1', 0.0), ('b at 2', 1.0)])

References: S. I. Ktena, A. Tejani, L. Theis, P. K. Myana, D. Dilipkumar, F. Huszár, S. Yoo,
W. Shi. "Addressing Delayed Feedback for Continuous Training with Neural Networks in CTR
prediction", RecSys 2019.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def fake_negative_weights(p_hat: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """The fake-negative importance weights (module docstring) of examples whose current click
    probability is ``p_hat`` and whose stream label is ``positive`` (a ``clicked`` correction) or
    not (a ``shown`` provisional negative)."""
    p = np.clip(np.asarray(p_hat, dtype=np.float64), 0.0, 1.0)
    return np.where(np.asarray(positive, dtype=bool), 1.0 + p, (1.0 - p) * (1.0 + p))


class FinalLabels(Generic[T]):
    """Shown items held until their slate's window has passed, then released once with their
    final label (1 if a click corrected them, else 0), in the order their slates were shown.

    Parameters:
        settle_s: event-time seconds after a slate's ``ts`` when its labels are final (at least
            the worker's attribution window).
        max_held: items held at most; past it the oldest slates are released early.
    """

    def __init__(self, settle_s: float, max_held: int = 200_000) -> None:
        if not settle_s > 0 or max_held < 1:
            raise ValueError("FinalLabels needs settle_s > 0 and max_held >= 1")
        self.settle_s, self.max_held = settle_s, max_held
        self._slates: OrderedDict[str, tuple[float, dict[str, list]]] = OrderedDict()
        self._count = 0
        self.watermark = float("-inf")

    def __len__(self) -> int:
        """Shown items waiting for their final label."""
        return self._count

    def shown(self, request_id: str, item_id: str, ts: float, payload: T) -> None:
        """Hold a shown item (label 0 until a click corrects it); ``ts``: its slate's event time."""
        if ts > self.watermark:
            self.watermark = ts
        slate = self._slates.get(request_id)
        if slate is None:
            slate = self._slates[request_id] = (ts, {})
        if item_id not in slate[1]:
            slate[1][item_id] = [payload, 0.0]
            self._count += 1

    def clicked(self, request_id: str, item_id: str) -> bool:
        """Correct a held item's label to 1; False when the item is not held (a click under the
        ``wait`` protocol, or one whose slate was released)."""
        slate = self._slates.get(request_id)
        held = None if slate is None else slate[1].get(item_id)
        if held is None:
            return False
        held[1] = 1.0
        return True

    def release(self, watermark: float | None = None) -> list[tuple[T, float]]:
        """Move event time to ``watermark`` and return (payload, final label) of every item whose
        slate is ``settle_s`` older than it, and of the oldest slates beyond ``max_held``."""
        if watermark is not None and watermark > self.watermark:
            self.watermark = watermark
        out: list[tuple[T, float]] = []
        cutoff = self.watermark - self.settle_s
        slates = self._slates
        while slates:
            request_id, (ts, items) = next(iter(slates.items()))
            if ts >= cutoff and self._count <= self.max_held:
                break
            del slates[request_id]
            self._count -= len(items)
            out += [(payload, label) for payload, label in items.values()]
        return out
