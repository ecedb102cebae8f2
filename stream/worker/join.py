"""Joins clicks to the impression slate they came from and turns both into labelled examples.

A slate (one impression event) stays open for ``window_s`` seconds of event time after it was
shown. A click with the slate's ``request_id`` on a shown item within the window makes a
``clicked`` example of that item at once; when the window closes, the shown items nobody clicked
make one ``closed`` example, all negatives. Position and propensity come from the impression, so
every item says where it was shown and with what probability: what the learner and the
evaluation need to correct for display bias. That is the ``wait`` feedback protocol; under
``immediate`` an impression makes a ``shown`` example of all its items at once (provisional
negatives), a click still makes its ``clicked`` example, and a closing window makes none.

The examples themselves are built by ``stream.examples``, the contract's one definition.

Event time drives the windows: the watermark is the newest event timestamp seen (the worker keeps
one joiner per source partition, so it is the partition's own), so replayed history joins exactly
as it did live. Clicks that cannot be joined are not examples:

- ``orphan_click``: no impression with that ``request_id`` is known;
- ``late_click``: the click came more than ``window_s`` after the impression, or after its
  window closed (its item was, or will be, a negative);
- ``item_not_shown``: the impression exists but did not show the clicked item;
- ``duplicate_click``: the item of that slate was already clicked.
"""
from __future__ import annotations

import heapq
from typing import Iterable

from stream.events import Click, Impression, Item
from stream.examples import CLICKED, CLOSED, FEEDBACK_PROTOCOLS, IMMEDIATE, SHOWN, WAIT, Example, click_example

MATCHED = "matched"
ORPHAN = "orphan_click"
LATE = "late_click"
NOT_SHOWN = "item_not_shown"
DUPLICATE = "duplicate_click"


class _Slate:
    """An open slate: its impression, and the items clicked so far."""

    __slots__ = ("impression", "clicked", "_items")

    def __init__(self, impression: Impression) -> None:
        self.impression = impression
        self.clicked: set[str] = set()
        self._items: dict[str, Item] | None = None

    @property
    def items(self) -> dict[str, Item]:
        """The shown items by id (built at the first click or close: most slates get neither)."""
        if self._items is None:
            self._items = {item.item_id: item for item in self.impression.items}
        return self._items


class ImpressionJoiner:
    """Open slates keyed by ``request_id``, closed by the event-time watermark.

    Parameters:
        window_s: the attribution window in seconds of event time (default 30 minutes).
        max_weight: clip of the inverse-propensity weight an example carries.
        feedback: ``"wait"`` or ``"immediate"`` (module docstring).

    >>> from stream.events import Click, Impression, Item
    >>> j = ImpressionJoiner(window_s=60)
    >>> imp = Impression(schema_version=1, event_id="e1", user_id="u", ts=0.0, request_id="r", model_version="m1",
    ...                  policy="greedy", items=[Item("a", position=1, propensity=1.0), Item("b", position=2, propensity=0.5)])
    >>> j.on_impression(imp) is None   # under ``wait`` feedback: nothing until a click or the close
    True
    >>> outcome, ex = j.on_click(Click(schema_version=1, event_id="e2", user_id="u", ts=5.0, request_id="r", item_id="b"))
    >>> (item,) = ex.items
    >>> outcome, ex.stage, item.label, item.position, item.weight
    ('matched', 'clicked', 1.0, 2, 2.0)
    >>> [(e.stage, [(i.item_id, i.label) for i in e.items]) for e in j.advance(61.0)]
    [('closed', [('a', 0.0)])]
    """

    def __init__(self, window_s: float = 1800.0, max_weight: float = 50.0, feedback: str = WAIT) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        if feedback not in FEEDBACK_PROTOCOLS:
            raise ValueError(f"feedback must be one of {FEEDBACK_PROTOCOLS}, got {feedback!r}")
        self.feedback = feedback
        self.window_s = window_s
        self.max_weight = max_weight
        self.watermark = float("-inf")
        self._open: dict[str, _Slate] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._closed: dict[str, float] = {}
        self._closed_order: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._open)

    def on_impression(self, impression: Impression) -> Example | None:
        """Open the slate of an impression (a repeated request_id keeps the first slate); under
        ``immediate`` feedback, return its ``shown`` example."""
        request_id = impression.request_id
        if request_id in self._open or request_id in self._closed:
            return None
        self._open[request_id] = _Slate(impression)
        heapq.heappush(self._deadlines, (impression.ts + self.window_s, request_id))
        if self.feedback == IMMEDIATE:
            return click_example(impression, impression.items, SHOWN, impression.ts, impression.event_id,
                                 self.max_weight)
        return None

    def on_click(self, click: Click) -> tuple[str, Example | None]:
        """Join a click: (outcome, its ``clicked`` example or None)."""
        request_id = click.request_id
        slate = self._open.get(request_id)
        if slate is None:
            return (LATE if request_id in self._closed else ORPHAN), None
        item_id = click.item_id
        item = slate.items.get(item_id)
        if item is None:
            return NOT_SHOWN, None
        if click.ts - slate.impression.ts > self.window_s:
            return LATE, None
        if item_id in slate.clicked:
            return DUPLICATE, None
        slate.clicked.add(item_id)
        return MATCHED, click_example(slate.impression, [item], CLICKED, click.ts, click.event_id, self.max_weight)

    def advance(self, watermark: float) -> list[Example]:
        """Move event time to ``watermark``; return the ``closed`` example of every slate whose
        window closed with items nobody clicked (none under ``immediate`` feedback)."""
        if watermark > self.watermark:
            self.watermark = watermark
        closed = []
        deadlines, wait = self._deadlines, self.feedback == WAIT
        while deadlines and deadlines[0][0] < self.watermark:
            close_at, request_id = heapq.heappop(deadlines)
            slate = self._open.pop(request_id)
            if wait:
                imp, clicked = slate.impression, slate.clicked
                unclicked = [item for item_id, item in slate.items.items() if item_id not in clicked]
                if unclicked:
                    closed.append(click_example(imp, unclicked, CLOSED, imp.ts, imp.event_id, self.max_weight))
            self._closed[request_id] = close_at
            heapq.heappush(self._closed_order, (close_at, request_id))
        self._forget_closed()
        return closed

    def restore(
        self,
        impressions: Iterable[Impression],
        clicked: Iterable[tuple[str, str]],
        watermark: float,
        closed: Iterable[tuple[str, float]] = (),
    ) -> None:
        """Rebuild the state after a restart: impressions still open at ``watermark``, the
        (request_id, item_id) pairs already clicked (their positives were emitted before), and the
        (request_id, close time) of recently closed slates, so their clicks count as late."""
        for request_id, close_at in closed:
            if request_id not in self._closed:
                self._closed[request_id] = close_at
                heapq.heappush(self._closed_order, (close_at, request_id))
        for impression in impressions:
            self.on_impression(impression)
        for request_id, item_id in clicked:
            slate = self._open.get(request_id)
            if slate is not None and item_id in slate.items:
                slate.clicked.add(item_id)
        self.watermark = max(self.watermark, watermark)

    def _forget_closed(self) -> None:
        # A closed slate is remembered for one more window so that its late clicks are told from orphans.
        horizon = self.watermark - self.window_s
        order = self._closed_order
        while order and order[0][0] < horizon:
            _, request_id = heapq.heappop(order)
            self._closed.pop(request_id, None)
