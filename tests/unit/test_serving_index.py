"""The IVF item index (``serving.index``) and the recommendations served through it: recall on a
clustered catalogue, deltas visible at once, the exact mode, exact propensities on candidates,
and the background rebuild. No broker; the HTTP tests run a replica in process."""
from __future__ import annotations

import asyncio
import doctest

import numpy as np
import pytest

import serving.index
from learner.updates import Delta, ModelRows
from serving import policies
from serving.index import IndexSettings, kmeans
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel
from serving.popularity import Popularity
from serving.recommend import Recommender
from serving.scorer import BatchScorer
from serving.seen import SeenItems

K = 16


def test_docstring_examples():
    assert doctest.testmod(serving.index).failed == 0


def clustered(n_items, n_users, seed=0, topics=50, share=0.6):
    """Items and users around ``topics`` topic centres (``share`` of the variance), like a learned
    model; users mix two topics."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, np.sqrt(share), (topics, K))
    noise = np.sqrt(1 - share)
    item_vectors = centres[rng.integers(0, topics, n_items)] + rng.normal(0, noise, (n_items, K))
    mix = rng.integers(0, topics, (n_users, 2))
    user_vectors = centres[mix].sum(1) / np.sqrt(2) + rng.normal(0, noise, (n_users, K))
    items = ModelRows([f"i{j}" for j in range(n_items)], item_vectors, rng.normal(0, 0.3, n_items),
                      rng.normal(0, 0.3, n_items))
    users = ModelRows([f"u{j}" for j in range(n_users)], user_vectors, rng.normal(0, 0.1, n_users),
                      rng.normal(0, 0.1, n_users))
    return users, items


def model_of(users, items, index=None, seq=1):
    empty = ServingModel.empty("mf", K)
    model = empty.apply([Delta("mf", seq, f"mf-{seq}", 3.5, -1.0, users, items, 1000.0, None)])
    return model.with_index(index) if index is not None else model


def exact_top(model, user_row, k, kind="rating"):
    query, offset = model.query(user_row, kind)
    return np.argsort(-(model.items.matrix() @ query), kind="stable")[:k]


def test_recall_at_10_on_a_clustered_catalogue():
    users, items = clustered(20_000, 200)
    model = model_of(users, items, IndexSettings(min_items=1, probe=16))
    index = model.index
    assert len(index.centroids) == round(np.sqrt(20_000))
    hits, sizes = [], []
    for u in range(200):
        query, _ = model.query(u, "rating")
        rows, scores = index.search(query, np.zeros(0, np.int64))
        sizes.append(len(rows))
        got = rows[np.argsort(-scores, kind="stable")[:10]]
        hits.append(len(set(got.tolist()) & set(exact_top(model, u, 10).tolist())) / 10)
    print(f"recall@10 {np.mean(hits):.3f}, candidates {np.mean(sizes):.0f}")
    assert np.mean(hits) >= 0.95
    assert np.mean(sizes) < 0.2 * 20_000  # it did not just score everything


def test_candidates_are_scored_exactly_and_excluded_rows_are_minus_infinity():
    users, items = clustered(5_000, 10, seed=1)
    model = model_of(users, items, IndexSettings(min_items=1, probe=4))
    query, _ = model.query(3, "click")
    rows, scores = model.index.search(query, np.zeros(0, np.int64))
    assert len(np.unique(rows)) == len(rows)
    np.testing.assert_allclose(scores, model.items.matrix()[rows] @ query, rtol=1e-5, atol=1e-5)
    exclude = rows[:5].copy()
    rows2, scores2 = model.index.search(query, exclude)
    assert np.isneginf(scores2[np.isin(rows2, exclude)]).all()
    assert np.isfinite(scores2[~np.isin(rows2, exclude)]).all()
    with pytest.raises(ValueError, match="width"):
        model.index.search(query[:-1], exclude)


def test_a_delta_item_is_retrieved_at_once_wherever_it_lands():
    users, items = clustered(10_000, 20, seed=2)
    settings = IndexSettings(min_items=1, probe=2)
    model = model_of(users, items, settings)
    query, _ = model.query(0, "rating")
    probed = set(model.index.probed(query).tolist())
    # the item farthest from anything user 0 probes: move it far away, with a huge bias
    far = next(r for r in range(10_000) if model.index.assign[r] not in probed)
    moved = ModelRows([f"i{far}", "brand-new"], np.stack([-items.vectors[far] * 3, -items.vectors[far] * 3]),
                      np.array([1e4, 2e4]), np.zeros(2))
    after = model.apply([Delta("mf", 2, "mf-2", 3.5, -1.0, ModelRows.empty(K), moved, 1001.0, None)])
    new_row = after.items.row("brand-new")
    rows, scores = after.index.search(query, np.zeros(0, np.int64))
    top = rows[np.argsort(-scores)[:2]].tolist()
    assert top == [new_row, far]
    # ... scored with its new value, and the old version's index is untouched
    np.testing.assert_allclose(scores[rows == far], after.items.matrix()[far] @ query, rtol=1e-5)
    assert far not in model.index.fresh_rows and len(model.index.assign) == 10_000
    assert model.index.assign[far] >= 0 and after.index.assign[far] == -1
    assert model.index.alive.all() and model.index.sizes.sum() == 10_000
    assert far in model.index.members(model.index.assign[far]) and not after.index.alive.all()
    assert after.index.packed is model.index.packed  # the layout is shared, not copied
    # every item appears exactly once across clusters and fresh rows, each packed as it is now
    assert_layout(after.index, after.items.matrix())


def assert_layout(index, matrix):
    """Every row of ``matrix`` exactly once across the clusters' alive members and the fresh rows;
    the packed rows of the alive members and of the fresh rows equal the matrix's rows."""
    members = [index.members(c) for c in range(len(index.centroids))]
    assert [len(m) for m in members] == index.sizes.tolist()
    every = np.concatenate(members + [index.fresh_rows])
    assert sorted(every.tolist()) == list(range(len(matrix)))
    assert index.packed.dtype == np.float32 and len(index.packed) == len(index.order) * matrix.shape[1]
    for c, m in enumerate(members):
        assert (index.assign[m] == c).all()
        alive = index.alive[index.starts[c]:index.starts[c + 1]]
        np.testing.assert_array_equal(index.block(c)[:, alive], matrix[m].T)
    np.testing.assert_array_equal(index.fresh_packed, matrix[index.fresh_rows].T.ravel())
    assert (index.assign[index.fresh_rows] == -1).all()


