"""Window features per user and per item of the event stream, the anomaly detector's input.

Bots, click floods and broken clients show in how often and how widely an entity acts, so the
features are cheap decayed counts and distinct counts kept per entity as validated events
arrive (DESIGN.md "Events"), in event time. Counts decay with time constant ``window_s``;
distinct counts cover the last ``window_s`` seconds:

* user: ``event_rate`` (events per minute), ``ctr`` (clicks per impression), ``distinct_items``
  (items clicked or rated), ``inter_arrival_s`` (moving average of the gaps between events);
* item: ``click_rate`` (clicks per minute), ``click_spike`` (click rate over the last
  ``window_s / 10`` seconds relative to the rate over ``window_s``), ``ctr`` (clicks per
  impression showing the item), ``distinct_users`` (users who clicked it).
"""
from __future__ import annotations

import math
from typing import Any

USER_FEATURES = ("event_rate", "ctr", "distinct_items", "inter_arrival_s")
ITEM_FEATURES = ("click_rate", "click_spike", "ctr", "distinct_users")
SPIKE_FRACTION = 0.1  # the spike window is this fraction of the feature window
INTER_ARRIVAL_WEIGHT = 0.2  # weight of the newest gap in the inter-arrival moving average
KINDS = ("user", "item")  # the kinds of entity with windows, each scored by its own forest


class UserWindow:
    """One user's decayed counts, the items it clicked or rated (id -> last event time), the
    moving average of its inter-arrival gaps, and when it was last scored (event time)."""

    __slots__ = ("first_ts", "last_ts", "n_events", "events", "impressions", "clicks", "items",
                 "gap", "scored_ts")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.last_ts = ts
        self.n_events = 0
        self.events = 0.0
        self.impressions = 0.0
        self.clicks = 0.0
        self.items: dict[str, float] = {}
        self.gap = math.nan
        self.scored_ts = -math.inf


class ItemWindow:
    """One item's decayed click counts (slow and spike windows) and impressions, the users who
    clicked it (id -> last event time), and when it was last scored (event time)."""

    __slots__ = ("first_ts", "last_ts", "n_clicks", "clicks", "clicks_fast", "impressions",
                 "users", "scored_ts")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.last_ts = ts
        self.n_clicks = 0
        self.clicks = 0.0
        self.clicks_fast = 0.0
        self.impressions = 0.0
        self.users: dict[str, float] = {}
        self.scored_ts = -math.inf


def _rate(count: float, age: float, time_constant: float) -> float:
    """Events per second from a count decaying with ``time_constant``, kept for ``age`` seconds.

    At a steady rate r the count tends to r * tau * (1 - exp(-age / tau)); dividing by that
    factor instead of tau removes the start-up bias, so a new entity's rate is right at once.
    """
    return count / (time_constant * -math.expm1(-max(age, 1.0) / time_constant))


def _distinct(last_seen: dict[str, float], since: float) -> int:
    """Drop the ids last seen before ``since`` and count the rest."""
    for key in [key for key, ts in last_seen.items() if ts < since]:
        del last_seen[key]
    return len(last_seen)


class EntityWindows:
    """Window features per user and per item, updated in O(1) per event (O(slate) per impression).

    Counters decay as c <- c * exp(-dt / window_s) + 1, so c / window_s estimates the recent
    rate (corrected for the entity's age, see ``_rate``). Events are taken in arrival order; one
    that is older than its entity's latest event counts at that latest time (clocks never run
    backwards).

    Parameters
    ----------
    window_s
        Time constant of the decaying counts and length of the distinct-count window (seconds).
    """

    def __init__(self, window_s: float = 600.0) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        self.window_s = float(window_s)
        self.users: dict[str, UserWindow] = {}
        self.items: dict[str, ItemWindow] = {}

    def observe(self, event: dict[str, Any]) -> None:
        """Update the windows of the event's user and items."""
        kind = event["type"]
        ts = float(event["ts"])
        user = self._user(event["user_id"], ts)
        user.n_events += 1
        user.events += 1.0
        if kind == "impression":
            user.impressions += 1.0
            for shown in event["items"]:
                self._item(shown["item_id"], ts).impressions += 1.0
        elif kind in ("click", "rating"):
            user.items[event["item_id"]] = user.last_ts
            if kind == "click":
                user.clicks += 1.0
                item = self._item(event["item_id"], ts)
                item.n_clicks += 1
                item.clicks += 1.0
                item.clicks_fast += 1.0
                item.users[event["user_id"]] = item.last_ts
        else:
            raise ValueError(f"unknown event type {kind!r}")

    def user_features(self, user_id: str) -> dict[str, float]:
        """The user's features at its latest event."""
        user = self.users[user_id]
        return {
            "event_rate": 60.0 * _rate(user.events, user.last_ts - user.first_ts, self.window_s),
            "ctr": user.clicks / max(user.impressions, 1.0),
            "distinct_items": float(_distinct(user.items, user.last_ts - self.window_s)),
            "inter_arrival_s": user.gap,
        }

    def item_features(self, item_id: str) -> dict[str, float]:
        """The item's features at its latest event."""
        item = self.items[item_id]
        age = item.last_ts - item.first_ts
        slow = _rate(item.clicks, age, self.window_s)
        fast = _rate(item.clicks_fast, age, SPIKE_FRACTION * self.window_s)
        return {
            "click_rate": 60.0 * slow,
            "click_spike": fast / slow if slow > 0 else 0.0,
            "ctr": item.clicks / max(item.impressions, 1.0),
            "distinct_users": float(_distinct(item.users, item.last_ts - self.window_s)),
        }

    def entities(self, kind: str) -> dict[str, UserWindow] | dict[str, ItemWindow]:
        """The windows of one kind of entity (``"user"`` or ``"item"``), by id."""
        return self.users if kind == "user" else self.items

    def features(self, kind: str, key: str) -> dict[str, float]:
        """The features of one user or item (``kind`` ``"user"`` or ``"item"``) at its latest event."""
        return self.user_features(key) if kind == "user" else self.item_features(key)

    def expire(self, now: float, idle_s: float) -> None:
        """Forget the entities without events since ``now - idle_s``."""
        for table in (self.users, self.items):
            for key in [key for key, state in table.items() if state.last_ts < now - idle_s]:
                del table[key]

    def _user(self, user_id: str, ts: float) -> UserWindow:
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = UserWindow(ts)
            return user
        dt = ts - user.last_ts
        if dt > 0:
            decay = math.exp(-dt / self.window_s)
            user.events *= decay
            user.impressions *= decay
            user.clicks *= decay
            user.last_ts = ts
        gap = max(dt, 0.0)
        user.gap = gap if math.isnan(user.gap) else user.gap + INTER_ARRIVAL_WEIGHT * (gap - user.gap)
        return user

    def _item(self, item_id: str, ts: float) -> ItemWindow:
        item = self.items.get(item_id)
        if item is None:
            item = self.items[item_id] = ItemWindow(ts)
            return item
        dt = ts - item.last_ts
        if dt > 0:
            decay = math.exp(-dt / self.window_s)
            item.clicks *= decay
            item.impressions *= decay
            item.clicks_fast *= math.exp(-dt / (SPIKE_FRACTION * self.window_s))
            item.last_ts = ts
        return item
