"""A slate's click outcomes are scored together (learner.slate_order), whatever order they arrive in."""
import numpy as np
import pytest

from learner.slate_order import SlateOrder
from tests.unit.test_monitor_quality import EXAMINATION, click_bias_of, gauge, make_monitor, served_model


def test_positives_wait_for_their_slate_and_expire_by_event_time():
    order = SlateOrder(hold_s=100.0)
    assert order.add([("a", 1.0, 0.0, "a+"), ("b", 1.0, 10.0, "b+")]) == []
    assert order.held == 2
    assert order.add([("b", 0.0, 10.0, "b-")]) == ["b+", "b-"]
    assert order.add([(None, 3.0, 99.0, "rating")]) == ["rating"]  # a is 99 s old: still held
    assert order.add([(None, 3.0, 101.0, "rating2")]) == ["rating2", "a+"]  # now past hold_s
    assert order.held == 0


def test_the_oldest_slates_are_released_past_the_bound():
    order = SlateOrder(hold_s=1e9, max_held=2)
    assert order.add([(f"r{j}", 1.0, float(j), j) for j in range(3)]) == [0]
    assert order.held == 2
    with pytest.raises(ValueError):
        SlateOrder(hold_s=0.0)


def wait_protocol_stream(rng, truth, steps=12, slates=150, delay=2):
    """Click outcomes as the worker's wait protocol emits them: each step's positives at once, its
    slates' negatives ``delay`` steps later in one burst."""
    later: dict[int, list] = {}
    for step in range(steps + delay):
        batch = []
        if step < steps:
            for s in range(slates):
                request, user = f"s{step}-{s}", f"u{rng.integers(2000)}"
                items = rng.choice(len(truth), size=10, replace=False)
                logit = EXAMINATION[np.minimum(np.arange(10), 4)] + truth[items]
                clicked = rng.random(10) < 1.0 / (1.0 + np.exp(-logit))
                for k, (item, y) in enumerate(zip(items, clicked)):
                    outcome = {"user_id": user, "item_id": f"i{item}", "label": float(y), "kind": "click",
                               "model_version": "mf-1", "ts": step * 60.0, "anomalous": False,
                               "position": min(k + 1, 5), "propensity": 1.0, "request_id": request}
                    (batch if y else later.setdefault(step + delay, [])).append(outcome)
        yield batch + later.pop(step, [])


def test_served_figures_do_not_swing_with_the_arrival_order_of_a_slates_outcomes():
    model = served_model((tuple(EXAMINATION), 1.0))
    monitor, metrics = make_monitor(model, window=2000)
    calibration = []
    for step, batch in enumerate(wait_protocol_stream(np.random.default_rng(9), click_bias_of(model))):
        monitor.observe(batch)
        if step >= 4:
            calibration.append(gauge(metrics, "streamrec_served_calibration"))
        assert gauge(metrics, "streamrec_drift_alarm", signal="loss_click") == 0
    assert 0.85 < min(calibration) and max(calibration) < 1.15, calibration
