"""The anomaly detector's windows belong to the source partition (DESIGN.md "The worker's state"):
one set of entity windows per partition, rebuilt from that partition's log rows at every
assignment, parked with the partition's state at revocation and dropped with it; the forests,
likelihoods and flags stay the worker's. No Kafka here: pipelines and logs are driven directly."""
from __future__ import annotations

import gc
import json
import weakref

from stream.anomaly import AnomalyDetector
from stream.log.table import DeltaLog
from stream.worker.pipeline import IngestPipeline, Record
from tests.traffic import BASE_TS, click_flood
from tests.unit.test_partition_state import TOPIC, flush
from tests.unit.test_pipeline import clk, imp

SPLIT = BASE_TS + 600.0  # the first worker has partition 0 before this event time, another one after
BATCH = 100


def source(user_id: str) -> int:
    """The partition of a user's events (Kafka keys them by user): 0 for even users and the bot, 1 for odd."""
    return int(user_id[1:]) % 2 if user_id.startswith("u") else 0


def traffic() -> list[Record]:
    """20 users over 30 items for 1,200 s (so every item is clicked in both partitions), as records
    of their user's partition at consecutive offsets per partition, in time order."""
    events = click_flood(20, 30, 1200.0, bot=(0.0, 0.0), seed=3, slate=5)
    next_offset = {0: 0, 1: 0}
    out = []
    for event in events:
        partition = source(event["user_id"])
        out.append(Record(json.dumps(event).encode(), partition, next_offset[partition], topic=TOPIC))
        next_offset[partition] += 1
    return out


def new_pipeline() -> IngestPipeline:
    return IngestPipeline(dedupe_window_s=3600, attribution_window_s=60, detector=AnomalyDetector(seed=0))


def run(pipeline: IngestPipeline, records: list[Record], log: DeltaLog | None = None) -> None:
    """Process the records batch by batch; with a log, flush each batch recording its last offsets."""
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        result = pipeline.process(batch)
        if log is not None:
            flush(log, result, {r.partition: r.offset for r in batch})


def ts_of(record: Record) -> float:
    return json.loads(record.value)["ts"]


def assert_same_windows(got, expected) -> None:
    """Same users and items, with the same features and event counts."""
    assert got.users.keys() == expected.users.keys() and got.items.keys() == expected.items.keys()
    for user in expected.users:
        assert got.user_features(user) == expected.user_features(user), user
        assert got.users[user].n_events == expected.users[user].n_events, user
    for item in expected.items:
        assert got.item_features(item) == expected.item_features(item), item
        assert got.items[item].n_clicks == expected.items[item].n_clicks, item


def test_a_partition_that_moved_and_came_back_has_the_windows_of_one_that_never_moved(tmp_path):
    """Worker A has partitions 0 and 1; partition 0 moves to worker B for the second half of the
    stream and comes back to A, rebuilt from the log: A's windows of partition 0 (users and items)
    equal those of a worker that had both partitions all along, and so do its windows of 1."""
    records = traffic()
    first = [r for r in records if ts_of(r) < SPLIT]
    second = [r for r in records if ts_of(r) >= SPLIT]
    still = new_pipeline()
    run(still, records)

    log = DeltaLog(tmp_path)
    moved = new_pipeline()
    for partition in (0, 1):
        moved.assign(partition, log)
    run(moved, first, log)
    moved.revoke(0)
    moved.forget_revoked()
    other = new_pipeline()
    other.assign(0, log, until_offset=max(r.offset for r in first if r.partition == 0))
    run(other, [r for r in second if r.partition == 0], log)
    run(moved, [r for r in second if r.partition == 1], log)
    last = max(r.offset for r in records if r.partition == 0)
    assert moved.assign(0, log, until_offset=last)["from_log"]

    assert len(still.detector.windows[0].users) == 10 and len(still.detector.windows[0].items) == 30
    for partition in (0, 1):
        assert_same_windows(moved.detector.windows[partition], still.detector.windows[partition])
    assert moved.detector.windows[0].user_features("u4") == still.detector.windows[0].user_features("u4")
    moved.assign(0, log, until_offset=last)  # assigned again: rebuilt, replacing, not added to
    assert_same_windows(moved.detector.windows[0], still.detector.windows[0])


