"""Exports the logged impressions in the Open Bandit Pipeline's layout for off-policy evaluation.

The OBP reads one row per shown item: ``timestamp, item_id, position, click, propensity_score``
(the same columns as the Open Bandit Dataset CSVs), to which we add the ids that trace each row
back to its slate (``user_id``, ``request_id``, ``model_version``, ``policy``). The rows come from
the ``examples`` table of the log (a local folder or an object-store URL), one per outcome
message's item: under the worker's ``wait`` protocol a shown item appears once (``clicked`` or
``closed``), under ``immediate`` once as ``shown`` and once more if it was clicked.
``final_click_labels`` reads either as one row per shown item with its final label.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stream.log.table import EXAMPLES, DeltaLog

OBP_COLUMNS = ["timestamp", "item_id", "position", "click", "propensity_score",
               "user_id", "request_id", "model_version", "policy"]


def final_click_labels(examples: pd.DataFrame) -> pd.DataFrame:
    """The click rows of an ``examples`` table, one per shown item (``request_id``, ``item_id``):
    its final label (1 if any of its rows is a click) and its earliest ``ts`` (the slate's, under
    ``immediate``; a clicked item's click time under ``wait``), the other columns of its first row."""
    clicks = examples[examples["kind"] == "click"]
    key = ["request_id", "item_id"]
    grouped = clicks.groupby(key, sort=False, dropna=False)
    final = clicks.assign(label=grouped["label"].transform("max"), ts=grouped["ts"].transform("min"))
    return final.drop_duplicates(key)


def obp_frame(log_dir: str | Path, policy: str | None = None, storage_options: dict[str, str] | None = None) -> pd.DataFrame:
    """The logged click outcomes as an OBP-layout DataFrame, one row per shown item, in time order."""
    df = final_click_labels(DeltaLog(log_dir, storage_options).read(EXAMPLES))
    if policy is not None:
        df = df[df["policy"] == policy]
    out = pd.DataFrame({
        "timestamp": pd.to_datetime(df["ts"], unit="s", utc=True),
        "item_id": df["item_id"],
        "position": df["position"].astype("int64"),
        "click": (df["label"] > 0).astype("int64"),
        "propensity_score": df["propensity"],
        "user_id": df["user_id"],
        "request_id": df["request_id"],
        "model_version": df["model_version"],
        "policy": df["policy"],
    })
    return out.sort_values(["timestamp", "request_id", "position"], kind="stable").reset_index(drop=True)


def export_obp(log_dir: str | Path, out: Path, policy: str | None = None,
               storage_options: dict[str, str] | None = None) -> int:
    """Write the OBP-layout CSV to ``out``; return the number of rows."""
    frame = obp_frame(log_dir, policy, storage_options)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.17g")
    return len(frame)
