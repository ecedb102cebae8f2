"""Serving's pure parts: the copy-on-write model, the monitor (served RMSE, drift), the shadow
check and the request validation. No broker, no HTTP."""
from __future__ import annotations

import doctest
import importlib
import json
from dataclasses import replace

import numpy as np
import pytest

from learner.updates import (Delta, DeltaAssembler, ModelRows, SnapshotError, delta_messages, read_snapshot,
                             write_snapshot)
from serving.api import BadRequest, parse_predict_body, parse_recommendation_query
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel, sigmoid
from serving.monitor import Monitor
from serving.popularity import Popularity
from serving.seen import SeenItems
from serving.shadow import Outcome, shadow_check
from serving.table import RowTable

MODULES = ["table", "model", "policies", "live", "seen", "popularity", "drift", "shadow", "monitor", "api"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"serving.{name}")
    result = doctest.testmod(module)
    assert result.failed == 0


def rows(ids, k, rng, scale=1.0):
    n = len(ids)
    return ModelRows(list(ids), rng.normal(size=(n, k)) * scale, rng.normal(size=n) * 0.1, rng.normal(size=n) * 0.1)


def delta(seq, users, items, mean=3.5, intercept=-1.0, max_event_ts=None):
    return Delta("mf", seq, f"mf-{seq}", mean, intercept, users, items, 1000.0 + seq, max_event_ts)


def reference_scores(state: dict, user: str, items: list[str], kind: str, mean: float, intercept: float):
    """Scores straight from PUBLISHING.md's equations, from plain dicts of rows."""
    u = state["users"].get(user)
    out = []
    for item in items:
        i = state["items"].get(item)
        uv, ub, uc = u if u is not None else (0, 0.0, 0.0)
        iv, ib, ic = i if i is not None else (0, 0.0, 0.0)
        dot = float(np.dot(uv, iv)) if u is not None and i is not None else 0.0
        out.append(mean + ub + ib + dot if kind == "rating" else float(sigmoid(intercept + uc + ic + dot)))
    return np.array(out)


def test_deltas_build_new_versions_and_leave_old_ones_untouched():
    rng = np.random.default_rng(0)
    k = 4
    state = {"users": {}, "items": {}}
    model = ServingModel.empty("mf", k)
    versions = []
    for seq in range(1, 30):
        users = rows([f"u{j}" for j in rng.choice(10_000, 50)], k, rng)
        items = rows([f"i{j}" for j in rng.choice(300, 20)], k, rng)
        model = model.apply([delta(seq, users, items)])
        for side, r in (("users", users), ("items", items)):
            for j, item_id in enumerate(r.ids):
                state[side][item_id] = (r.vectors[j].astype(np.float32), float(np.float32(r.biases[j])),
                                        float(np.float32(r.click_biases[j])))
        versions.append((model, {side: dict(v) for side, v in state.items()}))
    probe_items = [f"i{j}" for j in range(0, 310, 7)]
    for model, snapshot_of_state in versions[::5]:  # old versions answer exactly as when they were built
        for user in list(snapshot_of_state["users"])[:5] + ["stranger"]:
            for kind in ("rating", "click"):
                np.testing.assert_allclose(model.predict(user, probe_items, kind),
                                           reference_scores(snapshot_of_state, user, probe_items, kind, 3.5, -1.0),
                                           rtol=1e-5, atol=1e-5)
    assert versions[-1][0].version == "mf-29" and versions[-1][0].seq == 29


def test_a_delta_copies_only_the_user_chunks_it_writes():
    rng = np.random.default_rng(1)
    users = rows([f"u{j}" for j in range(20_000)], 8, rng)
    base = ServingModel.empty("mf", 8).apply([delta(1, users, rows(["a"], 8, rng))])
    after = base.apply([delta(2, rows(["u5", "u19999"], 8, rng), ModelRows.empty(8))])
    shared = sum(a is b for a, b in zip(base.users.chunks, after.users.chunks))
    assert shared == len(base.users.chunks) - 2
    assert after.items is base.items  # no item row changed: the item matrix is the same object


