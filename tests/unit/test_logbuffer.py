"""The worker's log buffer: flush by size or by age, offsets carried to the flush that writes them."""
from __future__ import annotations

import doctest

import pyarrow as pa
import pytest

from stream.examples import EXAMPLE_ROWS_SCHEMA, Example, ExampleItem, example_rows
from stream.log import buffer as logbuffer
from stream.log.buffer import LogBuffer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rows(n: int) -> pa.Table:
    return pa.table({"ts": [float(k) for k in range(n)]})


NONE = EXAMPLE_ROWS_SCHEMA.empty_table()


def labelled(*messages: Example) -> pa.Table:
    """The log rows of ``examples`` messages (one per labelled item), as a batch result holds them."""
    return example_rows(list(messages))


def message(n: int, *, items: int = 1) -> Example:
    """An ``examples`` message (``stream.examples.Example``) labelling ``items`` items."""
    return Example(kind="click", stage="closed", user_id="u", request_id=f"r{n}", model_version="m",
                   policy="greedy", variant=None, ts=float(n), anomalous=False, event_id=f"e{n}",
                   items=[ExampleItem(item_id=f"i{k}", position=k + 1, propensity=1.0, weight=1.0, label=0.0, score=None)
                          for k in range(items)])


def test_docstring_example_runs() -> None:
    assert doctest.testmod(logbuffer).failed == 0


def test_due_by_size_before_the_interval() -> None:
    buffer = LogBuffer(flush_rows=10, flush_interval_s=60.0, clock=Clock())
    buffer.add(NONE, rows(6), {"p0": 6})
    assert not buffer.due()
    buffer.add(labelled(message(0, items=1), message(1, items=2)), rows(0), {"p0": 8})
    assert not buffer.due() and len(buffer) == 9  # rows: 6 events + 3 labelled items, not 2 messages
    buffer.add(labelled(message(2, items=1)), rows(0), {"p0": 9})
    assert buffer.due() and len(buffer) == 10


def test_due_by_age_of_the_oldest_row() -> None:
    clock = Clock()
    buffer = LogBuffer(flush_rows=1000, flush_interval_s=5.0, clock=clock)
    assert not buffer.due()  # empty: never due, however long it waits
    clock.now = 100.0
    assert not buffer.due()
    buffer.add(NONE, rows(1), {"p0": 1})
    clock.now = 104.9
    buffer.add(NONE, rows(1), {"p0": 2})  # a later batch does not restart the clock
    assert not buffer.due()
    clock.now = 105.0
    assert buffer.due()


def test_take_returns_everything_in_order_and_empties() -> None:
    buffer = LogBuffer(flush_rows=1000, flush_interval_s=5.0, clock=Clock())
    first, second = labelled(message(1, items=3)), labelled(message(2, items=1))
    buffer.add(first, rows(2), {"p0": 3, "p1": 5})
    buffer.add(NONE, rows(0), {})  # a batch without rows adds no table
    buffer.add(second, rows(3), {"p0": 8})
    pending = buffer.take()
    assert pending.examples == [first, second]  # the batches' example rows as they came
    assert [t.num_rows for t in pending.events] == [2, 3]
    assert pending.offsets == {"p0": 8, "p1": 5}  # the newest offset of each partition
    assert pending.rows == 9  # 5 event rows + 4 labelled items
    assert len(buffer) == 0 and not buffer.due() and buffer.take().offsets == {}


def test_offsets_alone_make_a_flush_due() -> None:
    """A batch of only duplicates or dead letters has no rows, but its offsets still need a commit."""
    clock = Clock()
    buffer = LogBuffer(flush_rows=10, flush_interval_s=1.0, clock=clock)
    buffer.add(NONE, rows(0), {"p0": 4})
    clock.now = 1.0
    assert buffer.due() and buffer.take().offsets == {"p0": 4}


@pytest.mark.parametrize("flush_rows, interval", [(0, 1.0), (10, -1.0), (10, float("nan"))])
def test_bad_settings_are_refused(flush_rows: int, interval: float) -> None:
    with pytest.raises(ValueError, match="flush_rows"):
        LogBuffer(flush_rows, interval)
