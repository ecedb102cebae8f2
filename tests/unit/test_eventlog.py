"""The event log as Delta tables: one row per shown item for impressions, UTC date/hour
partitions, one commit per append carrying the partitions' offsets (a replay is not appended
twice), reads filtered by since_ts and partition, and exact round trips."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
import pytest

from stream.events import Event, to_event
from stream.log.table import (
    EVENTS,
    EVENTS_SCHEMA,
    EXAMPLES,
    EXAMPLES_SCHEMA,
    DeltaLog,
    events_table,
    with_partition_columns,
)

# 2023-11-14 22:13:20 UTC
T = 1_700_000_000.0


def utc(y, mo, d, h, mi=0, s=0.0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=timezone.utc).timestamp() + s


def impression(ts=T, event_id="imp1", request_id="r1", with_extras=True) -> dict:
    event = {
        "event_id": event_id, "type": "impression", "schema_version": 1, "user_id": "u1", "ts": ts,
        "request_id": request_id, "model_version": "m3", "policy": "softmax",
        "items": [
            {"item_id": "a", "position": 1, "propensity": 0.7, "score": 2.5},
            {"item_id": "b", "position": 2, "propensity": 0.2},
            {"item_id": "c", "position": 4, "propensity": 0.1, "score": -1.25},
        ],
    }
    if with_extras:
        event["surface"] = "home"
        event["context"] = {"device": "ios", "n": 3}
    return event


def click(ts=T + 1, event_id="clk1") -> dict:
    return {"event_id": event_id, "type": "click", "schema_version": 1, "user_id": "u1", "ts": ts,
            "request_id": "r1", "item_id": "b", "position": 2}


def rating(ts=T + 2, event_id="rat1", value=4.5, user_id="u1") -> dict:
    return {"event_id": event_id, "type": "rating", "schema_version": 1, "user_id": user_id, "ts": ts,
            "item_id": "z", "value": value}


def structs(events: list[dict]) -> list[Event]:
    """The test's event dictionaries as the Structs ``decode`` gives (``events_table``'s input)."""
    return [to_event(e) for e in events]


def event_rows(event: dict, partition: int | None = None, offset: int | None = None) -> list[dict]:
    """The log rows of one event on its own, as dictionaries."""
    return events_table(structs([event]), [partition], [offset]).to_pylist()


def example_row(ts, item_id="a", label=1.0, event_id=None) -> dict:
    return {"user_id": "u1", "item_id": item_id, "label": label, "position": 1, "propensity": 0.5,
            "weight": 2.0, "model_version": "m1", "request_id": "r1", "ts": ts, "kind": "click",
            "anomalous": False, "policy": "greedy", "event_id": event_id or f"e{ts}"}


# -- event_rows -----------------------------------------------------------------------------------


def test_impression_explodes_to_one_row_per_shown_item():
    """An impression becomes one row per item with its position, propensity, score and the slate size."""
    rows = event_rows(impression(), partition=3, offset=42)
    assert [(r["item_id"], r["position"], r["propensity"], r["score"], r["slate_size"]) for r in rows] == [
        ("a", 1, 0.7, 2.5, 3),
        ("b", 2, 0.2, None, 3),
        ("c", 4, 0.1, -1.25, 3),
    ]
    for r in rows:
        assert set(r) == set(EVENTS_SCHEMA.names)
        assert (r["event_id"], r["type"], r["user_id"], r["ts"]) == ("imp1", "impression", "u1", T)
        assert (r["request_id"], r["model_version"], r["policy"], r["surface"]) == ("r1", "m3", "softmax", "home")
        assert json.loads(r["context"]) == {"device": "ios", "n": 3}
        assert (r["source_partition"], r["source_offset"]) == (3, 42)
        assert r["value"] is None


def test_impression_without_optional_fields():
    """Missing surface and context are null in every row."""
    rows = event_rows(impression(with_extras=False))
    assert len(rows) == 3
    assert all(r["surface"] is None and r["context"] is None for r in rows)
    assert all(r["source_partition"] is None and r["source_offset"] is None for r in rows)


def test_click_and_rating_are_one_row_each():
    """A click keeps its request/item/position; a rating its item and value; neither has slate columns."""
    (c,) = event_rows(click(), partition=0, offset=7)
    assert (c["type"], c["request_id"], c["item_id"], c["position"], c["value"]) == ("click", "r1", "b", 2, None)
    assert (c["propensity"], c["score"], c["slate_size"], c["model_version"]) == (None, None, None, None)
    (r,) = event_rows(rating(value=3))
    assert (r["type"], r["item_id"], r["value"], r["request_id"], r["position"]) == ("rating", "z", 3, None, None)
    assert isinstance(r["ts"], float)


def test_events_table_is_the_rows_of_each_event_in_order():
    """A batch's table holds every event's rows, in event order, with each event's source offsets."""
    batch = [impression(event_id="i1"), click(event_id="c1"), rating(event_id="r1"),
             impression(event_id="i2", request_id="r2", with_extras=False)]
    table = events_table(structs(batch), [0, 1, 2, 3], [10, 11, 12, 13])
    assert table.schema == EVENTS_SCHEMA
    expected = [row for k, event in enumerate(batch) for row in event_rows(event, k, 10 + k)]
    assert table.to_pylist() == expected
    assert [r["event_id"] for r in expected] == ["i1"] * 3 + ["c1", "r1"] + ["i2"] * 3


