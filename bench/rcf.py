"""Benchmark: the anomaly scorer on NAB, against ``rrcf`` and NAB's windowed Gaussian.

Every series is scored in streaming order by ``stream.anomaly.score_series`` (a fresh forest and
anomaly-likelihood layer per series, the worker's defaults unless overridden). Two peers:
NAB's ``windowedGaussian`` detector (window 6400, step 100, score 1 - Q(|z|)) on every series,
and ``rrcf`` on a subset of whole series (it manages a few hundred points per second), with the
same trees, sample size, shingle size and inputs, in its canonical streaming form (a sliding
window of ``sample_size`` points per tree, CoDisp after insertion), its scores put through the
same likelihood layer. Scores are judged by NAB's rules (``bench/nab_scoring.py``).

    python -m bench.rcf --data ../shared/data/nab [--quick] [--trees 50 --shingle-size 2 ...]

Result fields (the last stdout line, also bench/results/rcf.json):

* ``nab_standard``, ``nab_low_fp``, ``nab_low_fn``: NAB score per profile (threshold optimised
  over the corpus, normalised: null detector 0, perfect 100), ``nab_threshold`` the standard
  profile's threshold; ``gaussian_nab_standard`` the windowed Gaussian's;
* ``precision``, ``recall``, ``f1``, ``hits``, ``windows``, ``false_alarms``: windows caught by
  alarms at ``alarm_level`` (log-likelihood 0.5, i.e. likelihood 0.99999, set without labels);
  ``auc``: ROC AUC of the likelihoods against window membership;
* ``points_per_s``: points per CPU second of ``score_series`` over the corpus;
* on the rrcf subset (``subset``, ``subset_points``): ``rrcf_nab_standard`` beside
  ``subset_nab_standard``, ``rrcf_*``/``subset_*`` precision, recall, f1 and auc, and
  ``speedup`` = ``subset_points_per_s`` / ``rrcf_points_per_s``, each timed on the same series
  side by side (``score_series`` whole, rrcf's tree updates and CoDisp).

Times are CPU seconds of this process (both scorers are single-threaded; on a shared machine CPU
time is steadier than wall time).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
from tqdm import tqdm

from bench import nab_scoring
from bench.common import emit
from stream.anomaly import score_series
from stream.anomaly.likelihood import AnomalyLikelihood
from stream.anomaly.series import forest_inputs

QUICK_RRCF_POINTS = 2_000
FULL_RRCF_POINTS = 32_000
ALARM_LEVEL = 0.5  # log-likelihood of a likelihood of 0.99999 (Numenta's red zone)
GAUSSIAN_WINDOW, GAUSSIAN_STEP = 6400, 100  # NAB's windowedGaussian detector
FOREST_SETTINGS = ("num_trees", "sample_size", "shingle_size", "time_decay", "inputs", "seed")


@dataclass
class Series:
    key: str  # e.g. "realKnownCause/nyc_taxi.csv"
    values: np.ndarray
    bounds: list[tuple[int, int]]


def load_corpus(root: Path) -> list[Series]:
    """Every series under ``root/data`` that ``root/labels/combined_windows.json`` labels."""
    labels_path = root / "labels" / "combined_windows.json"
    if not labels_path.is_file():
        raise SystemExit(f"no NAB labels at {labels_path}: pass --data <folder with data/ and labels/>")
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    corpus = []
    for key in sorted(labels):
        path = root / "data" / key
        if not path.is_file():
            continue
        frame = pd.read_csv(path)
        timestamps = pd.to_datetime(frame["timestamp"]).to_numpy()
        corpus.append(Series(key, frame["value"].to_numpy(dtype=np.float64),
                             nab_scoring.window_bounds(timestamps, labels[key])))
    if not corpus:
        raise SystemExit(f"no labelled series found under {root / 'data'}")
    return corpus


def rrcf_subset(corpus: list[Series], max_points: int) -> list[Series]:
    """Whole series with labelled windows, shortest first, while they fit in ``max_points``."""
    chosen, total = [], 0
    for series in sorted((s for s in corpus if s.bounds), key=lambda s: (len(s.values), s.key)):
        if total + len(series.values) > max_points:
            break
        chosen.append(series)
        total += len(series.values)
    if not chosen:
        raise SystemExit(f"--rrcf-points {max_points} is smaller than the shortest labelled series")
    return chosen


def load_rrcf() -> ModuleType:
    """The ``rrcf`` module. rrcf 0.4.4's ``__init__`` imports ``pkg_resources`` (only for its
    version string), which recent setuptools no longer ship; its tree module needs only numpy,
    so when that import fails, the tree module is loaded on its own."""
    try:
        return importlib.import_module("rrcf")
    except ModuleNotFoundError as error:
        if error.name != "pkg_resources":
            raise SystemExit("rrcf is not installed: pip install -e '.[bench]'") from error
    spec = importlib.util.find_spec("rrcf")
    path = Path(next(iter(spec.submodule_search_locations))) / "rrcf.py"
    module_spec = importlib.util.spec_from_file_location("rrcf_tree", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def run_ours(series: Series, settings: dict) -> tuple[np.ndarray, float]:
    """Log-likelihoods of one series by ``score_series``, and the CPU seconds it took."""
    start = time.process_time()
    likelihood = score_series(series.values, **settings)
    return likelihood, time.process_time() - start


def run_rrcf(rrcf: ModuleType, series: Series, settings: dict,
             progress: tqdm) -> tuple[np.ndarray, float]:
    """rrcf's streaming recipe: per tree a sliding window of ``sample_size`` shingles; each new
    shingle is inserted, scored by its CoDisp, averaged over the trees. Returns the CoDisp
    scores (0 for the inputs before the first full shingle) and the CPU seconds."""
    np.random.seed(settings["seed"])
    trees = [rrcf.RCTree() for _ in range(settings["num_trees"])]
    x = forest_inputs(series.values, settings["inputs"]).reshape(len(series.values), -1)
    s = settings["shingle_size"]
    shingles = np.lib.stride_tricks.sliding_window_view(x, (s, x.shape[1])).reshape(len(x) - s + 1, -1)
    scores = np.zeros(len(series.values))
    start = time.process_time()
    for i, point in enumerate(shingles):
        total = 0.0
        for tree in trees:
            if len(tree.leaves) > settings["sample_size"]:
                tree.forget_point(i - settings["sample_size"])
            tree.insert_point(point, index=i)
            total += tree.codisp(i)
        scores[i + s - 1] = total / len(trees)
        progress.update(1)
    return scores, time.process_time() - start


def windowed_gaussian(values: np.ndarray, window: int = GAUSSIAN_WINDOW,
                      step: int = GAUSSIAN_STEP) -> np.ndarray:
    """NAB's ``windowedGaussian`` detector: 1 - Q(|z|) of each value under the mean and standard
    deviation of the values before it, over a window that grows to ``window`` values and then
    moves forward ``step`` values at a time (the first score is 0)."""
    x = np.asarray(values, dtype=np.float64)
    shifted = x - x[0]  # fewer cancellations in the running sums
    total = np.r_[0.0, np.cumsum(shifted)]
    squares = np.r_[0.0, np.cumsum(shifted ** 2)]
    seen = np.arange(1, len(x))  # values before each of x[1:]
    slides = np.maximum(seen - window, 0) // step
    first = slides * step
    last = np.minimum(seen, window + first)
    count = last - first
    mean = (total[last] - total[first]) / count
    var = np.maximum((squares[last] - squares[first]) / count - mean ** 2, 0.0)
    std = np.where(var > 0.0, np.sqrt(var), 1e-6)
    z = np.abs(shifted[1:] - mean) / std
    tail = 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2.0))
    return np.r_[0.0, 1.0 - tail]


def nab_scores(corpus: list[Series], scores: dict[str, np.ndarray]) -> dict[str, float]:
    """NAB score per profile and the standard profile's threshold."""
    series_scores = [scores[s.key] for s in corpus]
    bounds = [s.bounds for s in corpus]
    result = {}
    for field, profile in (("standard", "standard"), ("low_fp", "reward_low_FP_rate"),
                           ("low_fn", "reward_low_FN_rate")):
        outcome = nab_scoring.corpus_score(series_scores, bounds, nab_scoring.PROFILES[profile])
        result[f"nab_{field}"] = outcome.score
        if field == "standard":
            result["nab_threshold"] = outcome.threshold
    return result


