"""Anomaly scoring in the running worker: a click-flood bot is published on `anomalies` and its
examples are marked anomalous (the learner skips those: tests/test_learner_service.py)."""
from __future__ import annotations

import pytest

from stream.topics import Topics
from stream.producer import EventProducer
from stream.topics import ensure_topics
from tests.traffic import BASE_TS, click_flood
from tests.workerproc import WorkerProcess, read_topic, wait_for

pytestmark = pytest.mark.kafka


def test_click_flood_bot_is_flagged_in_the_stream(kafka_bootstrap, unique_name, tmp_path):
    """The bot is flagged and most of its examples carry anomalous=True; of 120 normal users at most
    3 (2.5%) ever get a flagged example: the detector's alarm (tail probability <= 1e-6 under its
    likelihood) flags ~0.03-0.1% of normal users at a time in simulation, and a user is scored every
    minute for 90 minutes here, so a few passing alarms are expected, a systematic false-positive
    problem is not."""
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    traffic = click_flood()
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


def test_detector_checkpoint_at_clean_stop_is_restored_by_the_next_worker(kafka_bootstrap, unique_name, tmp_path,
                                                                         monkeypatch):
    """SIGTERM makes the worker checkpoint its detector in its own folder next to the log (the interval is too long
    for a periodic one here); the restarted worker rebuilds the windows from the log, loads the
    checkpoint, and goes on with the rest of the stream."""
    monkeypatch.setenv("STREAMREC_DETECTOR_CHECKPOINT_INTERVAL_S", "3600")
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    traffic = click_flood(n_users=30, duration_s=1200.0, bot=(600.0, 900.0))
    first = [e for e in traffic if e["ts"] < BASE_TS + 800]
    worker = WorkerProcess(kafka_bootstrap, topics.prefix, tmp_path, "--worker-id", "w1", anomaly=True)
    manifest = worker.log_dir / "_detector" / "w1" / "manifest.json"
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(first)
    worker.start()
    try:
        wait_for(lambda: worker.logged_events()["event_id"].nunique() == len(first), 120, "the first events", worker)
        assert not manifest.exists()
        worker.stop()
        assert manifest.exists(), worker.output()[-3000:]
        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(traffic[len(first):])
        worker.start()
        wait_for(lambda: worker.logged_events()["event_id"].nunique() == len(traffic), 120, "all events", worker)
    finally:
        worker.stop()
    assert "restored anomaly detector: 31 users" in worker.output()
