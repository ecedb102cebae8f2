"""The HTTP API of a replica, in process, over real loopback sockets, without a broker.

The replica runs with ``follow=False``: the tests put model versions in place themselves (through
the same ``ModelUpdater.process`` path the Kafka follower uses, where it matters).
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from learner.updates import DeltaAssembler, ModelRows, delta_messages
from serving.app import ServingApp
from serving.index import IndexSettings
from serving.settings import ServeSettings
from serving.model import ServingModel

DESIGN = Path(__file__).resolve().parents[2] / ".." / "shared" / "DESIGN.md"
SERVING_METRICS = ("streamrec_served_rmse", "streamrec_drift_psi", "streamrec_drift_ks", "streamrec_model_info",
                   "streamrec_model_age_seconds", "streamrec_freshness_seconds", "streamrec_request_seconds",
                   "streamrec_served_baseline_rmse", "streamrec_served_logloss", "streamrec_served_baseline_logloss",
                   "streamrec_served_auc", "streamrec_served_calibration", "streamrec_drift_alarm")


def model_rows(n_users=50, n_items=300, k=8, seed=0):
    rng = np.random.default_rng(seed)
    users = ModelRows([f"u{j}" for j in range(n_users)], rng.normal(size=(n_users, k)), rng.normal(size=n_users) * 0.1,
                      np.zeros(n_users))
    items = ModelRows([f"i{j}" for j in range(n_items)], rng.normal(size=(n_items, k)), rng.normal(size=n_items) * 0.1,
                      np.zeros(n_items))
    return users, items


def first_model(users, items, seq=1):
    encoded = [v for _, v in delta_messages("mf", seq, 3.5, -1.0, users, items)]
    assembler = DeltaAssembler()
    return ServingModel.empty("mf", users.vectors.shape[1]).apply([d for v in encoded if (d := assembler.add(v))])


@contextlib.asynccontextmanager
async def replica(tmp_path, model: ServingModel | None = None, variants=None, **overrides):
    settings = ServeSettings(bootstrap_servers="unused:9092", store_dir=tmp_path, port=0, seed=1, **overrides)
    app = ServingApp(settings, variants)
    await app.start(follow=False)
    if model is not None:
        app.live.swap(model)
    app.updater.caught_up = True
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.port}") as session:
            yield app, session
    finally:
        await app.stop()


async def get(session, path, **params):
    async with session.get(path, params=params) as response:
        return response.status, await response.json()


def test_recommendations_have_the_contract_fields(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            status, data = await get(session, "/recommendations", user_id="u3", k="5")
            assert status == 200
            assert set(data) == {"request_id", "model_version", "user_id", "policy", "fallback", "items"}
            assert re.fullmatch(r"[0-9a-f]{32}", data["request_id"])
            assert (data["model_version"], data["user_id"], data["policy"], data["fallback"]) == ("mf-1", "u3",
                                                                                                   "greedy", False)
            assert [it["position"] for it in data["items"]] == [1, 2, 3, 4, 5]
            assert all(it["propensity"] == 1.0 for it in data["items"])
            scores = [it["score"] for it in data["items"]]
            assert scores == sorted(scores, reverse=True)
            predicted = app.live.current.predict("u3", [it["item_id"] for it in data["items"]], "rating")
            np.testing.assert_allclose(scores, predicted, rtol=1e-5)
            request_ids = {data["request_id"]}
            for policy in ("epsilon_greedy", "softmax"):
                status, data = await get(session, "/recommendations", user_id="u3", k="10", policy=policy)
                assert status == 200 and len(data["items"]) == 10
                assert all(0 < it["propensity"] <= 1 for it in data["items"])
                assert len({it["item_id"] for it in data["items"]}) == 10
                request_ids.add(data["request_id"])
            assert len(request_ids) == 3  # every response has its own id
    asyncio.run(body())


def test_unknown_users_get_the_flagged_popularity_fallback(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            hits = ["i42"] * 30 + ["i7"] * 20 + ["i99"] * 10
            app.monitor.observe([{"user_id": f"x{j}", "item_id": item, "label": 1.0, "kind": "click", "ts": 0.0,
                                  "anomalous": False} for j, item in enumerate(hits)])
            status, data = await get(session, "/recommendations", user_id="newcomer", k="3")
            assert status == 200 and data["fallback"] is True
            assert [it["item_id"] for it in data["items"]] == ["i42", "i7", "i99"]
            expected = app.live.current.predict("newcomer", ["i42", "i7", "i99"], "rating")
            np.testing.assert_allclose([it["score"] for it in data["items"]], expected, rtol=1e-5)
            metrics = await (await session.get("/metrics")).text()
            assert "streamrec_serving_fallbacks_total 1.0" in metrics
    asyncio.run(body())


def test_exclude_seen_leaves_out_what_the_user_interacted_with(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            _, before = await get(session, "/recommendations", user_id="u1", k="3")
            top = [it["item_id"] for it in before["items"]]
            app.monitor.observe([{"user_id": "u1", "item_id": top[0], "label": 4.0, "kind": "rating", "ts": 0.0,
                                  "anomalous": False}])
            _, after = await get(session, "/recommendations", user_id="u1", k="3")
            assert [it["item_id"] for it in after["items"]][:2] == top[1:]
            _, kept = await get(session, "/recommendations", user_id="u1", k="3", exclude_seen="false")
            assert [it["item_id"] for it in kept["items"]] == top
    asyncio.run(body())


def test_predict_scores_the_given_items(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            async with session.post("/predict", json={"user_id": "u2", "item_ids": ["i1", "nope"],
                                                      "kind": "click"}) as response:
                data = await response.json()
            assert response.status == 200
            assert data["model_version"] == "mf-1" and data["known_user"] is True and data["kind"] == "click"
            assert [it["known"] for it in data["items"]] == [True, False]
            expected = app.live.current.predict("u2", ["i1", "nope"], "click")
            np.testing.assert_allclose([it["score"] for it in data["items"]], expected, rtol=1e-6)
    asyncio.run(body())


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_answering(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            cases = [
                ({"k": "5"}, "user_id is required"),
                ({"user_id": "u1", "k": "1000"}, "k must be an integer in 1..100"),
                ({"user_id": "u1", "k": "-1"}, "k must be an integer"),
                ({"user_id": "u1", "policy": "thompson"}, "policy must be one of"),
                ({"user_id": "u" * 300}, "at most 256"),
                ({"user_id": "u1", "exclude_seen": "2"}, "exclude_seen must be true or false"),
                ({"user_id": "u1", "epsilon": "-0.1"}, "epsilon must be a number in 0..1"),
                ({"user_id": "u1", "temperature": "inf"}, "temperature must be a number"),
                ({"user_id": "u1", "debug": "1"}, "unknown parameter(s) 'debug'"),
            ]
            for params, message in cases:
                status, data = await get(session, "/recommendations", **params)
                assert status == 400 and message in data["error"], (params, data)
            async with session.get("/recommendations?user_id=a&user_id=b") as response:
                assert response.status == 400 and "more than once" in (await response.json())["error"]
            async with session.post("/predict", data=b"{not json") as response:
                assert response.status == 400 and "JSON" in (await response.json())["error"]
            big = b'{"user_id": "u1", "item_ids": ["' + b"x" * 70_000 + b'"]}'
            async with session.post("/predict", data=big) as response:
                assert response.status == 413 and "exceeded" in (await response.json())["error"]
            async with session.get("/nowhere") as response:
                assert response.status == 404 and "error" in await response.json()
            async with session.get("/predict") as response:
                assert response.status == 405
            async with session.get("/recommendations?user_id=" + "x" * 20_000) as response:
                assert 400 <= response.status < 500
            for junk in ("%00", "%ff%fe", "\u2603" * 10, "1e309", "[]", "{}"):
                for name in ("k", "epsilon", "temperature", "user_id"):
                    params = {"user_id": "u1", name: junk}
                    async with session.get("/recommendations", params=params) as response:
                        assert response.status in (200, 400), (name, junk, response.status)
            status, data = await get(session, "/healthz")
            assert status == 200 and data == {"status": "ok"}
            status, data = await get(session, "/recommendations", user_id="u1")
            assert status == 200
    asyncio.run(body())


def test_readiness_waits_for_a_model(tmp_path):
    async def body():
        async with replica(tmp_path) as (app, session):
            status, data = await get(session, "/readyz")
            assert status == 503 and data["reason"] == "no model loaded yet"
            status, data = await get(session, "/recommendations", user_id="u1")
            assert status == 503 and "no model" in data["error"]
            app.live.swap(first_model(*model_rows()))
            status, data = await get(session, "/readyz")
            assert status == 200 and data["model_version"] == "mf-1"
    asyncio.run(body())


def test_metrics_expose_every_serving_metric_of_the_design(tmp_path):
    if DESIGN.is_file():
        serving_line = next(line for line in DESIGN.read_text().splitlines() if line.startswith("- serving:"))
        text = serving_line + DESIGN.read_text().split(serving_line, 1)[1].split("\n\n")[0]
        assert set(re.findall(r"`(streamrec_[a-z_]+)", text)) == set(SERVING_METRICS)

    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, session):
            await get(session, "/recommendations", user_id="u1")
            async with session.get("/metrics") as response:
                assert response.status == 200 and response.content_type == "text/plain"
                families = {f.name: f for f in text_string_to_metric_families(await response.text())}
            for name in SERVING_METRICS:
                assert name in families, name
            assert families["streamrec_model_info"].samples[0].labels == {"version": "mf-1"}
            assert families["streamrec_freshness_seconds"].type == "histogram"
            routes = {s.labels["route"] for s in families["streamrec_request_seconds"].samples if s.value}
            assert "recommendations" in routes
    asyncio.run(body())


def test_every_response_comes_from_one_complete_version_while_deltas_apply(tmp_path):
    """Version s sets the global mean to 1000 s and every item bias to s, split in several parts:
    any item score of a complete version is 1001 s, so a half-applied version would show."""
    n_items, k = 20_000, 4
    item_ids = [f"i{j}" for j in range(n_items)]
    zero_users = ModelRows(["u1"], np.zeros((1, k)), np.zeros(1), np.zeros(1))

    def publish(seq):
        items = ModelRows(item_ids, np.zeros((n_items, k)), np.full(n_items, float(seq)), np.zeros(n_items))
        return [(key.encode(), orjson.dumps(value))
                for key, value in delta_messages("mf", seq, 1000.0 * seq, 0.0, zero_users, items, max_rows=4000)]

    async def body():
        async with replica(tmp_path) as (app, session):
            await app.updater.process(publish(1))
            stop = asyncio.Event()
            checked = []

            async def client(user):
                while not stop.is_set():
                    status, data = await get(session, "/recommendations", user_id=user, k="20")
                    assert status == 200
                    seq = int(data["model_version"].split("-")[1])
                    assert {it["score"] for it in data["items"]} == {1001.0 * seq}, data["model_version"]
                    async with session.post("/predict", json={"user_id": user, "item_ids": item_ids[:50]}) as r:
                        predicted = await r.json()
                    seq = int(predicted["model_version"].split("-")[1])
                    assert {it["score"] for it in predicted["items"]} == {1001.0 * seq}
                    checked.append(seq)

            clients = [asyncio.create_task(client(user)) for user in ("u1", "u1", "stranger", "u1")]
            for seq in range(2, 17):
                records = publish(seq)
                # parts arrive in separate fetches: nothing may change before the last one
                await app.updater.process(records[:-1])
                assert app.live.current.seq == seq - 1
                await asyncio.sleep(0.01)
                await app.updater.process(records[-1:])
                assert app.live.current.seq == seq
                await asyncio.sleep(0.03)
            stop.set()
            await asyncio.gather(*clients)
            assert len(set(checked)) >= 3 and len(checked) >= 20
    asyncio.run(body())


@pytest.mark.parametrize("retrieval", ["exact", "ivf"])
def test_rating_scores_stay_inside_the_rating_range_and_rank_by_the_unclipped_logit(tmp_path, retrieval):
    """Dot products of 8 standard normals put most raw ratings outside (1, 5): every returned
    score is clipped, and a slate is still ordered by the unclipped rating (no tie at 5)."""
    users, items = model_rows()
    assembler = DeltaAssembler()
    model = ServingModel.empty("mf", 8).apply([d for _, v in delta_messages("mf", 1, 3.5, -1.0, users, items,
                                                                              rating_range=(1, 5))
                                               if (d := assembler.add(v))])
    if retrieval == "ivf":
        model = model.with_index(IndexSettings(min_items=1, probe=64))  # probes every cluster
        assert model.index is not None
    logits = replace(model, rating_range=None).predict("u3", items.ids, "rating")
    assert logits.max() > 6 and logits.min() < 0

    async def body():
        async with replica(tmp_path, model) as (_, session):
            _, data = await get(session, "/recommendations", user_id="u3", k="20")
            chosen = [items.ids.index(it["item_id"]) for it in data["items"]]
            assert chosen == np.argsort(-logits, kind="stable")[:20].tolist()
            scores = [it["score"] for it in data["items"]]
            assert scores[:2] == [5.0, 5.0] and logits[chosen[1]] > 5  # the clip bites at the top
            np.testing.assert_allclose(scores, np.clip(logits[chosen], 1, 5), rtol=1e-6)
            for params in ({"policy": "epsilon_greedy", "epsilon": "1"}, {"policy": "softmax"},
                           {"user_id": "newcomer"}):
                status, data = await get(session, "/recommendations", **{"user_id": "u3", "k": "50", **params})
                assert status == 200 and all(1 <= it["score"] <= 5 for it in data["items"]), params
            async with session.post("/predict", json={"user_id": "u3", "item_ids": items.ids}) as response:
                predicted = [it["score"] for it in (await response.json())["items"]]
            assert (min(predicted), max(predicted)) == (1.0, 5.0)
    asyncio.run(body())
