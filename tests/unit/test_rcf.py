"""Tests of the streaming Random Cut Forest: detection, shingling, determinism, persistence, input
checks, and the structure and score of its trees against their definitions."""
from __future__ import annotations

import numpy as np
import pytest

from stream.anomaly import RandomCutForest
from stream.anomaly import _kernels as kernels


def daily_profile(n: int = 4000, period: int = 48, seed: int = 0) -> np.ndarray:
    """A noisy day-night profile: flat plateaus at +-1 joined by steep ramps."""
    t = np.arange(n)
    return np.tanh(3 * np.sin(2 * np.pi * t / period)) + np.random.default_rng(seed).normal(0, 0.05, n)


def sine(n: int = 4000, period: int = 20, seed: int = 0) -> np.ndarray:
    return np.sin(2 * np.pi * np.arange(n) / period) + np.random.default_rng(seed).normal(0, 0.05, n)


def test_planted_spike_level_shift_and_frozen_sensor_score_high() -> None:
    """Spike and level shift score above twice the normal 99th percentile. A frozen sensor is
    harder for any RCF (the flat shingle sits among the ramps' shingles; rrcf gives the same
    CoDisp): it must beat the normal 99th percentile and twice the normal median."""
    x = daily_profile()
    x[2000] += 1.0  # spike on a plateau
    x[2520:2580] = x[2519]  # sensor frozen half-way up a ramp
    x[3000:] += 1.0  # level shift
    scores = RandomCutForest(num_trees=50, sample_size=256, shingle_size=8, seed=0).score_update(x)
    normal = np.r_[scores[1000:2000], scores[2010:2500]]
    p99, median = np.percentile(normal, 99), np.median(normal)
    assert scores[2000:2008].max() > 2 * p99
    assert scores[3000:3050].max() > 2 * p99
    frozen = scores[2520:2580].max()
    assert frozen > 1.2 * p99 and frozen > 2 * median


def test_shingling_catches_broken_periodicity_that_single_points_miss() -> None:
    """One cycle at twice the frequency: every value is in range, only the shape is wrong. Single
    points stay within the normal tail; shingles of 8 stand far out of it."""
    y = sine()
    y[3000:3020] = np.sin(2 * np.pi * 2 * np.arange(20) / 20) + np.random.default_rng(9).normal(0, 0.05, 20)
    contrast = {}
    for shingle in (1, 8):
        scores = RandomCutForest(shingle_size=shingle, seed=0).score_update(y)
        contrast[shingle] = scores[3000:3020 + shingle].max() / np.percentile(scores[1000:3000], 99)
    assert contrast[1] < 1.5
    assert contrast[8] > 2.0 and contrast[8] > 2 * contrast[1]


