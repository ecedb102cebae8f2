"""Outcome keys and the learner's window of them: each outcome trained once (issue 19, item 7).

One key per outcome message (``stream.examples.outcome_key(kind, stage, event_id)``): a message
sent again is dropped whole, every item with it.

The end-to-end check, a worker SIGKILLed mid-stream on the real broker, is
tests/integration/test_learner_exactly_once.py.
"""
from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from learner.outcomes import OutcomeWindow
from learner.service import Learner
from learner.settings import LearnerSettings
from stream.events import Impression, Item, Rating
from stream.examples import (CLICKED, CLOSED, SHOWN, Example, click_example, count_rows, decode_examples,
                             example_batch, outcome_key, rating_example)

pytestmark = pytest.mark.hardening


def test_a_key_is_the_outcome_message_the_same_in_every_process():
    key = outcome_key("click", "closed", "e1")
    assert 0 <= key < 2**63
    other = subprocess.run([sys.executable, "-c", "from stream.examples import outcome_key; "
                            "print(outcome_key('click', 'closed', 'e1'))"], capture_output=True, text=True, check=True)
    assert int(other.stdout) == key  # unlike hash(), stable across restarts (PYTHONHASHSEED)
    # kind, stage and event each count, and no two triples that concatenate alike share a key
    distinct = {key, outcome_key("rating", "closed", "e1"), outcome_key("click", "shown", "e1"),
                outcome_key("click", "clicked", "e1"), outcome_key("click", "closed", "e2"),
                outcome_key("click", "close", "de1"), outcome_key("click", "closede1", ""),
                outcome_key("clickclosed", "", "e1"), outcome_key("click", "closed", "e1\x1f")}
    assert len(distinct) == 9


def test_the_window_counts_duplicates_inside_a_batch_and_across_batches():
    w = OutcomeWindow(retention_s=60, max_keys=100)
    assert w.fresh([1, 2, 1, 3], newest_ts=0.0) == [True, True, False, True]
    assert w.fresh([3, 4, 2], newest_ts=1.0) == [False, True, False]
    assert (len(w), w.duplicates, w.evicted) == (4, 3, 0)


def test_keys_expire_by_event_time_after_their_arrival():
    w = OutcomeWindow(retention_s=60, max_keys=100)
    w.fresh([1], newest_ts=1000.0)
    w.fresh([2], newest_ts=1050.0)
    assert w.fresh([1, 2], newest_ts=1059.0) == [False, False]
    w.fresh([], newest_ts=1070.0)                       # 1 arrived 70 s ago: forgotten; 2 kept
    assert len(w) == 1 and w.evicted == 0
    assert w.fresh([1, 2], newest_ts=1070.0) == [True, False]
    # Old data replayed behind live data is remembered by its arrival, not by its own old ts.
    w.fresh([5], newest_ts=0.0)
    assert w.fresh([5], newest_ts=1100.0) == [False]
    # A non-finite ts does not move the clock (it would forget everything).
    w.fresh([6], newest_ts=float("inf"))
    assert w.watermark == 1100.0 and w.fresh([5, 6]) == [False, False]


def test_the_window_is_bounded_and_forgets_the_oldest_first():
    w = OutcomeWindow(retention_s=1e9, max_keys=5)
    w.fresh([1, 2, 3], newest_ts=0.0)
    w.fresh([4, 5, 6, 7], newest_ts=1.0)                # two over: 1 and 2 go
    assert len(w) == 5 and w.evicted == 2
    assert w.fresh([3, 4, 5, 6, 7], newest_ts=2.0) == [False] * 5
    w.fresh(list(range(100, 120)), newest_ts=3.0)       # a batch larger than the bound keeps its newest
    assert len(w) == 5 and w.evicted == 2 + 5 + 15
    assert w.fresh([115, 116, 117, 118, 119], newest_ts=3.0) == [False] * 5
    assert w.fresh([1, 3], newest_ts=3.0) == [True, True]


def test_the_state_round_trips_and_a_smaller_bound_applies_on_load(tmp_path):
    w = OutcomeWindow(retention_s=100, max_keys=1000)
    for t in range(10):
        w.fresh([t * 10 + k for k in range(t + 1)], newest_ts=float(t))
    np.savez(tmp_path / "o.npz", **w.state())
    with np.load(tmp_path / "o.npz", allow_pickle=False) as arrays:
        state = dict(arrays)
    same = OutcomeWindow(retention_s=100, max_keys=1000)
    same.load_state(state)
    assert len(same) == len(w) == 55 and same.watermark == 9.0
    assert same.fresh(list(range(100)), newest_ts=9.0) == w.fresh(list(range(100)), newest_ts=9.0)
    small = OutcomeWindow(retention_s=100, max_keys=10)
    small.load_state(state)
    assert len(small) == 10 and small.fresh([90, 99, 0], newest_ts=9.0) == [False, False, True]
    with pytest.raises(ValueError, match="bucket sizes"):
        small.load_state({**state, "bucket_sizes": state["bucket_sizes"][:-1]})
    with pytest.raises(ValueError, match="retention_s"):
        OutcomeWindow(retention_s=0, max_keys=10)
    with pytest.raises(ValueError, match="max_keys"):
        OutcomeWindow(retention_s=10, max_keys=0)


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _duplicates() -> float:
    return _counter("streamrec_learner_duplicates_total")


