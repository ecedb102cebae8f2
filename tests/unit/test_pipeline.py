"""The ingest pipeline without Kafka or Faust: dead letters with their reasons and raw bytes,
dedupe, logging, the join, ratings, idle-time slate closing, restore after a restart, and
anomaly flags."""
from __future__ import annotations

import base64
import json
import time

import msgspec
import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from stream.examples import example_rows
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.worker.pipeline import IngestPipeline, Record

T = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


# -- helpers --------------------------------------------------------------------------------------


def imp(event_id, request_id, ts, items, user_id="u1", model_version="m1", policy="epsilon_greedy") -> dict:
    """An impression; ``items`` are (item_id, propensity) at positions 1..n."""
    return {"event_id": event_id, "type": "impression", "schema_version": 1, "user_id": user_id, "ts": ts,
            "request_id": request_id, "model_version": model_version, "policy": policy,
            "items": [{"item_id": i, "position": k + 1, "propensity": p} for k, (i, p) in enumerate(items)]}


def clk(event_id, request_id, item_id, ts, user_id="u1") -> dict:
    return {"event_id": event_id, "type": "click", "schema_version": 1, "user_id": user_id, "ts": ts,
            "request_id": request_id, "item_id": item_id}


def rat(event_id, item_id, value, ts, user_id="u1") -> dict:
    return {"event_id": event_id, "type": "rating", "schema_version": 1, "user_id": user_id, "ts": ts,
            "item_id": item_id, "value": value}


def raw(event: dict) -> bytes:
    return json.dumps(event).encode()


def records(*values: bytes | dict, partition: int = 0, start: int = 0) -> list[Record]:
    """Records at consecutive offsets; dicts are JSON-encoded, bytes go as they are."""
    return [Record(value=v if isinstance(v, (bytes, type(None))) else raw(v), partition=partition, offset=start + k)
            for k, v in enumerate(values)]


def item_rows(examples) -> list[dict]:
    """One dict per labelled item of the messages ``examples``: the header and the item's fields."""
    return example_rows(list(examples)).to_pylist()


def by_item(examples) -> dict[tuple[str, str], dict]:
    """The item rows of ``examples`` by (request_id, item_id), ratings by ("rating", item_id)."""
    return {(e["request_id"], e["item_id"]) if e["kind"] == "click" else ("rating", e["item_id"]): e
            for e in item_rows(examples)}


def summary(examples) -> list[tuple]:
    """(kind, request_id, item_id, label) of every labelled item of ``examples``, sorted."""
    return sorted((e["kind"], e["request_id"] or "", e["item_id"], e["label"]) for e in item_rows(examples))


def stages(examples) -> list[tuple]:
    """(stage, request_id, item ids) of every message of ``examples``, sorted: how they are framed."""
    return sorted((e.stage, e.request_id or "", tuple(i.item_id for i in e.items)) for e in examples)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FakeClock:
    """A monotonic clock moved by hand, given to the pipeline as ``IngestPipeline(clock=...)``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class FakeDetector:
    """Flags a fixed set of users; records what it was shown."""

    def __init__(self, flagged: set[str]) -> None:
        self.flagged = flagged
        self.batches: list[list[str]] = []
        self.last_scores = {"user": [9.0], "item": []}

    def observe_batch(self, events, partitions):
        self.batches.append([e["event_id"] for e in events])
        return [{"entity": f"user:{u}", "score": 9.0} for u in sorted({e["user_id"] for e in events} & self.flagged)]

    def is_flagged(self, user_id: str) -> bool:
        return user_id in self.flagged


def write_result(log: DeltaLog, result) -> None:
    """What the worker does with a batch result: event rows and the examples' item rows into the log."""
    log.append(EVENTS, result.log_table)
    log.append(EXAMPLES, example_rows(result.examples))


# -- dead letters ---------------------------------------------------------------------------------

GOOD_IMP = imp("g1", "r1", T, [("a", 0.5), ("b", 0.25)])


