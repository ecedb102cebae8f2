"""Replay sources: MovieLens and Open Bandit round trips against the files, the simulator, replay."""
from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from stream.events import validate
from sim.sources import OBD_CLICK_DELAY_S, movielens_ratings, obd_events, replay, synthetic_events


@pytest.mark.data
def test_movielens_ratings_round_trip(shared_data: Path) -> None:
    path = shared_data / "ml-100k" / "u.data"
    frame = pd.read_csv(path, sep="\t", names=["user", "item", "rating", "ts"])
    events = list(movielens_ratings(path))
    assert len(events) == len(frame) == 100_000
    assert all(validate(event) == [] for event in events)
    assert [e["user_id"] for e in events] == frame["user"].astype(str).tolist()
    assert [e["item_id"] for e in events] == frame["item"].astype(str).tolist()
    assert [e["value"] for e in events] == frame["rating"].astype(float).tolist()
    assert [e["ts"] for e in events] == frame["ts"].astype(float).tolist()
    assert events[0]["event_id"] == "ml-1" and len({e["event_id"] for e in events}) == len(events)
    assert next(movielens_ratings(shared_data / "ml-100k")) == events[0]  # the folder works too


def test_movielens_rejects_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n\n1\t2\t3\n")
    with pytest.raises(ValueError, match=r"u.data:3: expected 4 tab-separated fields"):
        list(movielens_ratings(path))


@pytest.mark.data
@pytest.mark.parametrize(("policy_dir", "policy"), [("random", "uniform"), ("bts", "external")])
def test_obd_events_round_trip_exactly(shared_data: Path, policy_dir: str, policy: str) -> None:
    path = shared_data / "obd" / policy_dir / "men.csv"
    frame = pd.read_csv(path, index_col=0)
    events = list(obd_events(path))
    assert all(validate(event) == [] for event in events)
    impressions = [e for e in events if e["type"] == "impression"]
    clicks = {e["request_id"]: e for e in events if e["type"] == "click"}
    assert len(impressions) == len(frame)
    assert len(clicks) == int(frame["click"].sum()) > 0
    users = {}
    for row, event in zip(frame.itertuples(), impressions, strict=True):
        (item,) = event["items"]
        assert event["request_id"] == f"obd-{policy_dir}-{row.Index}"
        assert event["model_version"] == f"obd-{policy_dir}" and event["policy"] == policy
        assert item["item_id"] == str(row.item_id)
        assert item["position"] == row.position
        assert type(item["propensity"]) is float and item["propensity"] == row.propensity_score  # the same float
        assert event["ts"] == pd.Timestamp(row.timestamp).timestamp()
        features = (row.user_feature_0, row.user_feature_1, row.user_feature_2, row.user_feature_3)
        assert users.setdefault(features, event["user_id"]) == event["user_id"]  # stable per user
        click = clicks.get(event["request_id"])
        assert (click is not None) == (row.click == 1)
        if click:
            assert (click["user_id"], click["item_id"], click["position"]) == (event["user_id"], item["item_id"], item["position"])
            assert click["ts"] == event["ts"] + OBD_CLICK_DELAY_S
    assert len(set(users.values())) == len(users)  # distinct feature rows, distinct user ids
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)


@pytest.mark.data
def test_obd_click_follows_its_impression(shared_data: Path) -> None:
    events = list(itertools.islice(obd_events(shared_data / "obd" / "bts" / "men.csv"), 5000))
    for before, after in itertools.pairwise(events):
        if after["type"] == "click":
            assert before["type"] == "impression" and before["request_id"] == after["request_id"]


def test_obd_rejects_a_csv_without_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "random" / "men.csv"
    path.parent.mkdir()
    path.write_text("timestamp,item_id\n2019-11-24 00:00:00+00:00,1\n")
    with pytest.raises(ValueError, match="missing columns: \\(unnamed row index\\), position"):
        list(obd_events(path))


def test_synthetic_events_are_deterministic_valid_and_realistic() -> None:
    events = list(synthetic_events(5000, n_users=200, n_items=500, seed=3, slate_size=8))
    assert events == list(synthetic_events(5000, n_users=200, n_items=500, seed=3, slate_size=8))
    assert events != list(synthetic_events(5000, n_users=200, n_items=500, seed=4, slate_size=8))
    assert len(events) == 5000
    assert all(validate(event) == [] for event in events)
    ts = [e["ts"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(ts))
    assert len({e["event_id"] for e in events}) == len(events)
    kinds = Counter(e["type"] for e in events)
    assert kinds["impression"] > kinds["click"] > kinds["rating"] > 0
    shown = {}
    for event in events:
        if event["type"] == "impression":
            assert [item["position"] for item in event["items"]] == list(range(1, 9))
            assert len({item["item_id"] for item in event["items"]}) == 8
            shown[event["request_id"]] = {item["item_id"]: item["position"] for item in event["items"]}
        elif event["type"] == "click":
            assert shown[event["request_id"]][event["item_id"]] == event["position"]
        else:
            assert event["value"] in (1.0, 2.0, 3.0, 4.0, 5.0)
    by_position = Counter(e["position"] for e in events if e["type"] == "click")
    assert by_position[1] > by_position[4] > by_position[8]  # position bias


def test_synthetic_propensities_are_epsilon_greedy_probabilities() -> None:
    events = synthetic_events(2000, n_users=50, n_items=100, seed=1, slate_size=5, epsilon=0.2)
    for event in (e for e in events if e["type"] == "impression"):
        for k, item in enumerate(event["items"]):
            remaining = 100 - k
            assert item["propensity"] in (pytest.approx(0.8 + 0.2 / remaining), pytest.approx(0.2 / remaining))


def test_synthetic_rejects_a_slate_larger_than_the_catalogue() -> None:
    with pytest.raises(ValueError, match="slate_size"):
        next(synthetic_events(10, n_users=5, n_items=3, seed=0, slate_size=4))


class RecordingProducer:
    """Stands in for EventProducer: records what was sent and whether it was flushed."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.flushed = False

    def send(self, event: dict) -> None:
        self.sent.append(event)

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True


def test_replay_sends_up_to_the_limit_and_flushes() -> None:
    producer = RecordingProducer()
    events = synthetic_events(500, n_users=10, n_items=50, seed=0)
    assert replay(events, producer, limit=300, progress=False) == 300  # type: ignore[arg-type]
    assert producer.sent == list(synthetic_events(300, n_users=10, n_items=50, seed=0))
    assert producer.flushed


def test_replay_limits_the_rate() -> None:
    producer = RecordingProducer()
    start = time.monotonic()
    count = replay(synthetic_events(60, n_users=10, n_items=50, seed=0), producer, rate=200.0, progress=False)  # type: ignore[arg-type]
    elapsed = time.monotonic() - start
    assert count == 60
    assert elapsed >= 59 / 200.0 - 0.01


def test_replay_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        replay([], RecordingProducer(), rate=0)  # type: ignore[arg-type]
