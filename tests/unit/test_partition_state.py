"""State owned by partition (DESIGN.md "The worker's state"): each source partition has its own
dedupe window, open slates and watermark; ``assign`` rebuilds one partition from its own log rows
up to the offset the log records, ``revoke`` drops it. Without Kafka: the rebalance itself runs
against the real broker in tests/integration/test_worker_faults.py."""
from __future__ import annotations

import pytest

from stream.examples import example_rows
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.worker.pipeline import IngestPipeline, Record
from tests.unit.test_pipeline import T, clk, imp, rat, raw, stages, summary

GROUP, TOPIC = "g", "events"


def at(partition: int, offset: int, event: dict) -> Record:
    return Record(raw(event), partition=partition, offset=offset, topic=TOPIC)


def flush(log: DeltaLog, result, offsets: dict[int, int]) -> None:
    """What the worker's flush does: events, then examples, each with the partitions' last offsets."""
    recorded = {(TOPIC, p): o for p, o in offsets.items()}
    log.append(EVENTS, result.log_table, recorded, GROUP)
    log.append(EXAMPLES, example_rows(result.examples), recorded, GROUP)


@pytest.mark.hardening  # issue 19, item 1: the watermark is per partition
def test_a_lagging_partition_keeps_its_slates_open_while_another_moves_on():
    """Partition 1's event time passing a slate's window does not close partition 0's slate:
    its click, arriving later, is still a positive (no late_click caused by another partition)."""
    p = IngestPipeline(attribution_window_s=60)
    p.process([at(0, 0, imp("i0", "r0", T, [("a", 0.5), ("b", 0.5)]))])
    moved_on = p.process([at(1, 0, rat("x", "z", 1.0, T + 3600, user_id="u2"))])
    assert summary(moved_on.examples) == [("rating", "", "z", 1.0)]
    late_but_not_for_p0 = p.process([at(0, 1, clk("c0", "r0", "a", T + 30))])
    assert late_but_not_for_p0.join_outcomes == {"matched": 1}
    assert stages(late_but_not_for_p0.examples) == [("clicked", "r0", ("a",))]
    closed = p.process([at(0, 2, rat("y", "z", 1.0, T + 61))])
    assert ("click", "r0", "b", 0.0) in summary(closed.examples)
    assert stages(closed.examples) == [("closed", "r0", ("b",)), ("rated", "", ("z",))]


def test_dedupe_is_per_partition_and_tick_closes_each_idle_partition():
    """The same event id in two partitions is two events (keys pin an event to one partition,
    so only a producer's retry repeats it, always in the same partition)."""
    p = IngestPipeline(attribution_window_s=60)
    assert p.process([at(0, 0, rat("same", "z", 1.0, T))]).accepted == 1
    assert p.process([at(1, 0, rat("same", "z", 1.0, T))]).accepted == 1
    assert p.process([at(0, 1, rat("same", "z", 1.0, T))]).duplicates == 1
    assert p.remembered_ids == 2


def test_assign_rebuilds_one_partition_up_to_the_recorded_offset(tmp_path):
    """A second worker assigned partition 0 takes its ids and open slates from the log rows of
    partition 0 only, up to the offset given: the slate moved with its partition and its click
    joins; events past that offset are not taken as duplicates (Kafka delivers them again)."""
    log = DeltaLog(tmp_path)
    first = IngestPipeline(attribution_window_s=600)
    result = first.process([
        at(0, 0, imp("i0", "r0", T, [("a", 0.5), ("b", 0.5)])),
        at(1, 0, imp("i1", "r1", T, [("c", 0.5)], user_id="u2")),
        at(0, 1, rat("x0", "z", 2.0, T + 1)),
    ])
    flush(log, result, {0: 1, 1: 0})
    flush(log, first.process([at(0, 2, rat("x1", "z", 3.0, T + 2))]), {})  # logged, offset not recorded

    assert log.resume_offsets(GROUP, TOPIC, [0, 1, 2]) == {0: 2, 1: 1, 2: None}
    second = IngestPipeline(attribution_window_s=600)
    assert second.assign(0, log, until_offset=1) == {"events": 2, "open_slates": 1, "from_log": True}
    assert set(second.partitions) == {0}
    replay = second.process([at(0, 1, rat("x0", "z", 2.0, T + 1)), at(0, 2, rat("x1", "z", 3.0, T + 2)),
                             at(0, 3, clk("c0", "r0", "b", T + 5))])
    assert (replay.duplicates, replay.accepted) == (1, 2)
    assert replay.join_outcomes == {"matched": 1}
    assert sorted(second.process([at(1, 1, clk("c1", "r1", "c", T + 5, user_id="u2"))]).join_outcomes) == [
        "orphan_click"]  # partition 1 was not assigned here: its slate is not this worker's


def test_a_revoked_partition_handed_back_untouched_is_kept(tmp_path):
    """Kafka's eager rebalance revokes every partition and often hands the same ones back: when
    the log's offset shows nobody processed the partition since, its state is reused as it was;
    when somebody did, it is rebuilt from the log."""
    log = DeltaLog(tmp_path)
    p = IngestPipeline(attribution_window_s=600)
    flush(log, p.process([at(0, 0, imp("i0", "r0", T, [("a", 0.5)])), at(0, 1, rat("x", "z", 1.0, T))]), {0: 1})
    kept = p.partition(0)
    p.revoke(0)
    assert p.partitions == {}
    assert p.assign(0, log, until_offset=1)["from_log"] is False and p.partition(0) is kept
    p.revoke(0)
    other = IngestPipeline(attribution_window_s=600)  # another worker had it meanwhile
    other.assign(0, log, until_offset=1)
    flush(log, other.process([at(0, 2, rat("y", "z", 1.0, T + 1))]), {0: 2})
    assert p.assign(0, log, until_offset=2) == {"events": 3, "open_slates": 1, "from_log": True}
    assert p.partition(0) is not kept


def test_revoke_drops_the_partition_and_reassignment_restores_it(tmp_path):
    """After revoke nothing of the partition is in use; assigning it again (the state kept aside
    forgotten) brings back what the log holds, including a clicked item (no second positive)
    and the watermark."""
    log = DeltaLog(tmp_path)
    p = IngestPipeline(attribution_window_s=600)
    result = p.process([at(0, 0, imp("i0", "r0", T, [("a", 0.5), ("b", 0.5)])), at(0, 1, clk("c0", "r0", "a", T + 1))])
    flush(log, result, {0: 1})
    p.revoke(0)
    p.forget_revoked()
    assert p.partitions == {} and p.open_slates == 0
    assert p.assign(0, log, until_offset=1) == {"events": 2, "open_slates": 1, "from_log": True}
    again = p.process([at(0, 2, clk("c1", "r0", "a", T + 2)), at(0, 3, rat("y", "z", 1.0, T + 601))])
    assert again.join_outcomes == {"duplicate_click": 1}
    assert ("click", "r0", "b", 0.0) in summary(again.examples)
    assert stages(again.examples) == [("closed", "r0", ("b",)), ("rated", "", ("z",))]
    assert p.partition(0).last_event_ts == T + 601