def _bad(**change) -> bytes:
    event = rat("bad", "i", 1.0, T)
    for k, v in change.items():
        if v is None:
            event.pop(k)
        else:
            event[k] = v
    return raw(event)


BAD_INPUTS = {
    "not_json": b'{"event_id": "x", ',
    "not_utf8": b'{"event_id": "\xff\xfe"}',
    "too_large": raw(dict(rat("big", "i", 1.0, T), pad="x" * 70_000)),
    "not_object": b'[1, 2, 3]',
    "unknown_type": _bad(type="view"),
    "unsupported_schema_version": _bad(schema_version=2),
    "missing_field": _bad(user_id=None),
    "wrong_type": _bad(ts="yesterday"),
    "invalid_value": raw(imp("badimp", "r9", T, [("a", 0.0)])),  # propensity must be > 0
}


def test_every_dlq_reason_in_a_mixed_batch():
    """Each bad message is dead-lettered with its reason, detail, exact raw bytes and source; the good ones around them are accepted."""
    good = [raw(GOOD_IMP), raw(clk("g2", "r1", "b", T + 1)), raw(rat("g3", "z", 3.5, T + 2))]
    values, reasons = [good[0]], []
    for reason, bad in BAD_INPUTS.items():
        values.append(bad)
        reasons.append(reason)
    values.insert(5, good[1])
    values.append(good[2])
    batch = [Record(value=v, partition=4, offset=100 + k, key=f"k{k}".encode(), topic="events")
             for k, v in enumerate(values)]
    before = {r: sample("streamrec_dlq_total", reason=r) for r in reasons}

    result = IngestPipeline().process(batch)

    assert [m["reason"] for _, m in result.dlq] == reasons
    bad_records = [r for r in batch if r.value not in good]
    for (key, message), record in zip(result.dlq, bad_records):
        assert key == record.key
        assert base64.b64decode(message["raw"]) == record.value
        assert message["raw_encoding"] == "base64"
        assert message["source"] == {"topic": "events", "partition": 4, "offset": record.offset}
        assert isinstance(message["detail"], str) and message["detail"]
        assert len(message["detail"]) <= 2000
        assert isinstance(message["dlq_ts"], float)
        json.dumps(message)  # the DLQ message itself must be JSON-serialisable
    assert result.accepted == 3
    assert result.duplicates == 0
    assert sorted({r["event_id"] for r in result.log_table.to_pylist()}) == ["g1", "g2", "g3"]
    offsets = {r["event_id"]: (r["source_partition"], r["source_offset"]) for r in result.log_table.to_pylist()}
    assert offsets == {"g1": (4, 100), "g2": (4, 105), "g3": (4, 111)}
    assert len(result.log_table.to_pylist()) == 4  # two rows for the impression, one each for click and rating
    assert summary(result.examples) == [("click", "r1", "b", 1.0), ("rating", "", "z", 3.5)]
    assert stages(result.examples) == [("clicked", "r1", ("b",)), ("rated", "", ("z",))]
    for r in reasons:
        assert sample("streamrec_dlq_total", reason=r) == before[r] + 1


def test_dlq_detail_names_the_problem():
    """The detail says which field is wrong, e.g. the propensity of item 0 or the missing user_id."""
    result = IngestPipeline().process(records(BAD_INPUTS["invalid_value"], BAD_INPUTS["missing_field"]))
    details = [m["detail"] for _, m in result.dlq]
    assert "items[0].propensity" in details[0]
    assert "user_id" in details[1]


def test_none_value_is_dead_lettered_with_empty_raw():
    """A record with no value (a tombstone) is not_json with empty raw bytes, and the worker goes on."""
    result = IngestPipeline().process(records(None, rat("ok", "z", 1.0, T)))
    ((key, message),) = result.dlq
    assert message["reason"] == "not_json"
    assert message["raw"] == ""
    assert message["source"]["offset"] == 0
    assert result.accepted == 1


