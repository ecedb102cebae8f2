"""Outcome keys and the learner's window of them: each outcome trained once (issue 19, item 7).

The end-to-end check, a worker SIGKILLed mid-stream on the real broker, is
tests/integration/test_learner_exactly_once.py.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import REGISTRY

from learner.outcomes import OutcomeWindow
from learner.service import Learner
from learner.settings import LearnerSettings
from stream.examples import NEGATIVE, POSITIVE, click_examples, outcome_key, rating_example

pytestmark = pytest.mark.hardening


def test_a_key_is_the_outcome_the_same_in_every_process():
    key = outcome_key("click", "e1", "a")
    assert 0 <= key < 2**63
    other = subprocess.run([sys.executable, "-c", "from stream.examples import outcome_key; "
                            "print(outcome_key('click', 'e1', 'a'))"], capture_output=True, text=True, check=True)
    assert int(other.stdout) == key  # unlike hash(), stable across restarts (PYTHONHASHSEED)
    distinct = {key, outcome_key("rating", "e1", "a"), outcome_key("click", "e2", "a"), outcome_key("click", "e1", "b"),
                outcome_key("click", "e1\x1fa", ""), outcome_key("click", "e1", "a\x1f")}
    assert len(distinct) == 6


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


def _learner(root) -> Learner:
    return Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=4, device="cpu",
                                   store_dir=root / "store", checkpoint_dir=root / "ckpt",
                                   outcome_window_s=3600, outcome_keys_max=10_000))


def _slate(n: int, t: float) -> dict:
    return {"event_id": f"imp-{n}", "user_id": f"u{n % 7}", "ts": t, "request_id": f"r{n}", "model_version": "m",
            "policy": "uniform", "items": [{"item_id": f"i{k}", "position": k + 1, "propensity": 0.2}
                                           for k in range(5)]}


def _outcomes(first: int, last: int) -> list[dict]:
    """Per slate: a click on its first item, the other four as negatives, and a rating."""
    out = []
    for n in range(first, last):
        slate = _slate(n, 1_750_000_000.0 + n)
        out += click_examples(slate, slate["items"][:1], POSITIVE, slate["ts"] + 1, f"clk-{n}", 50.0)
        out += click_examples(slate, slate["items"][1:], NEGATIVE, slate["ts"], slate["event_id"], 50.0)
        out.append(rating_example({"event_id": f"rat-{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 5}",
                                   "value": 4.0, "ts": slate["ts"]}))
    return out


def test_the_learner_trains_each_outcome_once_and_remembers_across_a_restart(tmp_path):
    learner = _learner(tmp_path)
    before = _counter("streamrec_learner_duplicates_total")
    first = _outcomes(0, 40)                              # 40 x 6 outcomes
    assert learner.learn(first[:150]) == 150
    assert learner.learn(first[100:]) == len(first) - 150  # 50 re-sent, skipped
    assert _counter("streamrec_learner_duplicates_total") - before == 50
    unkeyed = [{k: v for k, v in e.items() if k != "event_id"} for e in first[:3]]
    assert learner.learn(unkeyed) == 3                    # no identity: trained, as before keys existed

    learner.checkpoint()
    restarted = _learner(tmp_path)
    assert len(restarted.outcomes) == len(first)
    second = _outcomes(40, 50)
    assert restarted.learn(first[-30:] + second + second[:5]) == len(second)
    assert _counter("streamrec_learner_duplicates_total") - before == 50 + 30 + 5
    assert _counter("streamrec_learner_outcome_keys") == len(first) + len(second)
