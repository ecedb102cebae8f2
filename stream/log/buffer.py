"""Rows the worker has accepted but not yet written to the log, and the Kafka offsets they cover.

Committing to the log once per consumer batch makes one data file per batch and table: under light
traffic a batch is a handful of events, and a day becomes tens of thousands of tiny files. The
buffer collects the rows of many batches and says when to flush them: when it holds
``flush_rows`` rows, or when its oldest row has waited ``flush_interval_s``. The worker commits
the offsets of the buffered batches only after the flush, so a crash replays them from Kafka and
nothing accepted is lost; the buffer is plain data, without I/O, so that this is testable alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa



@dataclass
class Pending:
    """What one flush writes and then commits."""

    examples: list[pa.Table] = field(default_factory=list)  # rows of the ``examples`` table
    events: list[pa.Table] = field(default_factory=list)
    offsets: dict = field(default_factory=dict)  # topic partition -> next offset to consume
    rows: int = 0


class LogBuffer:
    """Accumulates batches until a flush is due (by size or by age).

    >>> clock = iter([0.0, 1.0, 9.0]).__next__
    >>> buffer = LogBuffer(flush_rows=100, flush_interval_s=5.0, clock=clock)
    >>> buffer.add(pa.table({"label": [4.0]}), pa.table({"ts": [1.0, 2.0]}), {"p0": 7})   # clock: 0.0
    >>> buffer.due()                                                       # clock: 1.0
    False
    >>> buffer.due()                                                       # clock: 9.0
    True
    >>> pending = buffer.take()
    >>> pending.rows, pending.offsets, len(buffer)
    (3, {'p0': 7}, 0)
    """

    def __init__(self, flush_rows: int, flush_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if flush_rows < 1 or not flush_interval_s >= 0:
            raise ValueError(f"flush_rows must be >= 1 and flush_interval_s >= 0, got {flush_rows}, {flush_interval_s}")
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self._clock = clock
        self._pending = Pending()
        self._since: float | None = None

    def __len__(self) -> int:
        return self._pending.rows

    def add(self, examples: pa.Table, events: pa.Table, offsets: dict) -> None:
        """Buffer one batch's example rows and event rows; ``offsets`` are the batch's next offsets."""
        pending = self._pending
        if self._since is None and (examples.num_rows or events.num_rows or offsets):
            self._since = self._clock()
        if examples.num_rows:
            pending.examples.append(examples)
        if events.num_rows:
            pending.events.append(events)
        pending.offsets.update(offsets)
        pending.rows += examples.num_rows + events.num_rows

    def due(self) -> bool:
        """True when the buffer holds ``flush_rows`` rows or has waited ``flush_interval_s``."""
        if self._since is None:
            return False
        return self._pending.rows >= self.flush_rows or self._clock() - self._since >= self.flush_interval_s

    def take(self) -> Pending:
        """Everything buffered so far; the buffer starts empty again."""
        pending, self._pending, self._since = self._pending, Pending(), None
        return pending