def test_too_large_raw_is_kept_whole():
    """The DLQ raw of an oversize message is the whole input, not a prefix."""
    big = BAD_INPUTS["too_large"]
    assert len(big) > 65536
    ((_, message),) = IngestPipeline().process(records(big)).dlq
    assert message["reason"] == "too_large"
    assert base64.b64decode(message["raw"]) == big


# -- dedupe ---------------------------------------------------------------------------------------


def test_duplicates_counted_and_not_logged():
    """A repeated event_id (same or a later batch) is counted as a duplicate, not logged, not joined twice."""
    p = IngestPipeline()
    dup_before = sample("streamrec_duplicates_total")
    first = p.process(records(GOOD_IMP, clk("c1", "r1", "a", T + 1), GOOD_IMP))
    assert (first.accepted, first.duplicates) == (2, 1)
    assert [r["event_id"] for r in first.log_table.to_pylist()] == ["g1", "g1", "c1"]
    second = p.process(records(clk("c1", "r1", "a", T + 1), GOOD_IMP, start=3))
    assert (second.accepted, second.duplicates) == (0, 2)
    assert second.log_table.num_rows == 0 and second.examples == []
    assert second.join_outcomes == {}
    assert len(first.examples) == 1
    assert stages(first.examples) == [("clicked", "r1", ("a",))]
    assert sample("streamrec_duplicates_total") == dup_before + 3


# -- join through the pipeline -------------------------------------------------------------------


def test_click_join_and_outcomes():
    """Clicks join to the slate (position/propensity/weight from the impression) and unjoined ones are counted by reason."""
    p = IngestPipeline(attribution_window_s=60)
    result = p.process(records(
        imp("i1", "r1", T, [("a", 0.5), ("b", 0.01)]),
        clk("c1", "r1", "b", T + 3),
        clk("c2", "r1", "b", T + 4),       # duplicate_click
        clk("c3", "nope", "a", T + 5),     # orphan_click
        clk("c4", "r1", "zz", T + 6),      # item_not_shown
        clk("c5", "r1", "a", T + 61),      # late_click (ts)
    ))
    assert result.join_outcomes == {"matched": 1, "duplicate_click": 1, "orphan_click": 1,
                                    "item_not_shown": 1, "late_click": 1}
    # the late click's ts moved event time past T + 60, so the slate closed in this batch: a is a negative
    assert summary(result.examples) == [("click", "r1", "a", 0.0), ("click", "r1", "b", 1.0)]
    assert stages(result.examples) == [("clicked", "r1", ("b",)), ("closed", "r1", ("a",))]
    ex = by_item(result.examples)[("r1", "b")]
    assert (ex["item_id"], ex["label"], ex["position"], ex["propensity"], ex["weight"]) == ("b", 1.0, 2, 0.01, 50.0)
    assert (ex["model_version"], ex["policy"], ex["ts"], ex["event_id"]) == ("m1", "epsilon_greedy", T + 3, "c1")
    assert ex["stage"] == "clicked"
    assert result.accepted == 6
    assert len(result.log_table.to_pylist()) == 7  # every accepted click is logged, joined or not


def test_negatives_emitted_when_event_time_passes_window():
    """A later batch whose events move event time past ts + window emits the unclicked items as negatives."""
    p = IngestPipeline(attribution_window_s=60)
    p.process(records(imp("i1", "r1", T, [("a", 0.5), ("b", 0.25), ("c", 1.0)]), clk("c1", "r1", "b", T + 3)))
    assert p.process(records(rat("x1", "z", 1.0, T + 60), start=2)).examples[1:] == []
    result = p.process(records(rat("x2", "z", 1.0, T + 60.5), start=3))
    assert summary(result.examples) == [("click", "r1", "a", 0.0), ("click", "r1", "c", 0.0), ("rating", "", "z", 1.0)]
    assert stages(result.examples) == [("closed", "r1", ("a", "c")), ("rated", "", ("z",))]
    (closed,) = [e for e in result.examples if e.stage == "closed"]
    assert (closed.ts, closed.event_id, closed.user_id) == (T, "i1", "u1")
    negs = by_item(result.examples)
    assert (negs[("r1", "a")]["position"], negs[("r1", "a")]["weight"], negs[("r1", "a")]["ts"]) == (1, 2.0, T)
    assert (negs[("r1", "c")]["position"], negs[("r1", "c")]["propensity"]) == (3, 1.0)


