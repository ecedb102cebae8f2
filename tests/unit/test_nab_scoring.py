"""Tests of the NAB scorer (bench/nab_scoring.py) on series small enough to score by hand.

A 100-row series has a probation of floor(0.15 * 100) = 15 rows; its one window covers rows
40..49 (width 10). sigma(p) = 2 / (1 + exp(5 p)) - 1 is NAB's scaled sigmoid.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench import nab_scoring as ns

N = 100
WINDOW = [(40, 49)]


def sigma(p: float) -> float:
    return 2.0 / (1.0 + math.exp(5.0 * p)) - 1.0


def alarms_at(*rows: int, n: int = N) -> np.ndarray:
    alarms = np.zeros(n, dtype=bool)
    alarms[list(rows)] = True
    return alarms


def test_profiles_follow_nab_config() -> None:
    assert ns.PROFILES["standard"] == ns.Profile(tp=1.0, fp=0.11, fn=1.0)
    assert ns.PROFILES["reward_low_FP_rate"] == ns.Profile(tp=1.0, fp=0.22, fn=1.0)
    assert ns.PROFILES["reward_low_FN_rate"] == ns.Profile(tp=1.0, fp=0.11, fn=2.0)


def test_probation_is_fifteen_percent_capped_at_750_rows() -> None:
    assert ns.probation_length(100) == 15
    assert ns.probation_length(4032) == 604
    assert ns.probation_length(22695) == 750


@pytest.mark.parametrize("profile", list(ns.PROFILES.values()))
def test_detection_at_window_start_earns_a_full_true_positive(profile: ns.Profile) -> None:
    score, windows = ns.nab_raw_score(alarms_at(40), WINDOW, profile)
    assert windows == 1
    assert score == pytest.approx(profile.tp)  # sigma(-10/10) / sigma(-1)


def test_later_detection_earns_less_and_only_the_first_one_counts() -> None:
    late, _ = ns.nab_raw_score(alarms_at(47), WINDOW)
    assert late == pytest.approx(sigma(-3 / 10) / sigma(-1))
    both, _ = ns.nab_raw_score(alarms_at(47, 41), WINDOW)
    assert both == pytest.approx(sigma(-9 / 10) / sigma(-1))


@pytest.mark.parametrize("profile", list(ns.PROFILES.values()))
def test_missed_window_costs_a_false_negative(profile: ns.Profile) -> None:
    assert ns.nab_raw_score(alarms_at(), WINDOW, profile)[0] == pytest.approx(-profile.fn)


@pytest.mark.parametrize("profile", list(ns.PROFILES.values()))
def test_false_positive_before_any_window_costs_a_full_false_positive(profile: ns.Profile) -> None:
    score, _ = ns.nab_raw_score(alarms_at(20, 40), WINDOW, profile)
    assert score == pytest.approx(profile.tp - profile.fp)


def test_false_positive_after_a_window_costs_by_its_distance() -> None:
    """Past the window, the distance is counted in widths minus one: row 58 is 9 rows past
    row 49, one unit; row 95 is past three units and costs the full A_FP."""
    near, _ = ns.nab_raw_score(alarms_at(40, 50), WINDOW)
    assert near == pytest.approx(1.0 + 0.11 * sigma(1 / 9))
    one, _ = ns.nab_raw_score(alarms_at(40, 58), WINDOW)
    assert one == pytest.approx(1.0 + 0.11 * sigma(1.0))
    far, _ = ns.nab_raw_score(alarms_at(40, 95), WINDOW)
    assert far == pytest.approx(1.0 - 0.11)


def test_probationary_rows_are_not_scored() -> None:
    assert ns.nab_raw_score(alarms_at(3, 10), WINDOW)[0] == pytest.approx(-1.0)
    score, windows = ns.nab_raw_score(alarms_at(), [(5, 12)])  # window wholly in probation
    assert (score, windows) == (0.0, 0)


def test_threshold_sweep_finds_the_best_cut_over_the_corpus() -> None:
    """Two series: a cut at 0.8 catches both windows at their start and one false positive
    (0.9 is the false positive alone, 0.3 adds a second, distant false positive)."""
    a = np.zeros(N)
    a[[40, 20]] = [0.8, 0.9]
    b = np.zeros(N)
    b[[40, 95]] = [0.85, 0.3]
    threshold, raw = ns.optimise_threshold([a, b], [WINDOW, WINDOW])
    assert threshold == pytest.approx(0.8)
    assert raw == pytest.approx(2.0 - 0.11)


def test_nothing_detected_when_every_cut_loses() -> None:
    noise = np.zeros(N)
    noise[60:] = 1.0  # every scored alarm is a false positive
    threshold, raw = ns.optimise_threshold([noise], [WINDOW])
    assert threshold == math.inf and raw == pytest.approx(-1.0)


@pytest.mark.parametrize("name", list(ns.PROFILES))
def test_null_detector_scores_zero_and_perfect_detector_one_hundred(name: str) -> None:
    profile = ns.PROFILES[name]
    bounds = [WINDOW, [(30, 39), (70, 79)]]
    null = ns.corpus_score([np.full(N, 0.5), np.full(N, 0.5)], bounds, profile)
    assert null.score == pytest.approx(0.0)
    perfect = [np.zeros(N), np.zeros(N)]
    for scores, series_bounds in zip(perfect, bounds):
        for first, _ in series_bounds:
            scores[first] = 1.0
    result = ns.corpus_score(perfect, bounds, profile)
    assert result.score == pytest.approx(100.0)
    assert result.perfect == pytest.approx(3 * profile.tp)
    assert result.null == pytest.approx(-3 * profile.fn)


def test_window_bounds_map_timestamps_to_rows() -> None:
    timestamps = np.arange("2024-01-01T00:00", "2024-01-01T01:40", np.timedelta64(5, "m"),
                           dtype="datetime64[m]")
    bounds = ns.window_bounds(timestamps, [["2024-01-01 00:10:00.000000", "2024-01-01 00:25:00.000000"]])
    assert bounds == [(2, 5)]
