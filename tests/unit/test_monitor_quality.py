"""The monitor's quality beside its baseline, its drift alarms and its concept-drift alarm (issue 14)."""
import numpy as np
import pytest

from learner.updates import Delta, ModelRows
from serving.live import LiveModel
from serving.metrics import ENDOGENOUS_SIGNALS, EXOGENOUS_SIGNALS, ServingMetrics
from serving.model import ServingModel
from serving.monitor import Monitor
from serving.popularity import Popularity
from serving.seen import SeenItems

N_USERS, N_ITEMS = 2000, 200
EXAMINATION = np.log([1.0, 0.5, 0.33, 0.25, 0.2])  # roughly logit intercepts of examination 1/k


def served_model(calibration, click_bias=None, seq=1):
    """Version mf-<seq>: item click biases ``click_bias`` (default: drawn once, seed 0), no factors."""
    if click_bias is None:
        click_bias = np.random.default_rng(0).normal(-1.0, 1.0, N_ITEMS)
    users = ModelRows([f"u{j}" for j in range(N_USERS)], np.zeros((N_USERS, 1)), np.zeros(N_USERS), np.zeros(N_USERS))
    items = ModelRows([f"i{j}" for j in range(N_ITEMS)], np.zeros((N_ITEMS, 1)), np.zeros(N_ITEMS), click_bias)
    delta = Delta("mf", seq, f"mf-{seq}", 3.0, 0.0, users, items, 0.0, None, None, calibration)
    return ServingModel.empty("mf", 1).apply([delta])


def make_monitor(model, window=2000):
    metrics = ServingMetrics()
    live = LiveModel(4, metrics)
    live.swap(model)
    monitor = Monitor(live, metrics, SeenItems(), Popularity(), rmse_window=window, drift_window=window,
                      drift_every_s=0.0)
    return monitor, metrics


def gauge(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def clicks(rng, n, click_bias, user_pool=N_USERS, item_pool=N_ITEMS, user_offset=0, burst=True):
    """Click outcomes of the planted world; users come in bursts of 1-5 outcomes (clustered ids)."""
    users = []
    while len(users) < n:
        users += [user_offset + int(rng.integers(user_pool))] * (int(rng.integers(1, 6)) if burst else 1)
    users = users[:n]
    items = rng.integers(item_pool, size=n)
    positions = rng.integers(1, 6, size=n)
    logit = EXAMINATION[positions - 1] + click_bias[np.minimum(items, N_ITEMS - 1)]
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    return [{"user_id": f"u{u}", "item_id": f"i{i}", "label": y, "kind": "click", "model_version": "mf-1",
             "ts": 0.0, "anomalous": False, "position": int(k), "propensity": 0.2}
            for u, i, k, y in zip(users, items, positions, labels)]


def click_bias_of(model):
    return model.items.get(model.items.rows([f"i{j}" for j in range(N_ITEMS)]))[:, 2].astype(np.float64)


def test_a_calibrated_model_beats_its_baseline_and_a_miscalibrated_one_shows_it():
    calibrated = served_model((tuple(EXAMINATION), 1.0))
    truth = click_bias_of(calibrated)
    figures = {}
    for name, model in (("calibrated", calibrated), ("plain", served_model(None))):
        monitor, metrics = make_monitor(model)
        monitor.observe(clicks(np.random.default_rng(1), 6000, truth))
        figures[name] = {f: gauge(metrics, f"streamrec_served_{f}") for f in
                         ("logloss", "baseline_logloss", "auc", "calibration")}
        figures[name]["rmse"] = gauge(metrics, "streamrec_served_rmse", kind="click")
        figures[name]["baseline_rmse"] = gauge(metrics, "streamrec_served_baseline_rmse", kind="click")
    good, plain = figures["calibrated"], figures["plain"]
    assert good["logloss"] < good["baseline_logloss"] and good["rmse"] < good["baseline_rmse"]
    assert 0.9 < good["calibration"] < 1.1 and good["auc"] > 0.6
    assert plain["calibration"] > 1.3  # the position-free probability overstates clicks low in the slate
    assert plain["logloss"] > good["logloss"]
    assert plain["baseline_logloss"] == pytest.approx(good["baseline_logloss"])  # same outcomes, same baseline


def test_rating_rmse_beside_the_running_mean():
    monitor, metrics = make_monitor(served_model(None))
    rng = np.random.default_rng(2)
    ratings = [{"user_id": "u1", "item_id": "i1", "label": float(y), "kind": "rating", "model_version": "mf-1",
                "ts": 0.0, "anomalous": False, "position": None, "propensity": 1.0} for y in rng.integers(4, 6, 500)]
    monitor.observe(ratings)  # the model predicts 3.0 everywhere: worse than the running mean (about 4.5)
    assert gauge(metrics, "streamrec_served_rmse", kind="rating") > gauge(
        metrics, "streamrec_served_baseline_rmse", kind="rating") + 0.5


def alarms(metrics, signals):
    return {s: gauge(metrics, "streamrec_drift_alarm", signal=s) for s in signals}


def test_no_drift_alarm_on_a_stationary_stream_with_clustered_ids():
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=1000)
    rng = np.random.default_rng(3)
    raised = set()
    for _ in range(40):
        monitor.observe(clicks(rng, 500, click_bias_of(model)))
        monitor.observe_served(rng.normal(size=50))
        raised |= {s for s, v in alarms(metrics, EXOGENOUS_SIGNALS + ("loss_click",)).items() if v == 1}
    assert not raised
    assert all(np.isfinite(gauge(metrics, "streamrec_drift_psi", signal=s)) for s in EXOGENOUS_SIGNALS)


