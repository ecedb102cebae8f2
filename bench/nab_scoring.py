"""Detection metrics on labelled anomaly windows: the NAB score, window F1 and ROC AUC.

``bench/rcf.py`` judges every detector by these rules. The NAB score follows NAB's own scorer
(Lavin & Ahmad 2015; NAB's ``nab/sweeper.py``, ``nab/optimizer.py``, ``nab/runner.py`` and
``config/profiles.json``):

* the first ``min(floor(0.15 n), 750)`` rows of a series are probationary and not scored at all;
* a detection in a window earns A_TP * sigma(p) / sigma(-1), p = -(last - i + 1) / width, and
  only the window's best (its earliest) detection counts; a window with no detection after the
  probation costs A_FN (a window wholly inside the probation counts for nothing);
* every detection outside the windows adds A_FP * sigma(p), p = |i - last of the previous
  window| / (its width - 1), or sigma = -1 with no window before it (or p >= 3), where
  sigma(p) = 2 / (1 + exp(5 p)) - 1;
* detections are the rows whose score is >= a threshold, one threshold for the whole corpus per
  profile, chosen by sweeping every distinct score (NAB's optimizer);
* the corpus total S is normalised to 100 (S - S_null) / (S_perfect - S_null), S_null the
  optimised score of NAB's null detector (a constant score), S_perfect = A_TP x number of
  windows.

Where NAB itself fails (the distance past a one-row window divides by zero), the width minus
one is taken as at least 1. The checks against NAB's source are listed in docs/anomaly-nab.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_CAP = 750  # NAB: 0.15 * 5000 rows


@dataclass(frozen=True)
class Profile:
    """NAB cost matrix: weights of a true positive, a false positive and a false negative."""

    tp: float = 1.0
    fp: float = 0.11
    fn: float = 1.0


PROFILES = {  # NAB config/profiles.json
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": Profile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": Profile(tp=1.0, fp=0.11, fn=2.0),
}
STANDARD = PROFILES["standard"]


@dataclass(frozen=True)
class CorpusScore:
    """A profile's NAB result: the normalised score, the threshold chosen and the raw totals."""

    score: float
    threshold: float
    raw: float
    null: float
    perfect: float


def window_bounds(timestamps: np.ndarray, windows: list[list[str]]) -> list[tuple[int, int]]:
    """Index ranges [first, last] (inclusive) of the rows inside each labelled window."""
    ts = np.asarray(timestamps, dtype="datetime64[ns]")
    bounds = []
    for start, end in windows:
        first = int(np.searchsorted(ts, np.datetime64(start.replace(" ", "T")), side="left"))
        last = int(np.searchsorted(ts, np.datetime64(end.replace(" ", "T")), side="right")) - 1
        if last < first:
            raise ValueError(f"window {start} .. {end} contains no rows")
        bounds.append((first, last))
    return bounds


def in_windows(n: int, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask of the rows that lie inside a window."""
    mask = np.zeros(n, dtype=bool)
    for first, last in bounds:
        mask[first:last + 1] = True
    return mask


def probation_length(n: int) -> int:
    """Rows at the start of an ``n``-row series that NAB does not score."""
    return int(min(math.floor(PROBATION_FRACTION * n), PROBATION_CAP))


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """NAB's sigma(p) = 2 / (1 + exp(5 p)) - 1, and -1 from p = 3 on."""
    p = np.asarray(position, dtype=np.float64)
    return np.where(p >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(p, 3.0))) - 1.0)


def row_weights(n: int, bounds: list[tuple[int, int]],
                profile: Profile = STANDARD) -> tuple[np.ndarray, np.ndarray]:
    """What each row would add as a detection (NAB's sweep score), and its window (-1: none).

    Probationary rows are included here; the callers drop them.
    """
    weight = np.full(n, -profile.fp)  # before the first window: sigma = -1
    window = np.full(n, -1, dtype=np.int64)
    max_tp = float(scaled_sigmoid(-1.0))
    ordered = sorted(bounds)
    for k, (first, last) in enumerate(ordered):
        rows = np.arange(first, last + 1)
        width = last - first + 1
        weight[rows] = profile.tp * scaled_sigmoid(-(last - rows + 1) / width) / max_tp
        window[rows] = k
        end = ordered[k + 1][0] if k + 1 < len(ordered) else n
        after = np.arange(last + 1, end)
        weight[after] = profile.fp * scaled_sigmoid((after - last) / max(width - 1, 1))
    return weight, window