def numpy_search(index, matrix, query, need=0):
    """The candidates as the per-cluster formulation scored them: every alive member of the
    probed clusters, then the fresh rows, each ``matrix[rows] @ query``."""
    rows = np.concatenate([index.members(c) for c in index.probed(query, need=need)] + [index.fresh_rows])
    return rows, matrix[rows] @ query


def test_the_compiled_search_equals_the_numpy_formulation_before_and_after_a_delta():
    users, items = clustered(6_000, 40, seed=8)
    model = model_of(users, items, IndexSettings(min_items=1, probe=5))
    rng = np.random.default_rng(0)
    changed_ids = [f"i{j}" for j in rng.choice(6_000, 300, replace=False)]
    changed = ModelRows(changed_ids + ["new-a", "new-b"], rng.normal(size=(302, K)), np.zeros(302), np.zeros(302))
    after = model.apply([Delta("mf", 2, "mf-2", 3.5, -1.0, ModelRows.empty(K), changed, 1001.0, None)])
    assert len(after.index.fresh_rows) == 302 and len(model.index.fresh_rows) == 0
    nothing = np.zeros(0, np.int64)
    for version in (model, after):
        matrix = version.items.matrix()
        for u in range(40):
            query = version.query(u, "rating" if u % 2 else "click")[0]
            need = 0 if u % 3 else 500
            rows, scores = version.index.search(query, nothing, need=need)
            want_rows, want_scores = numpy_search(version.index, matrix, query, need)
            order, want_order = np.argsort(rows), np.argsort(want_rows)
            np.testing.assert_array_equal(rows[order], want_rows[want_order])
            np.testing.assert_allclose(scores[order], want_scores[want_order], rtol=1e-5, atol=1e-5)
            assert scores.dtype == np.float32 and rows.dtype == np.int64