def test_windows_of_a_revoked_partition_are_parked_and_dropped_by_forget_revoked():
    """Revoking takes the partition's windows out of the detector at once; ``forget_revoked``
    frees them; the other partition's windows stay."""
    pipeline = new_pipeline()
    run(pipeline, traffic())
    detector = pipeline.detector
    windows = weakref.ref(detector.windows[0])
    pipeline.revoke(0)
    assert set(detector.windows) == {1} and windows() is not None  # parked with the partition's state
    pipeline.forget_revoked()
    gc.collect()
    assert windows() is None
    assert set(detector.windows) == {1} and len(detector.windows[1].users) == 10


def test_a_revoked_partition_handed_back_untouched_keeps_its_windows(tmp_path):
    """When the log shows nobody processed the partition since its revocation, its parked windows
    come back as they were (not read from the log again)."""
    log = DeltaLog(tmp_path)
    pipeline = new_pipeline()
    records = traffic()
    run(pipeline, records, log)
    kept = pipeline.detector.windows[0]
    features = kept.user_features("u4")
    pipeline.revoke(0)
    restored = pipeline.assign(0, log, until_offset=max(r.offset for r in records if r.partition == 0))
    assert restored["from_log"] is False
    assert pipeline.detector.windows[0] is kept and kept.user_features("u4") == features


def test_an_entitys_window_in_one_partition_does_not_see_another_partitions_events():
    """Item x clicked by user a in partition 0 and by user b in partition 1: each partition's
    window of x counts its own clicks only, equals the window of a detector that saw only that
    partition's events, and is scored on its own; a is not in partition 1's windows."""
    def slate(partition: int, user: str, k: int) -> list[Record]:
        ts = BASE_TS + 10.0 * k
        return [Record(json.dumps(imp(f"{user}i{k}", f"{user}r{k}", ts, [("x", 0.5), ("y", 0.5)], user)).encode(),
                       partition, 2 * k),
                Record(json.dumps(clk(f"{user}c{k}", f"{user}r{k}", "x", ts + 1, user)).encode(), partition, 2 * k + 1)]

    p0 = [r for k in range(3) for r in slate(0, "a", k)]
    p1 = [r for k in range(5) for r in slate(1, "b", k)]
    pipeline = IngestPipeline(detector=AnomalyDetector(min_events=3, score_every_s=0.0, seed=0))
    pipeline.process(sorted(p0 + p1, key=ts_of))
    windows = pipeline.detector.windows
    assert (windows[0].items["x"].n_clicks, windows[1].items["x"].n_clicks) == (3, 5)
    assert "a" in windows[0].users and "a" not in windows[1].users
    alone = AnomalyDetector(min_events=3, score_every_s=0.0, seed=0)
    alone.observe_batch([json.loads(r.value) for r in p0])
    assert_same_windows(windows[0], alone.windows[0])
    assert pipeline.detector.last_scores["item"].shape == (2,)  # x once per partition, in one forest


def test_a_lagging_partition_keeps_its_entities_while_another_moves_on():
    """Idle entities are forgotten by their partition's own event time: partition 1 running two
    hours ahead does not expire partition 0's users, partition 0 moving on does."""
    detector = AnomalyDetector(seed=0)  # idle_s 1800
    event = {"type": "rating", "user_id": "a", "ts": BASE_TS, "item_id": "x"}
    detector.observe_batch([event], [0])
    detector.observe_batch([dict(event, user_id="b", ts=BASE_TS + 7200.0)], [1])
    assert "a" in detector.windows[0].users
    detector.observe_batch([dict(event, user_id="c", ts=BASE_TS + 7200.0)], [0])
    assert set(detector.windows[0].users) == {"c"}


def test_checkpoint_keeps_scoring_times_per_partition(tmp_path):
    """An item scored at different times in two partitions gets each time back in each partition's
    rebuilt window; the models are the worker's, one set for both partitions."""
    def clicks(user: str, start: float) -> list[dict]:
        return [{"type": "click", "user_id": user, "ts": start + k, "item_id": "x"} for k in range(3)]

    events = clicks("a", BASE_TS) + clicks("b", BASE_TS + 30.0)
    partitions = [0] * 3 + [1] * 3
    live = AnomalyDetector(min_events=3, score_every_s=0.0, seed=0)
    live.observe_batch(events, partitions)
    live.snapshot().save(tmp_path / "ckpt")
    restarted = AnomalyDetector(min_events=3, score_every_s=0.0, seed=0)
    restarted.warm_windows(events[:3], 0)
    restarted.warm_windows(events[3:], 1)
    assert restarted.load_checkpoint(tmp_path / "ckpt")
    assert [restarted.windows[p].items["x"].scored_ts for p in (0, 1)] == [BASE_TS + 2.0, BASE_TS + 32.0]
    assert restarted.forests["item"].n_points == live.forests["item"].n_points == 2