def test_rating_becomes_example_directly():
    """A rating is an example at once: kind rating, label = value, propensity 1, weight 1, no slate fields."""
    result = IngestPipeline().process(records(rat("r1", "movie", 4, T + 0.25, user_id="u7")))
    assert msgspec.to_builtins(result.examples) == [{
        "kind": "rating", "stage": "rated", "user_id": "u7", "request_id": None, "model_version": None,
        "policy": None, "variant": None, "ts": T + 0.25, "anomalous": False, "event_id": "r1",
        "items": [{"item_id": "movie", "position": None, "propensity": 1.0, "weight": 1.0, "label": 4.0, "score": None}],
    }]
    assert isinstance(result.examples[0].items[0].label, float)


def test_example_metric_labels():
    """streamrec_examples_total counts ratings, positives and negatives under their label names."""
    names = [("rating", "rating"), ("click", "positive"), ("click", "negative")]
    before = {n: sample("streamrec_examples_total", kind=n[0], label=n[1]) for n in names}
    p = IngestPipeline(attribution_window_s=10)
    p.process(records(imp("i1", "r1", T, [("a", 1.0), ("b", 1.0)]), clk("c1", "r1", "a", T + 1),
                      rat("x", "z", 2.0, T + 20)))
    after = {n: sample("streamrec_examples_total", kind=n[0], label=n[1]) for n in names}
    assert {n: after[n] - before[n] for n in names} == {names[0]: 1, names[1]: 1, names[2]: 1}


def test_example_metric_counts_labelled_items_not_messages(clock):
    """streamrec_examples_total counts labelled items: a ``closed`` message of 3 unclicked items
    adds 3 to negative, whether the batch or the idle timer closes the slate."""
    names = [("rating", "rating"), ("click", "positive"), ("click", "negative")]

    def counts() -> dict:
        return {n: sample("streamrec_examples_total", kind=n[0], label=n[1]) for n in names}

    p = IngestPipeline(attribution_window_s=10, idle_grace_s=1, clock=clock)
    before = counts()
    result = p.process(records(
        imp("i1", "r1", T, [("a", 1.0), ("b", 0.5), ("c", 0.5), ("d", 0.25)]), clk("c1", "r1", "a", T + 1),
        imp("i2", "r2", T + 15, [("x", 1.0), ("y", 1.0), ("z", 1.0)]), rat("x1", "q", 2.0, T + 20)))
    assert stages(result.examples) == [("clicked", "r1", ("a",)), ("closed", "r1", ("b", "c", "d")),
                                       ("rated", "", ("q",))]
    after = counts()
    assert {n: after[n] - before[n] for n in names} == {names[0]: 1, names[1]: 1, names[2]: 3}
    clock.now += 100
    assert stages(p.tick().examples) == [("closed", "r2", ("x", "y", "z"))]
    assert sample("streamrec_examples_total", kind="click", label="negative") == after[names[2]] + 3


# -- tick -----------------------------------------------------------------------------------------


def test_tick_closes_slates_after_idle_grace(clock):
    """With no events for idle_grace_s, event time follows the wall clock and due slates close."""
    p = IngestPipeline(attribution_window_s=60, idle_grace_s=5, clock=clock)
    p.process(records(imp("i1", "r1", T, [("a", 0.5), ("b", 0.25)]), clk("c1", "r1", "a", T + 1)))
    clock.now += 4.9
    assert p.tick().examples == []            # still inside the grace period
    clock.now += 55.1                         # idle 60 s: watermark T + 1 + 60 > T + 60
    result = p.tick()
    assert summary(result.examples) == [("click", "r1", "b", 0.0)]
    assert stages(result.examples) == [("closed", "r1", ("b",))]
    assert result.examples[0].items[0].weight == 4.0
    assert (result.examples[0].ts, result.examples[0].event_id) == (T, "i1")
    assert p.open_slates == 0
    clock.now += 100
    assert p.tick().examples == []            # closed once


