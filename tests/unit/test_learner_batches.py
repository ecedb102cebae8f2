"""The learner trains a poll of outcome messages in micro-batches of at most ``batch_size``
labelled items per kind, whatever the number of items per message: the model's step sizes were
tuned on micro-batches of that many items."""
from __future__ import annotations

from learner.service import Learner
from learner.settings import LearnerSettings
from stream.events import Impression, Item, Rating
from stream.examples import CLOSED, click_example, example_batch, rating_example


def test_a_poll_is_trained_in_micro_batches_of_at_most_batch_size_items_per_kind(tmp_path, monkeypatch):
    learner = Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=4, device="cpu", batch_size=10,
                                      checkpoint_dir=tmp_path / "ckpt", store_dir=tmp_path / "store"))
    calls = []
    learn_batch = learner.model.learn_batch

    def spy(users, items, labels, kind="rating", **kwargs):
        calls.append((kind, len(users)))
        return learn_batch(users, items, labels, kind=kind, **kwargs)

    monkeypatch.setattr(learner.model, "learn_batch", spy)
    messages = []
    for k in range(7):  # 7 slates of 5 unclicked items: 35 click rows
        imp = Impression(schema_version=1, event_id=f"e{k}", user_id=f"u{k}", ts=float(k), request_id=f"r{k}",
                         model_version="m", policy="greedy",
                         items=[Item(f"i{j}", position=j + 1, propensity=0.5) for j in range(5)])
        messages.append(click_example(imp, imp.items, CLOSED, imp.ts, imp.event_id, 50.0))
    messages += [rating_example(Rating(schema_version=1, event_id=f"x{j}", user_id="u", ts=1.0, item_id=f"m{j}",
                                       value=4.0))
                 for j in range(3)]
    assert learner.learn(example_batch(messages)) == 38
    assert calls == [("rating", 3), ("click", 10), ("click", 10), ("click", 10), ("click", 5)]