def nab_raw_score(alarms: np.ndarray, bounds: list[tuple[int, int]],
                  profile: Profile = STANDARD) -> tuple[float, int]:
    """NAB's unnormalised score of one series' detections, and the number of windows scored
    (those not wholly in the probationary period)."""
    alarms = np.asarray(alarms, dtype=bool)
    weight, window = row_weights(len(alarms), bounds, profile)
    scored = np.arange(len(alarms)) >= probation_length(len(alarms))
    score = float(weight[alarms & scored & (window < 0)].sum())
    windows = np.unique(window[scored & (window >= 0)])
    for k in windows:
        hits = alarms & scored & (window == k)
        score += float(weight[hits].max()) if hits.any() else -profile.fn
    return score, len(windows)


def optimise_threshold(scores: list[np.ndarray], bounds: list[list[tuple[int, int]]],
                       profile: Profile = STANDARD) -> tuple[float, float]:
    """The threshold (detections: score >= threshold) with the best corpus total, and that total.

    NAB's ``calcScoreByThreshold``: every distinct score is tried, from the highest down; the
    first candidate, ``inf``, detects nothing. Ties go to the higher threshold.
    """
    values, weights, windows = [], [], []
    offset = 0
    n_windows = 0
    for series, series_bounds in zip(scores, bounds):
        series = np.asarray(series, dtype=np.float64)
        weight, window = row_weights(len(series), series_bounds, profile)
        keep = slice(probation_length(len(series)), None)
        window = window[keep]
        n_windows += len(np.unique(window[window >= 0]))
        values.append(series[keep])
        weights.append(weight[keep])
        windows.append(np.where(window >= 0, window + offset, -1))
        offset += len(series_bounds)
    value = np.concatenate(values)
    order = np.argsort(-value, kind="stable")
    value = value[order]
    weight = np.concatenate(weights)[order]
    window = np.concatenate(windows)[order]
    gain = np.where(window < 0, weight, 0.0)
    inside = np.flatnonzero(window >= 0)
    by_window = inside[np.argsort(window[inside], kind="stable")]  # each window's rows, best first
    starts = np.flatnonzero(np.r_[True, np.diff(window[by_window]) != 0])
    for rows in np.split(by_window, starts[1:]):
        best = np.maximum.accumulate(weight[rows])
        gain[rows] = np.diff(np.r_[-profile.fn, best])
    total = -profile.fn * n_windows + np.cumsum(gain)
    ends = np.flatnonzero(np.r_[value[1:] != value[:-1], True])  # last row of each distinct score
    thresholds = np.r_[np.inf, value[ends]]
    totals = np.r_[-profile.fn * n_windows, total[ends]]
    best = int(np.argmax(totals))
    return float(thresholds[best]), float(totals[best])


def corpus_score(scores: list[np.ndarray], bounds: list[list[tuple[int, int]]],
                 profile: Profile = STANDARD) -> CorpusScore:
    """NAB's final score of a detector on a corpus (see the module docstring)."""
    threshold, raw = optimise_threshold(scores, bounds, profile)
    _, null = optimise_threshold([np.full(len(s), 0.5) for s in scores], bounds, profile)
    perfect = profile.tp * sum(len(b) for b in bounds)
    return CorpusScore(100.0 * (raw - null) / (perfect - null), threshold, raw, null, perfect)


def window_detection(alarms: np.ndarray, bounds: list[tuple[int, int]]) -> tuple[int, int]:
    """(windows hit, runs of alarms outside every window)."""
    alarms = np.asarray(alarms, dtype=bool)
    hits = sum(bool(alarms[first:last + 1].any()) for first, last in bounds)
    outside = alarms & ~in_windows(len(alarms), bounds)
    starts = outside & ~np.concatenate([[False], outside[:-1]])
    return hits, int(starts.sum())


def precision_recall_f1(hits: int, windows: int, false_alarms: int) -> tuple[float, float, float]:
    """Window-level precision (hits per alarm episode), recall (hits per window) and F1."""
    precision = hits / (hits + false_alarms) if hits + false_alarms else 0.0
    recall = hits / windows if windows else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
