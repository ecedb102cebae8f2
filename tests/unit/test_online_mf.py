"""OnlineMF: learns planted structure online, scores before it trains, corrects display bias,
round-trips checkpoints, rejects bad examples, and runs the same on CPU and CUDA."""
from __future__ import annotations

import doctest
import importlib
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from learner import OnlineMF
from stream.events import encode
from stream.examples import CLICKED, CLOSED, example_rows
from stream.files import sha256_file
from stream.worker.pipeline import IngestPipeline, Record
from sim.tastes import TASTE_A, TASTE_B, taste_fans, taste_slates

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def ids(prefix: str, rows: np.ndarray) -> np.ndarray:
    return np.array([f"{prefix}{r}" for r in rows], dtype=object)


def planted_ratings(seed: int, n_users: int = 300, n_items: int = 200, rank: int = 4):
    """A rank-``rank`` rating matrix plus biases around 3; returns the noise-free truth."""
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 0.6, (n_users, rank))
    q = rng.normal(0, 0.6, (n_items, rank))
    return 3.0 + rng.normal(0, 0.4, (n_users, 1)) + rng.normal(0, 0.4, (1, n_items)) + p @ q.T


def stream(model: OnlineMF, users, items, labels, batch: int) -> np.ndarray:
    return np.concatenate([
        model.learn_batch(users[s:s + batch], items[s:s + batch], labels[s:s + batch])
        for s in range(0, len(labels), batch)
    ])


