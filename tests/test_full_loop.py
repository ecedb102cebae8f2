"""The whole loop on the real broker: SDK events → worker → learner → serving, nothing restarted.

A user's new clicks on items of one kind must move that user's live recommendations toward items
of that kind within seconds.
"""
from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest

from stream import events as ev
from stream.config import Topics
from stream.kafka_local import free_port
from stream.processes import spawn, stop
from stream.producer import EventProducer
from stream.topics import ensure_topics
from tests.workerproc import wait_for

pytestmark = pytest.mark.kafka

A = [f"a{i}" for i in range(10)]
B = [f"b{i}" for i in range(10)]


def _sessions(user: str, liked: list[str], n: int, rng: random.Random, t0: float) -> list[dict]:
    """n slates of 3 A and 3 B items; the user clicks the liked items shown in the top 4."""
    out = []
    for s in range(n):
        shown = rng.sample(A, 3) + rng.sample(B, 3)
        rng.shuffle(shown)
        request = f"{user}-{s}-{rng.random():.6f}"
        ts = t0 + s * 0.01
        out.append(ev.impression(user, request, "m0", "uniform",
                                 [{"item_id": it, "position": p + 1, "propensity": 1 / 20} for p, it in enumerate(shown)],
                                 ts=ts))
        out += [ev.click(user, request, it, ts=ts + 0.001) for it in shown[:4] if it in liked]
    return out


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
    t0 = time.time()
    try:
        warmup = []
        for u in range(30):
            warmup += _sessions(f"fan-a{u}", A, 15, rng, t0)
            warmup += _sessions(f"fan-b{u}", B, 15, rng, t0)
        warmup += _sessions("target", A, 15, rng, t0)
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

        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(_sessions("target", B, 40, rng, time.time()))
        clicked_at = time.monotonic()
        wait_for(lambda: _share_b(_recommend(port, "target")) >= 0.6, 60,
                 "the target's recommendations to turn to B items")
        after = _recommend(port, "target")
        assert after["model_version"] != before["model_version"]
        assert time.monotonic() - clicked_at < 60
        assert all(p.poll() is None for p in procs), "a component died"
    finally:
        for p in procs:
            stop(p)