def _learner(root) -> Learner:
    return Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=4, device="cpu",
                                   store_dir=root / "store", checkpoint_dir=root / "ckpt",
                                   outcome_window_s=3600, outcome_keys_max=10_000))


def _slate(n: int, t: float) -> Impression:
    return Impression(schema_version=1, event_id=f"imp-{n}", user_id=f"u{n % 7}", ts=t, request_id=f"r{n}",
                      model_version="m", policy="uniform",
                      items=[Item(f"i{k}", position=k + 1, propensity=0.2) for k in range(5)])


def _clicked(slate: Impression, n: int) -> Example:
    """The ``clicked`` message of a click on the slate's first item."""
    return click_example(slate, slate.items[:1], CLICKED, slate.ts + 1, f"clk-{n}", 50.0)


def _closed(slate: Impression) -> Example:
    """The ``closed`` message of the slate's other four items, when its window closed."""
    return click_example(slate, slate.items[1:], CLOSED, slate.ts, slate.event_id, 50.0)


def _outcomes(first: int, last: int) -> list[Example]:
    """Per slate three messages, six labelled items: a ``clicked`` of its first item, the ``closed``
    of the other four, and a rating."""
    out: list[Example] = []
    for n in range(first, last):
        slate = _slate(n, 1_750_000_000.0 + n)
        out += [_clicked(slate, n), _closed(slate),
                rating_example(Rating(schema_version=1, event_id=f"rat-{n}", user_id=f"u{n % 7}", ts=slate.ts,
                                      item_id=f"i{n % 5}", value=4.0))]
    return out


def test_the_learner_trains_each_outcome_once_and_remembers_across_a_restart(tmp_path):
    learner = _learner(tmp_path)
    before = _duplicates()
    first = _outcomes(0, 40)                              # 40 x 3 messages, 40 x 6 items
    assert learner.learn(example_batch(first[:75])) == count_rows(first[:75])
    assert learner.learn(example_batch(first[51:])) == count_rows(first[75:])  # 8 slates re-sent, skipped
    assert _duplicates() - before == count_rows(first[51:75]) == 8 * 6
    assert len(learner.outcomes) == len(first)           # one key per message, not per item
    # messages without an event_id (an Example always has one): as Kafka delivers them, the field reads as null
    unkeyed = decode_examples([orjson.dumps({k: v for k, v in msgspec.to_builtins(e).items() if k != "event_id"})
                               for e in first[:3]])
    assert unkeyed.malformed == 0 and unkeyed.rows["event_id"].null_count == unkeyed.rows.num_rows
    assert learner.learn(unkeyed) == count_rows(first[:3])  # no identity: trained, as before keys
    assert _duplicates() - before == 48

    learner.checkpoint()
    restarted = _learner(tmp_path)
    assert len(restarted.outcomes) == len(first)
    second = _outcomes(40, 50)
    resent = first[-30:] + second + second[:5]
    assert restarted.learn(example_batch(resent)) == count_rows(second)
    assert _duplicates() - before == 48 + count_rows(first[-30:]) + count_rows(second[:5])
    assert _counter("streamrec_learner_outcome_keys") == len(first) + len(second)


def test_a_resent_closed_message_is_dropped_whole(tmp_path):
    learner = _learner(tmp_path)
    slate = _slate(1, 1_750_000_000.0)
    assert learner.learn(example_batch([_clicked(slate, 1), _closed(slate)])) == 5
    trained, before = dict(learner.model.n_examples), _duplicates()
    assert learner.learn(example_batch([_closed(slate)])) == 0
    assert _duplicates() - before == 4                    # every item of the message, counted per item
    assert learner.model.n_examples == trained            # nothing of it reached the model


def test_the_clicked_and_the_closed_of_one_slate_are_both_trained(tmp_path):
    learner = _learner(tmp_path)
    before = _duplicates()
    slate, other = _slate(1, 1_750_000_000.0), _slate(2, 1_750_000_000.0)
    assert learner.learn(example_batch([_clicked(slate, 1)])) == 1
    assert learner.learn(example_batch([_closed(slate)])) == 4     # the slate's, later: not the click's
    assert learner.learn(example_batch([_closed(other), _clicked(other, 2)])) == 5  # in one batch, either order
    # the provisional ``shown`` of a slate and its ``closed`` share the impression's event: the stage tells them apart
    shown = click_example(other, other.items, SHOWN, other.ts, other.event_id, 50.0)
    assert learner.learn(example_batch([shown])) == 0 and len(learner.waiting) == 5  # kept: waits for its clicks
    assert _duplicates() == before
    assert len(learner.outcomes) == 5


def test_a_message_repeated_inside_one_batch_is_trained_once(tmp_path):
    learner = _learner(tmp_path)
    before = _duplicates()
    slate = _slate(1, 1_750_000_000.0)
    clicked, closed = _clicked(slate, 1), _closed(slate)
    # as Kafka delivers them: JSON, decoded in columns
    batch = decode_examples([msgspec.json.encode(m) for m in (closed, clicked, closed, clicked, closed)])
    assert batch.malformed == 0 and batch.rows.num_rows == 4 + 1 + 4 + 1 + 4
    assert learner.learn(batch) == 5
    assert _duplicates() - before == 4 + 1 + 4
    assert learner.model.n_examples["click"] == 5