def test_an_exogenous_shift_alarms_and_endogenous_signals_never_do():
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=1000)
    rng = np.random.default_rng(4)
    truth = click_bias_of(model)
    for _ in range(30):  # item popularity counts clicked items only: it needs many outcomes
        monitor.observe(clicks(rng, 500, truth))
        monitor.observe_served(rng.normal(size=500))
    assert alarms(metrics, EXOGENOUS_SIGNALS) == {s: 0 for s in EXOGENOUS_SIGNALS}
    # new users arrive (the model knows none of them), the model's scores and the shown items move
    shifted = clicks(rng, 5000, truth, user_pool=500, user_offset=N_USERS, item_pool=20)
    monitor.observe(shifted[:800])
    assert gauge(metrics, "streamrec_drift_alarm", signal="new_users") == 1
    monitor.observe(shifted[800:])
    monitor.observe_served(rng.normal(3.0, 1.0, size=1000))
    monitor.refresh_drift()
    for signal in ENDOGENOUS_SIGNALS:
        stats = gauge(metrics, "streamrec_drift_psi", signal=signal)
        assert signal == "label_rate" or stats > 0.5  # they moved a lot ...
        assert gauge(metrics, "streamrec_drift_alarm", signal=signal) is None  # ... and never alarm


def _steady_monitor(seed):
    """A monitor after 5,000 click outcomes of a world its calibrated model knows."""
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model)
    rng = np.random.default_rng(seed)
    truth = click_bias_of(model)
    for _ in range(10):
        monitor.observe(clicks(rng, 500, truth))
    return monitor, metrics, rng, truth


def test_the_concept_drift_alarm_rises_when_the_served_loss_degrades():
    monitor, metrics, rng, truth = _steady_monitor(5)
    assert gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 0
    quiet = gauge(metrics, "streamrec_concept_drift_statistic", signal="loss_click")
    statistics = []
    for _ in range(4):  # preferences change: what users liked, they now avoid, and the other way round
        monitor.observe(clicks(rng, 250, -truth))
        statistics.append(gauge(metrics, "streamrec_concept_drift_statistic", signal="loss_click"))
        if gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 1:
            break
    assert gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 1, (quiet, statistics)


def test_more_clicks_that_the_model_predicts_raise_no_concept_drift_alarm():
    # the click rate triples and the model knows it: its log loss rises with the baseline's, so
    # the raw loss climbs while the model is as good as before (a raw-loss test alarms here)
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model)
    rng = np.random.default_rng(6)
    truth = click_bias_of(model)
    for _ in range(10):
        monitor.observe(clicks(rng, 500, truth))
    raw_before = gauge(metrics, "streamrec_served_logloss")
    monitor.live.swap(served_model((tuple(EXAMINATION), 1.0), click_bias=truth + 1.5, seq=2))
    for _ in range(20):
        monitor.observe([dict(c, model_version="mf-2") for c in clicks(rng, 500, truth + 1.5)])
        assert gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 0
    assert gauge(metrics, "streamrec_served_logloss") > raw_before + 0.1


