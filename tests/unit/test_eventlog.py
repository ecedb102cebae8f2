"""The Parquet event log: one row per shown item for impressions, UTC date/hour partitions,
atomic whole-file writes, reads filtered by since_ts, and exact round trips."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest

from stream.log.table import (
    EVENTS,
    EVENTS_SCHEMA,
    EXAMPLES,
    EXAMPLES_SCHEMA,
    ParquetLog,
    events_table,
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


def event_rows(event: dict, partition: int | None = None, offset: int | None = None) -> list[dict]:
    """The log rows of one event on its own, as dictionaries."""
    return events_table([event], [partition], [offset]).to_pylist()


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
    table = events_table(batch, [0, 1, 2, 3], [10, 11, 12, 13])
    assert table.schema == EVENTS_SCHEMA
    expected = [row for k, event in enumerate(batch) for row in event_rows(event, k, 10 + k)]
    assert table.to_pylist() == expected
    assert [r["event_id"] for r in expected] == ["i1"] * 3 + ["c1", "r1"] + ["i2"] * 3


def test_write_accepts_an_arrow_table_and_splits_it_by_hour(tmp_path):
    """A table whose rows are not in time order still lands one file per hour, nothing lost."""
    batch = [rating(ts=utc(2024, 1, 1, 5), event_id="a"), rating(ts=utc(2024, 1, 1, 7), event_id="b"),
             rating(ts=utc(2024, 1, 1, 5, 30), event_id="c")]
    paths = ParquetLog(tmp_path).write(EVENTS, events_table(batch))
    assert sorted(p.parent.name for p in paths) == ["hour=05", "hour=07"]
    assert sorted(ParquetLog(tmp_path).read(EVENTS)["event_id"]) == ["a", "b", "c"]


def test_staged_files_are_invisible_until_committed_and_removable(tmp_path):
    """stage writes temporary files readers ignore; commit renames them; remove_temporary deletes
    what was staged and never committed (a worker stopped in between)."""
    log = ParquetLog(tmp_path)
    staged = log.stage(EVENTS, events_table([rating(event_id="kept")]))
    assert log.files(EVENTS) == [] and all(tmp.exists() for tmp, _ in staged)
    assert log.commit(staged) == [final for _, final in staged]
    assert log.read(EVENTS)["event_id"].tolist() == ["kept"]
    log.stage(EXAMPLES, [example_row(T)])
    log.stage(EVENTS, events_table([rating(event_id="lost")]))
    assert log.remove_temporary() == 2
    assert log.read(EVENTS)["event_id"].tolist() == ["kept"] and log.read(EXAMPLES).empty
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [staged[0][1].name]


# -- write: partitions and atomicity --------------------------------------------------------------


def test_write_partitions_by_utc_date_and_hour(tmp_path):
    """Rows go to events/date=YYYY-MM-DD/hour=HH by their UTC event time, one file per hour."""
    log = ParquetLog(tmp_path)
    rows = (event_rows(rating(ts=utc(2023, 12, 31, 23, 59, 59.5), event_id="x1"))
            + event_rows(rating(ts=utc(2024, 1, 1, 0), event_id="x2"))
            + event_rows(rating(ts=utc(2024, 1, 1, 0, 30), event_id="x3"))
            + event_rows(rating(ts=utc(2024, 1, 1, 13, 5), event_id="x4")))
    paths = log.write(EVENTS, rows, tag="p0-17")
    rel = sorted(str(p.parent.relative_to(tmp_path)) for p in paths)
    assert rel == ["events/date=2023-12-31/hour=23", "events/date=2024-01-01/hour=00", "events/date=2024-01-01/hour=13"]
    assert all(p.name.startswith("part-p0-17-") and p.suffix == ".parquet" for p in paths)
    by_folder = {p.parent.name + p.parent.parent.name: sorted(pq.read_table(p).column("event_id").to_pylist())
                 for p in paths}
    assert by_folder == {"hour=23date=2023-12-31": ["x1"], "hour=00date=2024-01-01": ["x2", "x3"],
                         "hour=13date=2024-01-01": ["x4"]}


def test_write_empty_rows_writes_nothing(tmp_path):
    """Writing no rows creates no file and no folder."""
    assert ParquetLog(tmp_path).write(EVENTS, []) == []
    assert list(tmp_path.iterdir()) == []


def test_write_leaves_no_tmp_files(tmp_path):
    """After writes every file in the tree is a finished part-*.parquet; no .tmp file remains."""
    log = ParquetLog(tmp_path)
    for k in range(3):
        log.write(EVENTS, event_rows(impression(event_id=f"i{k}", ts=T + 3600 * k)))
        log.write(EXAMPLES, [example_row(T + 3600 * k)])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6
    assert not [p for p in files if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert all(p.name.startswith("part-") and p.name.endswith(".parquet") for p in files)


def test_unfinished_tmp_file_is_not_read(tmp_path):
    """A leftover temporary file (a crash mid-write) is invisible to files() and read()."""
    log = ParquetLog(tmp_path)
    (path,) = log.write(EVENTS, event_rows(rating()))
    (path.parent / ".part-crashed.parquet.tmp").write_bytes(b"garbage")
    assert log.files(EVENTS) == [path]
    assert log.read(EVENTS)["event_id"].tolist() == ["rat1"]


def test_files_have_the_dataset_schema(tmp_path):
    """Written files carry exactly the dataset's Arrow schema (types included)."""
    log = ParquetLog(tmp_path)
    (ev,) = log.write(EVENTS, event_rows(impression()))
    (ex,) = log.write(EXAMPLES, [example_row(T)])
    assert pq.read_schema(ev).remove_metadata() == EVENTS_SCHEMA
    assert pq.read_schema(ex).remove_metadata() == EXAMPLES_SCHEMA


