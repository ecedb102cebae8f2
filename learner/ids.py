"""Grow-only map from string ids to dense table rows.

The learner keeps one embedding row per user and per item. Rows are handed out in first-seen order
and never reused, so there are no hash collisions and a row number is stable for the life of a
model (serving deltas and checkpoints rely on that). Lookups are batched: one C-level pass over
the batch through a dict; ids seen for the first time are validated and inserted together.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat

import numpy as np

MAX_ID_LENGTH = 256  # DESIGN.md: ids are non-empty strings of at most 256 characters


class IdMap:
    """Strings to rows ``0..len(self)-1``, in the order the ids were first added.

    >>> m = IdMap()
    >>> m.add(["alice", "bob", "alice"]).tolist()
    [0, 1, 0]
    >>> m.lookup(["bob", "carol"]).tolist()
    [1, -1]
    """

    def __init__(self, ids: Iterable[str] = (), *, name: str = "id") -> None:
        self.name = name
        self._rows: dict[str, int] = {}
        self.ids: list[str] = []
        self.add(list(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids`` as int64, ``-1`` where an id is unknown; never adds."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()  # iterating a list is faster than iterating an object array
        return np.fromiter(map(self._rows.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))

    def add(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids``, giving new rows to ids not seen before (in first-seen order); all or
        nothing: when a new id is invalid, ValueError is raised and no id is added."""
        rows = self.lookup(ids)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            seq = ids.tolist() if isinstance(ids, np.ndarray) else ids
            unknown = [seq[j] for j in missing.tolist()]
            new = list(dict.fromkeys(unknown))  # first-seen order, each once
            self._check(new)
            start = len(self.ids)
            self._rows.update(zip(new, range(start, start + len(new))))
            self.ids.extend(new)
            rows[missing] = np.fromiter(map(self._rows.__getitem__, unknown), dtype=np.int64,
                                        count=len(unknown))
        return rows

    def truncate(self, n: int) -> None:
        """Forget the ids added after the first ``n`` (undoes a batch that failed validation)."""
        for key in self.ids[n:]:
            del self._rows[key]
        del self.ids[n:]

    def _check(self, keys: list) -> None:
        if set(map(type, keys)) <= {str}:  # the common case, checked in C-level passes
            lengths = list(map(len, keys))
            if min(lengths) >= 1 and max(lengths) <= MAX_ID_LENGTH:
                return
        for key in keys:
            if not (isinstance(key, str) and 0 < len(key) <= MAX_ID_LENGTH):
                shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
                raise ValueError(
                    f"{self.name} must be a non-empty str of at most {MAX_ID_LENGTH} characters, "
                    f"got {shown}"
                )
