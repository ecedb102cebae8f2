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

from stream.topics import Topics
from stream.tools.kafka_local import free_port
from stream.tools.processes import spawn, stop
from stream.producer import EventProducer
from stream.topics import ensure_topics
from tests.traffic import TASTE_A as A
from tests.traffic import TASTE_B as B
from tests.traffic import taste_fans, taste_slates
from tests.workerproc import wait_for

pytestmark = pytest.mark.kafka

def _recommend(port: int, user: str) -> dict:
    url = f"http://127.0.0.1:{port}/recommendations?user_id={user}&k=5&policy=greedy&exclude_seen=false"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _share_b(recs: dict) -> float:
    return sum(item["item_id"].startswith("b") for item in recs["items"]) / max(1, len(recs["items"]))


def test_new_clicks_move_live_recommendations(kafka_bootstrap, unique_name, tmp_path):
    """After clicking B items, a user who liked A items is recommended mostly B items, within seconds."""
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    common = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topics.prefix]
    port = free_port()
    procs = [
        spawn(tmp_path, "worker", "worker", *common, "--log-dir", str(tmp_path / "log"), "--web-port", "0",
               "--batch-timeout-s", "0.2", "--attribution-window-s", "2", "--no-anomaly"),
        spawn(tmp_path, "learner", "learner", *common, "--store-dir", str(tmp_path / "store"),
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--web-port", "0", "--n-factors", "8",
               "--publish-interval-s", "0.3", "--snapshot-interval-s", "2", "--device", "cpu"),
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
        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(taste_slates([("target", B)], 40, rng, time.time() - 10, every_s=0.25))
        clicked_at = time.monotonic()
        wait_for(lambda: _share_b(_recommend(port, "target")) >= 0.6, 60,
                 "the target's recommendations to turn to B items")
        after = _recommend(port, "target")
        assert after["model_version"] != before["model_version"]
        assert time.monotonic() - clicked_at < 60
        # the last slates' negatives (window 2 s, then 2 s of idle grace) must not turn it back
        time.sleep(8)
        settled = _recommend(port, "target")
        assert _share_b(settled) >= 0.6, settled
        assert all(p.poll() is None for p in procs), "a component died"
    except AssertionError:
        for name in ("worker", "learner", "serving"):
            print(f"--- {name}.log (tail)\n" + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        for p in procs:
            stop(p)