def test_several_deltas_merge_into_one_build_where_the_newest_row_wins():
    rng = np.random.default_rng(2)
    first = rows(["a", "b"], 3, rng)
    second = ModelRows(["b"], np.full((1, 3), 9.0), np.ones(1), np.zeros(1))
    model = ServingModel.empty("mf", 3).apply([delta(1, ModelRows.empty(3), first),
                                               delta(2, ModelRows.empty(3), second)])
    assert model.version == "mf-2" and len(model.items) == 2
    assert model.items.vector(model.items.row("b"))[:4].tolist() == [9.0, 9.0, 9.0, 1.0]


def test_deltas_that_cannot_apply_are_refused():
    rng = np.random.default_rng(3)
    model = ServingModel.empty("mf", 3).apply([delta(1, rows(["u"], 3, rng), rows(["a"], 3, rng))])
    bad = rows(["a"], 3, rng)
    bad.vectors[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.apply([delta(2, ModelRows.empty(3), bad)])
    with pytest.raises(ValueError, match="factors"):
        model.apply([delta(2, ModelRows.empty(5), rows(["a"], 5, rng))])
    with pytest.raises(ValueError, match="model"):
        model.apply([replace(delta(2, ModelRows.empty(3), rows(["a"], 3, rng)), model="other")])


def test_building_from_an_older_version_does_not_disturb_the_newer_ones():
    rng = np.random.default_rng(4)
    t1 = RowTable.from_rows(rows(["a", "b"], 2, rng), None)
    t2 = t1.with_rows(rows(["c"], 2, rng))
    fork = t1.with_rows(rows(["d"], 2, rng))  # t1 is no longer the newest of its lineage
    assert (t2.row("c"), t2.row("d"), fork.row("c"), fork.row("d")) == (2, -1, -1, 2)
    assert t2.id_of(2) == "c" and fork.id_of(2) == "d"


def test_snapshot_and_delta_paths_give_the_same_model(tmp_path):
    rng = np.random.default_rng(5)
    users, items = rows([f"u{j}" for j in range(50)], 6, rng), rows([f"i{j}" for j in range(80)], 6, rng)
    write_snapshot(tmp_path, "mf", 7, 3.2, -1.5, users, items)
    from_snapshot = ServingModel.from_snapshot(read_snapshot(tmp_path / "mf" / "mf-7"))
    assembler = DeltaAssembler()
    parts = [assembler.add(v) for _, v in delta_messages("mf", 7, 3.2, -1.5, users, items, max_rows=30)]
    from_deltas = ServingModel.empty("mf", 6).apply([parts[-1]])
    probe = [f"i{j}" for j in range(0, 90, 3)]
    for user in ("u0", "u49", "nobody"):
        for kind in ("rating", "click"):
            np.testing.assert_allclose(from_snapshot.predict(user, probe, kind), from_deltas.predict(user, probe, kind),
                                       rtol=1e-6)


def test_an_unfinished_publish_is_dropped_once_a_later_one_completes():
    rng = np.random.default_rng(8)
    users, items = rows([f"u{j}" for j in range(40)], 4, rng), rows([f"i{j}" for j in range(40)], 4, rng)
    assembler = DeltaAssembler()
    unfinished = delta_messages("mf", 3, 3.0, -1.0, users, items, max_rows=20)
    assert assembler.add(unfinished[0][1]) is None and len(assembler) == 1  # its learner stopped here
    other_model = delta_messages("bpr", 2, 3.0, -1.0, users, items, max_rows=20)
    assert assembler.add(other_model[0][1]) is None and len(assembler) == 2
    done = [assembler.add(v) for _, v in delta_messages("mf", 4, 3.0, -1.0, users, items, max_rows=20)]
    assert done[-1] is not None and done[-1].seq == 4
    assert len(assembler) == 1  # mf-3's part is gone; the other model's publish is still awaited
    assert assembler.add(other_model[1][1]) is None and len(assembler) == 1


def test_serving_scores_equal_the_learners_predictions():
    """The contract end to end: rows exported by OnlineMF score the same in serving."""
    pytest.importorskip("torch")
    from learner.online_mf import OnlineMF

    rng = np.random.default_rng(6)
    mf = OnlineMF(n_factors=8, device="cpu", seed=0)
    users = [f"u{j}" for j in rng.integers(0, 40, 600)]
    items = [f"i{j}" for j in rng.integers(0, 60, 600)]
    mf.learn_batch(users, items, rng.integers(1, 6, 600).astype(float), kind="rating")
    mf.learn_batch(users[:300], items[:300], rng.integers(0, 2, 300).astype(float), kind="click",
                   positions=[1] * 300, propensities=[1.0] * 300)
    user_rows, item_rows = mf.export_rows(None, None)
    served = ServingModel.empty("mf", 8).apply([Delta("mf", 1, "mf-1", mf.global_mean, mf.click_intercept,
                                                      user_rows, item_rows, 0.0, None)])
    probe_users = ["u1", "u7", "stranger", "u1"]
    probe_items = ["i3", "i59", "i2", "unknown"]
    for kind in ("rating", "click"):
        expected = mf.predict(probe_users, probe_items, kind=kind)
        got = [served.predict(u, [i], kind)[0] for u, i in zip(probe_users, probe_items)]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# -- monitor -------------------------------------------------------------------------------------

def make_monitor(window=1000, history=4):
    metrics = ServingMetrics()
    live = LiveModel(history, metrics)
    monitor = Monitor(live, metrics, SeenItems(), Popularity(), rmse_window=window, drift_window=window,
                      drift_every_s=3600.0)
    return monitor, live, metrics


def gauge(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def test_served_rmse_uses_the_version_that_served_the_outcome():
    monitor, live, metrics = make_monitor()
    good = ServingModel.empty("mf", 1).apply([delta(1, ModelRows.empty(1),
                                                    ModelRows(["a"], np.zeros((1, 1)), np.array([0.5]), np.zeros(1)),
                                                    mean=3.5)])
    bad = good.apply([delta(2, ModelRows.empty(1),
                            ModelRows(["a"], np.zeros((1, 1)), np.array([-2.0]), np.zeros(1)), mean=3.5)])
    live.swap(good, now=100.0)
    live.swap(bad, now=200.0)
    example = {"user_id": "u", "item_id": "a", "label": 4.0, "kind": "rating", "model_version": "mf-1",
               "ts": 150.0, "anomalous": False, "request_id": "r", "position": 1, "propensity": 1.0, "weight": 1.0}
    monitor.observe([example])  # served by mf-1: prediction 4.0, error 0
    assert gauge(metrics, "streamrec_served_rmse", kind="rating") == pytest.approx(0.0)
    monitor.observe([{**example, "model_version": None, "ts": 150.0}])  # live at ts=150: mf-1 again
    assert gauge(metrics, "streamrec_served_rmse", kind="rating") == pytest.approx(0.0)
    monitor.observe([{**example, "model_version": None, "ts": 250.0}])  # live at 250: mf-2, error 2.5
    assert gauge(metrics, "streamrec_served_rmse", kind="rating") == pytest.approx(np.sqrt(2.5 ** 2 / 3))
    monitor.observe([{**example, "anomalous": True}, {"user_id": 5}, "not an example"])
    counts = {r: gauge(metrics, "streamrec_serving_examples_total", result=r)
              for r in ("served_version", "event_time", "anomalous", "invalid")}
    assert counts == {"served_version": 1, "event_time": 2, "anomalous": 1, "invalid": 2}


def test_click_rmse_is_the_error_of_the_click_probability():
    monitor, live, metrics = make_monitor()
    model = ServingModel.empty("mf", 1).apply([delta(1, ModelRows.empty(1), ModelRows.empty(1), intercept=0.0)])
    live.swap(model)
    clicks = [{"user_id": "u", "item_id": "a", "label": label, "kind": "click", "model_version": "mf-1",
               "ts": 0.0, "anomalous": False} for label in (1.0, 0.0, 0.0, 0.0)]
    monitor.observe(clicks)  # p = sigmoid(0) = 0.5 for all: every error is 0.5
    assert gauge(metrics, "streamrec_served_rmse", kind="click") == pytest.approx(0.5)


STARS = np.array([1.0, 2.0, 3.0, 4.0, 5.0])


def rating_stream(n, rng, item_shift=0, bot_share=0.0, stars=(0.05, 0.1, 0.25, 0.35, 0.25)):
    """Ratings (each one an interaction, so every drift window counts the same observations)."""
    users = [f"u{u}" for u in rng.zipf(1.3, n) % 5000]
    for j in np.flatnonzero(rng.random(n) < bot_share):
        users[j] = f"bot{j % 3}"
    items = (rng.zipf(1.3, n) + item_shift) % 400
    labels = rng.choice(STARS, n, p=stars)
    return [{"user_id": u, "item_id": f"i{i}", "label": y, "kind": "rating", "ts": 0.0, "model_version": None,
             "anomalous": False} for u, i, y in zip(users, items, labels)]


SIGNALS = ("score", "item_popularity", "user_activity", "label_rate")


def test_psi_stays_below_0_1_on_a_stationary_stream():
    rng = np.random.default_rng(8)
    window = 2000
    monitor, _, metrics = make_monitor(window)
    for _ in range(3):
        monitor.observe(rating_stream(window, rng))
        monitor.observe_served(rng.normal(3.5, 0.5, window))
    monitor.refresh_drift()
    for signal in SIGNALS:
        assert gauge(metrics, "streamrec_drift_psi", signal=signal) < 0.1, signal
        assert gauge(metrics, "streamrec_drift_ks", signal=signal) < 0.1, signal


def test_psi_rises_above_0_2_on_a_shifted_stream():
    rng = np.random.default_rng(9)
    window = 2000
    monitor, _, metrics = make_monitor(window)
    monitor.observe(rating_stream(window, rng))
    monitor.observe_served(rng.normal(3.5, 0.5, window))
    # The world moves: other items get popular, three users produce a third of the traffic,
    # ratings get worse, and the served scores drop.
    monitor.observe(rating_stream(window, rng, item_shift=37, bot_share=0.33, stars=(0.25, 0.3, 0.25, 0.1, 0.1)))
    monitor.observe_served(rng.normal(3.0, 0.5, window))
    monitor.refresh_drift()
    for signal in SIGNALS:
        assert gauge(metrics, "streamrec_drift_psi", signal=signal) > 0.2, signal
        assert gauge(metrics, "streamrec_drift_ks", signal=signal) > 0.1, signal


def test_a_falling_click_rate_is_label_drift():
    rng = np.random.default_rng(10)
    monitor, _, metrics = make_monitor(2000)
    for rate in (0.3, 0.1):
        monitor.observe([{"user_id": f"u{j}", "item_id": f"i{j % 50}", "label": float(y), "kind": "click",
                          "ts": 0.0, "anomalous": False} for j, y in enumerate(rng.random(2000) < rate)])
    monitor.refresh_drift()
    assert gauge(metrics, "streamrec_drift_psi", signal="label_rate") > 0.2
    assert gauge(metrics, "streamrec_drift_ks", signal="label_rate") == pytest.approx(0.2, abs=0.05)


def test_seen_items_and_popularity_come_from_interactions():
    monitor, live, _ = make_monitor()
    monitor.observe([
        {"user_id": "u", "item_id": "a", "label": 1.0, "kind": "click", "ts": 0.0, "anomalous": False},
        {"user_id": "u", "item_id": "b", "label": 0.0, "kind": "click", "ts": 0.0, "anomalous": False},
        {"user_id": "u", "item_id": "c", "label": 2.0, "kind": "rating", "ts": 0.0, "anomalous": False},
        {"user_id": "bot", "item_id": "d", "label": 1.0, "kind": "click", "ts": 0.0, "anomalous": True},
    ])
    assert monitor.seen.get("u") == ["a", "c"]
    assert monitor.seen.get("bot") == ["d"]
    assert set(monitor.popularity.counts()) == {"a", "c"}  # the anomalous click does not count
    assert [(o.item_id, o.label) for o in monitor.recent_outcomes()] == [("a", 1.0), ("b", 0.0), ("c", 2.0)]


def test_shadow_check_refuses_a_worse_candidate_and_promotes_a_comparable_one():
    rng = np.random.default_rng(9)
    k = 4
    users, items = rows([f"u{j}" for j in range(30)], k, rng), rows([f"i{j}" for j in range(40)], k, rng)
    live = ServingModel.empty("mf", k).apply([delta(1, users, items, mean=3.0)])
    outcomes = []
    for _ in range(400):
        u, i = f"u{rng.integers(30)}", f"i{rng.integers(40)}"
        outcomes.append(Outcome(u, i, float(live.predict(u, [i], "rating")[0] + rng.normal(0, 0.3)), "rating"))
    nudged = ModelRows(items.ids, items.vectors + rng.normal(0, 0.02, items.vectors.shape), items.biases,
                       items.click_biases)
    similar = live.apply([delta(2, ModelRows.empty(k), nudged, mean=3.0)])
    scrambled = live.apply([delta(2, rows([f"u{j}" for j in range(30)], k, rng, scale=2.0), ModelRows.empty(k),
                                  mean=3.0)])
    assert shadow_check(live, similar, outcomes, tolerance=0.2).promote
    verdict = shadow_check(live, scrambled, outcomes, tolerance=0.2)
    assert not verdict.promote and "rating RMSE" in verdict.reason
    assert shadow_check(live, scrambled, outcomes[:10], min_outcomes=100).promote  # too little evidence


# -- request validation --------------------------------------------------------------------------

@pytest.mark.parametrize("query, message", [
    ({}, "user_id is required"),
    ({"user_id": ""}, "user_id must not be empty"),
    ({"user_id": "u" * 257}, "257 characters"),
    ({"user_id": "u", "k": "101"}, "k must be an integer in 1..100"),
    ({"user_id": "u", "k": "ten"}, "k must be an integer"),
    ({"user_id": "u", "policy": "random"}, "policy must be one of greedy, epsilon_greedy, softmax"),
    ({"user_id": "u", "exclude_seen": "maybe"}, "exclude_seen must be true or false"),
    ({"user_id": "u", "epsilon": "1.5"}, "epsilon must be a number in 0..1"),
    ({"user_id": "u", "epsilon": "nan"}, "epsilon must be a number"),
    ({"user_id": "u", "temperature": "0"}, "temperature must be a number in 0.01..100"),
    ({"user_id": "u", "limit": "3"}, "unknown parameter(s) 'limit'"),
])
def test_bad_recommendation_queries_say_what_is_wrong(query, message):
    with pytest.raises(BadRequest) as err:
        parse_recommendation_query(query)
    assert message in str(err.value)


@pytest.mark.parametrize("body, message", [
    (b"{", "must be a JSON object"),
    (b"[1]", "must be a JSON object"),
    (b'{"user_id": "u"}', "item_ids must be a list of 1..1000"),
    (b'{"user_id": "u", "item_ids": []}', "item_ids must be a list of 1..1000"),
    (b'{"user_id": "u", "item_ids": ["a", 3]}', "item_ids[1] must be a string"),
    (b'{"user_id": 7, "item_ids": ["a"]}', "user_id must be a string"),
    (b'{"user_id": "u", "item_ids": ["a"], "kind": "views"}', "kind must be one of rating, click"),
    (b'{"user_id": "u", "item_ids": ["a"], "extra": 1}', "unknown field(s) 'extra'"),
])
def test_bad_predict_bodies_say_what_is_wrong(body, message):
    with pytest.raises(BadRequest) as err:
        parse_predict_body(body)
    assert message in str(err.value)


def test_cli_flags_override_the_environment_and_bad_values_are_refused(monkeypatch):
    import argparse

    from serving.cli import add_parser, settings_from_args

    monkeypatch.setenv("STREAMREC_SERVE_PORT", "9999")
    monkeypatch.setenv("STREAMREC_SERVE_EPSILON", "0.3")
    parser = argparse.ArgumentParser(prog="streamrec")
    add_parser(parser.add_subparsers(dest="command"))
    settings = settings_from_args(parser.parse_args(["serve", "--kind", "click", "--history", "3"]))
    assert (settings.port, settings.epsilon, settings.kind, settings.history, settings.host) == \
        (9999, 0.3, "click", 3, "127.0.0.1")
    with pytest.raises(SystemExit, match="epsilon must be in"):
        settings_from_args(parser.parse_args(["serve", "--epsilon", "2"]))


def test_the_scorer_batches_concurrent_requests_and_keeps_versions_apart():
    import asyncio
    from functools import partial

    from serving import scorer as scorer_module
    from serving.policies import greedy
    from serving.scorer import BatchScorer

    rng = np.random.default_rng(11)
    old, new = (rng.normal(size=(500, 6)).astype(np.float32) for _ in range(2))
    queries = rng.normal(size=(12, 6)).astype(np.float32)
    sizes = []
    run_batch = scorer_module._run_batch

    def counting(batch):
        sizes.append(len(batch))
        return run_batch(batch)

    async def body():
        scorer = BatchScorer()
        jobs = [scorer.rank(old if j % 2 else new, queries[j], 1.0, np.array([0, 1]), partial(greedy, k=3))
                for j in range(12)]
        jobs.append(scorer.rank(old, None, 0.0, np.zeros(0, np.int64), partial(greedy, k=2),
                                base=np.arange(500, dtype=np.float32)))
        jobs.append(scorer.rank(old, queries[0], 0.0, np.zeros(0, np.int64), lambda s: 1 / 0))
        jobs.append(scorer.rank(old, queries[0][:3], 0.0, np.zeros(0, np.int64), partial(greedy, k=3)))
        return await asyncio.gather(*jobs, return_exceptions=True)

    scorer_module._run_batch = counting
    try:
        results = asyncio.run(body())
    finally:
        scorer_module._run_batch = run_batch
    assert sum(sizes) == 15 and len(sizes) < 15
    for j in range(12):
        scores = (old if j % 2 else new) @ queries[j] + 1.0
        scores[[0, 1]] = -np.inf
        slate, chosen = results[j]
        assert slate.indices.tolist() == np.argsort(-scores)[:3].tolist()
        np.testing.assert_allclose(chosen, scores[slate.indices], rtol=1e-6)
    assert results[12][0].indices.tolist() == [499, 498]
    assert isinstance(results[13], ZeroDivisionError)
    assert isinstance(results[14], ValueError)  # a query of the wrong length fails its own request only


# -- the rating range ----------------------------------------------------------------------------

def test_snapshots_and_deltas_carry_the_rating_range(tmp_path):
    rng = np.random.default_rng(12)
    users, items = rows([f"u{j}" for j in range(5)], 3, rng), rows([f"i{j}" for j in range(7)], 3, rng)
    manifest = write_snapshot(tmp_path, "mf", 1, 3.0, -1.0, users, items, rating_range=(1, 5))
    assert manifest["rating_range"] == [1.0, 5.0]
    snapshot = read_snapshot(tmp_path / "mf" / "mf-1")
    assert snapshot.rating_range == (1.0, 5.0)
    model = ServingModel.from_snapshot(snapshot)
    assert model.rating_range == (1.0, 5.0)
    assembler = DeltaAssembler()  # deltas travel as JSON, in parts
    parts = [json.loads(json.dumps(v)) for _, v in delta_messages("mf", 2, 3.0, -1.0, users, items,
                                                                   rating_range=(0.5, 10), max_rows=4)]
    delta = [assembler.add(v) for v in parts][-1]
    assert delta.rating_range == (0.5, 10.0) and model.apply([delta]).rating_range == (0.5, 10.0)
    # like the global mean, the range is the newest publish's: one without a range lifts it
    unbounded = [assembler.add(v) for _, v in delta_messages("mf", 3, 3.0, -1.0, users, items)][-1]
    assert unbounded.rating_range is None and model.apply([unbounded]).rating_range is None


def test_a_snapshot_or_delta_without_the_rating_range_field_has_no_range(tmp_path):
    """What a learner of an earlier release wrote still loads, and scores ratings unclipped."""
    rng = np.random.default_rng(13)
    users, items = rows(["u"], 2, rng, scale=10.0), rows(["a"], 2, rng, scale=10.0)
    write_snapshot(tmp_path, "mf", 1, 3.0, -1.0, users, items)
    path = tmp_path / "mf" / "mf-1" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["rating_range"] is None
    del manifest["rating_range"]
    path.write_text(json.dumps(manifest))
    snapshot = read_snapshot(path.parent)
    assert snapshot.rating_range is None and ServingModel.from_snapshot(snapshot).rating_range is None
    assembler = DeltaAssembler()
    for _, value in delta_messages("mf", 2, 3.0, -1.0, users, items):
        del value["rating_range"]
        delta = assembler.add(value)
    assert delta.rating_range is None
    model = ServingModel.empty("mf", 2).apply([delta])
    expected = 3.0 + users.biases[0] + items.biases[0] + users.vectors[0] @ items.vectors[0]
    np.testing.assert_allclose(model.predict("u", ["a"], "rating"), [expected], rtol=1e-5)


@pytest.mark.parametrize("bad", [[5, 1], [1, 1], [1], [1, 2, 3], "1,5", {"low": 1}, [1, float("inf")], [True, 5]])
def test_a_malformed_rating_range_is_refused(tmp_path, bad):
    rng = np.random.default_rng(14)
    users, items = rows(["u"], 2, rng), rows(["a"], 2, rng)
    write_snapshot(tmp_path, "mf", 1, 3.0, -1.0, users, items)
    path = tmp_path / "mf" / "mf-1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rating_range": bad}))
    with pytest.raises(SnapshotError, match="rating_range"):
        read_snapshot(path.parent)
    (_, first), (_, last) = delta_messages("mf", 2, 3.0, -1.0, users, items)  # users, then items
    assembler = DeltaAssembler()
    assert assembler.add(json.loads(json.dumps({**first, "rating_range": bad}))) is None
    with pytest.raises(ValueError, match="rating_range"):
        assembler.add(json.loads(json.dumps({**last, "rating_range": bad})))