def test_exact_mode_and_small_catalogues_build_no_index_and_rank_like_brute_force():
    users, items = clustered(3_000, 30, seed=3)
    assert model_of(users, items, IndexSettings(mode="exact", min_items=1)).index is None
    assert model_of(users, items, IndexSettings(min_items=5_000)).index is None
    exact = model_of(users, items, IndexSettings(mode="exact"))
    live = LiveModel(1, ServingMetrics())
    live.swap(exact)
    recommender = Recommender(live, BatchScorer(), SeenItems(), Popularity(), seed=0)

    async def body():
        for u in range(30):
            response = await recommender.recommend(f"u{u}", 10, exclude_seen=False)
            assert [exact.items.row(it["item_id"]) for it in response["items"]] == exact_top(exact, u, 10).tolist()
    asyncio.run(body())


def test_a_slate_is_never_shortened_by_small_clusters_or_exclusions():
    users, items = clustered(3_000, 5, seed=7)
    model = model_of(users, items, IndexSettings(min_items=1, clusters=300, probe=1))
    query, _ = model.query(0, "rating")
    first = model.index.probed(query)
    rows, scores = model.index.search(query, np.zeros(0, np.int64), need=100)
    assert len(rows) >= 100 and len(model.index.members(first[0])) < 100
    exclude = rows[:80]
    rows, scores = model.index.search(query, exclude, need=100)
    assert np.isfinite(scores).sum() >= 100
    recommender = recommender_on(model)
    seen = [model.items.id_of(int(r)) for r in exclude]
    for item in seen:
        recommender.seen.add("u0", item)

    async def body():
        return await recommender.recommend("u0", 100, "greedy")
    response = asyncio.run(body())
    assert len(response["items"]) == 100 and not set(seen) & {it["item_id"] for it in response["items"]}


def test_probing_every_cluster_equals_brute_force():
    users, items = clustered(4_000, 20, seed=4)
    model = model_of(users, items, IndexSettings(min_items=1, clusters=30, probe=30))
    for u in range(20):
        query, _ = model.query(u, "rating")
        rows, scores = model.index.search(query, np.zeros(0, np.int64))
        assert rows[np.argsort(-scores, kind="stable")[:10]].tolist() == exact_top(model, u, 10).tolist()


def recommender_on(model, seed=0):
    live = LiveModel(2, ServingMetrics())
    live.swap(model)
    return Recommender(live, BatchScorer(), SeenItems(), Popularity(), seed=seed, candidates=50)


def test_recommendations_through_the_index_report_exact_candidate_propensities():
    users, items = clustered(8_000, 20, seed=5)
    model = model_of(users, items, IndexSettings(min_items=1, probe=6))
    recommender = recommender_on(model)
    query, offset = model.query(7, "rating")
    rows, scores = model.index.search(query, np.zeros(0, np.int64))
    logits = scores + np.float32(offset)

    async def body():
        greedy = await recommender.recommend("u7", 10, "greedy", exclude_seen=False)
        soft = await recommender.recommend("u7", 5, "softmax", exclude_seen=False, temperature=0.5)
        return greedy, soft
    greedy, soft = asyncio.run(body())
    expected = rows[np.argsort(-logits, kind="stable")[:10]]
    assert [model.items.row(it["item_id"]) for it in greedy["items"]] == expected.tolist()
    assert all(it["propensity"] == 1.0 for it in greedy["items"])
    np.testing.assert_allclose([it["score"] for it in greedy["items"]],
                               model.predict_rows(np.full(10, 7), expected, "rating"), rtol=1e-5)
    # softmax: Plackett-Luce over the 50 best retrieved candidates
    pool = rows[np.argsort(-logits, kind="stable")[:50]]
    pool_logits = dict(zip(pool.tolist(), (logits[np.argsort(-logits, kind="stable")[:50]] / 0.5).tolist()))
    left = dict(pool_logits)
    for it in soft["items"]:
        row = model.items.row(it["item_id"])
        assert row in left
        z = np.array(list(left.values()))
        expected_p = np.exp(left[row] - z.max()) / np.exp(z - z.max()).sum()
        assert it["propensity"] == pytest.approx(expected_p, rel=1e-5)
        del left[row]