def top_items(model: OnlineMF, user: str, k: int, kind: str | None = None) -> list[str]:
    """The ``k`` items with the best scores for ``user`` among every item the model knows, best
    first (what serving ranks by, without its seen-items filter)."""
    scores = model.predict([user] * len(model.items), model.items.ids, kind=kind)
    return [model.items.ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def bursty_stream(seed: int, n: int = 3_000):
    """Ratings arriving in per-user sessions, as in MovieLens: long runs of one user."""
    rng = np.random.default_rng(seed)
    truth = planted_ratings(seed, 60, 80)
    users = np.repeat(rng.integers(0, 60, n // 30), 30)
    items = rng.integers(0, 80, n)
    labels = np.clip(np.round(truth[users, items] + rng.normal(0, 0.3, n)), 1, 5)
    return ids("u", users), ids("i", items), labels


# ------------------------------------------------------------------ learning


def test_learns_planted_low_rank_ratings_with_ids_arriving_mid_stream():
    rng = np.random.default_rng(0)
    truth = planted_ratings(0)
    n_users, n_items = truth.shape
    # the first half of the stream only knows the first 200 users and 150 items
    first = (rng.integers(0, 200, 40_000), rng.integers(0, 150, 40_000))
    second = (rng.integers(0, n_users, 60_000), rng.integers(0, n_items, 60_000))
    u = np.concatenate([first[0], second[0]])
    i = np.concatenate([first[1], second[1]])
    y = truth[u, i] + rng.normal(0, 0.1, len(u))
    model = OnlineMF(n_factors=8, device="cpu")
    before = stream(model, ids("u", u), ids("i", i), y, batch=500)
    assert np.all(np.isfinite(before))

    grid_u, grid_i = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    predicted = model.predict(ids("u", grid_u.ravel()), ids("i", grid_i.ravel()))
    error = np.sqrt(np.mean((predicted - truth.ravel()) ** 2))
    late_error = np.sqrt(np.mean((before[-20_000:] - y[-20_000:]) ** 2))
    new_rows = (grid_u.ravel() >= 200) | (grid_i.ravel() >= 150)
    new_error = np.sqrt(np.mean((predicted[new_rows] - truth.ravel()[new_rows]) ** 2))
    spread = truth.std()
    assert error < 0.25 * spread, (error, spread)
    assert late_error < 0.3 * spread, (late_error, spread)
    assert new_error < 0.3 * spread, (new_error, spread)


def test_unseen_ids_score_with_the_prior():
    model = OnlineMF(n_factors=4, device="cpu", rating_range=(1, 5))
    assert model.predict(["nobody"], ["nothing"]).tolist() == [3.0]  # midpoint before any rating
    model.learn_batch(["a", "a", "b"], ["x", "y", "x"], [5.0, 4.0, 2.0])
    mean = model.global_mean
    user_bias = model.export_rows(["a"], [])[0].biases[0]
    item_bias = model.export_rows([], ["x"])[1].biases[0]
    scores = model.predict(["nobody", "a", "nobody"], ["nothing", "nothing", "x"])
    np.testing.assert_allclose(scores, [mean, mean + user_bias, mean + item_bias], atol=1e-6)
    assert user_bias != 0 and item_bias != 0
    assert len(model.users) == 2 and len(model.items) == 2  # predict never adds ids


def test_a_rating_bias_step_splits_into_a_level_and_a_decaying_part():
    """The first rating of a new user moves its level and its transient bias by the same step a;
    the transient part is then scaled by bias_decay, so the exported bias is a * (1 + decay)."""
    biases = {}
    for decay in (0.0, 0.5, 1.0):
        model = OnlineMF(n_factors=4, device="cpu", bias_decay=decay)
        model.learn_batch(["a", "b"], ["x", "x"], [3.0, 3.0])
        model.learn_batch(["new"], ["x"], [5.0])
        biases[decay] = model.export_rows(["new"], [])[0].biases[0]
        assert model.predict(["new"], ["x"])[0] == pytest.approx(
            model.global_mean + biases[decay] + model.export_rows([], ["x"])[1].biases[0]
            + model.export_rows(["new"], [])[0].vectors[0] @ model.export_rows([], ["x"])[1].vectors[0],
            abs=1e-5)
    assert biases[0.0] > 0.1
    assert biases[0.5] == pytest.approx(1.5 * biases[0.0], rel=1e-5)
    assert biases[1.0] == pytest.approx(2.0 * biases[0.0], rel=1e-5)


def test_the_transient_bias_fades_with_the_users_next_ratings():
    """After a run of fives, a user back at its usual rating returns to its level faster with a
    decaying transient bias than with a persistent one."""
    rng = np.random.default_rng(0)
    warm_users = ids("w", rng.integers(0, 30, 3_000))
    warm_items = ids("i", rng.integers(0, 40, 3_000))
    usual = ["3"] * 20 + ["5"] * 6 + ["3"] * 4
    after = {}
    for decay in (0.3, 1.0):
        model = OnlineMF(n_factors=4, device="cpu", bias_decay=decay, implicit_lr=0.0)
        model.learn_batch(warm_users, warm_items, np.full(3_000, 3.0))
        for j, label in enumerate(usual):
            model.learn_batch(["fan"], [f"i{j}"], [float(label)])
        after[decay] = model.predict(["fan"], ["i39"])[0]
    assert after[0.3] < after[1.0] - 0.1, after


def test_implicit_feedback_informs_a_new_users_taste():
    """Two groups of users rate their own set of items 3 and two probe sets 5 and 1, in opposite
    ways. A new user who rated only group A's set items (all 3: the ratings say nothing) is
    expected to like A's probes, which only the items it chose to rate can tell."""
    rng = np.random.default_rng(0)
    events = []
    for _ in range(2):
        for group, liked, disliked in (("A", "P", "Q"), ("B", "Q", "P")):
            for k in range(20):
                events += [(f"{group}{k}", f"set{group}{j}", 3.0) for j in range(10)]
                events += [(f"{group}{k}", f"{liked}{j}", 5.0) for j in range(10)]
                events += [(f"{group}{k}", f"{disliked}{j}", 1.0) for j in range(10)]
    users, items, labels = (np.array(column, dtype=object)
                            for column in zip(*(events[e] for e in rng.permutation(len(events)))))
    labels = labels.astype(float)
    probes = [f"P{j}" for j in range(10)] + [f"Q{j}" for j in range(10)]
    gap = {}
    for implicit_lr in (0.0, 0.02):
        model = OnlineMF(n_factors=8, device="cpu", rating_range=(1, 5), implicit_lr=implicit_lr)
        stream(model, users, items, labels, batch=50)
        model.learn_batch(["new"] * 10, [f"setA{j}" for j in range(10)], [3.0] * 10)
        scores = model.predict(["new"] * 20, probes)
        gap[implicit_lr] = scores[:10].mean() - scores[10:].mean()
    assert abs(gap[0.0]) < 0.5, gap
    assert gap[0.02] > 2.0, gap


def test_tables_grow_past_a_chunk_without_collisions():
    model = OnlineMF(n_factors=4, device="cpu")
    users = ids("user-", np.arange(10_000))
    model.learn_batch(users, ["only-item"] * len(users), np.arange(len(users)) % 5 + 1.0)
    assert len(model.users) == 10_000
    rows = model.users.lookup(users)
    assert np.array_equal(rows, np.arange(10_000))
    # each user's score follows its own rating: no row is shared (the first users of the batch
    # are left out: they were scored while the global mean was still settling)
    scores = model.predict(users, ["only-item"] * len(users))[100:]
    by_rating = [scores[r::5] for r in range(5)]
    assert all(low.max() < high.min() for low, high in zip(by_rating, by_rating[1:]))


# ------------------------------------------------------------------ prequential


def test_learn_batch_returns_scores_made_before_the_update():
    users, items, labels = bursty_stream(1)
    model = OnlineMF(n_factors=8, device="cpu")
    stream(model, users[:2_000], items[:2_000], labels[:2_000], batch=200)
    # one example per user, so nothing inside the batch can inform another example's score
    first = np.unique(users[2_000:], return_index=True)[1]
    u, i, y = users[2_000:][first], items[2_000:][first], labels[2_000:][first]
    # the global mean is the one thing that moves inside a batch: example j sees the labels before it
    n, total = model.n_examples["rating"], model.rating_sum
    mean_seen = (total + np.cumsum(y) - y) / (n + np.arange(len(y)))
    expected_before = model.predict(u, i) + (mean_seen - model.global_mean)
    returned = model.learn_batch(u, i, y)
    after = model.predict(u, i)
    np.testing.assert_allclose(returned, expected_before, rtol=0, atol=1e-5)
    assert np.abs(after - returned).max() > 1e-2  # post-update scores would fail the check above


def test_a_batch_scores_each_example_after_its_users_earlier_examples():
    """Within a batch, a user's k-th example sees the updates of the first k-1 (stream order):
    with distinct items, one batch gives exactly the scores of one-example batches."""
    users = np.array(["ann"] * 6 + ["bob"] * 4 + ["ann"] * 2, dtype=object)
    items = ids("i", np.arange(12))
    labels = np.array([5, 4, 5, 5, 4, 5, 1, 2, 1, 1, 4, 5], dtype=float)
    for compiled in (True, False):
        one_batch = OnlineMF(n_factors=4, device="cpu")
        one_batch._compiled_cpu_step = compiled
        one_by_one = OnlineMF(n_factors=4, device="cpu")
        one_by_one._compiled_cpu_step = compiled
        # same starting point: a few shared items trained first
        for m in (one_batch, one_by_one):
            m.learn_batch(["x", "y"], ["i0", "i1"], [3.0, 3.0])
        batched = one_batch.learn_batch(users, items, labels)
        sequential = np.concatenate([
            one_by_one.learn_batch(users[j:j + 1], items[j:j + 1], labels[j:j + 1])
            for j in range(len(labels))
        ])
        np.testing.assert_allclose(batched, sequential, rtol=0, atol=1e-5)
        assert batched[5] > batched[0]  # ann's scores rise as her fives come in


@pytest.mark.parametrize("settings", [
    {}, {"implicit_window": 4, "bias_decay": 0.5, "implicit_lr": 0.05},
])
def test_compiled_cpu_step_matches_the_torch_formulation(settings):
    """Same scores and same tables; the second case has users rating more items in a batch than
    their implicit window holds."""
    users, items, labels = bursty_stream(2)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, len(labels))
    scores, tables = [], []
    for compiled in (True, False):
        model = OnlineMF(n_factors=8, device="cpu", **settings)
        model._compiled_cpu_step = compiled
        batches = [slice(s, s + 256) for s in range(0, len(labels), 256)]
        scores.append(np.concatenate([
            model.learn_batch(users[b], items[b], labels[b], weights=weights[b]) for b in batches
        ]))
        tables.append({name: table.numpy().copy() for name, table in model.tables.items()})
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-4)
    assert tables[0].keys() == tables[1].keys()
    for name in tables[0]:
        np.testing.assert_allclose(tables[0][name], tables[1][name], rtol=1e-3, atol=1e-4, err_msg=name)
    assert np.abs(tables[0]["item_implicit"]).max() > 1e-3  # the implicit factors did learn


# ------------------------------------------------------------------ display bias


def simulate_slates(seed: int, n_users: int = 200, n_items: int = 20, slate: int = 10,
                    n_impressions: int = 10_000, temperature: float = 0.5):
    """Clicks under the position-based model: P(click) = exam(position) * relevance(user, item).
    The logging policy is Plackett-Luce on a fixed item score unrelated to relevance, so a few
    items hold the top positions; the logged propensity of an (item, position) is its Monte Carlo
    frequency under that policy."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(0, 1, (n_users, 4)), rng.normal(0, 1, (n_items, 4))
    relevance = 1 / (1 + np.exp(-(0.75 * p @ q.T + rng.normal(0, 1, n_items) - 1.0)))
    exam = 1.0 / np.arange(1, slate + 1)
    log_score = rng.normal(0, 1, n_items) / temperature

    def slates(n: int) -> np.ndarray:
        return np.argsort(-(log_score + rng.gumbel(size=(n, n_items))), axis=1)[:, :slate]

    frequent = slates(100_000)
    propensity = np.zeros((n_items, slate))
    slot = np.broadcast_to(np.arange(slate), frequent.shape)
    np.add.at(propensity, (frequent, slot), 1.0 / len(frequent))
    shown = slates(n_impressions)
    users = rng.integers(0, n_users, n_impressions)
    positions = np.broadcast_to(np.arange(1, slate + 1), shown.shape)
    clicks = rng.random(shown.shape) < exam * relevance[users[:, None], shown]
    return {
        "relevance": relevance, "exam": exam,
        "users": ids("u", np.repeat(users, slate)), "items": ids("i", shown.ravel()),
        "positions": positions.ravel(), "clicks": clicks.ravel().astype(float),
        "propensities": np.maximum(propensity[shown, positions - 1].ravel(), 1e-5),
    }


def ndcg_at_10(scores: np.ndarray, relevance: np.ndarray) -> float:
    discount = 1 / np.log2(np.arange(2, 12))
    ranked = np.take_along_axis(relevance, np.argsort(-scores, axis=1)[:, :10], axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :10]
    return float(((ranked * discount).sum(1) / (ideal * discount).sum(1)).mean())


def test_ips_correction_ranks_relevant_items_better_than_raw_clicks():
    sim = simulate_slates(0)
    n_users, n_items = sim["relevance"].shape
    grid_u = ids("u", np.repeat(np.arange(n_users), n_items))
    grid_i = ids("i", np.tile(np.arange(n_items), n_users))
    ndcg = {}
    for corrected in (False, True):
        model = OnlineMF(n_factors=8, device="cpu")
        for s in range(0, len(sim["clicks"]), 2_000):
            part = slice(s, s + 2_000)
            logged = {"positions": sim["positions"][part], "propensities": sim["propensities"][part]}
            model.learn_batch(sim["users"][part], sim["items"][part], sim["clicks"][part], kind="click",
                              **(logged if corrected else {}))
        scores = model.predict(grid_u, grid_i, kind="click").reshape(n_users, n_items)
        ndcg[corrected] = ndcg_at_10(scores, sim["relevance"])
        if corrected:
            curve = model.position_bias.examination(range(1, 11))
            assert np.max(np.abs(curve - sim["exam"])) <= 0.05, curve
    assert ndcg[True] >= ndcg[False] + 0.03, ndcg


def joined(events: list[dict], pipeline: IngestPipeline) -> list[dict]:
    """The labelled items of the click examples the worker's pipeline makes of ``events`` arriving
    one by one, a row each in message order (``example_rows``): a ``clicked`` positive when its
    click arrives, a slate's ``closed`` negatives when event time passes the end of its window."""
    messages = []
    for offset, event in enumerate(events):
        messages += pipeline.process([Record(encode(event), partition=0, offset=offset)]).examples
    joiner = pipeline.partition(0).joiner
    messages += joiner.advance(events[-1]["ts"] + 10 * joiner.window_s)
    assert {m.stage for m in messages} == {CLICKED, CLOSED}
    return example_rows(messages).to_pylist()


@pytest.mark.parametrize("batch", [1, 64, 512])
def test_clicks_tell_two_tastes_apart_and_follow_a_user_whose_taste_changed(batch):
    """Traffic spread over event time, joined as the worker joins it: the model separates fans of
    "a" items from fans of "b" items, and a fan of "a" who now clicks only "b" items is then
    recommended "b" items, after the negatives of those slates too."""
    rng = random.Random(0)
    pipeline = IngestPipeline(attribution_window_s=2)
    fans = taste_fans(30)
    warmup = joined(taste_slates([*fans, ("target", TASTE_A)], 15, rng, 0.0, every_s=0.02), pipeline)
    model = OnlineMF(n_factors=8, device="cpu")

    def learn(examples: list[dict]) -> None:
        for s in range(0, len(examples), batch):
            part = examples[s:s + batch]
            model.learn_batch([e["user_id"] for e in part], [e["item_id"] for e in part], [e["label"] for e in part],
                              kind="click", positions=[e["position"] for e in part],
                              propensities=[e["propensity"] for e in part])

    def share_b(user: str) -> float:
        return np.mean([item[0] == "b" for item in top_items(model, user, k=5)])

    learn(warmup)
    assert share_b("target") <= 0.2
    assert np.mean([share_b(user) for user, liked in fans if liked is TASTE_A]) <= 0.2
    assert np.mean([share_b(user) for user, liked in fans if liked is TASTE_B]) >= 0.8
    learn(joined(taste_slates([("target", TASTE_B)], 40, rng, 100.0, every_s=0.25), pipeline))
    assert share_b("target") >= 0.8


def test_propensities_become_clipped_self_normalised_weights():
    def trained(propensities: list[float], **settings) -> np.ndarray:
        model = OnlineMF(n_factors=4, device="cpu", **settings)
        model.learn_batch(["a", "b"], ["x", "y"], [1.0, 0.0], kind="click", propensities=propensities)
        return model.predict(["a", "b"], ["x", "y"], kind="click")

    # self-normalised: scaling every propensity by the same factor changes nothing
    np.testing.assert_allclose(trained([0.2, 0.4]), trained([0.1, 0.2]), atol=1e-7)
    # clipped: propensities below ips_clip all count as ips_clip
    raw = {"self_normalize": False, "ips_clip": 0.1}
    np.testing.assert_allclose(trained([0.01, 0.5], **raw), trained([0.001, 0.5], **raw), atol=1e-7)
    # and a rarely shown click counts more than a commonly shown one
    assert trained([0.1, 1.0], self_normalize=False)[0] > trained([1.0, 1.0], self_normalize=False)[0]


# ------------------------------------------------------------------ serving helpers


def test_scores_rank_items_for_known_and_unknown_users():
    """A user ranks an item it never rated among those it did; an unknown user ranks items by
    their biases (the prior)."""
    model = OnlineMF(n_factors=4, device="cpu")
    users = ["u1"] * 3 + ["u2"] * 3 + ["u3"] * 3
    items = ["good", "bad", "meh"] * 3
    model.learn_batch(users, items, [5.0, 1.0, 3.0] * 3)
    model.learn_batch(["u4", "u4"], ["good", "hidden"], [5.0, 4.0])
    assert top_items(model, "u1", k=2) == ["good", "hidden"]
    assert top_items(model, "stranger", k=4) == ["good", "hidden", "meh", "bad"]


def test_export_rows_agree_with_predict():
    """Serving scores bias plus dot product: the exported user rows fold in the implicit part and
    the bias level, for ratings and clicks alike."""
    users, items, labels = bursty_stream(3, n=600)
    model = OnlineMF(n_factors=8, device="cpu")
    stream(model, users, items, labels, batch=100)
    model.learn_batch(users[:100], items[:100], np.arange(100) % 2.0, kind="click")
    u_rows, i_rows = model.export_rows(["u1", "u5"], None)
    assert u_rows.ids == ["u1", "u5"] and i_rows.ids == model.items.ids
    row = model.users.lookup(["u1"])[0]
    assert np.abs(u_rows.vectors[0] - model.tables["user_factors"][row].numpy()).max() > 1e-3
    j = i_rows.ids.index(items[0])
    manual = (model.global_mean + u_rows.biases[0] + i_rows.biases[j]
              + u_rows.vectors[0] @ i_rows.vectors[j])
    assert model.predict(["u1"], [items[0]], kind="rating")[0] == pytest.approx(manual, abs=1e-5)
    logit = (model.click_intercept + u_rows.click_biases[0] + i_rows.click_biases[j]
             + u_rows.vectors[0] @ i_rows.vectors[j])
    click = model.predict(["u1"], [items[0]], kind="click")[0]
    assert click == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)
    with pytest.raises(ValueError, match="user ids"):
        model.export_rows(["nobody"], [])


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_gives_identical_predictions_and_resumes_exactly(tmp_path):
    users, items, labels = bursty_stream(4)
    model = OnlineMF(n_factors=8, device="cpu", rating_range=(1, 5))
    stream(model, users[:2_000], items[:2_000], labels[:2_000], batch=250)
    model.learn_batch(users[:300], items[:300], np.arange(300) % 2.0, kind="click",
                      positions=np.arange(300) % 5 + 1, propensities=np.full(300, 0.5))
    model.save(tmp_path / "ckpt")
    loaded = OnlineMF.load(tmp_path / "ckpt", device="cpu")
    for kind in ("rating", "click"):
        np.testing.assert_array_equal(loaded.predict(users, items, kind=kind),
                                      model.predict(users, items, kind=kind))
    assert top_items(loaded, "u3", k=5) == top_items(model, "u3", k=5)
    np.testing.assert_array_equal(loaded.position_bias.examination(), model.position_bias.examination())
    # training on after the load matches training on without it, new ids included
    rest = (np.append(users[2_000:], "brand-new"), np.append(items[2_000:], "new-item"),
            np.append(labels[2_000:], 4.0))
    np.testing.assert_array_equal(stream(loaded, *rest, batch=250), stream(model, *rest, batch=250))