def test_append_accepts_an_arrow_table_and_partitions_it_by_hour(tmp_path):
    """A table whose rows are not in time order lands in one data file per UTC (date, hour), nothing lost."""
    batch = [rating(ts=utc(2024, 1, 1, 5), event_id="a"), rating(ts=utc(2024, 1, 1, 7), event_id="b"),
             rating(ts=utc(2023, 12, 31, 23, 59, 59.5), event_id="c")]
    log = DeltaLog(tmp_path)
    assert log.append(EVENTS, events_table(structs(batch))) == 3
    assert sorted(log.read(EVENTS)["event_id"]) == ["a", "b", "c"]
    files = sorted(str(p.parent.relative_to(tmp_path)) for p in (tmp_path / EVENTS).rglob("*.parquet")
                   if "_delta_log" not in p.parts)
    assert files == ["events/date=2023-12-31/hour=23", "events/date=2024-01-01/hour=05", "events/date=2024-01-01/hour=07"]
    assert log.data_files(EVENTS) == 3


def test_each_append_is_one_commit_with_the_offsets_of_its_partitions(tmp_path):
    """The offsets ride in the same commit as the rows, as Delta transaction ids per group, topic and partition."""
    log = DeltaLog(tmp_path)
    rows = events_table(structs([rating(event_id="a"), rating(event_id="b")]), [0, 1], [5, 9])
    log.append(EVENTS, rows, offsets={("ev", 0): 5, ("ev", 1): 9}, group="g")
    table = DeltaTable(str(tmp_path / EVENTS))
    assert table.version() == 0
    assert [table.transaction_version(f"g:ev:{p}") for p in (0, 1, 2)] == [5, 9, None]
    assert log.recorded_offsets(EVENTS, "g", "ev", [0, 1]) == {0: 5, 1: 9}
    assert log.recorded_offsets(EVENTS, "other-group", "ev", [0]) == {0: None}


def test_a_replayed_batch_is_not_appended_twice(tmp_path):
    """Rows at or below the offset the table records for their partition are left out; newer rows go in."""
    log = DeltaLog(tmp_path)
    first = events_table(structs([rating(event_id=f"e{k}") for k in range(4)]), [0, 0, 1, 1], [0, 1, 0, 1])
    log.append(EVENTS, first, offsets={("ev", 0): 1, ("ev", 1): 1}, group="g")
    replay = events_table(structs([rating(event_id=f"e{k}") for k in range(1, 6)]), [0, 1, 1, 0, 1], [1, 0, 1, 2, 2])
    assert log.append(EVENTS, replay, offsets={("ev", 0): 2, ("ev", 1): 2}, group="g") == 2
    assert sorted(log.read(EVENTS)["event_id"]) == ["e0", "e1", "e2", "e3", "e4", "e5"]
    assert log.recorded_offsets(EVENTS, "g", "ev", [0, 1]) == {0: 2, 1: 2}


def test_an_append_whose_offsets_are_all_recorded_is_skipped(tmp_path):
    """A retried examples append (its commit had gone through) adds nothing and makes no commit."""
    log = DeltaLog(tmp_path)
    assert log.append(EXAMPLES, [example_row(T)], offsets={("ev", 0): 3}, group="g") == 1
    assert log.append(EXAMPLES, [example_row(T)], offsets={("ev", 0): 3}, group="g") == 0
    assert len(log.read(EXAMPLES)) == 1 and DeltaTable(str(tmp_path / EXAMPLES)).version() == 0


