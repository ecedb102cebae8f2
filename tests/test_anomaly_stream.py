"""Anomaly scoring in the running worker: a click-flood bot is published on `anomalies` and its
examples are marked anomalous (the learner skips those: tests/test_learner_service.py)."""
from __future__ import annotations

import numpy as np
import pytest

from stream import events as ev
from stream.config import Topics
from stream.producer import EventProducer
from stream.topics import ensure_topics
from tests.workerproc import WorkerProcess, read_topic, wait_for

pytestmark = pytest.mark.kafka

BASE_TS = 1_750_000_000.0


def _traffic(n_users: int = 120, n_items: int = 1000, duration_s: float = 5400.0,
             bot: tuple[float, float] = (2700.0, 4200.0), seed: int = 0) -> list[dict]:
    """Normal users: a 10-item slate every ~60 s, a click on 10% of them. The bot: a slate and a
    click on it every ~1.2 s (50x a normal pace, CTR ~1) between ``bot`` seconds."""
    rng = np.random.default_rng(seed)
    out = []

    def session(user: str, t: float, click_prob: float) -> None:
        shown = [f"i{i}" for i in rng.choice(n_items, 10, replace=False)]
        request = f"{user}-{t:.3f}"
        out.append(ev.impression(user, request, "m0", "softmax",
                                 [{"item_id": it, "position": p + 1, "propensity": 0.1} for p, it in enumerate(shown)],
                                 ts=BASE_TS + t))
        if rng.random() < click_prob:
            out.append(ev.click(user, request, shown[rng.integers(3)], ts=BASE_TS + t + rng.uniform(0.2, 5)))

    for u in range(n_users):
        gap = 60.0 * rng.lognormal(0.0, 0.5)
        t = rng.uniform(0, gap)
        while t < duration_s:
            session(f"u{u}", t, 0.1)
            t += rng.exponential(gap)
    t = bot[0]
    while t < bot[1]:
        session("bot", t, 1.0)
        t += rng.exponential(1.2)
    return sorted(out, key=lambda e: e["ts"])


def test_click_flood_bot_is_flagged_in_the_stream(kafka_bootstrap, unique_name, tmp_path):
    """The bot is flagged and most of its examples carry anomalous=True; of 120 normal users at most
    3 (2.5%) ever get a flagged example: the detector's z=4 threshold flags ~0.5% of normal users
    at a time in simulation, and a user is scored every minute for 90 minutes here, so a few
    passing alarms are expected, a systematic false-positive problem is not."""
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    traffic = _traffic()
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(traffic)
    worker = WorkerProcess(kafka_bootstrap, topics.prefix, tmp_path, "--attribution-window-s", "30",
                           anomaly=True).start()
    try:
        clicks = sum(e["type"] == "click" for e in traffic)
        wait_for(lambda: (worker.logged_examples()["label"] > 0).sum() >= clicks * 0.95, 300,
                 "the positives of the clicks", worker)
        wait_for(lambda: len(worker.logged_examples()) >= 10 * (len(traffic) - clicks) * 0.95, 120,
                 "the negatives", worker)
    finally:
        worker.stop()
    examples = worker.logged_examples()
    anomalies = read_topic(kafka_bootstrap, topics.anomalies, 10**9, timeout=10)  # all of them
    assert any(a["entity"] == "bot" and a["kind"] == "user" and a["grade"] > 0 for a in anomalies)

    bot = examples[examples["user_id"] == "bot"]
    assert bot["anomalous"].mean() >= 0.8
    normal_flagged = examples[(examples["user_id"] != "bot") & examples["anomalous"]]["user_id"].nunique()
    assert normal_flagged <= 3
