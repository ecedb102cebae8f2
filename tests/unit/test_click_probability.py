"""Click probabilities at a position (issue 14, deliverable 1): the learner's PositionCalibration
trained as the learner service trains it, published with deltas and snapshots, kept by serving's
model and by the learner's checkpoint."""
import numpy as np
import pytest

from learner.service import Learner
from learner.settings import LearnerSettings
from learner.updates import DeltaAssembler, ModelRows, delta_messages, read_snapshot, write_snapshot
from serving.model import ServingModel
from stream.events import Impression, Item
from stream.examples import CLICKED, CLOSED, click_example, example_batch, example_rows

N_USERS, N_ITEMS, RANK, SLATE = 300, 120, 3, 5


def learner_in(tmp_path) -> Learner:
    return Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=8, device="cpu",
                                   checkpoint_dir=tmp_path / "ckpt", store_dir=tmp_path / "store"))


def position_world(seed: int, n_slates: int):
    """Slates of 5 random items; examination 1/k at position k, attractiveness from a rank-3 model.

    Yields batches of 100 slates' outcome messages (``stream.examples``): per slate a ``clicked``
    message for each clicked item and a ``closed`` one of the items nobody clicked."""
    rng = np.random.default_rng(seed)
    users, items = rng.normal(0, 0.8, (N_USERS, RANK)), rng.normal(0, 0.8, (N_ITEMS, RANK))
    item_bias = rng.normal(-1.0, 0.5, N_ITEMS)
    slates = 0
    for _ in range(n_slates // 100):
        u = rng.integers(N_USERS, size=100).repeat(SLATE)
        i = np.concatenate([rng.choice(N_ITEMS, SLATE, replace=False) for _ in range(100)])
        k = np.tile(np.arange(1, SLATE + 1), 100)
        attractive = 1.0 / (1.0 + np.exp(-(np.einsum("ij,ij->i", users[u], items[i]) + item_bias[i])))
        clicks = rng.random(len(u)) < attractive / k
        batch = []
        for s in range(0, len(u), SLATE):
            slates += 1
            impression = Impression(schema_version=1, event_id=f"imp-{slates}", user_id=f"u{u[s]}", ts=0.0,
                                    request_id=f"r{slates}", model_version="m", policy="uniform",
                                    items=[Item(f"i{b}", position=int(p), propensity=SLATE / N_ITEMS)
                                           for b, p in zip(i[s:s + SLATE], k[s:s + SLATE])])
            clicked = clicks[s:s + SLATE]
            batch += [click_example(impression, [item], CLICKED, 0.0, f"clk-{slates}-{item.position}", 50.0)
                      for item, c in zip(impression.items, clicked) if c]
            if not clicked.all():
                batch.append(click_example(impression, [item for item, c in zip(impression.items, clicked) if not c],
                                           CLOSED, 0.0, impression.event_id, 50.0))
        yield batch


def test_predicted_ctr_per_position_is_within_10_percent_of_the_observed_after_warm_up(tmp_path):
    learner = learner_in(tmp_path)
    predicted, observed, positions = [], [], []
    for step, messages in enumerate(position_world(seed=0, n_slates=16_000)):
        batch = example_batch(messages)
        rows = batch.rows
        # what learn() does inside: the calibration of before the batch, at the shown positions
        p = np.clip(learner.model.predict(rows["user_id"].to_pylist(), rows["item_id"].to_pylist(), "click"),
                    1e-12, 1 - 1e-12)
        k = rows["position"].to_numpy()
        calibrated = learner.calibration.predict(np.log(p) - np.log1p(-p), k)
        assert learner.learn(batch) == rows.num_rows == 100 * SLATE
        if step >= 40:  # warm-up: 4000 slates
            predicted.append(calibrated), observed.append(rows["label"].to_numpy()), positions.append(k)
    predicted, observed, positions = map(np.concatenate, (predicted, observed, positions))
    ratios = [predicted[positions == k].mean() / observed[positions == k].mean() for k in range(1, SLATE + 1)]
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios
    assert learner.calibration.intercepts[0] > learner.calibration.intercepts[SLATE - 1] + 1.0  # 1/k was learned
    click_quality = learner.quality["click"]
    assert click_quality.logloss() < click_quality.baseline_logloss()
    assert click_quality.rmse() < click_quality.baseline_rmse()


def test_the_uncalibrated_click_probability_misses_the_observed_ctr_per_position(tmp_path):
    """The same world without the calibration: the test above can fail."""
    learner = learner_in(tmp_path)
    batches = list(position_world(seed=1, n_slates=6000))
    for messages in batches[:-10]:
        learner.learn(example_batch(messages))
    tail = example_rows([m for messages in batches[-10:] for m in messages])
    p = learner.model.predict(tail["user_id"].to_pylist(), tail["item_id"].to_pylist(), "click")
    k, y = tail["position"].to_numpy(), tail["label"].to_numpy()
    ratios = [p[k == j].mean() / y[k == j].mean() for j in range(1, SLATE + 1)]
    assert any(abs(r - 1.0) > 0.1 for r in ratios), ratios


def test_calibration_travels_in_deltas_snapshots_and_checkpoints(tmp_path):
    learner = learner_in(tmp_path)
    for messages in position_world(seed=2, n_slates=3000):
        learner.learn(example_batch(messages))
    intercepts, slope = learner.click_calibration()
    assert slope != 1.0 and intercepts[0] != intercepts[3]

    users, items = learner.model.export_rows(None, None)
    assembler = DeltaAssembler()
    messages = delta_messages("mf", 1, learner.model.global_mean, learner.model.click_intercept, users, items,
                              click_calibration=learner.click_calibration(), max_rows=100)
    delta = [d for d in (assembler.add(v) for _, v in messages) if d is not None][0]
    served = ServingModel.empty("mf", 8).apply([delta])
    assert served.click_calibration == (intercepts, slope)

    write_snapshot(tmp_path / "store", "mf", 1, learner.model.global_mean, learner.model.click_intercept,
                   users, items, click_calibration=learner.click_calibration())
    snapshot_model = ServingModel.from_snapshot(read_snapshot(tmp_path / "store" / "mf" / "mf-1"))
    rows_u, rows_i = served.users.rows(["u1", "u2"]), served.items.rows(["i1", "i2"])
    for k in (1, 4):
        expected = learner.calibration.predict(
            np.log(learner.model.predict(["u1", "u2"], ["i1", "i2"], "click"))
            - np.log1p(-learner.model.predict(["u1", "u2"], ["i1", "i2"], "click")), np.array([k, k]))
        np.testing.assert_allclose(snapshot_model.click_probability_at(rows_u, rows_i, np.array([k, k])),
                                   expected, rtol=1e-4)

    learner.checkpoint()
    restored = learner_in(tmp_path)
    np.testing.assert_allclose(restored.calibration.intercepts, learner.calibration.intercepts)
    assert restored.calibration.slope == pytest.approx(learner.calibration.slope)


def test_a_model_without_calibration_gives_the_plain_sigmoid_at_every_position():
    items = ModelRows(["a"], np.zeros((1, 1)), np.zeros(1), np.array([0.5]))
    messages = delta_messages("mf", 1, 3.0, -1.0, ModelRows.empty(1), items)
    for _, value in messages:
        value.pop("click_calibration")  # an older learner
    delta = DeltaAssembler().add(messages[0][1])
    model = ServingModel.empty("mf", 1).apply([delta])
    p = model.click_probability_at(np.array([-1, -1]), model.items.rows(["a", "a"]), np.array([1, 7]))
    np.testing.assert_allclose(p, 1.0 / (1.0 + np.exp(0.5)))