def test_resume_offsets_follow_the_table_that_lags(tmp_path):
    """One past the last offset both tables record; None for a partition the log knows nothing of."""
    log = DeltaLog(tmp_path)
    log.append(EVENTS, events_table(structs([rating()]), [0], [8]), offsets={("ev", 0): 8}, group="g")
    assert log.resume_offsets("g", "ev", [0, 1]) == {0: None, 1: None}  # examples not committed yet
    log.append(EXAMPLES, [], offsets={("ev", 0): 6}, group="g")
    assert log.resume_offsets("g", "ev", [0, 1]) == {0: 7, 1: None}


def test_empty_append_without_offsets_writes_nothing(tmp_path):
    """Appending no rows and no offsets creates no table."""
    log = DeltaLog(tmp_path)
    assert log.append(EVENTS, []) == 0
    assert list(tmp_path.iterdir()) == [] and log.data_files(EVENTS) == 0


def test_uncommitted_data_files_are_invisible(tmp_path):
    """A data file without a commit (a worker killed between the two) is not read."""
    log = DeltaLog(tmp_path)
    log.append(EVENTS, events_table(structs([rating()])))
    folder = next(p.parent for p in (tmp_path / EVENTS).rglob("*.parquet") if "_delta_log" not in p.parts)
    pq.write_table(events_table(structs([rating(event_id="ghost")])), folder / "part-crashed.parquet")
    assert log.read(EVENTS)["event_id"].tolist() == ["rat1"]


def test_files_have_the_dataset_schema(tmp_path):
    """Data files carry the dataset's Arrow schema (the partition columns live in the folders)."""
    log = DeltaLog(tmp_path)
    log.append(EVENTS, event_rows(impression()))
    log.append(EXAMPLES, [example_row(T)])
    for dataset, schema in ((EVENTS, EVENTS_SCHEMA), (EXAMPLES, EXAMPLES_SCHEMA)):
        (path,) = [p for p in (tmp_path / dataset).rglob("*.parquet") if "_delta_log" not in p.parts]
        assert pq.read_schema(path).remove_metadata() == schema


# -- read -----------------------------------------------------------------------------------------


def test_read_round_trip_is_exact(tmp_path):
    """Floats (ts, propensity, score, value) and ints come back bit-for-bit; nulls stay null."""
    log = DeltaLog(tmp_path)
    ts = 1_700_000_000.123456789
    imp = impression(ts=ts)
    imp["items"][0]["propensity"] = 0.1
    imp["items"][1]["propensity"] = 1 / 3
    imp["items"][0]["score"] = 1e-300
    rows = event_rows(imp, 1, 2**40) + event_rows(rating(ts=ts + 0.1, value=-0.30000000000000004))
    log.append(EVENTS, rows)
    df = log.read(EVENTS).sort_values(["ts", "position"]).reset_index(drop=True)
    assert list(df.columns) == EVENTS_SCHEMA.names
    assert len(df) == 4
    assert df["ts"].tolist() == [ts, ts, ts, ts + 0.1]
    assert df["propensity"].tolist()[:3] == [0.1, 1 / 3, 0.1]
    assert df["score"].tolist()[0] == 1e-300
    assert pd.isna(df["score"].tolist()[1])
    assert df["value"].tolist()[3] == -0.30000000000000004
    assert df["position"].tolist()[:3] == [1, 2, 4]
    assert df["source_offset"].tolist()[:3] == [2**40] * 3
    assert pd.isna(df["propensity"].tolist()[3])


def test_read_since_ts_filters_rows_across_hours(tmp_path):
    """since_ts keeps the rows at or after it, in the boundary hour and after it."""
    log = DeltaLog(tmp_path)
    times = {"h10": utc(2024, 1, 1, 10, 59, 59.0), "h11a": utc(2024, 1, 1, 11, 0),
             "h11b": utc(2024, 1, 1, 11, 20), "h11c": utc(2024, 1, 1, 11, 40), "h12": utc(2024, 1, 2, 12, 5)}
    for eid, ts in times.items():
        log.append(EVENTS, event_rows(rating(ts=ts, event_id=eid)))
    assert sorted(log.read(EVENTS, since_ts=utc(2024, 1, 1, 11, 20))["event_id"]) == ["h11b", "h11c", "h12"]
    assert sorted(log.read(EVENTS, since_ts=utc(2024, 1, 1, 11))["event_id"]) == ["h11a", "h11b", "h11c", "h12"]