def test_tick_waits_for_idle_grace_even_when_window_passed(clock):
    """Before idle_grace_s of quiet, tick closes nothing even if the idle time alone would pass the window."""
    p = IngestPipeline(attribution_window_s=1, idle_grace_s=5, clock=clock)
    p.process(records(imp("i1", "r1", T, [("a", 0.5)])))
    clock.now += 4.9                          # watermark would be T + 4.9 > T + 1
    assert p.tick().examples == []
    assert p.open_slates == 1
    clock.now += 0.1
    closed = p.tick().examples
    assert summary(closed) == [("click", "r1", "a", 0.0)]
    assert stages(closed) == [("closed", "r1", ("a",))]


def test_tick_does_not_close_before_window(clock):
    """Idle time that keeps the watermark at or before ts + window closes nothing."""
    p = IngestPipeline(attribution_window_s=60, idle_grace_s=1, clock=clock)
    p.process(records(imp("i1", "r1", T, [("a", 0.5)])))
    clock.now += 60.0                         # watermark T + 60: on the deadline, still open
    assert p.tick().examples == []
    assert p.open_slates == 1
    clock.now += 0.5
    closed = p.tick().examples
    assert summary(closed) == [("click", "r1", "a", 0.0)]
    assert stages(closed) == [("closed", "r1", ("a",))]


def test_tick_without_events_does_nothing(clock):
    """tick() before any event (or with no open slate) returns nothing."""
    p = IngestPipeline(idle_grace_s=0.0, clock=clock)
    clock.now += 10_000
    assert p.tick().examples == []
    p.process(records(rat("x", "z", 1.0, T)))
    clock.now += 10_000
    assert p.tick().examples == []


def test_tick_with_real_clock():
    """The default clock is the real one: after a short real sleep, tick closes a slate whose window has passed."""
    p = IngestPipeline(attribution_window_s=0.05, idle_grace_s=0.01)
    p.process(records(imp("i1", "r1", T, [("a", 0.5)])))
    time.sleep(0.2)
    closed = p.tick().examples
    assert summary(closed) == [("click", "r1", "a", 0.0)]
    assert stages(closed) == [("closed", "r1", ("a",))]


# -- anomaly flags --------------------------------------------------------------------------------


def test_examples_of_flagged_users_are_marked_anomalous(clock):
    """The detector sees every accepted event; examples (positives, negatives, ratings, tick negatives) of flagged users are anomalous."""
    det = FakeDetector({"bad"})
    p = IngestPipeline(attribution_window_s=60, detector=det, idle_grace_s=1, clock=clock)
    flagged_before = sample("streamrec_examples_flagged_anomalous_total")
    result = p.process(records(
        imp("i1", "r1", T, [("a", 0.5), ("b", 0.5)], user_id="bad"),
        imp("i2", "r2", T, [("a", 0.5), ("b", 0.5)], user_id="good"),
        clk("c1", "r1", "a", T + 1, user_id="bad"),
        clk("c2", "r2", "a", T + 1, user_id="good"),
        rat("x1", "z", 2.0, T + 2, user_id="bad"),
        rat("x2", "z", 2.0, T + 2, user_id="good"),
        b"not json",
    ))
    assert det.batches == [["i1", "i2", "c1", "c2", "x1", "x2"]]
    assert result.anomalies == [{"entity": "user:bad", "score": 9.0}]
    flags = {(e.user_id, e.stage): e.anomalous for e in result.examples}
    assert flags == {("bad", "clicked"): True, ("good", "clicked"): False, ("bad", "rated"): True, ("good", "rated"): False}
    assert len(result.examples) == 4
    clock.now += 100
    negs = p.tick().examples
    assert stages(negs) == [("closed", "r1", ("b",)), ("closed", "r2", ("b",))]
    assert sorted((e["user_id"], e["item_id"], e["anomalous"]) for e in item_rows(negs)) == [
        ("bad", "b", True), ("good", "b", False)]
    assert sample("streamrec_examples_flagged_anomalous_total") == flagged_before + 3