def test_load_refuses_tampered_weights(tmp_path):
    model = OnlineMF(n_factors=4, device="cpu")
    model.learn_batch(["a"], ["x"], [4.0])
    model.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        OnlineMF.load(tmp_path / "m")


def rewrite_saved(folder, change) -> None:
    """Apply ``change(tensors, meta)`` to a saved model and record the new tensors' sha256."""
    tensors = load_file(folder / "model.safetensors")
    meta = json.loads((folder / "model.json").read_text())
    change(tensors, meta)
    save_file(tensors, folder / "model.safetensors")
    meta["weights_sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps(meta))


def test_loads_format_2_whose_seen_pairs_it_no_longer_reads(tmp_path):
    model = OnlineMF(n_factors=4, device="cpu")
    model.learn_batch(["a", "b"], ["x", "y"], [4.0, 2.0])
    model.save(tmp_path / "m")

    def as_format_2(tensors, meta):
        tensors["seen_pairs"] = torch.tensor([1, 4294967297], dtype=torch.int64)
        meta["format_version"] = 2

    rewrite_saved(tmp_path / "m", as_format_2)
    loaded = OnlineMF.load(tmp_path / "m", device="cpu")
    assert "seen_pairs" not in loaded.tables
    np.testing.assert_array_equal(loaded.predict(["a", "b"], ["y", "x"]), model.predict(["a", "b"], ["y", "x"]))


def test_load_refuses_an_unknown_format(tmp_path):
    OnlineMF(n_factors=4, device="cpu").save(tmp_path / "m")
    rewrite_saved(tmp_path / "m", lambda tensors, meta: meta.update(format_version=1))
    with pytest.raises(ValueError, match="format_version"):
        OnlineMF.load(tmp_path / "m")


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"labels": [4.0, float("nan")]}, "labels"),
        ({"labels": [4.0, float("inf")]}, "labels"),
        ({"labels": [4.0, 9.0]}, "rating_range"),
        ({"weights": [1.0, float("nan")]}, "weights"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"kind": "purchase"}, "kind"),
        ({"kind": "click", "labels": [1.0, 0.5]}, "labels"),
        ({"kind": "click", "labels": [1.0, 0.0], "propensities": [0.5, 0.0]}, "propensities"),
        ({"kind": "click", "labels": [1.0, 0.0], "propensities": [0.5, float("nan")]}, "propensities"),
        ({"kind": "click", "labels": [1.0, 0.0], "positions": [1, 0]}, "positions"),
        ({"positions": [1, 2]}, "positions"),
        ({"items": ["x"]}, "items"),
        ({"items": ["x", ""]}, "item id"),
        ({"users": ["a", 7]}, "user id"),
    ],
)
def test_bad_examples_are_rejected_and_nothing_is_trained(kwargs, field):
    model = OnlineMF(n_factors=4, device="cpu", rating_range=(1, 5))
    model.learn_batch(["a"], ["x"], [3.0])
    before = model.predict(["a", "b"], ["x", "y"])
    batch = {"users": ["a", "b"], "items": ["x", "y"], "labels": [4.0, 5.0], **kwargs}
    with pytest.raises(ValueError, match=field):
        model.learn_batch(**batch)
    assert len(model.users) == 1 and len(model.items) == 1
    assert model.n_examples == {"rating": 1, "click": 0}
    np.testing.assert_array_equal(model.predict(["a", "b"], ["x", "y"]), before)


@pytest.mark.parametrize("kwargs", [{"n_factors": 0}, {"lr": float("nan")}, {"ips_clip": 0.0},
                                    {"rating_range": (5, 1)}, {"user_prior": -1.0}])
def test_bad_hyperparameters_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        OnlineMF(device="cpu", **kwargs)


@pytest.mark.parametrize("module", ["learner.online_mf", "learner.ids"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@requires_cuda
def test_cuda_matches_cpu():
    users, items, labels = bursty_stream(5)
    scores = []
    for device in ("cpu", "cuda"):
        model = OnlineMF(n_factors=8, device=device)
        scores.append(stream(model, users, items, labels, batch=256))
        assert model.device.type == device
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-3)


@pytest.mark.gpu
@requires_cuda
def test_cuda_checkpoint_loads_on_cpu(tmp_path):
    users, items, labels = bursty_stream(6, n=600)
    model = OnlineMF(n_factors=8, device="cuda")
    stream(model, users, items, labels, batch=100)
    model.save(tmp_path / "m")
    loaded = OnlineMF.load(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(loaded.predict(users, items), model.predict(users, items), atol=1e-5)