def test_read_one_source_partition_up_to_an_offset(tmp_path):
    """A partition's rows up to an offset: what a worker restores when it is assigned that partition."""
    log = DeltaLog(tmp_path)
    log.append(EVENTS, events_table(structs([rating(event_id=f"e{k}") for k in range(5)]), [0, 1, 0, 1, 0], [0, 0, 1, 1, 2]))
    assert sorted(log.read(EVENTS, source_partition=0)["event_id"]) == ["e0", "e2", "e4"]
    assert sorted(log.read(EVENTS, source_partition=0, until_offset=1)["event_id"]) == ["e0", "e2"]
    assert log.partitions_logged() == [0, 1]
    assert log.newest_ts(EVENTS, source_partition=1) == T + 2


def test_read_since_ts_with_columns_excluding_ts_still_filters_rows(tmp_path):
    """read(since_ts, columns=[...]) returns only rows with ts >= since_ts even when ts is not a requested column."""
    log = DeltaLog(tmp_path)
    log.append(EXAMPLES, [example_row(T, event_id="old"), example_row(T + 10, event_id="new")])  # same hour
    df = log.read(EXAMPLES, since_ts=T + 5, columns=["event_id", "label"])
    assert list(df.columns) == ["event_id", "label"]
    assert df["event_id"].tolist() == ["new"]


def test_read_columns_subset(tmp_path):
    """columns selects and orders the returned columns."""
    log = DeltaLog(tmp_path)
    log.append(EXAMPLES, [example_row(T, event_id="e1")])
    df = log.read(EXAMPLES, columns=["label", "event_id"])
    assert list(df.columns) == ["label", "event_id"]
    assert df.to_dict("records") == [{"label": 1.0, "event_id": "e1"}]


def test_a_column_the_table_has_not_seen_reads_as_nulls_and_joins_on_append(tmp_path):
    """A table written before a column joined the schema reads it as nulls; the next append adds it."""
    log = DeltaLog(tmp_path)
    older = events_table(structs([rating(event_id="old")])).drop_columns(["variant"])
    write_deltalake(str(tmp_path / EVENTS), with_partition_columns(older), partition_by=["date", "hour"])
    before = log.read(EVENTS, columns=["event_id", "variant"])
    assert before["event_id"].tolist() == ["old"] and before["variant"].isna().all()
    newer = impression(event_id="new")
    newer["variant"] = "B"
    log.append(EVENTS, event_rows(newer))
    got = log.read(EVENTS, columns=["event_id", "variant"]).drop_duplicates()
    assert sorted(map(tuple, got.fillna("-").values.tolist())) == [("new", "B"), ("old", "-")]


@pytest.mark.parametrize("dataset, schema", [(EVENTS, EVENTS_SCHEMA), (EXAMPLES, EXAMPLES_SCHEMA)])
def test_empty_read_returns_schema_columns(tmp_path, dataset, schema):
    """Reading a table that does not exist yet gives an empty frame with exactly the schema's columns."""
    log = DeltaLog(tmp_path / "nothing-here")
    df = log.read(dataset)
    assert len(df) == 0
    assert list(df.columns) == schema.names
    assert log.data_files(dataset) == 0
    df2 = log.read(dataset, since_ts=T, columns=["ts", "user_id"])
    assert list(df2.columns) == ["ts", "user_id"] and len(df2) == 0


def test_since_ts_beyond_all_data_returns_empty_with_columns(tmp_path):
    """A since_ts after every row yields the empty schema frame, not an error."""
    log = DeltaLog(tmp_path)
    log.append(EXAMPLES, [example_row(T)])
    df = log.read(EXAMPLES, since_ts=T + 7200)
    assert len(df) == 0 and list(df.columns) == EXAMPLES_SCHEMA.names


def test_examples_round_trip_with_null_position(tmp_path):
    """Rating examples (position null) and click examples share the examples table."""
    log = DeltaLog(tmp_path)
    rating_ex = dict(example_row(T, item_id="z", label=4.5, event_id="r"), position=None, kind="rating",
                     model_version=None, request_id=None, policy=None, anomalous=True)
    log.append(EXAMPLES, [example_row(T, event_id="c"), rating_ex])
    df = log.read(EXAMPLES).set_index("event_id")
    assert df.loc["c", "position"] == 1 and df.loc["c", "label"] == 1.0
    assert pd.isna(df.loc["r", "position"]) and df.loc["r", "label"] == 4.5
    assert bool(df.loc["r", "anomalous"]) is True and bool(df.loc["c", "anomalous"]) is False
