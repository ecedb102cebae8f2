"""The Open Bandit Pipeline export: OBP columns from the click examples of the log, exact
propensities, click = label > 0, ratings left out, optional policy filter."""
from __future__ import annotations

import csv

import pandas as pd

from stream.log.table import EXAMPLES, DeltaLog
from stream.log.export import OBP_COLUMNS, export_obp, obp_frame

T = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def click_example(request_id, item_id, position, propensity, label, ts, policy="epsilon_greedy",
                  user_id="u1", model_version="m1") -> dict:
    return {"user_id": user_id, "item_id": item_id, "label": label, "position": position,
            "propensity": propensity, "weight": min(1 / propensity, 50.0), "model_version": model_version,
            "request_id": request_id, "ts": ts, "kind": "click", "anomalous": False, "policy": policy,
            "event_id": f"{request_id}-{item_id}"}


def rating_example(ts, item_id="z", value=4.0) -> dict:
    return {"user_id": "u9", "item_id": item_id, "label": value, "position": None, "propensity": 1.0,
            "weight": 1.0, "model_version": None, "request_id": None, "ts": ts, "kind": "rating",
            "anomalous": False, "policy": None, "event_id": f"rating-{ts}"}


def write_log(root) -> None:
    """Two slates (epsilon_greedy, uniform) and two ratings, written out of order, two hours apart."""
    log = DeltaLog(root)
    log.append(EXAMPLES, [
        click_example("r2", "x", 2, 0.2, 0.0, T + 3600.25, policy="uniform", user_id="u2", model_version="m2"),
        click_example("r2", "y", 1, 0.2, 1.0, T + 3600.5, policy="uniform", user_id="u2", model_version="m2"),
        rating_example(T + 3600.0),
    ])
    log.append(EXAMPLES, [
        click_example("r1", "b", 2, 1 / 3, 1.0, T + 5.5),
        click_example("r1", "a", 1, 0.1, 0.0, T),
        click_example("r1", "c", 3, 0.30000000000000004, 0.0, T),
        rating_example(T + 1.0, value=5.0),
    ])


def test_obp_frame_columns_rows_and_values(tmp_path):
    """obp_frame has the OBP columns and one row per click example, in time then slate-position order."""
    write_log(tmp_path)
    df = obp_frame(tmp_path)
    assert list(df.columns) == OBP_COLUMNS
    assert df[["request_id", "item_id", "position", "click"]].values.tolist() == [
        ["r1", "a", 1, 0], ["r1", "c", 3, 0], ["r1", "b", 2, 1], ["r2", "x", 2, 0], ["r2", "y", 1, 1],
    ]
    assert df["propensity_score"].tolist() == [0.1, 0.30000000000000004, 1 / 3, 0.2, 0.2]
    assert df["policy"].tolist() == ["epsilon_greedy"] * 3 + ["uniform"] * 2
    assert df["user_id"].tolist() == ["u1"] * 3 + ["u2"] * 2
    assert df["model_version"].tolist() == ["m1"] * 3 + ["m2"] * 2
    assert df["position"].dtype == "int64" and df["click"].dtype == "int64"
    assert df["timestamp"].tolist()[0] == pd.Timestamp("2023-11-14 22:13:20", tz="UTC")
    assert df["timestamp"].tolist()[2] == pd.Timestamp("2023-11-14 22:13:25.5", tz="UTC")
    assert str(df["timestamp"].dt.tz) == "UTC"


def test_click_is_label_positive(tmp_path):
    """click is 1 exactly for label > 0 (a fractional positive label counts), 0 otherwise."""
    DeltaLog(tmp_path).append(EXAMPLES, [
        click_example("r", "a", 1, 0.5, 0.25, T), click_example("r", "b", 2, 0.5, 0.0, T),
        click_example("r", "c", 3, 0.5, -1.0, T),
    ])
    assert obp_frame(tmp_path)["click"].tolist() == [1, 0, 0]


def test_ratings_are_excluded(tmp_path):
    """Rating examples never appear in the OBP export."""
    write_log(tmp_path)
    df = obp_frame(tmp_path)
    assert "z" not in set(df["item_id"])
    assert len(df) == 5


def test_policy_filter(tmp_path):
    """policy= keeps only the slates logged by that policy; an unknown policy gives no rows."""
    write_log(tmp_path)
    df = obp_frame(tmp_path, policy="uniform")
    assert df["item_id"].tolist() == ["x", "y"]
    assert set(df["policy"]) == {"uniform"}
    assert len(obp_frame(tmp_path, policy="greedy")) == 0


def test_empty_log_gives_empty_frame_with_columns(tmp_path):
    """An empty log exports zero rows with the OBP columns."""
    df = obp_frame(tmp_path)
    assert list(df.columns) == OBP_COLUMNS and len(df) == 0


def test_export_obp_writes_csv_with_exact_propensities(tmp_path):
    """export_obp writes the OBP CSV (creating folders) and its propensities parse back exactly."""
    write_log(tmp_path / "log")
    out = tmp_path / "deep" / "dir" / "obp.csv"
    n = export_obp(tmp_path / "log", out)
    assert n == 5
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == OBP_COLUMNS
    assert [float(r["propensity_score"]) for r in rows] == [0.1, 0.30000000000000004, 1 / 3, 0.2, 0.2]
    assert [r["click"] for r in rows] == ["0", "0", "1", "0", "1"]
    assert [r["position"] for r in rows] == ["1", "3", "2", "2", "1"]
    assert [r["item_id"] for r in rows] == ["a", "c", "b", "x", "y"]
    assert pd.Timestamp(rows[2]["timestamp"]) == pd.Timestamp("2023-11-14 22:13:25.5", tz="UTC")


def test_export_obp_policy_filter_and_count(tmp_path):
    """export_obp with a policy writes and counts only that policy's rows."""
    write_log(tmp_path / "log")
    out = tmp_path / "eg.csv"
    assert export_obp(tmp_path / "log", out, policy="epsilon_greedy") == 3
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["policy"] for r in rows} == {"epsilon_greedy"}
    assert len(rows) == 3


def test_export_obp_empty_log_writes_header_only(tmp_path):
    """With nothing logged the CSV holds just the header and the count is 0."""
    out = tmp_path / "empty.csv"
    assert export_obp(tmp_path / "log", out) == 0
    assert out.read_text().splitlines() == [",".join(OBP_COLUMNS)]


def test_under_immediate_feedback_a_clicked_item_is_one_row_with_its_slate_time(tmp_path):
    """The immediate protocol logs every shown item as ``shown`` (label 0) and a click once more
    as ``clicked``: the export has one row per shown item, clicked if either row is a click."""
    DeltaLog(tmp_path).append(EXAMPLES, [
        click_example("r", "a", 1, 0.5, 0.0, T), click_example("r", "b", 2, 0.25, 0.0, T),
        {**click_example("r", "b", 2, 0.25, 1.0, T + 7.0), "event_id": "click-b"},
    ])
    df = obp_frame(tmp_path)
    assert df[["item_id", "position", "click"]].values.tolist() == [["a", 1, 0], ["b", 2, 1]]
    assert df["timestamp"].tolist() == [pd.Timestamp(T, unit="s", tz="UTC")] * 2