def test_detector_not_called_for_batch_without_accepted_events():
    """A batch of only dead letters and duplicates is not shown to the detector."""
    det = FakeDetector(set())
    p = IngestPipeline(detector=det)
    p.process(records(rat("x", "z", 1.0, T)))
    result = p.process(records(b"nope", rat("x", "z", 1.0, T), start=1))
    assert det.batches == [["x"]]
    assert result.anomalies == []


# -- restore --------------------------------------------------------------------------------------


def first_run(log: DeltaLog) -> tuple[list[Record], IngestPipeline]:
    """A first worker: an old slate (closed), an open slate r1 with b clicked, a rating; all logged."""
    p = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    batch1 = records(
        imp("old", "r0", T - 4000, [("x", 0.5), ("y", 1.0)]),          # previous hour
        imp("i1", "r1", T, [("a", 0.5), ("b", 0.25), ("c", 0.01)]),
    )
    batch2 = records(clk("c1", "r1", "b", T + 10), rat("x1", "z", 3.0, T + 20), start=2)
    r1 = p.process(batch1)
    assert summary(r1.examples) == [("click", "r0", "x", 0.0), ("click", "r0", "y", 0.0)]
    assert stages(r1.examples) == [("closed", "r0", ("x", "y"))]
    write_result(log, r1)
    r2 = p.process(batch2)
    assert summary(r2.examples) == [("click", "r1", "b", 1.0), ("rating", "", "z", 3.0)]
    assert stages(r2.examples) == [("clicked", "r1", ("b",)), ("rated", "", ("z",))]
    write_result(log, r2)
    return batch1 + batch2, p


def test_restore_from_empty_log(tmp_path):
    """Restoring from a log with no events restores nothing."""
    p = IngestPipeline()
    assert p.restore(DeltaLog(tmp_path)) == {"events": 0, "open_slates": 0}
    assert p.open_slates == 0 and p.remembered_ids == 0


def test_restore_treats_logged_ids_as_duplicates(tmp_path):
    """After restore, Kafka redelivering the first run's events gives only duplicates: nothing logged or emitted."""
    log = DeltaLog(tmp_path)
    replay, _ = first_run(log)
    p2 = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    assert p2.restore(log) == {"events": 4, "open_slates": 1}
    result = p2.process(replay)
    assert (result.accepted, result.duplicates) == (0, 4)
    assert result.log_table.to_pylist() == [] and result.examples == [] and result.dlq == []


def test_restore_closes_open_slates_with_right_negatives(tmp_path):
    """The restored slate closes with negatives for a and c only (b was clicked before the restart), and r0 is not closed twice."""
    log = DeltaLog(tmp_path)
    first_run(log)
    p2 = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    p2.restore(log)
    assert p2.process(records(rat("y1", "z", 1.0, T + 1800, user_id="u2"), start=10)).examples[1:] == []
    result = p2.process(records(rat("y2", "z", 1.0, T + 1800.5, user_id="u2"), start=11))
    assert stages(result.examples) == [("closed", "r1", ("a", "c")), ("rated", "", ("z",))]
    negs = by_item(e for e in result.examples if e.kind == "click")
    assert sorted(negs) == [("r1", "a"), ("r1", "c")]
    a, c = negs[("r1", "a")], negs[("r1", "c")]
    assert (a["label"], a["position"], a["propensity"], a["weight"]) == (0.0, 1, 0.5, 2.0)
    assert (c["label"], c["position"], c["propensity"], c["weight"]) == (0.0, 3, 0.01, 50.0)
    assert {e["model_version"] for e in negs.values()} == {"m1"}
    assert {e["policy"] for e in negs.values()} == {"epsilon_greedy"}
    assert {(e["user_id"], e["ts"], e["event_id"]) for e in negs.values()} == {("u1", T, "i1")}