def test_same_seed_same_scores_other_seed_other_scores() -> None:
    x = sine(1500)
    a = RandomCutForest(num_trees=20, shingle_size=4, seed=3).score_update(x)
    b = RandomCutForest(num_trees=20, shingle_size=4, seed=3).score_update(x)
    c = RandomCutForest(num_trees=20, shingle_size=4, seed=4).score_update(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batching_does_not_change_scores() -> None:
    x = sine(1200)
    whole = RandomCutForest(num_trees=10, shingle_size=4, seed=1).score_update(x)
    forest = RandomCutForest(num_trees=10, shingle_size=4, seed=1)
    pieces = np.concatenate([forest.score_update(x[i:i + 7]) for i in range(0, len(x), 7)])
    np.testing.assert_array_equal(whole, pieces)


def test_save_load_round_trip_continues_identically(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(1500, 3))
    forest = RandomCutForest(num_trees=15, sample_size=64, shingle_size=2, seed=7)
    forest.score_update(x[:1000])
    path = tmp_path / "forest.npz"
    forest.save(path)
    loaded = RandomCutForest.load(path)
    assert (loaded.num_trees, loaded.sample_size, loaded.shingle_size, loaded.dim) == (15, 64, 2, 3)
    np.testing.assert_array_equal(loaded.attribution(x[1000]), forest.attribution(x[1000]))
    np.testing.assert_array_equal(loaded.score_update(x[1000:]), forest.score_update(x[1000:]))


def test_load_rejects_foreign_files(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a RandomCutForest"):
        RandomCutForest.load(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected_and_changes_nothing(bad: float) -> None:
    forest = RandomCutForest(num_trees=5, seed=0)
    forest.score_update(np.arange(10.0))
    before = forest.n_points
    with pytest.raises(ValueError, match="finite.*input 2"):
        forest.score_update(np.array([1.0, 2.0, bad, 4.0]))
    with pytest.raises(ValueError, match="finite"):
        forest.score([bad])
    assert forest.n_points == before


def test_input_shapes_and_dimension_checks() -> None:
    forest = RandomCutForest(num_trees=5, shingle_size=3, seed=0)
    scores = forest.score_update(np.ones((6, 2)))
    assert scores.shape == (6,)
    assert np.all(scores[:2] == 0)  # no full shingle yet
    with pytest.raises(ValueError, match="2-dimensional"):
        forest.score_update(np.ones(4))
    with pytest.raises(ValueError, match="shape"):
        forest.score(np.ones((2, 2, 2)))
    assert forest.attribution(np.ones(2)).shape == (6,)


@pytest.mark.parametrize("kwargs", [{"num_trees": 0}, {"sample_size": 1.5}, {"shingle_size": True},
                                    {"time_decay": -1.0}, {"time_decay": np.nan}, {"seed": -1}])
def test_invalid_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RandomCutForest(**kwargs)


def test_default_time_decay_follows_aws() -> None:
    assert RandomCutForest(sample_size=128).time_decay == pytest.approx(1 / 1280)


def test_score_does_not_learn() -> None:
    x = sine(600)
    forest = RandomCutForest(num_trees=10, shingle_size=4, seed=2)
    forest.score_update(x[:500])
    first = forest.score(x[500:])
    np.testing.assert_array_equal(forest.score(x[500:]), first)
    twin = RandomCutForest(num_trees=10, shingle_size=4, seed=2)
    twin.score_update(x[:500])
    np.testing.assert_array_equal(forest.score_update(x[500:]), twin.score_update(x[500:]))


def test_attribution_sums_to_score_and_names_the_odd_dimension() -> None:
    rng = np.random.default_rng(0)
    forest = RandomCutForest(num_trees=30, sample_size=128, seed=0)
    forest.update(rng.normal(size=(2000, 3)))
    odd = np.array([0.1, 8.0, -0.2])
    parts = forest.attribution(odd)
    assert parts.sum() == pytest.approx(forest.score(odd[None, :])[0])
    assert int(np.argmax(parts)) == 1 and parts[1] > 0.8 * parts.sum()


def _check_tree(state: dict, t: int, sample_size: int) -> None:
    """Structure of one tree: links, masses, boxes and cuts agree with its leaves."""
    lo, hi, mass = state["lo"][t], state["hi"][t], state["mass"][t]
    leaves = []

    def walk(node: int) -> tuple[np.ndarray, np.ndarray, int]:
        if node < sample_size:
            leaves.append(node)
            np.testing.assert_array_equal(lo[node], hi[node])
            return lo[node], hi[node], int(mass[node])
        left, right = state["left"][t, node], state["right"][t, node]
        assert state["parent"][t, left] == node and state["parent"][t, right] == node
        a, b = walk(left), walk(right)
        np.testing.assert_array_equal(lo[node], np.minimum(a[0], b[0]))
        np.testing.assert_array_equal(hi[node], np.maximum(a[1], b[1]))
        assert mass[node] == a[2] + b[2]
        dim, cut = state["cut_dim"][t, node], state["cut_val"][t, node]
        assert a[1][dim] <= cut < b[0][dim]
        return lo[node], hi[node], a[2] + b[2]

    root = state["root"][t]
    assert state["parent"][t, root] == -1
    assert walk(root)[2] == sample_size == state["n_sampled"][t]
    assert len(leaves) + state["n_free"][t, 0] == sample_size
    sampled = state["heap_leaf"][t]
    assert sorted(leaves) == sorted(set(sampled))
    assert all(mass[leaf] == np.count_nonzero(sampled == leaf) for leaf in leaves)
    heap = state["heap_weight"][t]
    assert all(heap[(i - 1) // 2] >= heap[i] for i in range(1, sample_size))


def test_trees_stay_consistent_through_eviction_and_duplicates() -> None:
    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=(3000, 2)), 1)  # rounding makes many duplicates
    forest = RandomCutForest(num_trees=4, sample_size=32, time_decay=0.01, seed=0)
    forest.score_update(values)
    for t in range(4):
        _check_tree(forest._state, t, 32)


def _codisp(state: dict, leaf: int) -> float:
    """rrcf's CoDisp of a leaf: the largest |sibling| / |subtree| over the leaf's ancestors."""
    best, node = 0.0, leaf
    while state["parent"][0, node] >= 0:
        parent = state["parent"][0, node]
        sibling = state["right"][0, parent] if state["left"][0, parent] == node else state["left"][0, parent]
        best = max(best, state["mass"][0, sibling] / state["mass"][0, node])
        node = parent
    return best


@pytest.mark.parametrize("point", [[0.3, -0.2], [2.5, 0.0], [-4.0, 3.0]])
def test_score_is_the_expected_codisp_of_a_random_insertion(point: list[float]) -> None:
    """The closed-form score equals the mean CoDisp over many actual random insertions."""
    forest = RandomCutForest(num_trees=1, sample_size=32, time_decay=0.0, seed=0)
    forest.update(np.random.default_rng(2).normal(size=(32, 2)))
    x = np.array(point)
    expected = forest.score(x[None, :])[0]
    draws = []
    for k in range(4000):
        s = {name: array.copy() for name, array in forest._state.items()}
        s["rng"][0] = np.uint64(k * 7919 + 1)
        leaf = kernels.tree_insert(0, x, 32, s["root"], s["lo"], s["hi"], s["mass"], s["parent"],
                                   s["left"], s["right"], s["cut_dim"], s["cut_val"],
                                   s["free_leaf"], s["free_int"], s["n_free"], s["rng"])
        draws.append(_codisp(s, leaf))
    draws = np.array(draws)
    assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(len(draws)) + 1e-9