def test_a_falling_share_of_new_users_is_the_model_learning_them_not_an_alarm():
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=1000)
    rng = np.random.default_rng(7)
    truth = click_bias_of(model)
    for _ in range(4):  # a third of the outcomes come from users the model does not know yet ...
        batch = clicks(rng, 500, truth)
        monitor.observe([dict(c, user_id=f"new{c['user_id']}") if k % 3 == 0 else c for k, c in enumerate(batch)])
    beyond = []
    for _ in range(4):  # ... and then none do
        monitor.observe(clicks(rng, 500, truth))
        monitor.refresh_drift()
        assert gauge(metrics, "streamrec_drift_alarm", signal="new_users") == 0
        beyond.append(gauge(metrics, "streamrec_drift_psi", signal="new_users") > gauge(
            metrics, "streamrec_drift_psi_threshold", signal="new_users"))
    assert any(beyond)  # the share moved beyond the alarm level, in the direction that does not alarm


def test_a_steady_trickle_of_new_users_in_slate_bursts_raises_no_alarm():
    # one user in ~150 is new, and each comes with a whole slate of 10 outcomes at once: the share
    # is steady, but its bursts make two windows differ far more than independent draws would
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=1000)
    rng = np.random.default_rng(8)
    truth = click_bias_of(model)
    fresh = 0
    for _ in range(60):
        batch = clicks(rng, 500, truth, burst=False)
        slates = [batch[j:j + 10] for j in range(0, 500, 10)]
        for slate in slates:
            user = f"new{fresh}" if rng.random() < 1 / 150 else slate[0]["user_id"]
            fresh += user.startswith("new")
            for outcome in slate:
                outcome["user_id"] = user
        monitor.observe(batch)
        monitor.refresh_drift()
        assert gauge(metrics, "streamrec_drift_alarm", signal="new_users") == 0
    assert fresh > 10


def test_user_activity_counts_who_comes_not_who_clicks():
    """The same users ask for slates throughout; then 50 of them click almost everything shown and
    the rest nothing (what a model that suits only them would cause). Who comes did not change:
    no ``user_activity`` alarm, where counting the clicking users alarmed."""
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=300)
    rng = np.random.default_rng(5)
    raised = set()
    for batch in range(24):
        rows = []
        for slate in range(200):
            user = int(rng.integers(500))
            clicked = 4 if batch >= 12 and user < 50 else int(rng.random() < 0.3) * (batch < 12)
            rows += [{"user_id": f"u{user}", "item_id": f"i{int(rng.integers(N_ITEMS))}", "label": float(k < clicked),
                      "kind": "click", "model_version": "mf-1", "ts": 0.0, "anomalous": False, "position": k + 1,
                      "propensity": 0.2, "request_id": f"r{batch}-{slate}"} for k in range(5)]
        monitor.observe(rows)
        monitor.refresh_drift()
        raised |= {s for s, v in alarms(metrics, ("user_activity",)).items() if v == 1}
    assert not raised


def test_a_concept_drift_alarm_is_counted_though_its_gauge_is_down_by_the_next_scrape():
    """Busy traffic: the alarm's gauge holds for 500 outcomes, fewer than arrive between two
    scrapes; streamrec_drift_alarms_total keeps it (the demo and the alert rule read it)."""
    monitor, metrics, rng, truth = _steady_monitor(5)
    assert gauge(metrics, "streamrec_drift_alarms_total", signal="loss_click") == 0
    monitor.observe(clicks(rng, 6000, -truth))  # one scrape interval: the alarm, then 500 outcomes more
    assert gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 0
    assert gauge(metrics, "streamrec_drift_alarms_total", signal="loss_click") >= 1


def test_the_shadow_check_gets_each_shown_item_once_with_its_final_label():
    """Under immediate feedback a slate's items arrive as provisional negatives and a click later
    as a correction: the outcomes kept for the shadow check (``recent_outcomes``) hold each item
    once, after its window, clicked if a click corrected it; never a premature 0 or the click twice."""
    monitor, _ = make_monitor(served_model((tuple(EXAMINATION), 1.0)))
    base = {"kind": "click", "model_version": "mf-1", "anomalous": False, "propensity": 0.5, "request_id": "r1"}
    monitor.observe([{**base, "user_id": "u1", "item_id": f"i{k}", "label": 0.0, "position": k + 1, "stage": "shown",
                      "ts": 0.0} for k in range(3)])
    monitor.observe([{**base, "user_id": "u1", "item_id": "i1", "label": 1.0, "position": 2, "stage": "clicked",
                      "ts": 5.0}])
    assert monitor.recent_outcomes() == []  # the window has not passed: no label is final
    monitor.observe([{**base, "request_id": "r2", "user_id": "u2", "item_id": "i0", "label": 0.0, "position": 1,
                      "stage": "shown", "ts": 10_000.0}])
    assert [(o.request_id, o.item_id, o.label) for o in monitor.recent_outcomes()] == [
        ("r1", "i0", 0.0), ("r1", "i1", 1.0), ("r1", "i2", 0.0)]
