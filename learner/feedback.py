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

from collections import OrderedDict, deque
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stream.examples import CLICK, CLICKED, EXAMPLE_ROWS_SCHEMA, SHOWN

T = TypeVar("T")


def fake_negative_weights(p_hat: np.ndarray, positive: np.ndarray, late_share: float = 1.0) -> np.ndarray:
    """The fake-negative importance weights (module docstring) of examples whose current click
    probability is ``p_hat`` and whose stream label is ``positive`` (a ``clicked`` correction) or
    not (a ``shown`` provisional negative). ``late_share``: the share of clicks that arrive after
    the waiting window (1 without one)."""
    p = np.clip(np.asarray(p_hat, dtype=np.float64), 0.0, 1.0)
    late = late_share * p
    return np.where(np.asarray(positive, dtype=bool), 1.0 + late,
                    (1.0 - p) * (1.0 + late) / np.maximum(1.0 - (p - late), 1e-6))


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

    def shown_at(self, request_id: str) -> float | None:
        """The event time of a held slate; None when it is not held."""
        slate = self._slates.get(request_id)
        return None if slate is None else slate[0]

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


class WaitingWindow(FinalLabels[dict]):
    """The learner's waiting window under ``immediate`` feedback: shown items held until a
    ``quantile`` of the recent click delays has passed since their slate (``max_s`` until
    ``MIN_DELAYS`` delays are known, and never longer), so that a click arriving meanwhile
    trains with its item, as its label, instead of correcting a negative already trained.

    The items released unclicked still train as provisional negatives, and the clicks after the
    window as corrections: ``late_share`` (the share of clicks after the window, from the same
    recent delays) turns the fake-negative weights into those of a waiting window (Yang et al.
    2021, ES-DFM); without a window it is 1, the weights of Ktena et al. 2019.

    >>> window = WaitingWindow(quantile=0.9, max_s=60.0)
    >>> window.shown("r1", "a", 0.0, {"item": "a"}), window.shown("r1", "b", 0.0, {"item": "b"})
    (None, None)
    >>> window.clicked("r1", "b"), window.click_delay(0.5, 0.0, True), window.release(59.0)
    (True, None, [])
    >>> window.settle_s, window.release(60.5)   # the window is still max_s: one delay is too few
    (60.0, [({'item': 'a'}, 0.0), ({'item': 'b'}, 1.0)])

    References: J. Yang, X. Li, S. Han, T. Zhuang, D. Zhan, X. Zeng, B. Tong. "Capturing Delayed
    Feedback in Conversion Rate Prediction via Elapsed-Time Sampling", AAAI 2021; S. Gu, X.-R.
    Sheng, Y. Fan, G. Zhou, X. Zhu. "Real Negatives Matter: Continuous Training with Real
    Negatives for Delayed Feedback Modeling", KDD 2021.
    """

    MIN_DELAYS = 20

    def __init__(self, quantile: float, max_s: float, recent: int = 2000) -> None:
        if not 0 < quantile <= 1:
            raise ValueError("WaitingWindow needs 0 < quantile <= 1")
        super().__init__(max_s)
        self.quantile, self.max_s = quantile, max_s
        self._delays: deque[float] = deque(maxlen=recent)
        self._in_window: deque[bool] = deque(maxlen=recent)
        self._new_delays = False  # delays recorded since settle_s was last computed

    def admit(self, rows: pa.Table, final_labels: FinalLabels) -> pa.Table:
        """The rows of a batch (``EXAMPLE_ROWS_SCHEMA``) to train now: its ``shown`` rows wait
        here; a ``clicked`` row of a waiting item sets its label to 1 and is not trained itself (a
        later one, of a slate in ``final_labels``, stays a correction); the rows whose window has
        passed by the batch's newest ``ts`` come first, in the order their slates were shown."""
        is_click = pc.fill_null(pc.equal(rows["kind"], CLICK), False)
        shown = pc.fill_null(pc.and_(is_click, pc.equal(rows["stage"], SHOWN)), False).to_numpy(zero_copy_only=False)
        clicked = pc.fill_null(pc.and_(is_click, pc.equal(rows["stage"], CLICKED)), False).to_numpy(zero_copy_only=False)
        keep = ~shown
        if shown.any():
            for row in rows.filter(pa.array(shown)).to_pylist():
                self.shown(row["request_id"], row["item_id"], row["ts"], row)
        if clicked.any():
            requests, items, ts = (rows[f].to_pylist() for f in ("request_id", "item_id", "ts"))
            for r in np.flatnonzero(clicked):
                in_window = self.clicked(requests[r], items[r])
                keep[r] = not in_window
                held = self if in_window else final_labels
                self.click_delay(ts[r], held.shown_at(requests[r]), in_window)
        released = self.expired(pc.max(rows["ts"]).as_py() if rows.num_rows else None)
        rows = rows if keep.all() else rows.filter(pa.array(keep))
        return pa.concat_tables([released, rows]) if released.num_rows else rows

    def expired(self, watermark: float | None) -> pa.Table:
        """Move event time to ``watermark`` and return the held rows whose window has passed, with
        their labels (``EXAMPLE_ROWS_SCHEMA``), in the order their slates were shown."""
        return _labelled_rows(self.release(watermark) if len(self) else [])

    def click_delay(self, click_ts: float, slate_ts: float | None, in_window: bool) -> None:
        """Record a click's delay after its slate (ignored when the slate is unknown), and
        whether it came within the window."""
        if slate_ts is None or not click_ts >= slate_ts:
            return
        self._delays.append(click_ts - slate_ts)
        self._in_window.append(in_window)
        self._new_delays = True

    def release(self, watermark: float | None = None) -> list[tuple[dict, float]]:
        """As ``FinalLabels.release``, once the window is the quantile of the recent delays
        (recomputed only when delays were recorded since)."""
        if self._new_delays and len(self._delays) >= self.MIN_DELAYS:
            self.settle_s = min(self.max_s, max(float(np.quantile(self._delays, self.quantile)), 1e-9))
            self._new_delays = False
        return super().release(watermark)

    def table(self) -> pa.Table:
        """The held rows with their labels (``EXAMPLE_ROWS_SCHEMA``), in the order their slates
        were shown: what a checkpoint keeps."""
        return _labelled_rows([(row, label) for _, items in self._slates.values() for row, label in items.values()])

    def state(self) -> dict:
        """The recent delays and whether each came within the window (JSON), for a checkpoint."""
        return {"delays": list(self._delays), "in_window": list(self._in_window)}

    def load_state(self, state: dict, rows: pa.Table | None) -> None:
        """Restore ``state`` and hold ``rows`` (``table``) again with their labels."""
        self._delays.extend(state.get("delays", []))
        self._in_window.extend(state.get("in_window", []))
        self._new_delays = True
        for row in ([] if rows is None else rows.to_pylist()):
            self.shown(row["request_id"], row["item_id"], row["ts"], {**row, "label": 0.0})
            if row["label"] > 0:
                self.clicked(row["request_id"], row["item_id"])

    def late_share(self) -> float:
        """The share of the recent clicks that came after the window (1 before any)."""
        if not self._in_window:
            return 1.0
        return 1.0 - sum(self._in_window) / len(self._in_window)


def _labelled_rows(held: list[tuple[dict, float]]) -> pa.Table:
    """Held rows with their labels set, as a table of ``EXAMPLE_ROWS_SCHEMA``."""
    return pa.Table.from_pylist([{**row, "label": label} for row, label in held], schema=EXAMPLE_ROWS_SCHEMA)
