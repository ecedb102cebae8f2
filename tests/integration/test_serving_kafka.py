"""Serving against the real broker: model freshness, snapshot verification, the shadow check and a
replica catching up. The learner is simulated with ``learner.updates`` (snapshots written to a
store, ``delta_messages`` sent with a kafka-python producer), each test on its own topic prefix.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import msgspec
import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from learner.updates import ModelRows, delta_messages, write_snapshot
from serving.app import ServingApp
from serving.settings import ServeSettings
from stream.events import Rating
from stream.examples import rating_example
from stream.topics import Topics
from stream.topics import ensure_topics

pytestmark = pytest.mark.kafka
K = 8


@pytest.fixture
def topics(kafka_bootstrap, unique_name):
    t = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, t)
    return t


@pytest.fixture
def producer(kafka_bootstrap):
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0, max_request_size=8 * 1024 * 1024)
    yield p
    p.close()


def rows(ids, rng, scale=1.0):
    n = len(ids)
    return ModelRows(list(ids), rng.normal(size=(n, K)) * scale, rng.normal(size=n) * 0.1, np.zeros(n))


def base_model(seed=0):
    rng = np.random.default_rng(seed)
    return rows([f"u{j}" for j in range(40)], rng), rows([f"i{j}" for j in range(500)], rng)


def send_delta(producer, topics, seq, users, items, max_event_ts=None):
    for key, value in delta_messages("mf", seq, 3.5, -1.0, users, items, max_event_ts=max_event_ts, max_rows=200):
        producer.send(topics.model_updates, key=key.encode(), value=orjson.dumps(value))
    producer.flush()


def announce(producer, topics, manifest):
    producer.send(topics.model_updates, key=b"snapshot/mf", value=orjson.dumps(manifest))
    producer.flush()


@contextlib.asynccontextmanager
async def replica(bootstrap, topics, store, **overrides):
    settings = ServeSettings(bootstrap_servers=bootstrap, topic_prefix=topics.prefix, store_dir=store, port=0,
                             seed=0, **overrides)
    app = ServingApp(settings)
    await app.start()
    try:
        await app.wait_ready(60)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.port}") as session:
            yield app, session
    finally:
        await app.stop()


async def recommend(session, user, k=3):
    async with session.get("/recommendations", params={"user_id": user, "k": str(k)}) as response:
        assert response.status == 200
        return await response.json()


async def until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metric(app, name, **labels):
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def test_recommendations_follow_the_deltas_within_seconds(kafka_bootstrap, topics, producer, tmp_path):
    users, items = base_model()
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, users, items)

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            before = await recommend(session, "u3")
            assert before["model_version"] == "mf-1"
            # The learner moves three items right onto u3's taste.
            u3 = users.vectors[3]
            fresh = ModelRows(["i10", "i20", "i30"], np.stack([u3 * 5, u3 * 4, u3 * 3]), np.zeros(3), np.zeros(3))
            published = time.monotonic()
            send_delta(producer, topics, 2, ModelRows.empty(K), fresh, max_event_ts=time.time() - 0.5)

            async def changed():
                data = await recommend(session, "u3")
                return [it["item_id"] for it in data["items"]] == ["i10", "i20", "i30"] and \
                    data["model_version"] == "mf-2"
            visible = await until(changed, 10, "the delta's items on top of u3's recommendations")
            assert visible - published < 5.0
            assert metric(app, "streamrec_freshness_seconds_count") == 1
            assert metric(app, "streamrec_model_info", version="mf-2") == 1
            assert metric(app, "streamrec_model_info", version="mf-1") == 0
    asyncio.run(body())


def test_a_new_replica_catches_up_from_snapshot_plus_deltas(kafka_bootstrap, topics, producer, tmp_path):
    users, items = base_model()
    rng = np.random.default_rng(1)
    send_delta(producer, topics, 1, users, items)
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, users, items)
    changed = rows(["i5", "new-item"], rng)
    send_delta(producer, topics, 2, rows(["u0"], rng), ModelRows.empty(K))
    send_delta(producer, topics, 3, ModelRows.empty(K), changed)

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            assert app.live.current.version == "mf-3"  # ready means caught up
            assert metric(app, "streamrec_serving_deltas_total", result="skipped") == 1  # seq 1 is in the snapshot
            assert metric(app, "streamrec_serving_deltas_total", result="applied") == 2
            async with session.post("/predict", json={"user_id": "u0", "item_ids": ["new-item"]}) as response:
                data = await response.json()
            u0 = app.live.current.users.vector(app.live.current.users.row("u0"))
            expected = 3.5 + u0[K] + changed.biases[1] + float(np.dot(u0[:K], changed.vectors[1]))
            assert data["items"][0]["known"] and data["items"][0]["score"] == pytest.approx(expected, rel=1e-5)
    asyncio.run(body())


def test_a_corrupt_snapshot_is_refused_and_the_previous_version_keeps_serving(kafka_bootstrap, topics, producer,
                                                                              tmp_path):
    users, items = base_model()
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, users, items)

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            manifest = write_snapshot(tmp_path, "mf", 5, 3.5, -1.0, *base_model(seed=9))
            weights = tmp_path / manifest["path"] / "rows.safetensors"
            data = bytearray(weights.read_bytes())
            data[-10] ^= 0xFF  # one flipped byte in the tensors
            weights.write_bytes(bytes(data))
            announce(producer, topics, manifest)
            announce(producer, topics, {**manifest, "path": "../../etc"})

            async def refused():
                return metric(app, "streamrec_serving_snapshots_total", result="corrupt") == 2
            await until(refused, 10, "two refusals")
            response = await recommend(session, "u1")
            assert response["model_version"] == "mf-1"
            assert metric(app, "streamrec_model_info", version="mf-1") == 1
    asyncio.run(body())


def test_bootstrap_skips_a_corrupt_newest_snapshot(kafka_bootstrap, topics, tmp_path):
    users, items = base_model()
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, users, items)
    manifest = write_snapshot(tmp_path, "mf", 2, 3.5, -1.0, users, items)
    (tmp_path / manifest["path"] / "ids.json").write_text('{"users": [], "items": []}')

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            assert (await recommend(session, "u1"))["model_version"] == "mf-1"
            assert metric(app, "streamrec_serving_snapshots_total", result="corrupt") == 1
    asyncio.run(body())


def test_the_shadow_check_refuses_a_worse_snapshot_and_promotes_a_good_one(kafka_bootstrap, topics, producer,
                                                                          tmp_path):
    users, items = base_model()
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, users, items)
    rng = np.random.default_rng(4)

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path, shadow_min_outcomes=100,
                           shadow_tolerance=0.1) as (app, session):
            live = app.live.current
            for j in range(300):  # outcomes the live model predicts well, served by it
                user, item = f"u{rng.integers(40)}", f"i{rng.integers(500)}"
                label = float(live.predict(user, [item], "rating")[0] + rng.normal(0, 0.2))
                example = msgspec.structs.replace(
                    rating_example(Rating(schema_version=1, event_id=f"r{j}", user_id=user, ts=time.time(),
                                          item_id=item, value=label)), model_version="mf-1")
                producer.send(topics.examples, key=user.encode(), value=msgspec.json.encode(example))
            producer.flush()

            async def observed():
                return len(app.monitor.recent_outcomes()) == 300
            await until(observed, 15, "the monitor to read 300 outcomes")
            assert metric(app, "streamrec_served_rmse", kind="rating") == pytest.approx(0.2, abs=0.05)
            assert metric(app, "streamrec_serving_examples_total", result="served_version") == 300

            scrambled_users = rows(users.ids, rng, scale=2.0)
            announce(producer, topics, write_snapshot(tmp_path, "mf", 5, 3.5, -1.0, scrambled_users, items))

            async def refused():
                return metric(app, "streamrec_serving_snapshots_total", result="shadow_refused") == 1
            await until(refused, 10, "the shadow refusal")
            assert (await recommend(session, "u1"))["model_version"] == "mf-1"

            nudged = ModelRows(items.ids, items.vectors + rng.normal(0, 0.01, items.vectors.shape), items.biases,
                               items.click_biases)
            announce(producer, topics, write_snapshot(tmp_path, "mf", 6, 3.5, -1.0, users, nudged))

            async def promoted():
                return (await recommend(session, "u1"))["model_version"] == "mf-6"
            await until(promoted, 10, "the promotion of mf-6")
            assert metric(app, "streamrec_serving_snapshots_total", result="loaded") == 2  # bootstrap + mf-6
    asyncio.run(body())
