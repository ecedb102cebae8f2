"""Which items each user interacted with, so that ``exclude_seen`` can leave them out.

Fed from the outcomes on ``examples`` (a rating, or a click with a positive label, is an
interaction; an item shown and not clicked is not). Memory is bounded twice: the most recently
active ``max_users`` users are kept (least recently active evicted first), and for each of them
their ``max_items`` most recent items.
"""
from __future__ import annotations

from collections import OrderedDict


class SeenItems:
    """Bounded per-user sets of interacted items.

    Parameters:
        max_users: users kept; the least recently active one goes first.
        max_items: items kept per user; the oldest interaction goes first.

    >>> seen = SeenItems(max_users=2, max_items=2)
    >>> for user, item in [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u3", "x")]:
    ...     seen.add(user, item)
    >>> seen.get("u1"), seen.get("u2"), seen.get("u3")
    ([], ['a'], ['x'])
    """

    def __init__(self, max_users: int = 100_000, max_items: int = 200) -> None:
        if max_users < 1 or max_items < 1:
            raise ValueError(f"max_users and max_items must be positive, got {max_users}, {max_items}")
        self.max_users = max_users
        self.max_items = max_items
        self._users: OrderedDict[str, dict[str, None]] = OrderedDict()

    def add(self, user_id: str, item_id: str) -> None:
        items = self._users.get(user_id)
        if items is None:
            items = self._users[user_id] = {}
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(user_id)
            items.pop(item_id, None)
        items[item_id] = None
        if len(items) > self.max_items:
            del items[next(iter(items))]

    def get(self, user_id: str) -> list[str]:
        """The user's kept items, oldest first (empty for a user never seen)."""
        return list(self._users.get(user_id, ()))
