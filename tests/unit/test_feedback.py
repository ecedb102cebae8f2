"""The ``immediate`` feedback protocol (issue 18, deliverable 2): the worker sends shown items at
once and clicks as corrections, the learner trains with the fake-negative weighted loss and scores
each shown item once with its final label, and so does serving's monitor."""
from __future__ import annotations

import random
import time

import msgspec
import numpy as np
import pytest

from learner.feedback import FinalLabels, fake_negative_weights
from learner.service import Learner
from learner.settings import LearnerSettings
from stream import events as ev
from sim.tastes import TASTE_A, TASTE_B, taste_fans, taste_slates
from stream.events import Impression, Item, encode, to_event
from stream.examples import CLICKED, SHOWN, click_example, example_batch, example_rows
from stream.worker.join import ImpressionJoiner
from stream.worker.pipeline import IngestPipeline, Record

IMP = {"event_id": "e1", "type": "impression", "schema_version": 1, "user_id": "u", "ts": 100.0, "request_id": "r",
       "model_version": "m1", "policy": "greedy", "surface": "home",
       "items": [{"item_id": "a", "position": 1, "propensity": 1.0}, {"item_id": "b", "position": 2, "propensity": 0.5}]}
CLICK = {"event_id": "e2", "type": "click", "schema_version": 1, "user_id": "u", "ts": 105.0, "request_id": "r",
         "item_id": "b"}


def test_an_impression_is_sent_at_once_and_a_closing_window_sends_nothing():
    joiner = ImpressionJoiner(window_s=60, feedback="immediate")
    shown = joiner.on_impression(to_event(IMP))
    assert (shown.stage, shown.event_id, shown.ts) == (SHOWN, "e1", 100.0)
    assert [(i.item_id, i.label, i.position, i.weight) for i in shown.items] == [
        ("a", 0.0, 1, 1.0), ("b", 0.0, 2, 2.0)]
    outcome, clicked = joiner.on_click(to_event(CLICK))
    assert outcome == "matched" and clicked.stage == CLICKED and clicked.items[0].label == 1.0
    assert joiner.advance(200.0) == [] and len(joiner) == 0
    assert joiner.on_click(to_event({**CLICK, "event_id": "e3", "item_id": "a", "ts": 201.0}))[0] == "late_click"


def test_the_pipeline_sends_shown_then_clicked_and_rejects_an_unknown_protocol():
    pipeline = IngestPipeline(attribution_window_s=60, feedback="immediate")
    imp = ev.impression("u", "r", "m1", "greedy", IMP["items"], ts=time.time())
    click = ev.click("u", "r", "b", ts=imp["ts"] + 5)
    out = pipeline.process([Record(encode(imp), 0, 0), Record(encode(click), 0, 1)])
    assert [e.stage for e in out.examples] == [SHOWN, CLICKED]
    rows = example_rows(out.examples)
    assert rows.num_rows == 3 and rows["label"].to_pylist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="feedback must be one of"):
        IngestPipeline(feedback="eventually")


def test_the_weights_make_the_weighted_click_rate_the_true_one():
    """A shown item comes once as a negative and, with probability p, again as a positive: the
    weighted share of positives is then p itself (Ktena et al. 2019)."""
    for p in (0.01, 0.1, 0.4, 0.9):
        w_pos, w_neg = fake_negative_weights(np.array([p, p]), np.array([True, False]))
        assert p * w_pos / (w_neg + p * w_pos) == pytest.approx(p)


def test_final_labels_release_the_oldest_slates_beyond_the_bound():
    labels = FinalLabels(settle_s=60.0, max_held=3)
    labels.shown("r1", "a", 0.0, 1)
    labels.shown("r1", "b", 0.0, 2)
    labels.shown("r2", "c", 1.0, 3)
    assert labels.release() == [] and len(labels) == 3
    labels.shown("r3", "d", 2.0, 4)  # four held: the oldest slate goes, early
    assert labels.release() == [(1, 0.0), (2, 0.0)] and len(labels) == 2
    with pytest.raises(ValueError):
        FinalLabels(settle_s=0)


def _immediate_world(seed: int, n_slates: int, slate: int = 5, n_users: int = 200, n_items: int = 80):
    """Batches of 100 slates under ``immediate`` feedback: each slate's ``shown`` message at its
    time, its clicks 1 s later; examination 1/k at position k; slates 10 s apart."""
    rng = np.random.default_rng(seed)
    users, items = rng.normal(0, 0.8, (n_users, 3)), rng.normal(0, 0.8, (n_items, 3))
    bias = rng.normal(-1.0, 0.5, n_items)
    k = 0
    for _ in range(n_slates // 100):
        batch = []
        for _ in range(100):
            k += 1
            u, shown = rng.integers(n_users), rng.choice(n_items, slate, replace=False)
            imp = Impression(schema_version=1, event_id=f"imp-{k}", user_id=f"u{u}", ts=10.0 * k, request_id=f"r{k}",
                             model_version="m", policy="uniform",
                             items=[Item(f"i{i}", position=p + 1, propensity=slate / n_items)
                                    for p, i in enumerate(shown)])
            batch.append(click_example(imp, imp.items, SHOWN, imp.ts, imp.event_id, 50.0))
            attractive = 1 / (1 + np.exp(-(users[u] @ items[shown].T + bias[shown])))
            for item, a in zip(imp.items, attractive):
                if rng.random() < a / item.position:
                    batch.append(click_example(imp, [item], CLICKED, imp.ts + 1, f"c{k}-{item.item_id}", 50.0))
        yield batch


def test_the_learner_scores_each_shown_item_once_with_its_final_label_and_stays_calibrated(tmp_path):
    learner = Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=8, device="cpu", attribution_window_s=60,
                                      checkpoint_dir=tmp_path / "ckpt", store_dir=tmp_path / "store", rmse_window=5000))
    shown = clicks = 0
    for messages in _immediate_world(seed=1, n_slates=12_000):
        learner.learn(example_batch(messages))
        shown += sum(len(m.items) for m in messages if m.stage == SHOWN)
        clicks += sum(m.stage == CLICKED for m in messages)
    quality = learner.quality["click"]
    held = len(learner.final_labels)
    assert 0 < held <= 7 * 5  # the slates of the last 60 s are still open
    assert quality.n == 5000 and shown - held > 5000
    window = quality._window
    predicted, labels = window.column(0), window.column(2)
    assert labels.mean() == pytest.approx(clicks / shown, rel=0.15)  # final labels: each click once, no fake negative
    assert 0.9 <= predicted.mean() / labels.mean() <= 1.1, "calibrated on final labels"
    assert quality.rmse() < quality.baseline_rmse()