# -- read -----------------------------------------------------------------------------------------


def test_read_round_trip_is_exact(tmp_path):
    """Floats (ts, propensity, score, value) and ints come back bit-for-bit; nulls stay null."""
    log = ParquetLog(tmp_path)
    ts = 1_700_000_000.123456789
    imp = impression(ts=ts)
    imp["items"][0]["propensity"] = 0.1
    imp["items"][1]["propensity"] = 1 / 3
    imp["items"][0]["score"] = 1e-300
    rows = event_rows(imp, 1, 2**40) + event_rows(rating(ts=ts + 0.1, value=-0.30000000000000004))
    log.write(EVENTS, rows)
    df = log.read(EVENTS)
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


def test_read_since_ts_skips_old_hours_and_rows(tmp_path):
    """since_ts drops whole hours ending at or before it and filters rows inside the boundary hour."""
    log = ParquetLog(tmp_path)
    times = {"h10": utc(2024, 1, 1, 10, 59, 59.0), "h11a": utc(2024, 1, 1, 11, 0),
             "h11b": utc(2024, 1, 1, 11, 20), "h11c": utc(2024, 1, 1, 11, 40), "h12": utc(2024, 1, 1, 12, 5)}
    for eid, ts in times.items():
        log.write(EVENTS, event_rows(rating(ts=ts, event_id=eid)))
    since = utc(2024, 1, 1, 11, 20)
    files = log.files(EVENTS, since_ts=since)
    assert sorted({p.parent.name for p in files}) == ["hour=11", "hour=12"]
    assert len(files) == 4
    df = log.read(EVENTS, since_ts=since)
    assert sorted(df["event_id"]) == ["h11b", "h11c", "h12"]
    # an hour that ends exactly at since_ts is skipped; the one starting there is kept
    assert {p.parent.name for p in log.files(EVENTS, since_ts=utc(2024, 1, 1, 11))} == {"hour=11", "hour=12"}


def test_read_without_since_returns_everything_oldest_hour_first(tmp_path):
    """With no since_ts every row of every hour comes back, hours in time order."""
    log = ParquetLog(tmp_path)
    log.write(EVENTS, event_rows(rating(ts=utc(2024, 1, 2, 9), event_id="later")))
    log.write(EVENTS, event_rows(rating(ts=utc(2024, 1, 1, 23), event_id="earlier")))
    assert log.read(EVENTS)["event_id"].tolist() == ["earlier", "later"]


def test_read_since_ts_with_columns_excluding_ts_still_filters_rows(tmp_path):
    """read(since_ts, columns=[...]) returns only rows with ts >= since_ts even when ts is not a requested column."""
    log = ParquetLog(tmp_path)
    log.write(EXAMPLES, [example_row(T, event_id="old"), example_row(T + 10, event_id="new")])  # same hour
    df = log.read(EXAMPLES, since_ts=T + 5, columns=["event_id", "label"])
    assert list(df.columns) == ["event_id", "label"]
    assert df["event_id"].tolist() == ["new"]


def test_read_columns_subset(tmp_path):
    """columns selects and orders the returned columns."""
    log = ParquetLog(tmp_path)
    log.write(EXAMPLES, [example_row(T, event_id="e1")])
    df = log.read(EXAMPLES, columns=["label", "event_id"])
    assert list(df.columns) == ["label", "event_id"]
    assert df.to_dict("records") == [{"label": 1.0, "event_id": "e1"}]


@pytest.mark.parametrize("dataset, schema", [(EVENTS, EVENTS_SCHEMA), (EXAMPLES, EXAMPLES_SCHEMA)])
def test_empty_read_returns_schema_columns(tmp_path, dataset, schema):
    """Reading a dataset with no files gives an empty frame with exactly the schema's columns."""
    log = ParquetLog(tmp_path / "nothing-here")
    df = log.read(dataset)
    assert len(df) == 0
    assert list(df.columns) == schema.names
    assert log.files(dataset) == []
    df2 = log.read(dataset, since_ts=T, columns=["ts", "user_id"])
    assert list(df2.columns) == ["ts", "user_id"] and len(df2) == 0


def test_since_ts_beyond_all_data_returns_empty_with_columns(tmp_path):
    """A since_ts after every hour yields the empty schema frame, not an error."""
    log = ParquetLog(tmp_path)
    log.write(EXAMPLES, [example_row(T)])
    df = log.read(EXAMPLES, since_ts=T + 7200)
    assert len(df) == 0 and list(df.columns) == EXAMPLES_SCHEMA.names


def test_examples_round_trip_with_null_position(tmp_path):
    """Rating examples (position null) and click examples share the examples dataset."""
    log = ParquetLog(tmp_path)
    rating_ex = dict(example_row(T, item_id="z", label=4.5, event_id="r"), position=None, kind="rating",
                     model_version=None, request_id=None, policy=None, anomalous=True)
    log.write(EXAMPLES, [example_row(T, event_id="c"), rating_ex])
    df = log.read(EXAMPLES).set_index("event_id")
    assert df.loc["c", "position"] == 1 and df.loc["c", "label"] == 1.0
    assert pd.isna(df.loc["r", "position"]) and df.loc["r", "label"] == 4.5
    assert bool(df.loc["r", "anomalous"]) is True and bool(df.loc["c", "anomalous"]) is False