def detection(corpus: list[Series], scores: dict[str, np.ndarray],
              level: float = ALARM_LEVEL) -> dict[str, float]:
    """Windows caught by alarms at ``level``, and the AUC of the scores."""
    hits = windows = false_alarms = 0
    for series in corpus:
        hit, false = nab_scoring.window_detection(scores[series.key] >= level, series.bounds)
        hits, windows, false_alarms = hits + hit, windows + len(series.bounds), false_alarms + false
    precision, recall, f1 = nab_scoring.precision_recall_f1(hits, windows, false_alarms)
    labels = np.concatenate([nab_scoring.in_windows(len(s.values), s.bounds) for s in corpus])
    pooled = np.concatenate([scores[s.key] for s in corpus])
    return {"precision": precision, "recall": recall, "f1": f1, "windows": windows, "hits": hits,
            "false_alarms": false_alarms, "auc": nab_scoring.roc_auc(pooled, labels)}


def main(argv: list[str] | None = None) -> dict:
    defaults = {name: p.default for name, p in inspect.signature(score_series).parameters.items()}
    parser = argparse.ArgumentParser(prog="python -m bench.rcf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nab"),
                        help="NAB folder with data/<category>/<file>.csv and labels/ (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"run rrcf on at most {QUICK_RRCF_POINTS} points (ends in a minute or two)")
    parser.add_argument("--rrcf-points", type=int, default=None,
                        help=f"points budget of the rrcf subset (default {FULL_RRCF_POINTS}, "
                             f"{QUICK_RRCF_POINTS} with --quick)")
    for flag, name, kind in (("--trees", "num_trees", int), ("--sample-size", "sample_size", int),
                             ("--shingle-size", "shingle_size", int), ("--time-decay", "time_decay", float),
                             ("--inputs", "inputs", str), ("--seed", "seed", int)):
        parser.add_argument(flag, dest=name, type=kind, default=defaults[name],
                            help=f"score_series' {name} (default: %(default)s)")
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name in FOREST_SETTINGS}
    rrcf_points = args.rrcf_points or (QUICK_RRCF_POINTS if args.quick else FULL_RRCF_POINTS)

    corpus = load_corpus(args.data)
    subset = rrcf_subset(corpus, rrcf_points)
    rrcf = load_rrcf()
    score_series(np.zeros(args.shingle_size + 1), **settings)  # compile

    ours, seconds = {}, {}
    for series in tqdm(corpus, desc="forest", unit="series", file=sys.stderr):
        ours[series.key], seconds[series.key] = run_ours(series, settings)
    gaussian = {s.key: windowed_gaussian(s.values) for s in corpus}
    theirs, our_seconds, rrcf_seconds = {}, 0.0, 0.0
    subset_points = sum(len(s.values) for s in subset)
    with tqdm(total=subset_points - len(subset) * (args.shingle_size - 1), desc="rrcf",
              unit="pt", file=sys.stderr) as progress:
        for series in subset:  # side by side: ours again right before rrcf, same series
            our_seconds += run_ours(series, settings)[1]
            codisp, took = run_rrcf(rrcf, series, settings, progress)
            rrcf_seconds += took
            layer = AnomalyLikelihood(learning_period=args.sample_size)
            theirs[series.key] = layer.update(codisp)

    points = sum(len(s.values) for s in corpus)
    subset_rate = subset_points / our_seconds
    rrcf_rate = subset_points / rrcf_seconds
    result = {
        "points": points, "series": len(corpus), "trees": args.num_trees,
        "sample_size": args.sample_size, "shingle_size": args.shingle_size,
        "time_decay": args.time_decay, "inputs": args.inputs, "seed": args.seed,
        "quick": args.quick, "points_per_s": points / sum(seconds.values()),
        **nab_scores(corpus, ours),
        "gaussian_nab_standard": nab_scores(corpus, gaussian)["nab_standard"],
        "alarm_level": ALARM_LEVEL, **detection(corpus, ours),
        "subset": [s.key for s in subset], "subset_points": subset_points,
        "subset_points_per_s": subset_rate, "rrcf_points_per_s": rrcf_rate,
        "speedup": subset_rate / rrcf_rate,
        "subset_nab_standard": nab_scores(subset, ours)["nab_standard"],
        "rrcf_nab_standard": nab_scores(subset, theirs)["nab_standard"],
    }
    mine = detection(subset, ours)
    other = detection(subset, theirs)
    for name in ("precision", "recall", "f1", "auc"):
        result[f"subset_{name}"] = mine[name]
        result[f"rrcf_{name}"] = other[name]
    emit("rcf", result)
    return result


if __name__ == "__main__":
    main()