def test_epsilon_greedy_on_candidates_explores_the_whole_catalogue_with_exact_propensities():
    n = 400
    rng = np.random.default_rng(0)
    candidate_rows = np.array([10, 20, 30, 40])
    scores = np.array([4.0, 3.0, -np.inf, 1.0])  # row 30 is excluded
    catalogue = policies.Catalogue(candidate_rows, n, np.array([30, 31]))
    n_eligible = n - 2
    outside = 0
    for _ in range(300):
        slate = policies.epsilon_greedy(scores, 3, 0.5, rng, catalogue)
        placed = set()
        ranked = [10, 20, 40]
        for j, (row, p) in enumerate(zip(slate.indices.tolist(), slate.propensities)):
            assert row not in (30, 31) and row not in placed
            best = next(r for r in ranked if r not in placed)
            expected = 0.5 / (n_eligible - j) + (0.5 if row == best else 0.0)
            assert p == pytest.approx(expected)
            placed.add(row)
            outside += row not in (10, 20, 40)
    assert outside > 100  # uniform draws mostly land outside the four candidates


def test_a_stale_index_is_rebuilt_in_the_background_without_losing_deltas(tmp_path):
    from serving.updates import ModelUpdater

    users, items = clustered(6_000, 10, seed=6)
    settings = IndexSettings(min_items=1, probe=4)
    live = LiveModel(4, ServingMetrics())
    updater = ModelUpdater(tmp_path, "mf", live, ServingMetrics(), lambda: [], index=settings)
    live.swap(model_of(users, items, settings))
    old_centroids = live.current.index.centroids

    async def body():
        # a delta that rewrites a third of the catalogue makes the index stale
        rng = np.random.default_rng(1)
        ids = [f"i{j}" for j in range(0, 6_000, 3)]
        changed = ModelRows(ids, rng.normal(size=(len(ids), K)), np.zeros(len(ids)), np.zeros(len(ids)))
        await updater._apply([Delta("mf", 2, "mf-2", 3.5, -1.0, ModelRows.empty(K), changed, 1001.0, None)])
        assert live.current.index.stale
        assert updater._rebuild is not None
        # a delta arriving while the rebuild runs must survive it
        late = ModelRows(["late"], np.ones((1, K)), np.ones(1), np.zeros(1))
        await updater._apply([Delta("mf", 3, "mf-3", 3.5, -1.0, ModelRows.empty(K), late, 1002.0, None)])
        await updater._rebuild
    asyncio.run(body())
    current = live.current
    assert current.version == "mf-3" and current.items.row("late") >= 0
    assert not current.index.stale and len(current.index.fresh_rows) == 0
    assert current.index.centroids is not old_centroids
    assert current.index.alive.all()
    assert_layout(current.index, current.items.matrix())
    assert live.by_version("mf-3") is current


def test_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 10, (5, 4)).astype(np.float32)
    points = np.repeat(centres, 200, axis=0) + rng.normal(0, 0.1, (1000, 4)).astype(np.float32)
    found = kmeans(points, 5, 10, seed=0, init=centres + 1.0)
    distances = np.linalg.norm(found[:, None] - centres[None], axis=2)
    assert distances.min(axis=1).max() < 0.1


def test_index_settings_are_checked():
    with pytest.raises(ValueError, match="retrieval mode"):
        IndexSettings(mode="annoy")
    with pytest.raises(ValueError):
        IndexSettings(probe=0)
    assert IndexSettings(min_items=10).wants_index(10) and not IndexSettings(min_items=10).wants_index(9)
    assert not IndexSettings(mode="exact", min_items=1).wants_index(10 ** 6)