def test_the_weights_of_a_waiting_window_make_the_weighted_click_rate_the_true_one():
    """With a waiting window a shown item comes once, at the window's end: positive if clicked
    within it (probability p - late), else negative; and a click after it comes again as a
    correction (probability late = late_share * p). The weighted share of positives is p."""
    for p in (0.01, 0.1, 0.4, 0.9):
        for share in (0.0, 0.3, 1.0):
            w_pos, w_neg = fake_negative_weights(np.array([p, p]), np.array([True, False]), late_share=share)
            negatives = 1 - (p - share * p)  # not clicked within the window
            assert p * w_pos / (p * w_pos + negatives * w_neg) == pytest.approx(p)


def _tastes_learner(root) -> Learner:
    return Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=8, device="cpu", attribution_window_s=2.0,
                                   store_dir=root / "store", checkpoint_dir=root / "ckpt"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_burst_whose_shown_items_all_come_before_their_clicks_is_learned(tmp_path, seed):
    """The burst of docs/learner.md (900 slates within 150 ms, clicks 0.5 s later) under
    ``immediate``: every provisional negative arrives before any click. Trained at once, the
    negatives and then the corrections collapse the click model (2 runs of 10 learned); held in the
    waiting window, each slate trains with its clicks as its labels."""
    rng = random.Random(seed)
    pipeline = IngestPipeline(attribution_window_s=2.0, feedback="immediate")
    fans = taste_fans(30)
    events = taste_slates(fans, 15, rng, 0.0, every_s=0.15 / 900)
    examples = []
    for offset, event in enumerate(events):
        examples += pipeline.process([Record(encode(event), partition=0, offset=offset)]).examples
    learner = _tastes_learner(tmp_path)
    for start in range(0, len(examples), 64):
        learner.learn(example_batch(examples[start:start + 64]))
    model, ids = learner.model, learner.model.items.ids

    def share_b(user: str) -> float:
        scores = model.predict([user] * len(ids), ids, kind="click")
        return float(np.mean([ids[j].startswith("b") for j in np.argsort(-scores, kind="stable")[:5]]))

    assert np.mean([share_b(user) for user, liked in fans if liked is TASTE_A]) <= 0.2
    assert np.mean([share_b(user) for user, liked in fans if liked is TASTE_B]) >= 0.8
    assert learner.waiting.settle_s == pytest.approx(0.5)  # the window: the clicks' delay
    assert len(learner.waiting) <= 6  # the last slate waits for event time to pass its click


def test_the_waiting_window_holds_a_slate_until_its_clicks_and_survives_a_restart(tmp_path):
    learner = _tastes_learner(tmp_path)
    imp = to_event({**IMP, "ts": 0.0})
    shown = click_example(imp, imp.items, SHOWN, 0.0, "e1", 50.0)
    assert learner.learn(example_batch([shown])) == 0 and len(learner.waiting) == 2
    learner.checkpoint()
    restarted = _tastes_learner(tmp_path)  # the held rows were read, not trained: the checkpoint keeps them
    assert len(restarted.waiting) == 2
    clicked = click_example(imp, imp.items[1:], CLICKED, 1.0, "e2", 50.0)
    assert restarted.learn(example_batch([clicked])) == 0  # it labels its waiting item
    later = click_example(msgspec.structs.replace(imp, request_id="r2", ts=3.0), imp.items, SHOWN, 3.0, "e3", 50.0)
    assert restarted.learn(example_batch([later])) == 2  # the first slate's window (2 s) has passed
    assert [label for _, label in restarted.final_labels.release(10.0)] == [0.0, 1.0]  # scored with its click


def test_a_quiet_stream_s_last_slate_trains_once_event_time_follows_the_wall_clock(tmp_path):
    learner = _tastes_learner(tmp_path)  # attribution window 2 s: the waiting window until delays are known
    imp = to_event({**IMP, "ts": 0.0})
    assert learner.learn(example_batch([click_example(imp, imp.items, SHOWN, 0.0, "e1", 50.0)])) == 0
    assert learner.release_waiting(idle_s=1.0) == 0  # the window has not passed
    assert learner.release_waiting(idle_s=2.5) == 2 and len(learner.waiting) == 0