def test_served_rating_rmse_equals_the_learners_for_the_same_model_and_examples(tmp_path):
    """OnlineMF with rating_range=(1, 5) whose raw ratings leave the range: its snapshot, loaded
    in serving, predicts the learner's clipped scores, so the served RMSE equals the learner's."""
    pytest.importorskip("torch")
    from learner.online_mf import OnlineMF

    rng = np.random.default_rng(15)
    mf = OnlineMF(n_factors=4, rating_range=(1, 5), device="cpu", seed=0)
    # Additive user and item effects of +-2 around 3, learned from pairs that never combine two
    # extremes: a generous user (g) on a hit then scores about 7, a harsh one (h) on a flop about -1.
    plan = [("g", "avg", 5.0), ("m", "hit", 5.0), ("m", "avg", 3.0), ("m", "flop", 1.0), ("h", "avg", 1.0)]
    train = [plan[j % len(plan)] for j in range(1000)]
    users = [f"{u}{rng.integers(5)}" for u, _, _ in train]
    items = [f"{i}{rng.integers(5)}" for _, i, _ in train]
    for start in range(0, 1000, 100):
        batch = slice(start, start + 100)
        mf.learn_batch(users[batch], items[batch], [y for _, _, y in train[batch]])
    user_rows, item_rows = mf.export_rows(None, None)
    write_snapshot(tmp_path, "mf", 1, mf.global_mean, mf.click_intercept, user_rows, item_rows,
                   rating_range=mf.rating_range)
    served = ServingModel.from_snapshot(read_snapshot(tmp_path / "mf" / "mf-1"))

    probe_users = [f"{g}{j}" for g, j in zip(rng.choice(["g", "m", "h"], 300), rng.integers(0, 5, 300))]
    probe_items = [f"{g}{j}" for g, j in zip(rng.choice(["hit", "avg", "flop"], 300), rng.integers(0, 5, 300))]
    labels = rng.integers(1, 6, 300).astype(float)
    learner_rmse = np.sqrt(np.mean((mf.predict(probe_users, probe_items, kind="rating") - labels) ** 2))
    raw = replace(served, rating_range=None).predict_rows(served.users.rows(probe_users),
                                                          served.items.rows(probe_items), "rating")
    assert raw.max() > 6 and raw.min() < 0  # the clip matters here, and
    assert abs(np.sqrt(np.mean((raw - labels) ** 2)) - learner_rmse) > 0.1  # so unclipped RMSE would differ

    monitor, live, metrics = make_monitor()
    live.swap(served)
    monitor.observe([{"user_id": u, "item_id": i, "label": y, "kind": "rating", "model_version": "mf-1",
                      "ts": 0.0, "anomalous": False} for u, i, y in zip(probe_users, probe_items, labels)])
    assert gauge(metrics, "streamrec_served_rmse", kind="rating") == pytest.approx(learner_rmse, rel=1e-5)
    np.testing.assert_allclose(served.predict("g0", ["hit0", "avg0"], "rating"),
                               mf.predict(["g0", "g0"], ["hit0", "avg0"], kind="rating"), rtol=1e-5)
