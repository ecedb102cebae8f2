"""Streaming Random Cut Forest: anomaly scores for a scalar or vector stream, point by point.

The stream worker scores every entity's window features with it (``stream.anomaly.detector``)
and the benchmark ``bench/rcf.py`` runs it on NAB. The compiled tree operations live in
``stream/anomaly/_kernels.py``; this module holds the public class: input checks, shingling,
batching and persistence (``.npz`` without pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stream.anomaly import _kernels as kernels
from stream.files import atomic_write

_FORMAT = "streamrec.rcf/1"
_BATCH = 4096  # points per kernel call: bounds the (num_trees, batch) score buffer
_STATE = (
    ("root", np.int32, ("T",)),
    ("lo", np.float64, ("T", "2S", "D")),
    ("hi", np.float64, ("T", "2S", "D")),
    ("mass", np.int64, ("T", "2S")),
    ("parent", np.int32, ("T", "2S")),
    ("left", np.int32, ("T", "2S")),
    ("right", np.int32, ("T", "2S")),
    ("cut_dim", np.int32, ("T", "2S")),
    ("cut_val", np.float64, ("T", "2S")),
    ("free_leaf", np.int32, ("T", "S")),
    ("free_int", np.int32, ("T", "S")),
    ("n_free", np.int32, ("T", 2)),
    ("heap_weight", np.float64, ("T", "S")),
    ("heap_leaf", np.int32, ("T", "S")),
    ("n_sampled", np.int32, ("T",)),
    ("rng", np.uint64, ("T",)),
)


class RandomCutForest:
    """Streaming Random Cut Forest (Guha et al., ICML 2016) with a CoDisp anomaly score.

    Each of the ``num_trees`` trees is a random cut tree over its own time-decayed reservoir
    sample of at most ``sample_size`` points. A random cut picks a dimension with probability
    proportional to the side of the bounding box, then a position uniformly along it. The score
    of a point x is its expected collusive displacement, averaged over the trees:

        score(x) = mean_trees E[ CoDisp(x) ],
        CoDisp(x) = max over ancestors u of x after inserting x of |sibling(u)| / |u|,

    where the expectation over the random cut that would insert x is exact: at each node v on
    x's path, x is cut off with probability q_v = (growth of v's box to hold x) / (sides of the
    grown box), and then displaces mass(v) points. Normal points fall deep and displace few
    (scores of a few units); a point cut off high in the tree displaces many (up to
    ``sample_size``). This is the exact mean of rrcf's CoDisp over the insertion's randomness,
    so one tree gives what rrcf needs many insertions to average.

    The sample keeps, per tree, the ``sample_size`` points with the smallest weight
    -time_decay * t + log(-log(u)), u ~ U(0, 1), t the point's sequence number (AWS's sampler):
    recent points are favoured with weight exp(time_decay * t); time_decay = 0 is a uniform
    reservoir over all history.

    With ``shingle_size`` s > 1 the forest's points are the last s inputs concatenated (oldest
    first), so it sees shapes, not just values. The first s - 1 inputs of a stream form no full
    shingle: they score 0 and are not inserted.

    Every score is computed before its point is inserted, so a point never vouches for itself.
    Same seed and same input give the same scores, however the input is split into calls.

    Parameters
    ----------
    num_trees
        Number of trees (AWS default 50).
    sample_size
        Points kept per tree (AWS default 256); also the maximum score.
    shingle_size
        Number of consecutive inputs forming one point (1: no shingling).
    time_decay
        Decay of the sampler's weights per point; ``None`` is AWS's default 1 / (10 * sample_size),
        i.e. the sample covers roughly the last 10 * sample_size points.
    seed
        Seed of the trees' random streams.

    Attributes
    ----------
    dim
        Dimension of the inputs, fixed by the first input (``None`` before).
    n_points
        Full shingles offered to the sampler so far.

    Measurements behind the defaults: docs/anomaly.md.

    Examples
    --------
    >>> import numpy as np
    >>> from stream.anomaly import RandomCutForest
    >>> t = np.arange(3000)
    >>> series = np.sin(2 * np.pi * t / 50) + np.random.default_rng(0).normal(0, 0.05, t.size)
    >>> series[2500] += 2.0
    >>> forest = RandomCutForest(num_trees=50, sample_size=256, shingle_size=4, seed=0)
    >>> scores = forest.score_update(series)
    >>> 2500 <= int(np.argmax(scores[1000:])) + 1000 < 2504
    True

    References
    ----------
    Guha, S., Mishra, N., Roy, G., Schrijvers, O. (2016). Robust Random Cut Forest Based Anomaly
    Detection on Streams. ICML 2016, PMLR 48:2712-2721.
    AWS, randomcutforest-by-aws (sampler, defaults): https://github.com/aws/random-cut-forest-by-aws
    Bartos, M., Mullapudi, A., Troutman, S. (2019). rrcf: Implementation of the Robust Random Cut
    Forest algorithm for anomaly detection on streams. JOSS 4(35), 1336.
    """

    def __init__(self, num_trees: int = 50, sample_size: int = 256, shingle_size: int = 1,
                 time_decay: float | None = None, seed: int = 0) -> None:
        for name, value in (("num_trees", num_trees), ("sample_size", sample_size),
                            ("shingle_size", shingle_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if time_decay is None:
            time_decay = 1.0 / (10 * sample_size)
        if not (np.isfinite(time_decay) and time_decay >= 0):
            raise ValueError(f"time_decay must be a finite number >= 0 or None, got {time_decay!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.num_trees = int(num_trees)
        self.sample_size = int(sample_size)
        self.shingle_size = int(shingle_size)
        self.time_decay = float(time_decay)
        self.seed = int(seed)
        self.dim: int | None = None  # input dimension, fixed by the first input
        self.n_points = 0  # full shingles offered to the sampler so far
        self._recent = np.empty((0, 0))  # last shingle_size - 1 inputs
        self._state: dict[str, np.ndarray] = {}

    # -- public API -------------------------------------------------------------------------

    def score_update(self, values: np.ndarray) -> np.ndarray:
        """Score each input in order, then learn it; returns one score per input (shape (n,))."""
        points, skipped = self._points(values, advance=True)
        scores = np.zeros(skipped + len(points))
        scores[skipped:] = self._run(points, do_score=True, do_update=True)
        return scores

    def score(self, values: np.ndarray) -> np.ndarray:
        """Score inputs as if they followed the stream so far, without learning anything.

        Inputs in the same call are shingled together but not inserted, so they do not affect
        each other's scores.
        """
        points, skipped = self._points(values, advance=False)
        scores = np.zeros(skipped + len(points))
        scores[skipped:] = self._run(points, do_score=True, do_update=False)
        return scores

    def update(self, values: np.ndarray) -> None:
        """Learn inputs without scoring them (e.g. only the ones a threshold found normal)."""
        points, _ = self._points(values, advance=True)
        self._run(points, do_score=False, do_update=True)

    def attribution(self, value: np.ndarray) -> np.ndarray:
        """Per-dimension split of ``score`` of one input; the entries sum to its score.

        Returns shape (shingle_size * dim,) in the layout of the forest's points: oldest input
        of the shingle first, each input's ``dim`` values together. Dimension j gets the part of
        the expected displacement from cuts along j (a duplicate's part is split evenly).
        """
        x = self._as_array(np.asarray(value, dtype=np.float64).reshape(1, -1))
        points, skipped = self._points(x, advance=False)
        if skipped or not self._state:
            return np.zeros(self.shingle_size * x.shape[1])
        s = self._state
        return kernels.forest_attribution(points[0], s["root"], s["lo"], s["hi"], s["mass"],
                                          s["left"], s["right"], s["cut_dim"], s["cut_val"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the forest to ``path`` (.npz, no pickle), atomically via a temporary file."""
        params = {
            "format": _FORMAT, "num_trees": self.num_trees, "sample_size": self.sample_size,
            "shingle_size": self.shingle_size, "time_decay": self.time_decay, "seed": self.seed,
            "dim": self.dim, "n_points": self.n_points,
        }
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: given a name, np.savez would append .npz
                np.savez(fh, params=np.array(json.dumps(params)), recent=self._recent, **self._state)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RandomCutForest":
        """Read a forest written by ``save``; it continues exactly where the saved one stopped."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        if "params" not in arrays or "recent" not in arrays:
            raise ValueError(f"{path}: not a RandomCutForest file (no params)")
        params = json.loads(str(arrays.pop("params")))
        if params.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported format {params.get('format')!r}, expected {_FORMAT!r}")
        forest = cls(params["num_trees"], params["sample_size"], params["shingle_size"],
                     params["time_decay"], params["seed"])
        forest.n_points = int(params["n_points"])
        forest._recent = arrays.pop("recent").astype(np.float64)
        if params["dim"] is not None:
            forest.dim = int(params["dim"])
            expected = forest._allocate(forest.shingle_size * forest.dim)
            for name, template in expected.items():
                array = arrays.get(name)
                if array is None or array.shape != template.shape or array.dtype != template.dtype:
                    raise ValueError(f"{path}: state array {name!r} is missing or malformed")
                forest._state[name] = np.ascontiguousarray(array)
        return forest

    # -- internals --------------------------------------------------------------------------

    def _as_array(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"values must have shape (n,) or (n, d), got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim and len(x):
            raise ValueError(f"this forest takes {self.dim}-dimensional inputs, got shape {x.shape}")
        finite = np.isfinite(x)
        if not finite.all():
            row = int(np.argmin(finite.all(axis=1)))
            raise ValueError(f"values must be finite: input {row} is {x[row].tolist()}")
        return x

    def _points(self, values: np.ndarray, advance: bool) -> tuple[np.ndarray, int]:
        """Shingle the inputs: (points, number of leading inputs without a full shingle)."""
        x = self._as_array(values)
        if len(x) == 0:
            return np.empty((0, self.shingle_size * (self.dim or 1))), 0
        if self.dim is None:
            self.dim = x.shape[1]
            self._recent = np.empty((0, self.dim))
            self._state = self._allocate(self.shingle_size * self.dim)
        s = self.shingle_size
        history = np.concatenate([self._recent, x]) if s > 1 else x
        if advance and s > 1:
            self._recent = history[-(s - 1):].copy()
        n_points = len(history) - s + 1
        if n_points <= 0:
            return np.empty((0, s * self.dim)), len(x)
        windows = np.lib.stride_tricks.sliding_window_view(history, (s, self.dim))
        return windows.reshape(n_points, s * self.dim), len(x) - n_points

    def _allocate(self, dims: int) -> dict[str, np.ndarray]:
        sizes = {"T": self.num_trees, "S": self.sample_size, "2S": 2 * self.sample_size, "D": dims}
        state = {name: np.zeros([sizes.get(k, k) for k in shape], dtype=dtype)
                 for name, dtype, shape in _STATE}
        for name in ("root", "parent", "left", "right"):
            state[name][...] = -1
        state["free_leaf"][:] = np.arange(self.sample_size, dtype=np.int32)[::-1]
        state["free_int"][:] = np.arange(self.sample_size, 2 * self.sample_size, dtype=np.int32)[::-1]
        state["n_free"][:] = self.sample_size
        state["rng"][:] = np.random.SeedSequence(self.seed).generate_state(self.num_trees, np.uint64)
        return state

    def _run(self, points: np.ndarray, do_score: bool, do_update: bool) -> np.ndarray:
        scores = np.zeros(len(points))
        if len(points) == 0:
            return scores
        s = self._state
        out = np.zeros((self.num_trees, min(len(points), _BATCH)))
        for start in range(0, len(points), _BATCH):
            batch = np.ascontiguousarray(points[start:start + _BATCH])
            kernels.forest_pass(batch, self.n_points, self.time_decay, do_score, do_update,
                                s["root"], s["lo"], s["hi"], s["mass"], s["parent"], s["left"],
                                s["right"], s["cut_dim"], s["cut_val"], s["free_leaf"],
                                s["free_int"], s["n_free"], s["heap_weight"], s["heap_leaf"],
                                s["n_sampled"], s["rng"], out)
            if do_score:
                scores[start:start + len(batch)] = out[:, :len(batch)].mean(axis=0)
            if do_update:
                self.n_points += len(batch)
        return scores
