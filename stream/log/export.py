"""Exports the logged impressions in the Open Bandit Pipeline's layout for off-policy evaluation.

The OBP reads one row per shown item: ``timestamp, item_id, position, click, propensity_score``
(the same columns as the Open Bandit Dataset CSVs), to which we add the ids that trace each row
back to its slate (``user_id``, ``request_id``, ``model_version``, ``policy``). The rows come from
the ``examples`` table of the log (a local folder or an object-store URL), where every shown item carries its click label once its
attribution window has closed.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stream.log.table import EXAMPLES, DeltaLog

OBP_COLUMNS = ["timestamp", "item_id", "position", "click", "propensity_score",
               "user_id", "request_id", "model_version", "policy"]


def obp_frame(log_dir: str | Path, policy: str | None = None, storage_options: dict[str, str] | None = None) -> pd.DataFrame:
    """The logged click examples as an OBP-layout DataFrame, in time order."""
    df = DeltaLog(log_dir, storage_options).read(EXAMPLES)
    df = df[df["kind"] == "click"]
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
