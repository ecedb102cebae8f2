"""Detection metrics on labelled anomaly windows: window F1, ROC AUC and the NAB score.

``bench/rcf.py`` scores the forest and its ``rrcf`` peer with these, so both are judged by the
same rules:

* window detection: a labelled window with at least one alarm inside is a hit, a window
  without one a miss, and each run of consecutive alarms outside every window a false alarm;
* ROC AUC of the raw scores against window membership (ties count one half);
* the NAB score (Lavin & Ahmad 2015, rules of NAB's ``sweeper.py``): the first 15% of a series
  (at most 750 rows) is probationary and not scored; a window's earliest alarm earns
  A_TP * sigma(position) / sigma(-1), a window without one costs A_FN, and every alarm outside
  the windows costs A_FP * sigma(its distance past the previous window's end, in window widths),
  sigma(x) = 2 / (1 + exp(5x)) - 1 (and -1 beyond 3 widths, or with no window before it). The
  corpus total is normalised so that no alarms at all scores 0 and a perfect detector 100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_CAP = 750  # NAB: 0.15 * 5000 rows


@dataclass(frozen=True)
class Profile:
    """NAB cost matrix (weights of a true positive, a false positive, a false negative)."""

    tp: float = 1.0
    fp: float = 0.11
    fn: float = 1.0


STANDARD = Profile()


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


def _sigma(position: float) -> float:
    return -1.0 if position >= 3.0 else 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def nab_raw_score(alarms: np.ndarray, bounds: list[tuple[int, int]],
                  profile: Profile = STANDARD) -> tuple[float, int]:
    """NAB's unnormalised score of one series' alarms (see the module docstring), and the number
    of windows it scored (those not entirely in the probationary period)."""
    alarms = np.asarray(alarms, dtype=bool)
    n = len(alarms)
    probation = min(math.floor(PROBATION_FRACTION * n), PROBATION_CAP)
    max_tp = _sigma(-1.0)
    score = 0.0
    scored = 0
    for first, last in bounds:
        if last < probation:
            continue
        scored += 1
        detected = np.flatnonzero(alarms[max(first, probation):last + 1])
        if len(detected):
            i = max(first, probation) + int(detected[0])
            score += profile.tp * _sigma(-(last - i + 1) / (last - first + 1)) / max_tp
        else:
            score -= profile.fn
    inside = in_windows(n, bounds)
    for i in np.flatnonzero(alarms & ~inside):
        if i < probation:
            continue
        previous = [(first, last) for first, last in bounds if last < i]
        if previous:
            first, last = previous[-1]
            position = abs(last - i) / max(last - first, 1)
        else:
            position = 3.0
        score += profile.fp * _sigma(position)
    return score, scored


def nab_normalised(raw_total: float, n_windows: int, profile: Profile = STANDARD) -> float:
    """100 * (raw - null) / (perfect - null): null detector (no alarms) 0, perfect 100."""
    null = -profile.fn * n_windows
    perfect = profile.tp * n_windows
    return 100.0 * (raw_total - null) / (perfect - null)