def test_restore_keeps_clicked_pairs_and_accepts_new_clicks(tmp_path):
    """After restore, a new click on b is a duplicate_click (no second positive); a click on a is a positive."""
    log = DeltaLog(tmp_path)
    first_run(log)
    p2 = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    p2.restore(log)
    result = p2.process(records(clk("c2", "r1", "b", T + 30), clk("c3", "r1", "a", T + 40), start=10))
    assert result.join_outcomes == {"duplicate_click": 1, "matched": 1}
    assert summary(result.examples) == [("click", "r1", "a", 1.0)]
    assert stages(result.examples) == [("clicked", "r1", ("a",))]
    assert result.examples[0].items[0].weight == 2.0
    later = p2.process(records(rat("y2", "z", 1.0, T + 2000), start=12))
    assert summary(e for e in later.examples if e.kind == "click") == [("click", "r1", "c", 0.0)]
    assert stages(e for e in later.examples if e.kind == "click") == [("closed", "r1", ("c",))]


def test_restore_then_tick_closes_slates(tmp_path, clock):
    """A restored pipeline that sees no new events still closes the restored slate by idle time."""
    log = DeltaLog(tmp_path)
    first_run(log)
    p2 = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800, idle_grace_s=1, clock=clock)
    p2.restore(log)
    clock.now += 1790.0           # watermark T + 20 + 1790 = T + 1810 > T + 1800
    closed = p2.tick().examples
    assert summary(closed) == [("click", "r1", "a", 0.0), ("click", "r1", "c", 0.0)]
    assert stages(closed) == [("closed", "r1", ("a", "c"))]


def test_restore_does_not_reemit_negatives_of_slates_closed_by_tick(tmp_path, clock):
    """A slate closed by tick() before the restart (its negatives logged) is not reopened: no duplicate negatives."""
    log = DeltaLog(tmp_path)
    p1 = IngestPipeline(attribution_window_s=60, idle_grace_s=1, clock=clock)
    write_result(log, p1.process(records(imp("i1", "r1", T, [("a", 0.5), ("b", 0.5)]))))
    clock.now += 100
    closed = p1.tick()
    assert summary(closed.examples) == [("click", "r1", "a", 0.0), ("click", "r1", "b", 0.0)]
    assert stages(closed.examples) == [("closed", "r1", ("a", "b"))]
    write_result(log, closed)
    assert sorted(log.read(EXAMPLES, columns=["stage", "item_id"]).itertuples(index=False, name=None)) == [
        ("closed", "a"), ("closed", "b")]

    p2 = IngestPipeline(attribution_window_s=60, idle_grace_s=1)
    p2.restore(log)
    result = p2.process(records(rat("x", "z", 1.0, T + 500), start=1))
    assert summary(result.examples) == [("rating", "", "z", 1.0)]


def test_restore_reads_rows_logged_before_stages(tmp_path, clock):
    """Rows logged before the ``stage`` column have a null stage: a label-0 row still marks its
    slate closed (no duplicate negatives), a label-1 row is only a click (the slate stays open)."""
    log = DeltaLog(tmp_path)
    p1 = IngestPipeline(attribution_window_s=60, idle_grace_s=1, clock=clock)
    first = p1.process(records(imp("i1", "r1", T, [("a", 0.5), ("b", 0.5)]),
                               imp("i2", "r2", T + 50, [("x", 0.5), ("y", 0.5)]), clk("c1", "r2", "x", T + 55)))
    log.append(EVENTS, first.log_table)
    clock.now += 20  # idle: watermark T + 75 closes r1 (deadline T + 60), not r2 (T + 110)
    closed = p1.tick()
    assert stages(first.examples + closed.examples) == [("clicked", "r2", ("x",)), ("closed", "r1", ("a", "b"))]
    rows = example_rows(first.examples + closed.examples)
    legacy = rows.set_column(rows.schema.get_field_index("stage"), "stage", pa.nulls(rows.num_rows, pa.string()))
    log.append(EXAMPLES, legacy)
    assert log.read(EXAMPLES, columns=["stage"])["stage"].isna().all()

    p2 = IngestPipeline(attribution_window_s=60, idle_grace_s=1)
    assert p2.restore(log) == {"events": 3, "open_slates": 1}  # r2 only: r1's label-0 rows closed it
    assert p2.process(records(clk("c2", "r2", "x", T + 56), start=3)).join_outcomes == {"duplicate_click": 1}
    result = p2.process(records(rat("z1", "z", 1.0, T + 111), start=4))
    assert stages(result.examples) == [("closed", "r2", ("y",)), ("rated", "", ("z",))]


