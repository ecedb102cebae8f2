"""Copy-on-write row tables: string ids mapped to float32 rows that model versions share.

A model version must never change under a request, yet applying a delta must not copy a table of
a million users to change ten of them. A ``RowTable`` keeps its rows in chunks of ``chunk_rows``
rows; ``with_rows`` returns a new table that shares every chunk it does not write and copies only
the chunks it does. With ``chunk_rows=None`` the table is one contiguous chunk (the item side: a
recommendation multiplies the whole item matrix, which wants one array), copied whole when a
delta touches it.

Each row is ``[vector (k) | rating bias | click bias]``, width ``k + 2``, so that one matrix
product with ``[user vector | 1 | 0]`` (or ``| 0 | 1``) yields the dot product plus the item's
bias of either model.

Ids map to rows through a dict and a list that only ever grow and that every version of one
lineage shares: rows never move, a version sees the rows below its own ``n`` and treats the rest
as unknown, so appending ids for a newer version cannot change what an older one answers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learner.updates import ModelRows

USER_CHUNK_ROWS = 4096


def pack(rows: ModelRows) -> np.ndarray:
    """``[vectors | biases | click_biases]`` as one float32 array of width k + 2."""
    return np.hstack([rows.vectors, rows.biases[:, None], rows.click_biases[:, None]]).astype(np.float32, copy=False)


class RowTable:
    """Rows of one side (users or items) of one model version; immutable once built.

    Parameters:
        n_factors: k, the length of the factor vectors.
        chunk_rows: rows per chunk, or None for a single contiguous chunk.

    >>> import numpy as np
    >>> from learner.updates import ModelRows
    >>> t = RowTable.empty(2, chunk_rows=2)
    >>> t1 = t.with_rows(ModelRows(["a", "b", "c"], np.ones((3, 2)), np.zeros(3), np.zeros(3)))
    >>> t2 = t1.with_rows(ModelRows(["c", "d"], np.full((2, 2), 2.0), np.ones(2), np.zeros(2)))
    >>> len(t1), len(t2), t1.row("d"), t2.row("d")
    (3, 4, -1, 3)
    >>> t1.get(np.array([2]))[0].tolist(), t2.get(np.array([2]))[0].tolist()
    ([1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 1.0, 0.0])
    >>> t1.chunks[0] is t2.chunks[0]  # rows a and b were not written: the chunk is shared
    True
    """

    __slots__ = ("n_factors", "chunk_rows", "n", "chunks", "_ids", "_index")

    def __init__(self, n_factors: int, chunk_rows: int | None, n: int, chunks: tuple[np.ndarray, ...],
                 ids: list[str], index: dict[str, int]) -> None:
        self.n_factors = n_factors
        self.chunk_rows = chunk_rows
        self.n = n
        self.chunks = chunks
        self._ids = ids
        self._index = index

    @classmethod
    def empty(cls, n_factors: int, chunk_rows: int | None) -> RowTable:
        return cls(n_factors, chunk_rows, 0, (), [], {})

    @classmethod
    def from_rows(cls, rows: ModelRows, chunk_rows: int | None) -> RowTable:
        """A table holding ``rows`` (the last of a repeated id wins)."""
        return cls.empty(rows.vectors.shape[1], chunk_rows).with_rows(rows)

    def __len__(self) -> int:
        return self.n

    @property
    def width(self) -> int:
        return self.n_factors + 2

    def row(self, item_id: str) -> int:
        """The row of ``item_id`` in this version, or -1."""
        r = self._index.get(item_id, -1)
        return r if r < self.n else -1

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids`` (int64), -1 for ids this version does not know."""
        get, n = self._index.get, self.n
        out = np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        out[out >= n] = -1
        return out

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def get(self, rows: np.ndarray) -> np.ndarray:
        """The packed rows [len(rows), k + 2]; zeros (the prior) where a row is -1."""
        out = np.zeros((len(rows), self.width), np.float32)
        known = rows >= 0
        if not known.any():
            return out
        if self.chunk_rows is None:
            out[known] = self.chunks[0][rows[known]]
            return out
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of[known]):
            sel = known & (chunk_of == c)
            out[sel] = self.chunks[c][rows[sel] - c * self.chunk_rows]
        return out

    def vector(self, row: int) -> np.ndarray:
        """One packed row (a view, never to be written); zeros for -1."""
        if row < 0:
            return np.zeros(self.width, np.float32)
        if self.chunk_rows is None:
            return self.chunks[0][row]
        return self.chunks[row // self.chunk_rows][row % self.chunk_rows]

    def matrix(self) -> np.ndarray:
        """All rows as one [n, k + 2] array; only for single-chunk tables (it is a view)."""
        if self.chunk_rows is not None:
            raise ValueError("matrix() needs a single-chunk table (chunk_rows=None)")
        return self.chunks[0] if self.chunks else np.zeros((0, self.width), np.float32)

    def with_rows(self, rows: ModelRows) -> RowTable:
        """A new version with ``rows`` written (new ids appended, the last of a repeated id wins)."""
        if len(rows) == 0:
            return self
        if rows.vectors.shape[1] != self.n_factors:
            raise ValueError(f"rows have {rows.vectors.shape[1]} factors, the table has {self.n_factors}")
        ids, index = self._ids, self._index
        if len(ids) != self.n:
            # Built from a version that is not the newest of its lineage: take a private copy of
            # the id map so that the newer versions' rows stay untouched.
            ids = ids[:self.n]
            index = {item_id: i for i, item_id in enumerate(ids)}
        last = {item_id: j for j, item_id in enumerate(rows.ids)}
        source = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        values = pack(rows)[source]
        target = np.empty(len(last), np.int64)
        new_ids: list[str] = []
        for j, item_id in enumerate(last):
            r = index.get(item_id)
            if r is None:
                r = self.n + len(new_ids)
                new_ids.append(item_id)
            target[j] = r
        n_new = self.n + len(new_ids)
        if self.chunk_rows is None:
            merged = np.empty((n_new, self.width), np.float32)
            if self.n:
                merged[:self.n] = self.chunks[0][:self.n]
            merged[target] = values
            chunks: tuple[np.ndarray, ...] = (merged,)
        else:
            cr = self.chunk_rows
            grown = list(self.chunks) + [None] * (-(-n_new // cr) - len(self.chunks))
            chunk_of = target // cr
            for c in np.unique(chunk_of):
                old = grown[c]
                chunk = np.zeros((cr, self.width), np.float32) if old is None else old.copy()
                sel = chunk_of == c
                chunk[target[sel] - c * cr] = values[sel]
                grown[c] = chunk
            chunks = tuple(grown)
        # Commit the new ids last: nothing above can leave the shared map half-extended.
        for r, item_id in enumerate(new_ids, start=self.n):
            index[item_id] = r
        ids.extend(new_ids)
        return RowTable(self.n_factors, self.chunk_rows, n_new, chunks, ids, index)
