"""The whole loop on the real broker: SDK events → worker → learner → serving, nothing restarted.

A user's new clicks on items of one kind must move that user's live recommendations toward items
of that kind within seconds.

The traffic is spread over event time the way real traffic is: slates every few tens of
milliseconds, so the negatives of a slate (emitted when its attribution window closes) reach the
learner interleaved with the clicks of later slates. An earlier version put every slate into the
same 150 ms of event time; the worker then emitted all the clicks at once and all the negatives
only when the windows closed, and whether the online learner ended up separating the two tastes
depended on where its batch boundaries fell (it failed once in CI).
"""
from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest
from kafka import KafkaConsumer, TopicPartition

from stream.topics import Topics
from stream.tools.kafka_local import free_port
from stream.tools.processes import spawn, stop
from stream.producer import EventProducer
from stream.topics import ensure_topics
from stream.tools.scrape import scrape, total
from sim.tastes import TASTE_A as A
from sim.tastes import TASTE_B as B
from sim.tastes import taste_fans, taste_slates
from tests.workerproc import wait_for

pytestmark = pytest.mark.kafka

def _recommend(port: int, user: str) -> dict:
    url = f"http://127.0.0.1:{port}/recommendations?user_id={user}&k=5&policy=greedy&exclude_seen=false"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _share_b(recs: dict) -> float:
    return sum(item["item_id"].startswith("b") for item in recs["items"]) / max(1, len(recs["items"]))


def _seq(version: str) -> int:
    return int(version.rsplit("-", 1)[1])  # "<model>-<seq>" (learner/PUBLISHING.md)


def _newest_delta_seq(bootstrap: str, topic: str) -> int:
    """The seq of the newest delta on ``topic`` (``model.updates``, one partition)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    seqs = []
    try:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        consumer.seek(tp, max(0, end - 200))
        deadline = time.monotonic() + 30
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                seqs += [m["seq"] for m in map(json.loads, (r.value for r in records)) if m["type"] == "delta"]
    finally:
        consumer.close()
    assert seqs, f"no delta on {topic}"
    return max(seqs)


def test_new_clicks_move_live_recommendations(kafka_bootstrap, unique_name, tmp_path):
    """After clicking B items, a user who liked A items is recommended mostly B items, within seconds."""
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    common = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topics.prefix]
    port, learner_port = free_port(), free_port()
    procs = [
        spawn(tmp_path, "worker", "worker", *common, "--log-dir", str(tmp_path / "log"), "--web-port", "0",
               "--batch-timeout-s", "0.2", "--attribution-window-s", "2", "--no-anomaly"),
        spawn(tmp_path, "learner", "learner", *common, "--store-dir", str(tmp_path / "store"),
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--web-port", str(learner_port), "--n-factors", "8",
               "--publish-interval-s", "0.3", "--snapshot-interval-s", "2", "--device", "cpu",
               "--attribution-window-s", "2"),
        spawn(tmp_path, "serving", "serve", *common, "--store-dir", str(tmp_path / "store"),
               "--port", str(port), "--kind", "click", "--seed", "0"),
    ]
    rng = random.Random(0)
    fans = taste_fans(30)
    try:
        # 915 slates over the 18 s of event time that ended a minute ago
        warmup = taste_slates([*fans, ("target", A)], 15, rng, time.time() - 78, every_s=0.02)
        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(warmup)

        def target_known_and_likes_a() -> bool:
            try:
                recs = _recommend(port, "target")
            except OSError:
                return False
            return not recs["fallback"] and _share_b(recs) <= 0.4

        wait_for(target_known_and_likes_a, 180, "serving to recommend A items to the A-clicking target user")
        before = _recommend(port, "target")

        # 40 slates over the last 10 s, on which the target now clicks B items
        turn = taste_slates([("target", B)], 40, rng, time.time() - 10, every_s=0.25)
        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(turn)
        clicked_at = time.monotonic()
        wait_for(lambda: _share_b(_recommend(port, "target")) >= 0.6, 60,
                 "the target's recommendations to turn to B items")
        after = _recommend(port, "target")
        assert after["model_version"] != before["model_version"]
        assert time.monotonic() - clicked_at < 60
        # The last slates' negatives (window 2 s, then 2 s of idle grace) must not turn it back.
        # Every shown item becomes one example, a positive or a negative: once the learner has
        # trained on all of them, a clean stop publishes what it has not published yet, so its
        # newest delta holds everything; serving must answer from it and still recommend B.
        shown = sum(len(e["items"]) for e in warmup + turn if e["type"] == "impression")
        learner_metrics = f"http://127.0.0.1:{learner_port}/metrics"
        wait_for(lambda: total(scrape(learner_metrics), "streamrec_learner_examples_total") >= shown, 60,
                 f"the learner to train on all {shown} examples")
        assert all(p.poll() is None for p in procs), "a component died"
        learner = procs[1]
        stop(learner)
        assert learner.returncode == 0, "the learner did not stop cleanly"
        seq = _newest_delta_seq(kafka_bootstrap, topics.model_updates)

        def served_from_the_last_delta() -> dict | None:
            recs = _recommend(port, "target")
            return recs if _seq(recs["model_version"]) >= seq else None

        settled = wait_for(served_from_the_last_delta, 30, f"serving to answer from the learner's last delta ({seq})")
        assert _share_b(settled) >= 0.6, settled
        assert all(p.poll() is None for p in procs if p is not learner), "a component died"
    except AssertionError:
        for name in ("worker", "learner", "serving"):
            print(f"--- {name}.log (tail)\n" + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        for p in procs:
            stop(p)