def test_click_on_slate_closed_before_restart_is_late_not_orphan(tmp_path):
    """A click for a slate that closed before the restart is late_click after restore, as it would have been live."""
    log = DeltaLog(tmp_path)
    p1 = IngestPipeline(attribution_window_s=60)
    write_result(log, p1.process(records(imp("i1", "r1", T, [("a", 1.0)]), rat("x", "z", 1.0, T + 70))))
    late = records(clk("c1", "r1", "a", T + 5), start=2)
    assert p1.process(late).join_outcomes == {"late_click": 1}  # the live answer

    p2 = IngestPipeline(attribution_window_s=60)
    p2.restore(log)
    assert p2.process(late).join_outcomes == {"late_click": 1}


def test_a_restored_slate_keeps_its_ab_variant(tmp_path):
    """Negatives of a slate rebuilt from the log after a restart name the variant that served it."""
    log = DeltaLog(tmp_path)
    p = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    write_result(log, p.process(records(dict(imp("iv", "rv", T, [("a", 0.5), ("b", 0.5)]), variant="control"))))
    p2 = IngestPipeline(dedupe_window_s=10_000, attribution_window_s=1800)
    p2.restore(log)
    result = p2.process(records(rat("y9", "z", 1.0, T + 2000), start=5))
    negatives = [e for e in result.examples if e.kind == "click"]
    assert stages(negatives) == [("closed", "rv", ("a", "b"))]
    assert {e["variant"] for e in item_rows(negatives)} == {"control"}


@pytest.mark.parametrize("feedback", ["immediate", "wait"])
def test_a_batch_s_log_rows_are_its_examples_rows_in_message_order(clock, feedback):
    """``BatchResult.example_rows`` (``shown`` outcomes taken from the impressions' log rows in
    columns) equals the rows read from the example Structs: values, weights, scores, variants,
    anomaly flags and message order, over a batch that mixes every stage, with the items of one
    slate scored and of another not."""
    scored = imp("i3", "r3", T + 1, [("a", 0.01), ("c", 0.3)], user_id="bad")
    for item, score in zip(scored["items"], (0.25, 0.5)):
        item["score"] = score
    scored["variant"] = "B"
    p = IngestPipeline(attribution_window_s=60, detector=FakeDetector({"bad"}), feedback=feedback, clock=clock)
    result = p.process(records(
        imp("i1", "r1", T, [("a", 0.5), ("b", 0.02), ("c", 1.0)]),
        clk("c1", "r1", "b", T + 1),
        rat("x1", "z", 4.5, T + 1),
        scored,
        imp("i1", "r1", T, [("a", 0.5)]),  # a duplicate: no row
        clk("c2", "r3", "c", T + 2, user_id="bad"),
        imp("i4", "r4", T + 100, [("d", 0.125)], user_id="good"),  # closes r1 and r3 under wait
    ))
    stages_sent = [e.stage for e in result.examples]
    assert ("shown" in stages_sent) == (feedback == "immediate") and "clicked" in stages_sent
    assert ("closed" in stages_sent) == (feedback == "wait")
    assert result.example_rows.equals(example_rows(result.examples))
    assert result.example_rows.num_rows == sum(len(e.items) for e in result.examples)
