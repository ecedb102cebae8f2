"""Benchmark: the streaming Random Cut Forest against ``rrcf`` on the NAB series.

Every series is scored point by point in streaming order by ``learner.RandomCutForest``; on a
subset of whole series (``rrcf`` manages only tens of points per second here) ``rrcf`` runs
side by side with the same number of trees, sample size and shingle size, in its canonical
streaming form (a sliding window of ``sample_size`` points per tree, CoDisp after insertion).
Both score streams go through the same ``AdaptiveThreshold`` (defaults) to become alarms, and
are judged by the same rules (``bench/nab_scoring.py``): window precision / recall / F1, ROC AUC
of the scores against window membership, and the NAB score.

    python -m bench.rcf --data ../shared/data/nab [--quick]

Result fields (the last stdout line, also bench/results/rcf.json): ``points_per_s``,
``precision``, ``recall``, ``f1``, ``auc``, ``nab_score`` of the forest over every series;
``subset`` (series), ``subset_points`` and the forest's ``subset_*`` figures on the series rrcf
also ran, next to ``rrcf_*`` on the same points; ``speedup`` = forest points/s over rrcf
points/s on that subset (each forest's own time: scoring and learning, thresholds excluded).
``nab_score`` uses the alarms as they are (grade > 0); ``nab_score_tuned`` picks, like NAB's
scoreboard, the best cut on the grade (``nab_tuned_grade``) for the whole corpus.

Times are CPU seconds of this process (both forests are single-threaded; on a shared machine
CPU time is steadier than wall time), and on the subset the two run series by series,
alternating, so that both meet the same machine load.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
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
from stream.anomaly import AdaptiveThreshold, RandomCutForest

QUICK_RRCF_POINTS = 2_000
FULL_RRCF_POINTS = 32_000


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


def run_forest(series: Series, args: argparse.Namespace) -> tuple[np.ndarray, float]:
    """Scores of one series by a fresh forest, and the seconds it took."""
    forest = RandomCutForest(args.trees, args.sample_size, args.shingle_size, seed=args.seed)
    start = time.process_time()
    scores = forest.score_update(series.values)
    return scores, time.process_time() - start


def run_rrcf(rrcf: ModuleType, series: Series, args: argparse.Namespace,
             progress: tqdm) -> tuple[np.ndarray, float]:
    """rrcf's streaming recipe: per tree a sliding window of ``sample_size`` shingles; each new
    shingle is inserted, scored by its CoDisp, averaged over the trees."""
    np.random.seed(args.seed)
    trees = [rrcf.RCTree() for _ in range(args.trees)]
    shingles = np.lib.stride_tricks.sliding_window_view(series.values, args.shingle_size)
    scores = np.zeros(len(series.values))
    start = time.process_time()
    for i, point in enumerate(shingles):
        total = 0.0
        for tree in trees:
            if len(tree.leaves) > args.sample_size:
                tree.forget_point(i - args.sample_size)
            tree.insert_point(point, index=i)
            total += tree.codisp(i)
        scores[i + args.shingle_size - 1] = total / args.trees
        progress.update(1)
    return scores, time.process_time() - start


def detection(corpus: list[Series], scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Window metrics, AUC and NAB score of the default AdaptiveThreshold's alarms."""
    hits = windows = false_alarms = nab_windows = 0
    nab_raw = 0.0
    grades = {}
    for series in corpus:
        grades[series.key] = AdaptiveThreshold().update(scores[series.key])
        alarms = grades[series.key] > 0
        hit, false = nab_scoring.window_detection(alarms, series.bounds)
        hits, windows, false_alarms = hits + hit, windows + len(series.bounds), false_alarms + false
        raw, scored = nab_scoring.nab_raw_score(alarms, series.bounds)
        nab_raw, nab_windows = nab_raw + raw, nab_windows + scored
    precision, recall, f1 = nab_scoring.precision_recall_f1(hits, windows, false_alarms)
    labels = np.concatenate([nab_scoring.in_windows(len(s.values), s.bounds) for s in corpus])
    pooled = np.concatenate([scores[s.key] for s in corpus])
    tuned = max(
        (sum(nab_scoring.nab_raw_score(grades[s.key] > level, s.bounds)[0] for s in corpus), level)
        for level in np.arange(0.0, 1.0, 0.1))
    return {
        "precision": precision, "recall": recall, "f1": f1, "windows": windows, "hits": hits,
        "false_alarms": false_alarms, "auc": nab_scoring.roc_auc(pooled, labels),
        "nab_score": nab_scoring.nab_normalised(nab_raw, nab_windows),
        "nab_score_tuned": nab_scoring.nab_normalised(tuned[0], nab_windows),
        "nab_tuned_grade": round(float(tuned[1]), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.rcf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nab"),
                        help="NAB folder with data/<category>/<file>.csv and labels/ (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"run rrcf on at most {QUICK_RRCF_POINTS} points (ends in a minute or two)")
    parser.add_argument("--rrcf-points", type=int, default=None,
                        help=f"points budget of the rrcf subset (default {FULL_RRCF_POINTS}, "
                             f"{QUICK_RRCF_POINTS} with --quick)")
    parser.add_argument("--trees", type=int, default=50, help="trees in both forests (default: %(default)s)")
    parser.add_argument("--sample-size", type=int, default=256, help="points per tree (default: %(default)s)")
    parser.add_argument("--shingle-size", type=int, default=4, help="inputs per point (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both forests (default: %(default)s)")
    args = parser.parse_args(argv)
    rrcf_points = args.rrcf_points or (QUICK_RRCF_POINTS if args.quick else FULL_RRCF_POINTS)

    corpus = load_corpus(args.data)
    subset = rrcf_subset(corpus, rrcf_points)
    rrcf = load_rrcf()
    RandomCutForest(2, 4, args.shingle_size).score_update(np.zeros(args.shingle_size + 1))  # compile

    ours, seconds = {}, {}
    for series in tqdm(corpus, desc="forest", unit="series", file=sys.stderr):
        ours[series.key], seconds[series.key] = run_forest(series, args)
    theirs, forest_seconds, rrcf_seconds = {}, 0.0, 0.0
    subset_points = sum(len(s.values) for s in subset)
    with tqdm(total=subset_points - len(subset) * (args.shingle_size - 1), desc="rrcf",
              unit="pt", file=sys.stderr) as progress:
        for series in subset:  # side by side: the forest again right before rrcf, same series
            forest_seconds += run_forest(series, args)[1]
            theirs[series.key], took = run_rrcf(rrcf, series, args, progress)
            rrcf_seconds += took

    points = sum(len(s.values) for s in corpus)
    subset_rate = subset_points / forest_seconds
    rrcf_rate = subset_points / rrcf_seconds
    result = {
        "points": points, "series": len(corpus), "trees": args.trees,
        "sample_size": args.sample_size, "shingle_size": args.shingle_size, "seed": args.seed,
        "quick": args.quick, "points_per_s": points / sum(seconds.values()),
        **detection(corpus, ours),
        "subset": [s.key for s in subset], "subset_points": subset_points,
        "subset_points_per_s": subset_rate, "rrcf_points_per_s": rrcf_rate,
        "speedup": subset_rate / rrcf_rate,
    }
    mine = detection(subset, ours)
    other = detection(subset, theirs)
    for name in ("precision", "recall", "f1", "auc", "nab_score"):
        result[f"subset_{name}"] = mine[name]
        result[f"rrcf_{name}"] = other[name]
    emit("rcf", result)
    return result


if __name__ == "__main__":
    main()
