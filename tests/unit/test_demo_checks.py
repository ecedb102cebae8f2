"""The demo's checks (sim.demo.quality_checks): steady-phase means, alarm steps and the concept-drift delay."""
from __future__ import annotations

from sim.demo import quality_checks
from sim.simulator import Schedule


def _rows(schedule: Schedule, alarms: dict[int, list[str]], nan_steps: set[int] = frozenset()) -> list[dict]:
    rows = []
    for step in range(schedule.n_steps):
        value = float("nan") if step in nan_steps else 0.1 * (step + 1)
        rows.append({"step": step, "phase": schedule.phase(step), "served_rmse": value, "baseline_rmse": 2 * value,
                     "logloss": value, "baseline_logloss": value, "calibration": 1.0, "ctr_oracle": 0.3,
                     "ctr_popularity": 0.1, "drift_alarms": alarms.get(step, [])})
    return rows


def test_checks_average_the_steady_phase_and_count_its_alarm_steps():
    schedule = Schedule(warmup=2, steady=3, attack=1, shift=3)
    rows = _rows(schedule, {3: ["user_activity"], 4: ["user_activity", "loss_click"]}, nan_steps={2})
    checks = quality_checks(rows, schedule)
    assert checks["served_rmse_click"] == (0.4 + 0.5) / 2  # step 2 had no outcomes yet (NaN)
    assert checks["baseline_rmse_click"] == (0.8 + 1.0) / 2
    assert checks["drift_alarm_steps_steady"] == 2
    assert checks["concept_drift_alarm_delay_steps"] is None  # no concept-drift alarm after the shift


def test_concept_drift_delay_counts_from_the_start_of_the_shift_and_ignores_feature_alarms():
    schedule = Schedule(warmup=2, steady=3, attack=1, shift=4)
    start = schedule.start("shift")
    rows = _rows(schedule, {start: ["user_activity"], start + 2: ["loss_click"]})
    assert quality_checks(rows, schedule)["concept_drift_alarm_delay_steps"] == 2
